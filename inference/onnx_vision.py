"""ONNX Runtime path for the image encoder (vision tower + projector).

``export_vision_onnx`` writes ``vision.onnx``: SigLIP over a stack of AnyRes tiles followed by the
multimodal projector, ``pixel_values (tiles, 3, H, W) → image_features (tiles, tokens, hidden)``
with a dynamic tile count (a CXR has 1 base + up to 36 grid tiles), exported in float32 with
torch's TorchScript-based exporter (``dynamo=False``; no onnxscript needed), and ``vision.json``
with the weights hash it was exported from.

``use_onnx_vision`` swaps the loaded model's vision tower for an onnxruntime session and its
projector for the identity, so transformers' own AnyRes packing (unpadding, newline tokens) runs
unchanged on the ONNX features. Providers: CUDA when onnxruntime-gpu sees a GPU, else CPU.
Parity (max abs difference of features, identical greedy tokens): tests/test_onnx_vision.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from inference.errors import ModelError
from inference.model_folder import check_model_folder, weights_sha256

ONNX_FILE = "vision.onnx"
META_FILE = "vision.json"


class OnnxExportError(ModelError):
    """The vision encoder could not be exported (unsupported configuration or exporter failure)."""


class VisionEncoder(nn.Module):
    """Vision tower + projector as one module (what is exported)."""

    def __init__(self, model: LlavaOnevisionForConditionalGeneration) -> None:
        super().__init__()
        config = model.config
        _check_supported(config)
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.layer = int(config.vision_feature_layer)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        return self.projector(outputs.hidden_states[self.layer])


def _check_supported(config) -> None:
    if not isinstance(config.vision_feature_layer, int):
        raise OnnxExportError("the ONNX vision path supports one vision_feature_layer, not a list "
                              f"({config.vision_feature_layer!r})")
    if config.vision_feature_select_strategy != "full":
        raise OnnxExportError("the ONNX vision path supports vision_feature_select_strategy 'full' (LLaVA-OneVision,"
                              f" RadVLM), not {config.vision_feature_select_strategy!r}")


def export_vision_onnx(model_dir: Path | str, out_dir: Path | str, *, opset: int = 17) -> Path:
    """Export the vision encoder of the model folder ``model_dir`` to ``out_dir/vision.onnx``."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    weights = check_model_folder(model_dir)
    try:
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    except Exception as exc:  # safetensors, torch and config errors have no common base class
        raise ModelError(f"cannot load the model weights from {model_dir}: {exc}") from exc
    encoder = VisionEncoder(model).eval()
    vision = model.config.vision_config
    sample = torch.randn(2, vision.num_channels, vision.image_size, vision.image_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / ONNX_FILE
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            torch.onnx.export(encoder, (sample,), str(target), input_names=["pixel_values"],
                              output_names=["image_features"], opset_version=opset, dynamo=False,
                              dynamic_axes={"pixel_values": {0: "tiles"}, "image_features": {0: "tiles"}})
    except Exception as exc:  # the exporter raises many unrelated types
        raise OnnxExportError(f"ONNX export of the vision encoder failed: {exc}") from exc
    meta = {"weights_sha256": weights_sha256(weights), "tile_size": vision.image_size,
            "tokens_per_tile": int(encoder(sample[:1]).shape[1]), "hidden_size": model.config.text_config.hidden_size,
            "opset": opset, "exporter": "torch.onnx (TorchScript)", "torch": torch.__version__,
            "seconds": round(time.perf_counter() - started, 2)}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    return target


def _providers(ort) -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtVisionTower(nn.Module):
    """Stands in for the vision tower: returns the projected features as every hidden state, so
    transformers' ``hidden_states[vision_feature_layer]`` picks them and the identity projector keeps them."""

    def __init__(self, onnx_path: Path, *, threads: int | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelError("[model] vision_backend = 'onnxruntime' needs onnxruntime: pip install "
                             "'radvlm-pacs[onnx]' (CPU) or 'radvlm-pacs[gpu]' (CUDA), never both") from exc
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=_providers(ort))
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"cannot open the ONNX vision encoder {onnx_path}: {exc}") from exc
        self.provider = self.session.get_providers()[0]

    def forward(self, pixel_values: torch.Tensor, *args, **kwargs) -> BaseModelOutputWithPooling:
        array = pixel_values.detach().to("cpu", torch.float32).numpy()
        (features,) = self.session.run(["image_features"], {"pixel_values": np.ascontiguousarray(array)})
        tensor = torch.from_numpy(features).to(pixel_values.device, pixel_values.dtype)
        return BaseModelOutputWithPooling(last_hidden_state=tensor, hidden_states=(tensor,) * 64)


def use_onnx_vision(model: LlavaOnevisionForConditionalGeneration, onnx_dir: Path, weights_hash: str,
                    *, threads: int | None = None) -> str:
    """Replace the model's vision tower and projector by ``onnx_dir/vision.onnx``; returns the provider.

    Refuses an export made from other weights (``vision.json``'s hash)."""
    _check_supported(model.config)
    onnx_path, meta_path = onnx_dir / ONNX_FILE, onnx_dir / META_FILE
    if not onnx_path.is_file() or not meta_path.is_file():
        raise ModelError(f"no ONNX vision encoder in {onnx_dir} (expected {ONNX_FILE} and {META_FILE}); "
                         "run `radvlm export-onnx --model <model folder> --out <folder>`")
    try:
        exported_from = json.loads(meta_path.read_text())["weights_sha256"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"unreadable {meta_path}: {exc}") from exc
    if exported_from != weights_hash:
        raise ModelError(f"{onnx_path} was exported from other weights (sha256 {exported_from[:12]}…, model "
                         f"{weights_hash[:12]}…); export it again")
    tower = OrtVisionTower(onnx_path, threads=threads)
    model.model.vision_tower = tower
    model.model.multi_modal_projector = nn.Identity()
    return tower.provider
