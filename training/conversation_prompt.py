"""The conversation-generator prompt (RadVLM paper, Appendix) and the de-identified facts it carries.

Upstream (uzh-dqbm-cmi/RadVLM, ``radvlm/data/llm_generate_conversations.py`` with its
``prefixes_prompts/prefix_conv*.txt``) asks GPT-4o for a 5–10 round JSON Q&A between a lay user
and an assistant that "sees" the X-ray, from the report, the view, the gender and — for grounded
conversations — selected observations with their boxes; the answer is the JSON list of
``{"from": "human"|"gpt", "value": ...}`` turns. The instructions below follow that prompt in our
own words.

Only whitelisted facts reach the prompt, each normalised: report text (scrubbed of dates, times,
long numbers, e-mail addresses, phone numbers and titled names), CheXpert-style labels from the
shared list, the view as a short upper-case code, gender as "female"/"male", boxes as floats in
[0, 1]. Record ids, image paths and any other field of the input never leave this process.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from inference.labels import LABELS

PROMPT_VERSION = "radvlm-conv-v1"  # part of the cache key: change it when the wording changes

_COMMON_RULES = """\
- The user is a layperson who knows nothing about the findings and asks general, exploratory questions \
(what is visible, whether the image looks normal, what a term means, what a feature might indicate).
- The assistant answers as if it could look at the image itself: it mentions only what can reasonably be \
seen on a chest X-ray and never refers to a report, labels or any information given to you here.
- Answers are concise and cautious; they express uncertainty where appropriate and never give a definitive \
diagnosis.
- Questions and answers sound natural and stay on the visual content of the image.
- Reply with the JSON array only, no text before or after it:
[
  {"from": "human", "value": "<question>"},
  {"from": "gpt", "value": "<answer>"}
]
"""

STANDARD_PREFIX = (
    "You are given information about a chest X-ray that you cannot see. Write a $ROUNDS "
    "round question-and-answer conversation between a user and an AI assistant about this X-ray.\n\n"
    + _COMMON_RULES)

GROUNDED_PREFIX = (
    "You are given information about a chest X-ray that you cannot see, including observations with the "
    "coordinates of the region they occupy. Write a $ROUNDS round question-and-answer "
    "conversation between a user and an AI assistant about this X-ray.\n\n"
    + _COMMON_RULES
    + "- At least one question asks where an observation is located, and the answer gives its coordinates "
      "exactly in the format [x_min, y_min, x_max, y_max] with the values provided.\n")

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


def build_prompt(item: ConversationInput, *, min_rounds: int = 5, max_rounds: int = 10) -> str:
    """The full prompt for one image: instructions, then the de-identified facts."""
    prefix = GROUNDED_PREFIX if item.grounded else STANDARD_PREFIX
    lines = [prefix.replace("$ROUNDS", f"{min_rounds}-{max_rounds}"), "Information about the X-ray:",
             f"Radiology report: {scrub_text(item.report)}"]
    if _view(item.view):
        lines.append(f"View: {_view(item.view)}")
    if _gender(item.gender):
        lines.append(f"Gender: {_gender(item.gender)}")
    if item.labels:
        lines.append("Labels: " + ", ".join(item.labels))
    if item.grounded:
        lines.append("Selected observations with bounding box coordinates:")
        lines.extend(f"- {scrub_text(obs.text)}: " + " and ".join(_box(b) for b in obs.boxes)
                     for obs in item.observations)
    lines.append("\nConversation in the expected JSON format:")
    return "\n".join(lines)
