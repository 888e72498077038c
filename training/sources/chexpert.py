"""CheXpert (v1.0 and v1.0-small) for abnormality classification.

Schema sources:
- Stanford AIMI CheXpert documentation: ``train.csv`` / ``valid.csv`` (and the later ``test.csv``)
  with ``Path`` (e.g. ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``),
  ``Sex``, ``Age``, ``Frontal/Lateral``, ``AP/PA`` and 14 label columns (1 / 0 / -1 / blank).
- Upstream uzh-dqbm-cmi/RadVLM ``radvlm/data/datasets.py`` ``CheXpert_Dataset_MM``: the split is
  the CSV file; frontal images are those whose ``Path`` ends in ``frontal.jpg`` (the
  ``Frontal/Lateral`` column says the same, but ``test.csv`` does not have it); the image is
  ``root/Path`` with the ``CheXpert-v1.0-small/`` or ``CheXpert-v1.0/`` prefix removed; labels
  by the CheXpert rule of `label_rules`.
- Copies without ``test.csv`` (the release that ships only ``train.csv`` / ``valid.csv``): the
  source contributes no test records (counted in ``skipped``) instead of stopping the build.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from training.sources.errors import MissingSourceFileError
from training.sources.label_rules import LABEL_COLUMNS, UNCERTAIN_DEFAULT, Uncertain, chexpert_present
from training.sources.samples import SourceSample, Split
from training.sources.tables import find_table, label_cell, read_csv, text_cell

SOURCE = "chexpert"
SPLIT_FILES = {"train": "train.csv", "valid": "valid.csv", "test": "test.csv"}
_FRONTAL = re.compile(r"frontal\.jpg$")
_PREFIXES = ("CheXpert-v1.0-small/", "CheXpert-v1.0/")


def image_path(root: Path, csv_path: str) -> Path:
    for prefix in _PREFIXES:
        csv_path = csv_path.replace(prefix, "")
    return Path(root) / csv_path


def classification_samples(root: Path, split: Split, *, check_images: bool = True,
                           uncertain: Uncertain = UNCERTAIN_DEFAULT,
                           skipped: Counter | None = None) -> list[SourceSample]:
    """Frontal images of ``split`` with their present labels. A missing ``test.csv`` gives no
    test samples (and one ``skipped`` count); a missing train/valid table is an error."""
    try:
        path = find_table(root, SPLIT_FILES[split], f"CheXpert {split} table")
    except MissingSourceFileError:
        if split != "test":
            raise
        if skipped is not None:
            skipped["no test.csv: no test records"] += 1
        return []
    samples = []
    for line, row in read_csv(path, ("Path", *LABEL_COLUMNS)):
        relative = text_cell(path, line, row, "Path")
        if not _FRONTAL.search(relative):
            continue
        image = image_path(root, relative)
        if check_images and not image.is_file():
            raise MissingSourceFileError(image, f"CheXpert image ({path.name} line {line})")
        labels = chexpert_present({c: label_cell(path, line, row, c) for c in LABEL_COLUMNS}, uncertain)
        samples.append(SourceSample("classification", SOURCE, split, str(image), labels=labels))
    return samples
