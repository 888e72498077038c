"""``radvlm evaluate --model DIR --tasks … --data TEST_JSON --out DIR``: run a model over a test
split and keep its raw answers beside the references, then score them.

Order and speed: records are grouped by image (first-appearance order) so that each image is
decoded and encoded once and its KV-cache prefix serves every question about it (design §3);
generation itself is sequential (``RadVLMModel`` answers one question at a time).

Resumable: answers are appended, one JSON line per record and flushed, to
``OUT/predictions-{family}.jsonl``; a rerun skips every id already there (a torn last line from a
killed run is cut off first). Records whose image cannot be read go to ``OUT/errors.jsonl`` and
are retried on the next run.

Each predictions line has upstream's record shape: ``id``, ``task``, ``image``, ``instr`` (the
question asked), ``output`` (the raw answer; a list of answers for conversations), ``answer``
(the expected answer), the reference (``boxes`` / ``labels`` / ``txt`` / ``conversation`` …),
``model``, ``baseline`` and ``seconds``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from inference.errors import InputImageError
from inference.image import ModelImage, load_image
from inference.model import Turn
from training.evaluation.baselines import Answerer, PromptAdapter
from training.evaluation.records import (
    TASKS,
    clean_question,
    family_of,
    infer_task,
    iter_done_ids,
    read_split,
    reference_of,
    subject_of,
)


@dataclass
class RunSummary:
    answered: int = 0
    skipped_done: int = 0
    errors: int = 0
    seconds: float = 0.0
    files: list[Path] = field(default_factory=list)


def predictions_path(out_dir: Path, family: str) -> Path:
    return Path(out_dir) / f"predictions-{family}.jsonl"


def _repair_torn_tail(path: Path) -> None:
    """Cut a last line that a killed run left without its newline, so appends stay one JSON per line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="evaluate", unit="record", disable=not enabled, dynamic_ncols=True)


def run_evaluation(split_path: Path, out_dir: Path, answerer: Answerer, adapter: PromptAdapter,
                   tasks: Sequence[str] = TASKS, image_root: Path | None = None, limit: int | None = None,
                   progress: bool = True, clock: Callable[[], float] = time.perf_counter) -> RunSummary:
    """Answer every record of the split whose task is in ``tasks`` (at most ``limit`` new ones)
    and append the predictions; returns what was done."""
    split_path, out_dir = Path(split_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_root = Path(image_root) if image_root else split_path.parent
    selected = [(record, task) for record in read_split(split_path)
                if (task := infer_task(record)) in tasks]
    paths = {family: predictions_path(out_dir, family) for family in {family_of(task) for _, task in selected}}
    for path in paths.values():
        _repair_torn_tail(path)
    done = set(iter_done_ids(paths.values()))
    summary = RunSummary(files=sorted(paths.values()))
    todo = [(record, task) for record, task in selected if str(record["id"]) not in done]
    summary.skipped_done = len(selected) - len(todo)
    first_seen: dict[str, int] = {}
    for index, (record, _) in enumerate(todo):
        first_seen.setdefault(str(record["image"]), index)
    todo.sort(key=lambda item: first_seen[str(item[0]["image"])])  # stable: keeps order within an image
    if limit is not None:
        todo = todo[:limit]
    started = clock()
    image_key: str | None = None
    image: ModelImage | None = None
    image_error = ""
    handles = {family: path.open("a") for family, path in paths.items()}
    try:
        with _progress(len(todo), progress) as bar:
            for record, task in todo:
                key = str(record["image"])
                if key != image_key:
                    image_key, image, image_error = key, None, ""
                    try:
                        image = load_image(image_root / key)
                    except (InputImageError, OSError) as exc:
                        image_error = f"{type(exc).__name__}: {exc}"
                if image is None:
                    _append(out_dir / "errors.jsonl", {"id": record["id"], "image": key, "error": image_error})
                    summary.errors += 1
                    bar.update(1)
                    continue
                line = _answer_record(record, task, image_key, image, answerer, adapter, clock)
                handle = handles[family_of(task)]
                handle.write(json.dumps(line) + "\n")
                handle.flush()
                summary.answered += 1
                bar.update(1)
    finally:
        for handle in handles.values():
            handle.close()
    summary.seconds = clock() - started
    return summary


def _append(path: Path, line: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(line) + "\n")


def _answer_record(record: dict, task: str, image_key: str, image: ModelImage, answerer: Answerer,
                   adapter: PromptAdapter, clock: Callable[[], float]) -> dict:
    started = clock()
    turns = record.get("conversations", [])
    questions = [clean_question(turn["value"]) for turn in turns if turn["from"] == "human"]
    expected = [turn["value"] for turn in turns if turn["from"] != "human"]
    line = {"id": record["id"], "task": task, "image": record["image"]}
    if family_of(task) == "conversation":
        history: list[Turn] = []
        answers = []
        for question in questions:
            history.append(Turn("user", question))
            text = adapter.convert_answer(task, answerer.answer(image_key, image, history, task, None))
            answers.append(text)
            history.append(Turn("assistant", text))
        line.update({"instr": questions, "output": answers, "answer": expected})
    else:
        if not questions:
            raise ValueError(f"record {record['id']!r} has no question")
        subject = subject_of(record, questions[0])
        question = adapter.question(task, questions[0], subject, key=str(record["id"]))
        raw = answerer.answer(image_key, image, [Turn("user", question)], task, subject)
        line.update({"instr": question, "output": adapter.convert_answer(task, raw), "raw_output": raw,
                     "answer": expected[0] if expected else None})
        if subject is not None:
            line["label"] = subject
    line.update(reference_of(record, task))
    line.update({"model": answerer.model_id, "baseline": adapter.name, "seconds": round(clock() - started, 4)})
    return line
