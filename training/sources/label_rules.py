"""CheXpert-style label columns and upstream's two rules for turning them into present labels.

Encoding (CheXpert labeler, used by CheXpert ``train.csv`` and MIMIC-CXR
``mimic-cxr-2.0.0-chexpert.csv``): 1 positive, 0 negative, -1 uncertain, blank not mentioned.

Upstream (uzh-dqbm-cmi/RadVLM ``radvlm/data/datasets.py``):
- ``MIMIC_Dataset_MM``: ``fillna(0)`` then ``replace(-1, 1)``; a label is present when 1.
- ``CheXpert_Dataset_MM``: rows with "No Finding" == 1 get every pathology except "Support
  Devices" set to 0; then -1 → 1; blank stays NaN (absent); present when 1.
Both therefore count "uncertain" as present and "blank" as absent.
"""

from __future__ import annotations

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


def _ordered(present: set[str]) -> tuple[str, ...]:
    return tuple(label for label in ABNORMALITY_LABELS if label in present)


def mimic_present(cells: Cells) -> tuple[str, ...]:
    """MIMIC rule: blank → 0, -1 → 1, present when 1 ("No Finding" does not clear others)."""
    return _ordered({label for column, label in PATHOLOGY_COLUMNS.items()
                     if cells.get(column) in (1.0, -1.0)})


def chexpert_present(cells: Cells) -> tuple[str, ...]:
    """CheXpert rule: "No Finding" == 1 clears every pathology but Support Devices; -1 → 1."""
    healthy = cells.get(NO_FINDING_COLUMN) == 1.0
    present = set()
    for column, label in PATHOLOGY_COLUMNS.items():
        if healthy and column != "Support Devices":
            continue
        if cells.get(column) in (1.0, -1.0):
            present.add(label)
    return _ordered(present)
