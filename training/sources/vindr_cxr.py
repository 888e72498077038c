"""VinDr-CXR abnormality detection and abnormality grounding, radiologists' boxes fused by WBF.

Schema sources:
- PhysioNet VinDr-CXR v1.0.0: ``annotations/annotations_{train,test}.csv`` with ``image_id``,
  ``rad_id`` (``rad_ID`` in some copies), ``class_name``, ``x_min``, ``y_min``, ``x_max``,
  ``y_max`` in original pixels (blank for "No finding"); images ``{train,test}/{image_id}.dicom``.
- Upstream uzh-dqbm-cmi/RadVLM ``radvlm/data/datasets.py`` ``VinDr_CXR_Dataset`` (detection, one
  sample per image) and ``VinDr_CXR_Single_Label_Dataset`` (grounding, one sample per image and
  class): annotations grouped by (image_id, class_name), "No finding" rows give no boxes, the
  boxes of each group fused by `training.sources.wbf.fuse_boxes`; the annotation folder may be
  ``annotations/`` or the dataset root; the image size comes from the upstream-derived
  ``image_resolutions_{split}.json`` (image_id → [rows, columns], written with ``{split}_jpg/``
  by ``preprocess_scripts/dicom2jpg_vindrcxr``). Without that file we read Rows/Columns from the
  DICOM header, and the image given to training is the ``.dicom`` itself (``inference.image``
  reads it) unless ``{split}_jpg/{image_id}.jpg`` exists.
- A box with zero width or height is dropped, counted in ``skipped`` ("zero-area box"), as
  ``ensemble_boxes`` drops it during fusion ("Zero area box skipped"); an inverted box
  (x_max < x_min or y_max < y_min) stays an error naming the line.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from training.sources.errors import MissingSourceFileError, SourceFormatError
from training.sources.samples import BoxTuple, SourceSample, Split
from training.sources.tables import find_table, float_cell, read_csv, read_json, text_cell
from training.sources.wbf import UPSTREAM_IOU_THR, fuse_boxes

SOURCE = "vindr_cxr"
NO_FINDING = "No finding"
_BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")


@dataclass(frozen=True)
class VindrImage:
    image: str
    findings: tuple[tuple[str, tuple[BoxTuple, ...]], ...]   # sorted by class name


def _split_name(split: Split) -> str:
    if split == "valid":
        raise ValueError("VinDr-CXR has only train and test splits")
    return split


def _annotation_folder(root: Path) -> Path:
    folder = Path(root) / "annotations"
    return folder if folder.is_dir() else Path(root)


def _resolutions(root: Path, split: str) -> dict[str, tuple[int, int]] | None:
    path = _annotation_folder(root) / f"image_resolutions_{split}.json"
    if not path.is_file():
        return None
    data = read_json(path, "VinDr-CXR image resolutions")
    if not isinstance(data, dict):
        raise SourceFormatError(path, "expected an object image_id → [rows, columns]")
    sizes = {}
    for image_id, value in data.items():
        if not (isinstance(value, list) and len(value) == 2 and all(
                isinstance(v, (int, float)) and v > 0 for v in value)):
            raise SourceFormatError(path, f"expected [rows, columns], got {value!r}",
                                    column=image_id)
        sizes[image_id] = (int(value[0]), int(value[1]))
    return sizes


def _dicom_size(path: Path) -> tuple[int, int]:
    if not path.is_file():
        raise MissingSourceFileError(path, "VinDr-CXR DICOM image")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
        return int(ds.Rows), int(ds.Columns)
    except (InvalidDicomError, AttributeError, ValueError, TypeError) as exc:
        raise SourceFormatError(path, f"no readable Rows/Columns: {exc}", column="Rows") from exc


def read_images(root: Path, split: Split, *, iou_thr: float = UPSTREAM_IOU_THR,
                check_images: bool = True, skipped: Counter | None = None) -> list[VindrImage]:
    """Every annotated image of ``split``, ordered by image_id, with its fused findings;
    zero-area boxes dropped and counted in ``skipped``."""
    name = _split_name(split)
    root = Path(root)
    path = find_table(_annotation_folder(root), f"annotations_{name}.csv",
                      f"VinDr-CXR {name} annotations")
    boxes: dict[str, dict[str, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
    for line, row in read_csv(path, ("image_id", "class_name", *_BOX_COLUMNS)):
        image_id = text_cell(path, line, row, "image_id")
        class_name = text_cell(path, line, row, "class_name")
        per_class = boxes[image_id]
        if class_name == NO_FINDING or not (row["x_min"] or "").strip():
            per_class.setdefault(NO_FINDING, [])
            continue
        box = [float_cell(path, line, row, c) for c in _BOX_COLUMNS]
        if box[2] < box[0] or box[3] < box[1]:
            raise SourceFormatError(path, f"box {box} is inverted (max < min)", column="x_max", line=line)
        if box[2] == box[0] or box[3] == box[1]:
            if skipped is not None:
                skipped["zero-area box"] += 1
            per_class.setdefault(class_name, [])
            continue
        per_class[class_name].append(box)
    sizes = _resolutions(root, name)
    jpg_folder = root / f"{name}_jpg"
    images = []
    for image_id in sorted(boxes):
        dicom = root / name / f"{image_id}.dicom"
        image = jpg_folder / f"{image_id}.jpg" if jpg_folder.is_dir() else dicom
        if sizes is not None:
            if image_id not in sizes:
                raise SourceFormatError(_annotation_folder(root) / f"image_resolutions_{name}.json",
                                        "no entry for this image", column=image_id)
            rows, columns = sizes[image_id]
        else:
            rows, columns = _dicom_size(dicom)
        if check_images and not image.is_file():
            raise MissingSourceFileError(image, "VinDr-CXR image")
        findings = []
        for class_name in sorted(boxes[image_id]):
            if class_name == NO_FINDING:
                continue
            fused = fuse_boxes(boxes[image_id][class_name], columns, rows, iou_thr)
            if fused:
                findings.append((class_name, fused))
        images.append(VindrImage(str(image), tuple(findings)))
    return images


def detection_samples(images: list[VindrImage], split: Split) -> list[SourceSample]:
    """One sample per image; no boxes at all → the "no abnormality" answer."""
    return [SourceSample("detection", SOURCE, split, image.image, findings=image.findings)
            for image in images]


def grounding_samples(images: list[VindrImage], split: Split) -> list[SourceSample]:
    """One sample per image and abnormality class, with all its fused boxes."""
    return [SourceSample("abnormality_grounding", SOURCE, split, image.image, name=name,
                         boxes=boxes)
            for image in images for name, boxes in image.findings]
