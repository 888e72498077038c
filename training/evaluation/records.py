"""Test-split records: task names, reading a LLaVA-style test JSON, references, predictions files.

A test split is a JSON list (or JSONL) of LLaVA-style records, as the dataset builder writes them::

    {"id": "...", "image": "images/0001.dcm",
     "conversations": [{"from": "human", "value": "<image>\\nWhere is the ..."},
                       {"from": "gpt", "value": "The ... is located at the coordinates [...] ..."}],
     "task": "anatomical_grounding",            # optional: else inferred from the question
     "boxes": [[x1, y1, x2, y2], ...],           # optional references (else read from the answer)
     "labels": ["cardiomegaly"], "txt": "...",   # optional; also view, gender, sentencesBBox
    }

``image`` is resolved against ``image_root`` (default: the JSON file's folder).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from inference.labels import LABELS
from inference.parsing import parse_labels
from inference.prompts import (
    CLASSIFICATION_PROMPT_VARIANTS,
    DETECTION_PROMPT_VARIANTS,
    GROUNDING_PROMPT_VARIANTS,
    PHRASE_GROUNDING_PROMPT_VARIANTS,
    REPORT_PROMPT_VARIANTS,
)
from training.evaluation.grounding import extract_boxes_upstream

GROUNDING_TASKS = ("anatomical_grounding", "abnormality_grounding", "phrase_grounding", "detection")
CONVERSATION_TASKS = ("conversation", "grounded_conversation")
TASKS = ("report", "classification", *GROUNDING_TASKS, *CONVERSATION_TASKS)
FAMILIES = ("report", "classification", "grounding", "conversation")
TASK_ALIASES = {"grounding": GROUNDING_TASKS, "conversations": CONVERSATION_TASKS, "all": TASKS,
                "report_generation": ("report",), "abnormality_classification": ("classification",),
                "region_grounding": ("anatomical_grounding",), "abnormality_detection": ("detection",)}


class SplitFormatError(ValueError):
    """A test split or predictions file that cannot be read as documented."""


def family_of(task: str) -> str:
    """The metric family of a task: report, classification, grounding or conversation."""
    if task in GROUNDING_TASKS:
        return "grounding"
    if task in CONVERSATION_TASKS:
        return "conversation"
    if task in ("report", "classification"):
        return task
    raise SplitFormatError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def expand_tasks(names: Iterable[str]) -> tuple[str, ...]:
    """Task names (aliases such as ``grounding`` or upstream's ``report_generation`` allowed)."""
    tasks: list[str] = []
    for name in names:
        for task in TASK_ALIASES.get(name, (name,)):
            family_of(task)
            if task not in tasks:
                tasks.append(task)
    return tuple(tasks)


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{\}", "(.+?)") + "$", re.IGNORECASE | re.DOTALL)


_GROUNDING_TEMPLATES = [_template_regex(t) for t in GROUNDING_PROMPT_VARIANTS]
_PHRASE_TEMPLATES = [_template_regex(t) for t in PHRASE_GROUNDING_PROMPT_VARIANTS]


def clean_question(text: str) -> str:
    """A human turn without its ``<image>`` placeholder."""
    return text.replace("<image>\n", "").replace("<image>", "").strip()


def infer_task(record: Mapping) -> str:
    """The record's ``task`` if given, else read from its turns: more than one question →
    conversation (grounded when the record has ``sentencesBBox``); a RadVLM report,
    classification or detection phrasing → that task; a phrase-grounding phrasing →
    phrase_grounding; a region/abnormality phrasing → abnormality_grounding when the name asked
    about is one of the 14 labels or the record has ``label`` in them, else anatomical_grounding."""
    if record.get("task"):
        tasks = expand_tasks([str(record["task"])])
        if len(tasks) != 1:
            raise SplitFormatError(f"record {record.get('id')!r}: task {record['task']!r} names several tasks")
        return tasks[0]
    questions = [clean_question(turn["value"]) for turn in record.get("conversations", []) if turn["from"] == "human"]
    if not questions:
        raise SplitFormatError(f"record {record.get('id')!r} has no human turn and no 'task'")
    if len(questions) > 1:
        return "grounded_conversation" if record.get("sentencesBBox") else "conversation"
    question = questions[0]
    if question in REPORT_PROMPT_VARIANTS:
        return "report"
    if question in CLASSIFICATION_PROMPT_VARIANTS:
        return "classification"
    if question in DETECTION_PROMPT_VARIANTS:
        return "detection"
    if any(pattern.match(question) for pattern in _PHRASE_TEMPLATES):
        return "phrase_grounding"
    for pattern in _GROUNDING_TEMPLATES:
        match = pattern.match(question)
        if match:
            name = match.group(1).lower()
            return "abnormality_grounding" if name in LABELS else "anatomical_grounding"
    raise SplitFormatError(f"record {record.get('id')!r}: cannot tell the task of {question!r}; add a 'task' field")


def _answers(record: Mapping) -> list[str]:
    return [turn["value"] for turn in record.get("conversations", []) if turn["from"] != "human"]


def reference_of(record: Mapping, task: str) -> dict:
    """The reference fields of a record for its task's family (upstream's record shape):
    grounding → ``boxes`` (given, else the boxes of the expected answer); classification →
    ``labels`` (given, else ``parse_labels`` of the expected answer); report → ``txt`` (given,
    else the expected answer); conversation → ``conversation`` (the turns) plus ``labels``,
    ``txt``, ``view``, ``gender``, ``sentencesBBox`` when present."""
    family = family_of(task)
    answers = _answers(record)
    if family == "grounding":
        boxes = record.get("boxes")
        if boxes is None:
            if not answers:
                raise SplitFormatError(f"record {record.get('id')!r}: no 'boxes' and no expected answer")
            boxes = extract_boxes_upstream(answers[0])
        return {"boxes": [[float(v) for v in box] for box in boxes]}
    if family == "classification":
        labels = record.get("labels")
        if labels is None:
            if not answers:
                raise SplitFormatError(f"record {record.get('id')!r}: no 'labels' and no expected answer")
            labels = [label for label, present in parse_labels(answers[0]).items() if present]
        return {"labels": list(labels)}
    if family == "report":
        txt = record.get("txt")
        if txt is None:
            if not answers:
                raise SplitFormatError(f"record {record.get('id')!r}: no 'txt' and no expected answer")
            txt = answers[0]
        return {"txt": txt}
    reference = {"conversation": [{"from": t["from"], "value": t["value"]} for t in record["conversations"]]}
    for key in ("labels", "txt", "view", "gender", "sentencesBBox"):
        if key in record:
            reference[key] = record[key]
    return reference


def read_split(path: Path) -> list[dict]:
    """A test split: a JSON list, or JSONL (one record per line). Every record needs an ``id``
    (unique) and an ``image``."""
    text = Path(path).read_text()
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise SplitFormatError(f"{path}: not JSON / JSONL: {exc}") from exc
    seen: set[str] = set()
    for index, record in enumerate(records):
        if not isinstance(record, dict) or "id" not in record or "image" not in record:
            raise SplitFormatError(f"{path}: record {index} needs 'id' and 'image'")
        if str(record["id"]) in seen:
            raise SplitFormatError(f"{path}: duplicate id {record['id']!r}")
        seen.add(str(record["id"]))
    return records


def read_predictions(path: Path) -> list[dict]:
    """A predictions JSONL file (one JSON object per line; blank lines ignored); a JSON list is
    accepted too (upstream's ``*_output.json``)."""
    text = Path(path).read_text()
    try:
        if text.lstrip().startswith("["):
            return list(json.loads(text))
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise SplitFormatError(f"{path}: not JSONL: {exc}") from exc


def iter_done_ids(paths: Iterable[Path]) -> Iterator[str]:
    """Ids already answered in existing predictions files (a torn last line is ignored)."""
    for path in paths:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                yield str(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue


def subject_of(record: Mapping, question: str) -> str | None:
    """What a grounding question asks about: the record's ``label`` if given, else the ``{}`` of
    the RadVLM phrasing the question matches (region, label or sentence); None otherwise."""
    if record.get("label"):
        return str(record["label"])
    for pattern in (*_PHRASE_TEMPLATES, *_GROUNDING_TEMPLATES):
        match = pattern.match(question)
        if match:
            return match.group(1)
    return None
