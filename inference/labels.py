"""The 14 CheXpert-style labels RadVLM classifies (design §5), in canonical order."""

from __future__ import annotations

NO_FINDING = "no finding"

LABELS: tuple[str, ...] = (
    "atelectasis",
    "cardiomegaly",
    "consolidation",
    "edema",
    "enlarged cardiomediastinum",
    "fracture",
    "lung lesion",
    "lung opacity",
    "pleural effusion",
    "pleural other",
    "pneumonia",
    "pneumothorax",
    "support devices",
    NO_FINDING,
)

ABNORMALITY_LABELS: tuple[str, ...] = tuple(label for label in LABELS if label != NO_FINDING)
