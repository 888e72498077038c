"""Report targets cleaned of references to prior studies (the paper's GPT-4o filtering step).

The paper removes mentions of prior studies from the MIMIC-CXR and CheXpert-Plus report targets
(train and test) with an LLM; upstream's ``radvlm/data/llm_filter_reports.py`` writes one text
file per study into ``<dataset>/filtered_reports/`` — ``{study_id}.txt`` for MIMIC-CXR,
``{first three parts of path_to_image joined by _}.txt`` for CheXpert-Plus — which the dataset
builder reads with ``report_source = "filtered_reports"``. Here any OpenAI-compatible
``/chat/completions`` endpoint (a local vLLM / llama.cpp / SGLang server, or a hosted one) does
the editing, with the instructions of a replaceable file (``training/prompts/filter_reports.txt``,
our own wording of the paper's rule; ``$REPORT`` is the report text).

Per report, one of:

- ``filtered``: the edited text is written;
- ``removed``: the model answered ``None`` (nothing left once prior studies are removed):
  no file is written, so the builder leaves the image out, as upstream does;
- ``original_kept``: the request failed (timeout, unreachable, server error after the retries),
  the model refused, answered nothing, or answered with more text than the report holds
  (it added content): the ORIGINAL text is written and the reason recorded.

The run is resumable: a report whose file exists, or that is logged ``removed``, is not asked
again (``retry_failed`` asks the ``original_kept`` ones again). Every decision is appended to
``filtered_reports/filter_log.jsonl`` and ``filtered_reports/filter_run.json`` records the model,
endpoint and prompt (path, SHA-256 and text) of each run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from inference.durable import durable_write
from training.conversations import (APIError, ChatCompletionsClient, EndpointSettings, MalformedAnswerError,
                                    TransientAPIError)
from training.instructions.config import BuildConfig
from training.prompts import PromptText, load_prompt
from training.sources import chexpert_plus
from training.sources.mimic_cxr import MimicCxr
from training.sources.tables import find_table, read_csv, text_cell

log = logging.getLogger(__name__)

FOLDER = "filtered_reports"
LOG_FILE = "filter_log.jsonl"
RUN_FILE = "filter_run.json"
SOURCES = ("mimic_cxr", "chexpert_plus")
Status = Literal["filtered", "removed", "original_kept"]

_REFUSAL = re.compile(r"^\W*(i'?m sorry|i am sorry|sorry\b|i can(?:no|')t\b|i cannot\b|i am unable|i'm unable|"
                      r"as an ai\b|i won'?t\b)", re.IGNORECASE)
_NONE = re.compile(r"^\W*none\W*$", re.IGNORECASE)
MAX_GROWTH = 1.2   # an answer longer than this × the report (+ 40 characters) added content


class FilterError(RuntimeError):
    """The job cannot run (no source configured, bad source, endpoint refuses the key …)."""


@dataclass(frozen=True)
class ReportItem:
    source: str      # mimic_cxr | chexpert_plus
    key: str         # file stem in filtered_reports/
    text: str        # the unfiltered report target
    folder: Path     # <dataset root>/filtered_reports

    @property
    def path(self) -> Path:
        return self.folder / f"{self.key}.txt"


@dataclass(frozen=True)
class Decision:
    status: Status
    text: str | None   # what is written (None: nothing)
    reason: str = ""


@dataclass
class FilterSummary:
    counts: Counter = field(default_factory=Counter)   # status → n, plus "already_done"
    requests: int = 0
    reasons: Counter = field(default_factory=Counter)  # why originals were kept


# ------------------------------------------------------------------------------ the report items
def mimic_items(root: Path, splits: Sequence[str], *, reports_root: Path | None = None,
                report_source: str = "report_files") -> list[ReportItem]:
    """One item per study of the frontal images of ``splits`` (upstream filters
    ``MIMIC_Dataset_MM(only_frontal=True)``): the findings-else-impression-else-last-paragraph text
    from the raw report files (or ``reports.csv`` with ``report_source="reports_csv"``)."""
    if report_source == "filtered_reports":
        report_source = "report_files"
    mimic = MimicCxr(root, reports_root=reports_root, report_source=report_source,  # type: ignore[arg-type]
                     check_images=False)
    items: dict[int, ReportItem] = {}
    for split in splits:
        for image in mimic.images(split):  # type: ignore[arg-type]
            if image.study_id in items:
                continue
            text = mimic.report_text(image)
            if text:
                items[image.study_id] = ReportItem("mimic_cxr", str(image.study_id), text, Path(root) / FOLDER)
    return list(items.values())


def chexpert_plus_items(root: Path, splits: Sequence[str]) -> list[ReportItem]:
    """One item per study (upstream's file name) of the frontal rows of ``splits`` (train → CSV
    split "train", test → "valid"): findings, else impression."""
    path = find_table(root, chexpert_plus.REPORTS_CSV, "CheXpert-Plus report table")
    wanted = {{"train": "train", "test": "valid"}[split] for split in splits if split in ("train", "test")}
    items: dict[str, ReportItem] = {}
    for line, row in read_csv(path, ("path_to_image", "frontal_lateral", "split", *chexpert_plus.SECTION_COLUMNS)):
        if row["split"].strip() not in wanted or row["frontal_lateral"].strip() != "Frontal":
            continue
        key = chexpert_plus.filtered_report_name(text_cell(path, line, row, "path_to_image"))[:-len(".txt")]
        text = chexpert_plus.section_text(row)
        if text and key not in items:
            items[key] = ReportItem("chexpert_plus", key, text, Path(root) / FOLDER)
    return list(items.values())


def items_from_config(config: BuildConfig, sources: Sequence[str] = SOURCES,
                      splits: Sequence[str] = ("train", "test")) -> list[ReportItem]:
    """The report items of the ``[sources.mimic_cxr]`` / ``[sources.chexpert_plus]`` tables of a
    ``build-dataset`` job file (paths already resolved)."""
    items: list[ReportItem] = []
    for name in sources:
        if name not in SOURCES:
            raise FilterError(f"unknown source {name!r}; filter-reports handles {', '.join(SOURCES)}")
        source = getattr(config.sources, name)
        if source is None:
            continue
        if name == "mimic_cxr":
            items += mimic_items(source.root, splits, reports_root=source.reports_root,
                                 report_source=source.report_source)
        else:
            items += chexpert_plus_items(source.root, splits)
    if not items and not any(getattr(config.sources, name) is not None for name in sources):
        raise FilterError("the job file configures neither [sources.mimic_cxr] nor [sources.chexpert_plus]")
    return items


# -------------------------------------------------------------------------------------- deciding
def decide(original: str, answer: str) -> Decision:
    """What to write for the model's ``answer`` to the report ``original``."""
    text = answer.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("text").strip()
    if not text:
        return Decision("original_kept", original, "empty answer")
    if _NONE.match(text):
        return Decision("removed", None, "nothing left once prior studies are removed")
    if _REFUSAL.match(text):
        return Decision("original_kept", original, "refusal: " + " ".join(text.split())[:120])
    if len(text) > MAX_GROWTH * len(original) + 40:
        return Decision("original_kept", original, f"answer longer than the report ({len(text)} > {len(original)} "
                                                   "characters): content added")
    return Decision("filtered", text)


