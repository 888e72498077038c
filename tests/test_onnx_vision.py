"""ONNX Runtime image encoder: `radvlm export-onnx`, feature parity with torch, identical greedy tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from config.settings import ModelSettings
from dicom_node.cli import main
from inference.errors import ModelError
from inference.model import Turn, load_model
from tests.model_images import gradient_image

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx")
    assert main(["export-onnx", "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    return out


def test_export_writes_the_model_and_its_weights_hash(exported: Path, tiny_model):
    assert (exported / "vision.onnx").stat().st_size > 0
    assert json.loads((exported / "vision.json").read_text())["weights_sha256"] == tiny_model.info.weights_sha256


def test_onnx_features_match_torch_for_any_tile_count(tiny_model_dir, exported, tiny_model):
    onnx_model = load_model(ModelSettings(path=tiny_model_dir, max_new_tokens=24, vision_backend="onnxruntime",
                                          onnx_dir=exported))
    counts = set()
    for rows, columns in [(40, 30), (150, 120), (90, 200)]:  # different AnyRes grids: different tile counts
        inputs = tiny_model.encode_image(gradient_image(rows, columns), reuse_prefix=False).image_inputs
        counts.add(int(inputs["pixel_values"].shape[1]))
        with torch.inference_mode():
            mine = onnx_model.model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                             vision_feature_layer=-1,
                                                             vision_feature_select_strategy="full").pooler_output
            theirs = tiny_model.model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                               vision_feature_layer=-1,
                                                               vision_feature_select_strategy="full").pooler_output
        assert max((a - b).abs().max().item() for a, b in zip(mine, theirs)) < 1e-5
    assert len(counts) == 3

    image = gradient_image(150, 120, seed=5)
    for question in ("Provide a radiology report for this Chest X-Ray.",
                     "Where is the cardiomegaly located in this Chest X-ray?"):
        a = onnx_model.answer(onnx_model.encode_image(image), [Turn("user", question)], return_logits=True)
        b = tiny_model.answer(tiny_model.encode_image(image), [Turn("user", question)], return_logits=True)
        assert a.text == b.text
        for x, y in zip(a.step_logits, b.step_logits):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-4)


def test_export_of_other_weights_is_refused(tiny_model_dir, exported, tmp_path):
    meta = json.loads((exported / "vision.json").read_text())
    other = tmp_path / "onnx"
    shutil.copytree(exported, other)
    (other / "vision.json").write_text(json.dumps({**meta, "weights_sha256": "0" * 64}))
    with pytest.raises(ModelError, match="exported from other weights"):
        load_model(ModelSettings(path=tiny_model_dir, vision_backend="onnxruntime", onnx_dir=other))
    with pytest.raises(ModelError, match="radvlm export-onnx"):
        load_model(ModelSettings(path=tiny_model_dir, vision_backend="onnxruntime", onnx_dir=tmp_path / "none"))
