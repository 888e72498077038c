"""Conversation JSON files as upstream stores them (one file per image).

Upstream RadVLM writes the LLM-generated conversations to
``MIMIC-CXR-JPG/conversations/{train,test}/{standard,grounding}/{dicom_id}.json`` and
``PadChest/conversations/train/grounding/{ImageID stem}.json``; each file is a list of turns,
either ``{"from": "human"|"gpt", "value": ...}`` or ``{"question": ..., "answer": ...}``
(``create_json_cell_llava`` in ``radvlm/data/create_instructions.py`` accepts both). Item 3 of
issue 5 (training/conversations*.py) produces these files; this module only reads them.
"""

from __future__ import annotations

from pathlib import Path

from training.sources.errors import SourceFormatError
from training.sources.samples import Turn
from training.sources.tables import read_json


def load_turns(path: Path) -> tuple[Turn, ...]:
    """The turns of one conversation file; they must alternate human, gpt, human, gpt…"""
    data = read_json(path, "conversation file")
    if isinstance(data, dict) and "conversations" in data:
        data = data["conversations"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise SourceFormatError(path, "expected a non-empty list of turns")
    turns: list[Turn] = []
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise SourceFormatError(path, f"turn {index} is not an object")
        if "from" in item and "value" in item:
            speaker = item["from"]
            if speaker not in ("human", "gpt"):
                raise SourceFormatError(path, f"turn {index}: 'from' must be human or gpt, "
                                        f"got {speaker!r}", column="from")
            turns.append(Turn(speaker, _text(path, item["value"], index, "value")))
        elif "question" in item and "answer" in item:
            turns.append(Turn("human", _text(path, item["question"], index, "question")))
            turns.append(Turn("gpt", _text(path, item["answer"], index, "answer")))
        else:
            raise SourceFormatError(path, f"turn {index} has neither from/value nor "
                                    "question/answer keys")
    for index, turn in enumerate(turns):
        expected = "human" if index % 2 == 0 else "gpt"
        if turn.speaker != expected:
            raise SourceFormatError(path, f"turn {index} is from {turn.speaker}, expected "
                                    f"{expected} (turns must alternate, human first)")
    if len(turns) % 2:
        raise SourceFormatError(path, "the last turn is a question without an answer")
    return tuple(turns)


def _text(path: Path, value: object, index: int, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SourceFormatError(path, f"turn {index}: {key!r} must be a non-empty string",
                                column=key)
    return value.replace("<image>", "").strip()
