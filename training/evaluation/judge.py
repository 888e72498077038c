"""Conversation evaluation by an LLM judge, over any OpenAI-compatible ``/chat/completions``
endpoint.

The instructions come from a replaceable text file (``training/prompts/judge.txt`` by default,
``--judge-prompt FILE`` to use another): the shipped text is our own wording of the rules of the
paper's appendix judge prompt (concise step-by-step reasoning per round, leniency for small
deviations, one integer score ending the reply as ``Overall score: <score>/10``); it is not
upstream's text. ``$DATA`` in the file is replaced by the reference data in upstream's layout
(``evaluate_conversations.py``): labels, report, view, gender, grounded sentences for grounded
conversations, then every round as "User: … / Expected answer: … / Generated answer: …". Only
text crosses the boundary: no image, no identifiers.

A conversation record carries ``conversation`` (LLaVA turns ``{"from": "human"|"gpt", "value"}``,
the expected answers), ``output`` (the model's answers, one per gpt turn) and optionally
``labels``, ``txt``, ``view``, ``gender``, ``sentencesBBox``.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.prompts import PromptText, load_prompt

JUDGE_PROMPT = "judge"
"""Name of the shipped judge prompt (``training/prompts/judge.txt``)."""


def judge_prompt(path: Path | str | None = None) -> PromptText:
    """The judge instructions: the shipped file, or ``path``; must hold ``$DATA``."""
    return load_prompt(JUDGE_PROMPT, path, required=("DATA",))


_SCORE = re.compile(
    r"overall\s+score\s*\**\s*(?:[:=\-\u2013]|is)\s*\**\s*(\d+(?:\.\d+)?)\s*\**"
    r"(?:\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?))?", re.IGNORECASE)


class JudgeError(RuntimeError):
    """The judge endpoint could not be reached or answered in an unexpected shape."""


def parse_overall_score(text: str) -> float | None:
    """The score in a judge answer: the LAST "Overall score: N" (case-insensitive; markdown
    asterisks, ":", "=", "-" or "is", "N/10" and "N out of 10" tolerated; upstream's regex is ``Overall score:\\s*([\\d\\.]+)``
    on the first match). Invalid → None: no such line, a placeholder ("<score>"), a denominator
    other than 10, or a value outside [0, 10]."""
    matches = list(_SCORE.finditer(text))
    if not matches:
        return None
    value_text, denominator = matches[-1].group(1), matches[-1].group(2)
    if denominator is not None and float(denominator) != 10.0:
        return None
    value = float(value_text)
    return value if 0.0 <= value <= 10.0 else None


def format_grounded_sentences(sentences_boxes) -> str | None:
    """Grounded observations as lines "sentence: [x1, y1, x2, y2], …" (boxes with 2 decimals).
    Accepts a ready string, a dict sentence → boxes, or a list of {"sentence", "boxes"} or
    (sentence, boxes) pairs. (Upstream formats them with ``process_sbb``, whose source we could
    not read; this is our rendering of the same data.)"""
    if sentences_boxes is None:
        return None
    if isinstance(sentences_boxes, str):
        return sentences_boxes or None
    items = sentences_boxes.items() if isinstance(sentences_boxes, Mapping) else (
        (item["sentence"], item["boxes"]) if isinstance(item, Mapping) else item for item in sentences_boxes)
    lines = [f"{sentence}: " + ", ".join("[" + ", ".join(f"{float(v):.2f}" for v in box) + "]" for box in boxes)
             for sentence, boxes in items]
    return "\n".join(lines) or None


def build_judge_prompt(record: Mapping, prompt: PromptText | None = None) -> str:
    """The full judge prompt for one conversation record: the instructions (``prompt``, default
    the shipped ``judge.txt``) with ``$DATA`` replaced by the data in upstream's order."""
    conversation = record["conversation"]
    answers = list(record["output"])
    expected_turns = [turn for turn in conversation if turn["from"] != "human"]
    if len(answers) != len(expected_turns):
        raise ValueError(f"record {record.get('id')!r}: {len(answers)} generated answers for "
                         f"{len(expected_turns)} expected answers")
    prompt_text = prompt or judge_prompt()
    prompt = "List of Abnormalities: " + ", ".join(record.get("labels") or []) + "\n"
    prompt += "Radiology report: " + str(record.get("txt") or "") + "\n"
    prompt += "View: " + str(record.get("view")) + "\n"
    prompt += "Gender: " + str(record.get("gender")) + "\n"
    grounded = format_grounded_sentences(record.get("sentencesBBox"))
    if grounded is not None:
        prompt += "Selected observations with bounding boxes coordinates\n" + grounded + "\n"
    prompt += "Here is the conversation to evaluate: \n\n"
    generated = iter(answers)
    for turn in conversation:
        if turn["from"] == "human":
            prompt += "User: " + turn["value"].replace("<image>\n", "").replace("<image>", "").strip() + "\n"
        else:
            prompt += "Expected answer: " + turn["value"] + "\n"
            prompt += "Generated answer: " + str(next(generated)) + "\n\n"
    return prompt_text.fill(DATA=prompt)


