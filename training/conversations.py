"""LLM-generated conversations (RadVLM "conversations" and "grounded conversations" tasks).

For each image's de-identified facts (:mod:`training.conversation_prompt`) an OpenAI-compatible
chat-completions endpoint (OpenAI, Azure-compatible gateways, vLLM, SGLang, llama.cpp …) writes a
5–10 round Q&A as JSON. Answers are validated (JSON list, human/gpt alternation, round count,
coordinates in [0, 1]); malformed ones are asked again, transient HTTP errors (429, 5xx,
connection errors) are retried with backoff (honouring ``Retry-After``), and requests are spaced
to a configured rate. Every valid answer is cached under the SHA-256 of (prompt version, model,
prompt), and the output JSONL is appended and fsynced record by record, so a killed run resumes
where it stopped and a re-run costs no requests. Output records are LLaVA-style training records
(``id``, ``image``, ``conversations`` with ``<image>`` on the first question).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from inference.durable import durable_write
from training.conversation_prompt import PROMPT_VERSION, ConversationInput, ConversationPrompts, build_prompt

log = logging.getLogger(__name__)

_NUMBER_IN_BRACKETS = re.compile(r"\[\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\]")


class ConversationError(RuntimeError):
    """Base class of the generator's errors."""


class MalformedAnswerError(ConversationError):
    """The model's answer is not a valid conversation (retried)."""


