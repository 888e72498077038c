"""CheXpert-style label columns and upstream's two rules for turning them into present labels.

Encoding (CheXpert labeler, used by CheXpert ``train.csv`` and MIMIC-CXR
``mimic-cxr-2.0.0-chexpert.csv``): 1 positive, 0 negative, -1 uncertain, blank not mentioned.

Upstream (uzh-dqbm-cmi/RadVLM ``radvlm/data/datasets.py``):
- ``MIMIC_Dataset_MM``: ``fillna(0)`` then ``replace(-1, 1)``; a label is present when 1.
- ``CheXpert_Dataset_MM``: rows with "No Finding" == 1 get every pathology except "Support
  Devices" set to 0; then -1 → 1; blank stays NaN (absent); present when 1.
Both therefore count "uncertain" as present and "blank" as absent. The paper says uncertain
labels count as absent; the code, which produced the published model, maps them to present.
``uncertain`` chooses: "present" (default, upstream's code) or "absent" (the paper's text).
"""

from __future__ import annotations

from typing import Literal

from inference.labels import ABNORMALITY_LABELS

#: CSV column name → our lower-case label, for the 13 abnormality columns.
PATHOLOGY_COLUMNS: dict[str, str] = {
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "consolidation",
    "Edema": "edema",
    "Enlarged Cardiomediastinum": "enlarged cardiomediastinum",
    "Fracture": "fracture",
    "Lung Lesion": "lung lesion",
    "Lung Opacity": "lung opacity",
    "Pleural Effusion": "pleural effusion",
    "Pleural Other": "pleural other",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
    "Support Devices": "support devices",
}
NO_FINDING_COLUMN = "No Finding"
LABEL_COLUMNS: tuple[str, ...] = (*PATHOLOGY_COLUMNS, NO_FINDING_COLUMN)

assert sorted(PATHOLOGY_COLUMNS.values()) == sorted(ABNORMALITY_LABELS)

Cells = dict[str, float | None]
Uncertain = Literal["present", "absent"]
UNCERTAIN_DEFAULT: Uncertain = "present"


def _present_values(uncertain: Uncertain) -> tuple[float, ...]:
    if uncertain not in ("present", "absent"):
        raise ValueError(f"uncertain labels must be 'present' or 'absent', got {uncertain!r}")
    return (1.0, -1.0) if uncertain == "present" else (1.0,)


def _ordered(present: set[str]) -> tuple[str, ...]:
    return tuple(label for label in ABNORMALITY_LABELS if label in present)


def mimic_present(cells: Cells, uncertain: Uncertain = UNCERTAIN_DEFAULT) -> tuple[str, ...]:
    """MIMIC rule: blank → 0, -1 → 1 (or 0 with ``uncertain="absent"``), present when 1
    ("No Finding" does not clear others)."""
    values = _present_values(uncertain)
    return _ordered({label for column, label in PATHOLOGY_COLUMNS.items() if cells.get(column) in values})


def chexpert_present(cells: Cells, uncertain: Uncertain = UNCERTAIN_DEFAULT) -> tuple[str, ...]:
    """CheXpert rule: "No Finding" == 1 clears every pathology but Support Devices; -1 → 1 (or
    absent with ``uncertain="absent"``)."""
    values = _present_values(uncertain)
    healthy = cells.get(NO_FINDING_COLUMN) == 1.0
    present = set()
    for column, label in PATHOLOGY_COLUMNS.items():
        if healthy and column != "Support Devices":
            continue
        if cells.get(column) in values:
            present.add(label)
    return _ordered(present)