class ReportFilter:
    """Sends one report at a time with the prompt; retries transient errors with backoff."""

    def __init__(self, endpoint: EndpointSettings, prompt: PromptText,
                 client: ChatCompletionsClient | None = None, sleep: Callable[[float], None] = time.sleep):
        self.endpoint = endpoint
        self.prompt = prompt
        api_key = os.environ.get(endpoint.api_key_env)
        self.client = client or ChatCompletionsClient(endpoint, api_key)
        self._sleep = sleep

    def __call__(self, item: ReportItem, summary: FilterSummary) -> Decision:
        backoff = self.endpoint.backoff_s
        reason = "no attempt"
        for attempt in range(1, self.endpoint.max_attempts + 1):
            summary.requests += 1
            try:
                answer = self.client.complete(self.prompt.fill(REPORT=item.text))
            except TransientAPIError as exc:
                reason = f"request failed: {exc}"
            except MalformedAnswerError as exc:
                reason = f"unreadable response: {exc}"
            else:
                return decide(item.text, answer)
            if attempt < self.endpoint.max_attempts:
                self._sleep(backoff)
                backoff *= 2
        return Decision("original_kept", item.text, reason)


# ---------------------------------------------------------------------------------------- the run
def _logged(folder: Path) -> dict[str, str]:
    """key → last logged status (a line cut by a crash is ignored)."""
    path = folder / LOG_FILE
    statuses: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                statuses[entry["key"]] = entry["status"]
            except (ValueError, KeyError, TypeError):
                continue
    return statuses