class TransientAPIError(ConversationError):
    """Rate limited, server error or connection failure (retried with backoff)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class APIError(ConversationError):
    """A non-retryable endpoint error (bad key, unknown model, bad request)."""


class InputFileError(ConversationError):
    """The input JSONL cannot be read or a record is invalid."""


class EndpointSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str  # base URL of the API, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    model: str
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this environment variable, never from files
    timeout_s: float = Field(default=120.0, gt=0)
    temperature: float = Field(default=0.7, ge=0, le=2)
    max_tokens: int = Field(default=2048, ge=64)
    requests_per_minute: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=4, ge=1)  # per image, malformed answers and transient errors together
    backoff_s: float = Field(default=2.0, ge=0)  # first wait after a transient error; doubles each time


class PromptFiles(BaseModel):
    """Instruction files (default: the shipped ``training/prompts/conversation_*.txt``)."""

    model_config = ConfigDict(extra="forbid")

    standard: Path | None = None
    grounded: Path | None = None


class ConversationJobConfig(BaseModel):
    """The `radvlm generate-conversations` job file."""

    model_config = ConfigDict(extra="forbid")

    input: Path | None = None  # JSONL of ConversationInput records, or:
    dataset_config: Path | None = None  # the build-dataset job file: facts read from its sources
    split: Literal["train", "test"] = "train"  # with dataset_config
    fact_sources: list[Literal["mimic_cxr", "ms_cxr", "padchest_gr"]] = ["mimic_cxr", "ms_cxr", "padchest_gr"]
    prompts: PromptFiles = PromptFiles()
    output: Path  # JSONL of LLaVA-style records (appended; resumable)
    cache_dir: Path | None = None  # default: <output>.cache/
    endpoint: EndpointSettings
    min_rounds: int = Field(default=5, ge=1)
    max_rounds: int = Field(default=10, ge=1)
    limit: int | None = Field(default=None, ge=1)  # stop after this many new records

    @model_validator(mode="after")
    def _one_input(self) -> "ConversationJobConfig":
        if (self.input is None) == (self.dataset_config is None):
            raise ValueError("give exactly one of input (facts JSONL) and dataset_config (build-dataset job file)")
        return self

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir or self.output.with_name(self.output.name + ".cache")


@dataclass
class GenerationSummary:
    written: int = 0
    from_cache: int = 0
    already_done: int = 0
    failed: int = 0
    requests: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (record id, last reason)


class RateLimiter:
    """Spaces calls at least ``60 / requests_per_minute`` seconds apart."""

    def __init__(self, requests_per_minute: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.interval = 60.0 / requests_per_minute
        self._clock, self._sleep = clock, sleep
        self._next = 0.0

    def wait(self) -> None:
        now = self._clock()
        if now < self._next:
            self._sleep(self._next - now)
            now = self._next
        self._next = now + self.interval


class ChatCompletionsClient:
    """Minimal client of ``POST {url}/chat/completions`` (OpenAI wire format), standard library only."""

    def __init__(self, settings: EndpointSettings, api_key: str | None):
        self.settings = settings
        self.api_key = api_key

    def complete(self, prompt: str) -> str:
        body = json.dumps({"model": self.settings.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": self.settings.temperature,
                           "max_tokens": self.settings.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.settings.url.rstrip("/") + "/chat/completions", data=body,
                                         headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            if exc.code == 429 or exc.code >= 500:
                retry_after = exc.headers.get("Retry-After")
                raise TransientAPIError(f"HTTP {exc.code}: {detail}",
                                        float(retry_after) if retry_after and retry_after.isdigit() else None)
            raise APIError(f"HTTP {exc.code} from {self.settings.url}: {detail}") from exc
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise TransientAPIError(f"cannot reach {self.settings.url}: {exc}") from exc
        except ValueError as exc:
            raise MalformedAnswerError(f"the endpoint returned non-JSON: {exc}") from exc
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise MalformedAnswerError(f"no choices[0].message.content in the response: {exc!r}") from exc
        if not isinstance(content, str):
            raise MalformedAnswerError("choices[0].message.content is not text")
        return content


def parse_conversation(text: str, *, min_rounds: int = 5, max_rounds: int = 10) -> list[dict[str, str]]:
    """The JSON Q&A list inside ``text`` (code fences and chatter around it tolerated), validated."""
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end < start:
        raise MalformedAnswerError("no JSON list in the answer")
    try:
        turns = json.loads(text[start:end + 1])
    except json.JSONDecodeError as exc:
        raise MalformedAnswerError(f"invalid JSON: {exc}") from exc
    if not isinstance(turns, list) or not turns or len(turns) % 2:
        raise MalformedAnswerError("the answer is not a list of question/answer pairs")
    cleaned = []
    for index, turn in enumerate(turns):
        expected = "human" if index % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected:
            raise MalformedAnswerError(f"turn {index} is not from {expected!r}")
        value = turn.get("value")
        if not isinstance(value, str) or not value.strip():
            raise MalformedAnswerError(f"turn {index} has no text")
        cleaned.append({"from": expected, "value": value.strip()})
    rounds = len(cleaned) // 2
    if not min_rounds <= rounds <= max_rounds:
        raise MalformedAnswerError(f"{rounds} rounds, expected {min_rounds}-{max_rounds}")
    for turn in cleaned:
        for match in _NUMBER_IN_BRACKETS.finditer(turn["value"]):
            values = [float(v) for v in match.groups()]
            if not all(0.0 <= v <= 1.0 for v in values) or values[0] >= values[2] or values[1] >= values[3]:
                raise MalformedAnswerError(f"coordinates {match.group(0)} are not a normalised box")
    return cleaned


def to_training_record(item: ConversationInput, turns: list[dict[str, str]]) -> dict:
    """The LLaVA-style record: the image marker on the first question, as the dataset builder writes."""
    conversations = [dict(turn) for turn in turns]
    conversations[0]["value"] = "<image>\n" + conversations[0]["value"]
    task = "grounded_conversation" if item.grounded else "conversation"
    return {"id": f"{item.id}-{task}", "image": item.image, "task": task, "conversations": conversations}


def cache_key(model: str, prompt: str) -> str:
    return hashlib.sha256(f"{PROMPT_VERSION}\0{model}\0{prompt}".encode()).hexdigest()


class AnswerCache:
    """Valid raw answers on disk, one file per key (written atomically)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        path = self._path(key)
        try:
            return json.loads(path.read_text(encoding="utf-8"))["answer"]
        except FileNotFoundError:
            return None
        except (ValueError, KeyError):
            log.warning("ignoring unreadable cache entry %s", path)
            return None

    def put(self, key: str, answer: str) -> None:
        durable_write(self._path(key), json.dumps({"answer": answer}).encode("utf-8"), mode=0o600)


def read_inputs(path: Path) -> Iterator[ConversationInput]:
    try:
        handle = Path(path).open(encoding="utf-8")
    except OSError as exc:
        raise InputFileError(f"cannot read conversation input {path}: {exc}") from exc
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield ConversationInput.model_validate_json(line)
            except ValidationError as exc:
                raise InputFileError(f"{path}:{number}: {exc}") from exc


def job_inputs(cfg: ConversationJobConfig) -> Iterator[ConversationInput]:
    """The facts of the job: the input JSONL, or the sources of the build-dataset job file."""
    if cfg.input is not None:
        yield from read_inputs(cfg.input)
        return
    from training.conversation_facts import conversation_inputs, load_build_config
    from training.sources.errors import SourceError

    try:
        yield from conversation_inputs(load_build_config(cfg.dataset_config), cfg.split, cfg.fact_sources)
    except (SourceError, ValidationError) as exc:
        raise InputFileError(f"facts from {cfg.dataset_config}: {exc}") from exc


