"""PadChest-GR grounded reports: phrase grounding and grounded conversations.

Schema sources:
- BIMCV PadChest-GR release: ``grounded_reports_20240819.json``, a list of studies with
  ``StudyID``, ``ImageID`` and ``findings`` — each with ``sentence_en``, ``sentence_es``,
  ``abnormal``, ``boxes`` (normalised [x1, y1, x2, y2] in 0..1; often absent for normal
  sentences), ``extra_boxes``, ``labels``, ``locations``, ``progression``; ``master_table.csv``
  with ``ImageID``, ``StudyID``, ``PatientID``, ``split`` (train / validation / test),
  ``PatientSex_DICOM``, ``label_group`` …
- Upstream uzh-dqbm-cmi/RadVLM ``radvlm/data/datasets.py`` ``PadChest_grounding``: images in
  ``images_grounding/{ImageID}``, kept when the ImageID is in the master table's split AND has
  ``Projection`` AP or PA in PadChest's ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv``;
  one sample per finding with non-empty ``boxes`` (phrase = ``sentence_en``);
  ``PadChest_grounding_per_image`` reads grounded conversations from
  ``conversations/train/grounding/{ImageID stem}.json``; ``create_llava_dataset.py`` trains on
  train + validation.
"""

from __future__ import annotations

from pathlib import Path

from training.sources.conversation_files import load_turns
from training.sources.errors import MissingSourceFileError, SourceFormatError
from training.sources.samples import BoxTuple, SourceSample, Split, clamp_box
from training.sources.tables import find_table, read_csv, read_json, require_dir, text_cell

SOURCE = "padchest_gr"
GROUNDED_REPORTS = "grounded_reports_20240819.json"
MASTER_TABLE = "master_table.csv"
PADCHEST_TABLE = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
FRONTAL_PROJECTIONS = frozenset({"AP", "PA"})
_SPLIT = {"train": "train", "valid": "validation", "test": "test"}


def _images_of_split(root: Path, split: Split) -> set[str]:
    master = find_table(root, MASTER_TABLE, "PadChest-GR master table")
    in_split = {text_cell(master, line, row, "ImageID")
                for line, row in read_csv(master, ("ImageID", "split"))
                if row["split"].strip() == _SPLIT[split]}
    table = find_table(root, PADCHEST_TABLE, "PadChest image table (Projection column)")
    frontal = {row["ImageID"].strip() for _, row in read_csv(table, ("ImageID", "Projection"))
               if row["Projection"].strip() in FRONTAL_PROJECTIONS}
    return in_split & frontal


def _boxes(path: Path, image_id: str, raw: object) -> tuple[BoxTuple, ...]:
    if not isinstance(raw, list):
        raise SourceFormatError(path, f"ImageID {image_id}: 'boxes' must be a list", column="boxes")
    boxes = []
    for box in raw:
        if not (isinstance(box, list) and len(box) == 4
                and all(isinstance(v, (int, float)) for v in box)):
            raise SourceFormatError(path, f"ImageID {image_id}: box {box!r} is not 4 numbers",
                                    column="boxes")
        clamped = clamp_box(*(float(v) for v in box))
        if clamped is not None:
            boxes.append(clamped)
    return tuple(boxes)


def read_grounded(root: Path, split: Split, images_dir: str = "images_grounding",
                  check_images: bool = True) -> list[tuple[str, str, list[tuple[str, tuple[BoxTuple, ...]]]]]:
    """(ImageID, image path, [(sentence_en, boxes)…]) for each kept image, in file order."""
    root = Path(root)
    wanted = _images_of_split(root, split)
    path = root / GROUNDED_REPORTS
    data = read_json(path, "PadChest-GR grounded reports")
    if not isinstance(data, list):
        raise SourceFormatError(path, "expected a list of studies")
    folder = require_dir(root / images_dir, "PadChest-GR image folder")
    kept = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict) or "ImageID" not in entry:
            raise SourceFormatError(path, f"study {index} has no ImageID", column="ImageID")
        image_id = str(entry["ImageID"])
        if image_id not in wanted:
            continue
        findings = []
        for finding in entry.get("findings", []) or []:
            boxes = _boxes(path, image_id, finding.get("boxes", []) or [])
            if not boxes:
                continue
            sentence = finding.get("sentence_en")
            if not isinstance(sentence, str) or not sentence.strip():
                raise SourceFormatError(path, f"ImageID {image_id}: finding with boxes but no "
                                        "sentence_en", column="sentence_en")
            findings.append((sentence.strip(), boxes))
        if not findings:
            continue
        image = folder / image_id
        if check_images and not image.is_file():
            raise MissingSourceFileError(image, "PadChest-GR image")
        kept.append((image_id, str(image), findings))
    return kept


def phrase_samples(grounded: list, split: Split) -> list[SourceSample]:
    return [SourceSample("phrase_grounding", SOURCE, split, image, name=sentence, boxes=boxes)
            for _, image, findings in grounded for sentence, boxes in findings]


def conversation_samples(root: Path, grounded: list, split: Split,
                         conversations_dir: Path | None = None) -> list[SourceSample]:
    folder = Path(conversations_dir) if conversations_dir else (
        Path(root) / "conversations" / "train" / "grounding")
    if not folder.is_dir():
        raise MissingSourceFileError(folder, "PadChest-GR grounded conversations folder")
    samples = []
    for image_id, image, _ in grounded:
        conversation = folder / (Path(image_id).stem + ".json")
        if conversation.is_file():
            samples.append(SourceSample("grounded_conversation", SOURCE, split, image,
                                        turns=load_turns(conversation)))
    return samples
