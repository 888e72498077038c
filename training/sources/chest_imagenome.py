"""Chest ImaGenome (silver dataset) anatomical regions on MIMIC-CXR-JPG images.

Schema sources:
- PhysioNet Chest ImaGenome v1.0.0: ``silver_dataset/splits/{train,valid,test}.csv`` (dicom_id,
  subject_id, study_id, ViewPosition …) and ``silver_dataset/scene_graph/{dicom_id}_SceneGraph.json``
  (unpacked from ``scene_graph.zip``) whose ``objects`` carry ``bbox_name`` and the box in
  original-image pixels ``original_x1``, ``original_y1``, ``original_x2``, ``original_y2``.
- Upstream uzh-dqbm-cmi/RadVLM ``radvlm/data/datasets.py`` ``Chest_ImaGenome_Dataset``: the
  images are MIMIC-CXR-JPG ones (``files/p1x/…/{dicom_id}.jpg``), boxes are divided by the
  MIMIC metadata ``Columns`` (x) and ``Rows`` (y), one object is picked at random per sample
  (``pick_one_region``) and asked about by its ``bbox_name``; dicom_ids listed in a split but
  without a scene-graph file are skipped (upstream's ``missing_ids.json``);
  ``create_llava_dataset.py`` takes 80,000 samples of the train split.
- Split: upstream builds the MIMIC index with its default split "train" and intersects it with
  the ImaGenome split; we keep that for training (ImaGenome train ∩ MIMIC train) and, so that no
  MIMIC training image is ever tested on, take ImaGenome test ∩ MIMIC validate/test for testing.
"""

from __future__ import annotations

from pathlib import Path

from training.sources.errors import SourceFormatError
from training.sources.mimic_cxr import MimicCxr
from training.sources.samples import BoxTuple, SourceSample, Split, clamp_box
from training.sources.tables import find_table, read_csv, read_json, require_dir, text_cell

SOURCE = "chest_imagenome"
SPLIT_FILES = {"train": "train.csv", "valid": "valid.csv", "test": "test.csv"}
_BOX_KEYS = ("original_x1", "original_y1", "original_x2", "original_y2")


def _regions(path: Path, columns: int, rows: int) -> tuple[tuple[str, BoxTuple], ...]:
    graph = read_json(path, "Chest ImaGenome scene graph")
    objects = graph.get("objects") if isinstance(graph, dict) else None
    if not isinstance(objects, list):
        raise SourceFormatError(path, "missing list", column="objects")
    regions = []
    for index, item in enumerate(objects):
        missing = [k for k in ("bbox_name", *_BOX_KEYS) if k not in item]
        if missing:
            raise SourceFormatError(path, f"object {index} lacks {missing}", column=missing[0])
        try:
            x1, y1, x2, y2 = (float(item[k]) for k in _BOX_KEYS)
        except (TypeError, ValueError):
            raise SourceFormatError(path, f"object {index}: non-numeric box",
                                    column="original_x1") from None
        box = clamp_box(x1 / columns, y1 / rows, x2 / columns, y2 / rows)
        if box is not None:
            regions.append((str(item["bbox_name"]), box))
    return tuple(regions)


def anatomical_samples(root: Path, mimic: MimicCxr, split: Split) -> list[SourceSample]:
    silver = require_dir(Path(root) / "silver_dataset", "Chest ImaGenome silver_dataset folder")
    graphs = require_dir(silver / "scene_graph", "Chest ImaGenome scene_graph folder")
    path = find_table(silver / "splits", SPLIT_FILES[split], f"Chest ImaGenome {split} split")
    wanted_mimic = {"train"} if split == "train" else {"valid", "test"}
    samples = []
    for line, row in read_csv(path, ("dicom_id",)):
        dicom_id = text_cell(path, line, row, "dicom_id")
        image = mimic.by_dicom_id.get(dicom_id)
        if image is None or image.split not in wanted_mimic:
            continue
        graph = graphs / f"{dicom_id}_SceneGraph.json"
        if not graph.is_file():
            continue  # upstream: listed in missing_ids.json
        regions = _regions(graph, image.columns, image.rows)
        if regions:
            samples.append(SourceSample("anatomical_grounding", SOURCE, split,
                                        mimic.image_path(image), regions=regions))
    return samples