def _done_ids(output: Path) -> set[str]:
    if not output.is_file():
        return set()
    done = set()
    with output.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                done.add(json.loads(line)["id"])
            except (ValueError, KeyError):
                continue  # a line cut by a crash: its record is generated again
    return done


class ConversationGenerator:
    """Prompt → validated answer, through the cache, the rate limiter and the retry policy."""

    def __init__(self, cfg: ConversationJobConfig, client: ChatCompletionsClient | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.cfg = cfg
        api_key = os.environ.get(cfg.endpoint.api_key_env)
        if not api_key:
            log.warning("environment variable %s is not set: calling %s without a key",
                        cfg.endpoint.api_key_env, cfg.endpoint.url)
        self.client = client or ChatCompletionsClient(cfg.endpoint, api_key)
        self.prompts = ConversationPrompts.load(cfg.prompts.standard, cfg.prompts.grounded)
        self.cache = AnswerCache(cfg.resolved_cache_dir)
        self.limiter = RateLimiter(cfg.endpoint.requests_per_minute, sleep=sleep)
        self._sleep = sleep

    def conversation(self, item: ConversationInput, summary: GenerationSummary) -> list[dict[str, str]] | None:
        prompt = build_prompt(item, min_rounds=self.cfg.min_rounds, max_rounds=self.cfg.max_rounds,
                              prompts=self.prompts)
        key = cache_key(self.cfg.endpoint.model, prompt)
        cached = self.cache.get(key)
        if cached is not None:
            try:
                turns = parse_conversation(cached, min_rounds=self.cfg.min_rounds, max_rounds=self.cfg.max_rounds)
                summary.from_cache += 1
                return turns
            except MalformedAnswerError:
                log.warning("cached answer for %s no longer validates; asking again", item.id)
        backoff = self.cfg.endpoint.backoff_s
        reason = "no attempt"
        for attempt in range(1, self.cfg.endpoint.max_attempts + 1):
            self.limiter.wait()
            summary.requests += 1
            try:
                answer = self.client.complete(prompt)
                turns = parse_conversation(answer, min_rounds=self.cfg.min_rounds, max_rounds=self.cfg.max_rounds)
            except MalformedAnswerError as exc:
                reason = f"malformed answer: {exc}"
                log.info("%s attempt %d: %s", item.id, attempt, reason)
                continue
            except TransientAPIError as exc:
                reason = f"transient error: {exc}"
                wait = exc.retry_after if exc.retry_after is not None else backoff
                log.info("%s attempt %d: %s; waiting %.1fs", item.id, attempt, reason, wait)
                self._sleep(wait)
                backoff *= 2
                continue
            self.cache.put(key, answer)
            return turns
        summary.failed += 1
        summary.failures.append((item.id, reason))
        log.warning("%s: no valid conversation after %d attempts (%s)", item.id,
                    self.cfg.endpoint.max_attempts, reason)
        return None


def generate_conversations(cfg: ConversationJobConfig, *, client: ChatCompletionsClient | None = None,
                           sleep: Callable[[float], None] = time.sleep,
                           progress: Callable[[GenerationSummary], None] | None = None) -> GenerationSummary:
    """Run the job; APIError (bad key, unknown model …) stops it, everything else is per record."""
    if cfg.min_rounds > cfg.max_rounds:
        raise InputFileError(f"min_rounds {cfg.min_rounds} > max_rounds {cfg.max_rounds}")
    generator = ConversationGenerator(cfg, client, sleep)
    summary = GenerationSummary()
    done = _done_ids(cfg.output)
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    with cfg.output.open("a", encoding="utf-8") as out:
        for item in job_inputs(cfg):
            if cfg.limit is not None and summary.written >= cfg.limit:
                break
            record_id = to_training_record(item, [{"from": "human", "value": ""}])["id"]
            if record_id in done:
                summary.already_done += 1
                continue
            turns = generator.conversation(item, summary)
            if turns is not None:
                out.write(json.dumps(to_training_record(item, turns), ensure_ascii=False) + "\n")
                out.flush()
                os.fsync(out.fileno())
                done.add(record_id)
                summary.written += 1
            if progress:
                progress(summary)
    return summary
