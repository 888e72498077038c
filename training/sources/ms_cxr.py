"""MS-CXR phrase grounding on MIMIC-CXR-JPG images.

Schema sources:
- PhysioNet MS-CXR v1.0.0 / v1.1.0: ``MS_CXR_Local_Alignment_v1.0.0.csv`` (``…v1.1.0.csv``) with
  ``dicom_id``, ``category_name``, ``label_text``, ``path``, ``x``, ``y``, ``w``, ``h`` (pixels,
  top-left corner and size) and ``image_width``, ``image_height``.
- Upstream uzh-dqbm-cmi/RadVLM ``radvlm/data/preprocess_scripts/normalize_mscxr.py``: box =
  [x / image_width, y / image_height, (x + w) / image_width, (y + h) / image_height], grouped by
  dicom_id then label_text; ``radvlm/data/datasets.py`` ``MS_CXR``: one sample per (image,
  phrase) with all its boxes, images restricted to MIMIC-CXR frontal images of the split
  (``create_llava_dataset.py`` trains on MIMIC train + valid).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from training.sources.errors import SourceFormatError
from training.sources.mimic_cxr import FRONTAL_VIEWS, MimicCxr
from training.sources.samples import BoxTuple, SourceSample, Split, clamp_box
from training.sources.tables import find_table, float_cell, read_csv, text_cell

SOURCE = "ms_cxr"
DEFAULT_CSV = "MS_CXR_Local_Alignment_v1.0.0.csv"
_REQUIRED = ("dicom_id", "label_text", "x", "y", "w", "h", "image_width", "image_height")


def read_phrases(root: Path, csv_name: str = DEFAULT_CSV) -> dict[str, dict[str, list[BoxTuple]]]:
    """dicom_id → phrase → normalised boxes, in file order."""
    path = find_table(root, csv_name, "MS-CXR local alignment table")
    phrases: dict[str, dict[str, list[BoxTuple]]] = defaultdict(lambda: defaultdict(list))
    for line, row in read_csv(path, _REQUIRED):
        x, y, w, h, width, height = (float_cell(path, line, row, c) for c in _REQUIRED[2:])
        if width <= 0 or height <= 0:
            raise SourceFormatError(path, "image size must be positive", column="image_width",
                                    line=line)
        box = clamp_box(x / width, y / height, (x + w) / width, (y + h) / height)
        if box is None:
            raise SourceFormatError(path, f"box x={x} y={y} w={w} h={h} has no area", column="w",
                                    line=line)
        phrase = text_cell(path, line, row, "label_text")
        phrases[text_cell(path, line, row, "dicom_id")][phrase].append(box)
    return phrases


def dicom_ids(root: Path, csv_name: str = DEFAULT_CSV) -> frozenset[str]:
    return frozenset(read_phrases(root, csv_name))


def phrase_samples(root: Path, mimic: MimicCxr, split: Split,
                   csv_name: str = DEFAULT_CSV) -> list[SourceSample]:
    phrases = read_phrases(root, csv_name)
    samples = []
    for image in mimic.images(split):
        if image.dicom_id not in phrases or image.view not in FRONTAL_VIEWS:
            continue
        path = mimic.image_path(image)
        for phrase, boxes in phrases[image.dicom_id].items():
            samples.append(SourceSample("phrase_grounding", SOURCE, split, path, name=phrase,
                                        boxes=tuple(boxes)))
    return samples
