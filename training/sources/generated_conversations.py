"""Conversations written by ``radvlm generate-conversations`` (training/conversations.py).

That generator writes JSONL records ``{"id", "image", "task": "conversation" |
"grounded_conversation", "conversations": [{"from", "value"}…]}`` with ``<image>`` on the first
question. This reader takes them back as samples so the builder mixes them with the repeat
factors of Table 1 (conversations ×1, grounded conversations ×4); the image marker is removed
here and put back by the renderer.
"""

from __future__ import annotations

import json
from pathlib import Path

from training.sources.errors import MissingSourceFileError, SourceFormatError
from training.sources.samples import SourceSample, Turn

SOURCE = "generated_conversations"
TASKS = ("conversation", "grounded_conversation")


def conversation_samples(files: list[Path], task: str) -> list[SourceSample]:
    samples = []
    for path in files:
        path = Path(path)
        if not path.is_file():
            raise MissingSourceFileError(path, "generated conversations (JSONL)")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise SourceFormatError(path, f"not JSON: {exc}", line=number) from None
            for key in ("image", "task", "conversations"):
                if key not in record:
                    raise SourceFormatError(path, "missing key", column=key, line=number)
            if record["task"] not in TASKS:
                raise SourceFormatError(path, f"task must be one of {TASKS}", column="task",
                                        line=number)
            if record["task"] != task:
                continue
            turns = []
            for index, turn in enumerate(record["conversations"]):
                expected = "human" if index % 2 == 0 else "gpt"
                if not isinstance(turn, dict) or turn.get("from") != expected or not str(
                        turn.get("value", "")).strip():
                    raise SourceFormatError(path, f"turn {index} must be from {expected} with a "
                                            "value", column="conversations", line=number)
                turns.append(Turn(expected, str(turn["value"]).replace("<image>", "").strip()))
            if not turns or len(turns) % 2:
                raise SourceFormatError(path, "conversations must hold question/answer pairs",
                                        column="conversations", line=number)
            samples.append(SourceSample(task, SOURCE, "train", str(record["image"]),  # type: ignore[arg-type]
                                        turns=tuple(turns)))
    return samples
