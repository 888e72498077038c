"""Prompts that define a metric or a dataset, as plain text files the user can replace.

The shipped files are our own wording of the rules the RadVLM paper states (Appendix); they are
not upstream's text. A user who holds upstream's exact prompt can point the setting at that file
(``--judge-prompt``, ``[prompts]`` in the job files …) and reproduce its numbers.

- ``judge.txt``: LLM-judge instructions for conversations (``$DATA`` = reference data and rounds).
- ``conversation_standard.txt`` / ``conversation_grounded.txt``: conversation generation
  (``$ROUNDS`` = "5-10", ``$FACTS`` = the image's facts).
- ``filter_reports.txt``: removal of references to prior studies (``$REPORT``).
- ``radfact_entailment.txt``: entailment check of grounded-report sentences (``$PREMISE``,
  ``$HYPOTHESIS``).

Each loaded prompt carries its SHA-256 so that outputs can record which text produced them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

PROMPT_DIR = Path(__file__).parent
SHIPPED = ("judge", "conversation_standard", "conversation_grounded", "filter_reports", "radfact_entailment")


class PromptFileError(ValueError):
    """A prompt file cannot be read, is empty, or lacks a placeholder it needs."""


@dataclass(frozen=True)
class PromptText:
    name: str
    text: str
    path: Path
    sha256: str

    def fill(self, **values: str) -> str:
        """The text with each ``$NAME`` replaced by ``values["NAME"]`` (plain replacement: no other
        character of the prompt is special)."""
        text = self.text
        for key, value in values.items():
            text = text.replace(f"${key}", value)
        return text

    @property
    def record(self) -> dict[str, str]:
        """What an output records about the prompt that produced it."""
        return {"prompt": self.name, "prompt_path": str(self.path), "prompt_sha256": self.sha256}


def load_prompt(name: str, override: Path | str | None = None, *, required: tuple[str, ...] = ()) -> PromptText:
    """The shipped ``training/prompts/{name}.txt``, or the file ``override`` when given. Each
    placeholder of ``required`` (without the $) must appear in the text."""
    path = Path(override) if override else PROMPT_DIR / f"{name}.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PromptFileError(f"{name} prompt: cannot read {path}: {exc.strerror or exc}") from exc
    if not text.strip():
        raise PromptFileError(f"{name} prompt: {path} is empty")
    missing = [key for key in required if f"${key}" not in text]
    if missing:
        raise PromptFileError(f"{name} prompt: {path} lacks the placeholder(s) "
                              + ", ".join(f"${key}" for key in missing))
    return PromptText(name, text, path, hashlib.sha256(text.encode("utf-8")).hexdigest())