def _append(path: Path, entry: dict) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _record_run(folder: Path, endpoint: EndpointSettings, prompt: PromptText, started: str) -> None:
    path = folder / RUN_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        record = {}
    runs = record.get("runs", []) if isinstance(record, dict) else []
    runs.append({"started": started, "model": endpoint.model, "url": endpoint.url,
                 "temperature": endpoint.temperature, **prompt.record})
    record = {"model": endpoint.model, "prompt_sha256": prompt.sha256, "prompt_path": str(prompt.path),
              "prompt_text": prompt.text, "runs": runs}
    durable_write(path, (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode("utf-8"), mode=0o644)


def filter_reports(items: Iterable[ReportItem], endpoint: EndpointSettings, *, prompt: PromptText | None = None,
                   retry_failed: bool = False, limit: int | None = None, progress: bool = True,
                   client: ChatCompletionsClient | None = None,
                   sleep: Callable[[float], None] = time.sleep) -> FilterSummary:
    """Filter every item not done yet; APIError (bad key, unknown model) stops the run."""
    from tqdm import tqdm

    prompt = prompt or load_prompt("filter_reports", required=("REPORT",))
    items = list(items)
    run = ReportFilter(endpoint, prompt, client, sleep)
    summary = FilterSummary()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    logged: dict[Path, dict[str, str]] = {}
    for folder in sorted({item.folder for item in items}):
        folder.mkdir(parents=True, exist_ok=True)
        _record_run(folder, endpoint, prompt, started)
        logged[folder] = _logged(folder)
    asked = 0
    with tqdm(items, unit="report", desc="filtering reports", disable=not progress) as bar:
        for item in bar:
            status = logged[item.folder].get(item.key)
            done = status == "removed" or (item.path.is_file() and not (retry_failed and status == "original_kept"))
            if done:
                summary.counts["already_done"] += 1
                continue
            if limit is not None and asked >= limit:
                break
            asked += 1
            decision = run(item, summary)
            if decision.text is not None:
                durable_write(item.path, decision.text.encode("utf-8"), mode=0o644)
            elif item.path.is_file():
                item.path.unlink()
            _append(item.folder / LOG_FILE, {"key": item.key, "source": item.source, "status": decision.status,
                                             "reason": decision.reason, "model": endpoint.model,
                                             "prompt_sha256": prompt.sha256, "at": started})
            summary.counts[decision.status] += 1
            if decision.status == "original_kept":
                summary.reasons[decision.reason.split(":")[0]] += 1
            bar.set_postfix(filtered=summary.counts["filtered"], kept=summary.counts["original_kept"],
                            removed=summary.counts["removed"])
    return summary


def iter_log(folder: Path) -> Iterator[dict]:
    """The decisions logged in ``folder/filter_log.jsonl``."""
    path = Path(folder) / LOG_FILE
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                yield json.loads(line)
            except ValueError:
                continue


__all__ = ["APIError", "Decision", "FilterError", "FilterSummary", "ReportItem", "chexpert_plus_items",
           "decide", "filter_reports", "items_from_config", "iter_log", "mimic_items"]