@dataclass
class JudgeClient:
    """A minimal OpenAI-compatible chat client (stdlib HTTP): POST ``{base_url}/chat/completions``
    with one user message, temperature 0; retries transport errors and 5xx/429 with backoff."""

    base_url: str
    model: str
    api_key: str | None = field(default_factory=lambda: os.environ.get("RADVLM_JUDGE_API_KEY"))
    timeout_s: float = 120.0
    retries: int = 3
    backoff_s: float = 2.0
    max_tokens: int = 1024
    prompt_path: Path | None = None   # judge instructions file (None: the shipped judge.txt)

    def complete(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = json.loads(response.read())
                return payload["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as exc:
                last = exc
                if exc.code != 429 and exc.code < 500:
                    raise JudgeError(f"judge endpoint {url} refused the request: HTTP {exc.code}") from exc
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = exc
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                raise JudgeError(f"judge endpoint {url} answered in an unexpected shape: {exc}") from exc
            if attempt < self.retries:
                time.sleep(self.backoff_s * (2 ** attempt))
        raise JudgeError(f"judge endpoint {url} unreachable after {self.retries + 1} tries: {last}")


def judge_conversations(records: Iterable[Mapping], client: JudgeClient | None,
                        prompt: PromptText | None = None) -> dict:
    """Judge score of conversations: each record's prompt (``build_judge_prompt``) sent to the
    judge, score parsed with ``parse_overall_score``. ``judge_score`` = mean of the valid scores
    (upstream also averages only the parsed ones), ``n_invalid`` = answers with no valid score,
    ``n_failed`` = requests that failed; ``judge_score`` is ``not computed: …`` when no judge is
    configured or no score was valid."""
    records = list(records)
    if client is None:
        return {"n_samples": len(records), "judge_score": "not computed: judge endpoint not configured "
                "(--judge-url, --judge-model)", "n_invalid": None, "n_failed": None, "scores": []}
    prompt = prompt or judge_prompt(client.prompt_path)
    scores: list[float | None] = []
    raw: list[str] = []
    failed = 0
    for record in records:
        try:
            answer = client.complete(build_judge_prompt(record, prompt))
        except JudgeError as exc:
            failed += 1
            scores.append(None)
            raw.append(f"error: {exc}")
            continue
        raw.append(answer)
        scores.append(parse_overall_score(answer))
    valid = [score for score in scores if score is not None]
    return {
        "n_samples": len(records),
        "judge_score": float(np.mean(valid)) if valid else "not computed: no valid judge score",
        "n_valid": len(valid), "n_invalid": len(scores) - len(valid) - failed, "n_failed": failed,
        "scores": scores, "judge_answers": raw, "judge_model": client.model, **prompt.record,
    }

