"""The conversation-generator prompt (RadVLM paper, Appendix) and the de-identified facts it carries.

Upstream (uzh-dqbm-cmi/RadVLM, ``radvlm/data/llm_generate_conversations.py`` with its
``prefixes_prompts/prefix_conv*.txt``) asks GPT-4o for a 5–10 round JSON Q&A between a user and
an assistant that "sees" the X-ray, from the report, the labels, the view, the gender and — for
grounded conversations — selected observations with their boxes; the answer is the JSON list of
``{"from": "human"|"gpt", "value": ...}`` turns. The instructions live in replaceable files
(``training/prompts/conversation_standard.txt`` / ``conversation_grounded.txt``; ``$ROUNDS`` and
``$FACTS`` are filled in): the shipped text is our own wording of the paper's rules — no
reference to prior studies and no word "changes", no external data, the labels, view, gender
and boxes as the given facts, user questions general, exploratory or specific.

Only whitelisted facts reach the prompt, each normalised: report text (scrubbed of dates, times,
long numbers, e-mail addresses, phone numbers and titled names), CheXpert-style labels from the
shared list, the view as a short upper-case code, gender as "female"/"male", boxes as floats in
[0, 1]. Record ids, image paths and any other field of the input never leave this process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from inference.labels import LABELS
from training.prompts import PromptText, load_prompt

PROMPT_VERSION = "radvlm-conv-v2"  # part of the cache key (with the full prompt text)


@dataclass(frozen=True)
class ConversationPrompts:
    """The two instruction files (standard and grounded conversations)."""

    standard: PromptText
    grounded: PromptText

    @classmethod
    def load(cls, standard: Path | str | None = None, grounded: Path | str | None = None) -> "ConversationPrompts":
        return cls(load_prompt("conversation_standard", standard, required=("ROUNDS", "FACTS")),
                   load_prompt("conversation_grounded", grounded, required=("ROUNDS", "FACTS")))

    @property
    def record(self) -> dict[str, str]:
        return {"standard_prompt_sha256": self.standard.sha256, "standard_prompt_path": str(self.standard.path),
                "grounded_prompt_sha256": self.grounded.sha256, "grounded_prompt_path": str(self.grounded.path)}


_SCRUBBERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b[\w.+-]+@[\w-]+(\.[\w-]+)+\b"), "___"),  # e-mail
    (re.compile(r"\b\d{1,4}[/.-]\d{1,2}[/.-]\d{1,4}\b"), "___"),  # dates
    (re.compile(r"\b\d{1,2}:\d{2}(:\d{2})?\s*(a\.?m\.?|p\.?m\.?)?", re.I), "___"),  # times
    (re.compile(r"(\+?\d[\d ()-]{7,}\d)"), "___"),  # phone numbers, long identifiers with separators
    (re.compile(r"\b\d{5,}\b"), "___"),  # MRN / accession numbers
    (re.compile(r"\b(Dr|Drs|Mr|Mrs|Ms|Miss|Prof)\.?\s+[A-Z][\w'-]+(\s+[A-Z][\w'-]+)?"), "___"),  # titled names
)


def scrub_text(text: str) -> str:
    """Replace identifier-like spans with ``___`` (the MIMIC-CXR de-identification placeholder)."""
    for pattern, replacement in _SCRUBBERS:
        text = pattern.sub(replacement, text)
    return re.sub(r"[ \t]+", " ", text).strip()


class GroundedObservation(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str = Field(min_length=1)
    boxes: list[tuple[float, float, float, float]] = Field(min_length=1)

    @field_validator("boxes")
    @classmethod
    def _normalised(cls, boxes):
        for box in boxes:
            if not all(0.0 <= v <= 1.0 for v in box) or box[0] >= box[2] or box[1] >= box[3]:
                raise ValueError(f"box {list(box)} is not [x1, y1, x2, y2] normalised to [0, 1]")
        return boxes


class ConversationInput(BaseModel):
    """One image's facts. Unknown fields are accepted and dropped, so they can never be sent."""

    model_config = ConfigDict(extra="ignore")

    id: str
    image: str
    report: str = Field(min_length=1)
    labels: list[str] = Field(default_factory=list)
    view: str | None = None
    gender: str | None = None
    observations: list[GroundedObservation] = Field(default_factory=list)

    @field_validator("labels")
    @classmethod
    def _known_labels(cls, labels: list[str]) -> list[str]:
        cleaned = [label.strip().lower() for label in labels]
        unknown = [label for label in cleaned if label not in LABELS]
        if unknown:
            raise ValueError(f"unknown label(s) {unknown}; expected names from inference.labels.LABELS")
        return cleaned

    @property
    def grounded(self) -> bool:
        return bool(self.observations)


def _view(view: str | None) -> str | None:
    if not view:
        return None
    code = re.sub(r"[^A-Za-z ]", "", view).strip().upper()
    return code[:20] or None


def _gender(gender: str | None) -> str | None:
    value = (gender or "").strip().lower()
    return {"f": "female", "female": "female", "w": "female", "m": "male", "male": "male"}.get(value)


def _box(box: tuple[float, float, float, float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


def facts_text(item: ConversationInput) -> str:
    """The de-identified facts block: report, labels, view, gender, observations with boxes."""
    lines = ["Facts about the X-ray:", f"Radiology report: {scrub_text(item.report)}",
             "Labels: " + (", ".join(item.labels) if item.labels else "none")]
    if _view(item.view):
        lines.append(f"View: {_view(item.view)}")
    if _gender(item.gender):
        lines.append(f"Gender: {_gender(item.gender)}")
    if item.grounded:
        lines.append("Selected observations with bounding box coordinates:")
        lines.extend(f"- {scrub_text(obs.text)}: " + " and ".join(_box(b) for b in obs.boxes)
                     for obs in item.observations)
    return "\n".join(lines)


def build_prompt(item: ConversationInput, *, min_rounds: int = 5, max_rounds: int = 10,
                 prompts: ConversationPrompts | None = None) -> str:
    """The full prompt for one image: the instructions with ``$ROUNDS`` and ``$FACTS`` filled."""
    prompts = prompts or ConversationPrompts.load()
    template = prompts.grounded if item.grounded else prompts.standard
    return template.fill(ROUNDS=f"{min_rounds}-{max_rounds}", FACTS=facts_text(item))
