"""What a source reader hands to the instruction builder: one sample per image and task.

A sample carries the ground truth only (report text, labels, boxes, conversation turns); the
instruction builder turns it into a question and an answer, drawing the phrasing per repeat.
Boxes are always normalised to the ORIGINAL image: [x1, y1, x2, y2] with x / columns and
y / rows, origin top-left (design §3 "Boxes").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Task = Literal["report", "classification", "anatomical_grounding", "abnormality_grounding",
               "detection", "phrase_grounding", "conversation", "grounded_conversation"]
Split = Literal["train", "valid", "test"]
BoxTuple = tuple[float, float, float, float]

TASKS: tuple[str, ...] = ("report", "classification", "anatomical_grounding",
                          "abnormality_grounding", "detection", "phrase_grounding",
                          "conversation", "grounded_conversation")


@dataclass(frozen=True)
class Turn:
    """One conversation turn as LLaVA writes it: ``from`` is "human" or "gpt"."""

    speaker: Literal["human", "gpt"]
    value: str


@dataclass(frozen=True)
class SourceSample:
    """Ground truth for one instruction of one image.

    Which fields are set depends on ``task``:
      report → text; classification → labels (lower-case LABELS names, present ones only);
      anatomical_grounding → regions (the renderer picks one per repeat, as upstream's
      ``pick_one_region``); abnormality_grounding → name + boxes; detection → findings
      (name, boxes) pairs (empty: no finding); phrase_grounding → name (the sentence) + boxes;
      conversation / grounded_conversation → turns.
    """

    task: Task
    source: str
    split: Split
    image: str
    text: str | None = None
    labels: tuple[str, ...] = ()
    name: str | None = None
    boxes: tuple[BoxTuple, ...] = ()
    regions: tuple[tuple[str, BoxTuple], ...] = ()
    findings: tuple[tuple[str, tuple[BoxTuple, ...]], ...] = ()
    turns: tuple[Turn, ...] = field(default=())


def clamp_box(x1: float, y1: float, x2: float, y2: float) -> BoxTuple | None:
    """Clamp to [0, 1]; None for a box without area after clamping."""
    c = [min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2)]
    if c[2] <= c[0] or c[3] <= c[1]:
        return None
    return (c[0], c[1], c[2], c[3])
