"""Stage 4 of the phantom demo model (issue 16): vision-tower pre-training on per-patch finding
targets (training/demo_vision.py), and the phantom-source settings the later stage uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training.demo_vision import (
    FAMILIES,
    IMAGE_LABELS,
    PhantomPatchDataset,
    VisionPretrainConfig,
    _check_against_processor,
    pretrain,
)
from training.phantoms.sampler import PhantomConfig, PhantomSampler

TILE, PATCH = 64, 16


@pytest.fixture(scope="module")
def vision_model_dir(tmp_path_factory) -> Path:
    from inference.tiny import TinyGeometry, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("vision-base"), tile_size=TILE, patch_size=PATCH,
                            geometry=TinyGeometry(single_tile=True, tie_embeddings=True))


def _dataset(seed: int = 3, config: PhantomConfig | None = None, **kwargs) -> PhantomPatchDataset:
    return PhantomPatchDataset(PhantomSampler(seed, config or PhantomConfig(size=TILE)), 50, TILE, PATCH,
                               kwargs.get("mean", (0.5, 0.5, 0.5)), (0.5, 0.5, 0.5))


def _first(dataset: PhantomPatchDataset, kind: str) -> int:
    return next(i for i in range(len(dataset)) if any(f.kind == kind for f in dataset.sampler.sample(i).findings))


def test_patch_targets_mark_the_patches_a_finding_drew_and_no_others():
    dataset = _dataset(config=PhantomConfig(size=TILE, rates={"lung lesion": 1.0}, normal_fraction=0.0))
    index = _first(dataset, "lung lesion")
    phantom = dataset.sampler.sample(index)
    _, patches, labels = dataset[index]
    grid = TILE // PATCH
    lesion = next(k for k, f in enumerate(phantom.findings) if f.kind == "lung lesion")
    column = FAMILIES.index("lung lesion")
    _, top, left = dataset.square(phantom)
    expected = np.zeros(grid * grid, dtype=bool)
    x, y, _ = phantom.findings[lesion].lobes[0]
    expected[int((y + top) // PATCH) * grid + int((x + left) // PATCH)] = True
    marked = patches[:, column].numpy().astype(bool)
    assert marked[expected].all()                      # the patch holding the nodule's centre
    assert 0 < marked.sum() <= 4                       # a nodule touches at most a 2×2 block of patches
    mask = phantom.footprints[lesion][0]
    placed = np.zeros((TILE, TILE), dtype=bool)
    placed[top:top + mask.shape[0], left:left + mask.shape[1]] = mask
    hits = placed.reshape(grid, PATCH, grid, PATCH).any(axis=(1, 3)).reshape(-1)
    assert (marked == hits).all()                      # exactly the patches its pixels fall in
    assert labels[IMAGE_LABELS.index("lung lesion")] == 1.0 and labels[IMAGE_LABELS.index("no finding")] == 0.0
    absent = [FAMILIES.index(f) for f in FAMILIES if not phantom.labels[f]]
    assert patches[:, absent].sum() == 0


def test_a_normal_phantom_has_no_patch_target_and_only_no_finding():
    dataset = _dataset(config=PhantomConfig(size=TILE, normal_fraction=1.0))
    _, patches, labels = dataset[0]
    assert patches.sum() == 0
    assert labels.tolist() == [1.0 if label == "no finding" else 0.0 for label in IMAGE_LABELS]


def test_phantom_footprints_agree_with_the_truth_boxes():
    phantom = PhantomSampler(11, PhantomConfig(size=TILE, normal_fraction=0.0)).sample(2)
    assert len(phantom.footprints) == len(phantom.findings) == len(phantom.truths)
    for truth, footprints in zip(phantom.truths, phantom.footprints):
        assert len(footprints) == len(truth.boxes)
        for mask, box in zip(footprints, truth.boxes):
            rows, columns = np.nonzero(mask)
            assert box[0] * phantom.columns <= columns.min() and columns.max() < box[2] * phantom.columns
            assert box[1] * phantom.rows <= rows.min() and rows.max() < box[3] * phantom.rows


def test_the_pretraining_input_equals_the_processors_and_a_different_padding_is_caught(vision_model_dir):
    from inference.processor import load_processor

    processor = load_processor(vision_model_dir)
    mean = tuple(processor.image_processor.image_mean)
    dataset = PhantomPatchDataset(PhantomSampler(3, PhantomConfig(size=TILE)), 4, TILE, PATCH, mean,
                                  tuple(processor.image_processor.image_std))
    _check_against_processor(processor, dataset, dataset[0][0])
    shifted = dataset[0][0].clone()
    shifted[:, :, 0] += 1.0
    with pytest.raises(RuntimeError, match="differs from the processor"):
        _check_against_processor(processor, dataset, shifted)


def test_pretraining_changes_the_vision_tower_only_and_writes_a_loadable_folder(vision_model_dir, tmp_path):
    from config.settings import ModelSettings
    from inference.model import load_model

    out = tmp_path / "stage4"
    cfg = VisionPretrainConfig(model_path=vision_model_dir, output_dir=out, phantom_seed=4, size=TILE, steps=4,
                               batch_size=4, learning_rate=5e-3, warmup_steps=1, logging_steps=2, workers=0)
    record = pretrain(cfg, job_text="# job\n", log=lambda line: None)
    assert [entry["step"] for entry in record["loss"]] == [2, 4]
    before, after = load_file(str(vision_model_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and all("vision_tower" in key for key in changed)
    assert any("vision_tower" in key and "layers" in key for key in changed)
    assert (out / "vision_pretrain.json").is_file() and (out / "vision_pretrain.toml").read_text() == "# job\n"
    again = pretrain(cfg.model_copy(update={"output_dir": tmp_path / "again"}), log=lambda line: None)
    assert [e["loss"] for e in again["loss"]] == [e["loss"] for e in record["loss"]]   # a pure function of the job
    repeated = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(after[key], repeated[key]) for key in after)
    model = load_model(ModelSettings(path=out, device="cpu", dtype="float32"))
    assert model.info.version == load_model(ModelSettings(path=vision_model_dir, device="cpu", dtype="float32")).info.version


def test_pretraining_refuses_phantoms_larger_than_the_tile(vision_model_dir, tmp_path):
    cfg = VisionPretrainConfig(model_path=vision_model_dir, output_dir=tmp_path / "x", phantom_seed=4, size=96,
                               steps=1, batch_size=2, workers=0)
    with pytest.raises(ValueError, match="differs from the tile"):
        pretrain(cfg, log=lambda line: None)


def test_phantom_source_rates_override_the_generator_defaults_and_reject_unknown_families():
    from training.finetune.config import PhantomDataSettings
    from training.phantoms.sampler import DEFAULT_RATES

    settings = PhantomDataSettings(samples=10, rates={"pneumothorax": 0.3}, normal_fraction=0.1)
    config = settings.phantom_config()
    assert config.rates["pneumothorax"] == 0.3 and config.normal_fraction == 0.1
    assert {k: v for k, v in config.rates.items() if k != "pneumothorax"} == {
        k: v for k, v in DEFAULT_RATES.items() if k != "pneumothorax"}
    assert PhantomDataSettings(samples=10).phantom_config() == PhantomConfig(size=128)
    with pytest.raises(ValueError, match="unknown finding families"):
        PhantomDataSettings(samples=10, rates={"pneumonia": 0.5}).phantom_config()


def test_probe_scores_every_label_on_the_heldout_phantoms(vision_model_dir):
    from training.demo_vision import probe

    scores = probe(vision_model_dir, fit_count=60, heldout_count=20, size=TILE)
    assert set(scores) == set(IMAGE_LABELS) | {"macro"}
    assert all(0.0 <= value <= 1.0 for value in scores.values())
    assert scores["macro"] == pytest.approx(np.mean([scores[label] for label in IMAGE_LABELS]), abs=1e-3)


def test_the_data_manifest_records_the_finding_mix_the_job_drew():
    from training.finetune.config import TrainConfig
    from training.finetune.export import data_manifest

    cfg = TrainConfig(model_path="m", output_dir="o", max_steps=1,
                      data={"phantoms": {"samples": 4, "rates": {"pneumothorax": 0.3}, "normal_fraction": 0.1}})
    manifest = data_manifest(cfg, 4)
    assert manifest["phantom_config"]["rates"]["pneumothorax"] == 0.3
    assert manifest["phantom_config"]["normal_fraction"] == 0.1
