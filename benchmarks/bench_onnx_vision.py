"""Image encoder (vision tower + projector): torch vs the ONNX Runtime export, in one run, same tiles.

    .venv/bin/python benchmarks/bench_onnx_vision.py [--geometry medium|small] [--repeats 5] [--threads 2]

A random LlavaOnevision is built offline with 384-px tiles and patch 14 (729 tokens per tile, as
SigLIP-so400m in RadVLM) and a reduced SigLIP width/depth (medium: 256 wide, 4 layers; small: the
32-px test geometry); the 1955×1841 chest CR (pydicom-data RG1) is preprocessed once (AnyRes
tiles) and encoded by torch (fp32) and by onnxruntime (the provider it picks: CUDA with
onnxruntime-gpu and a GPU, else CPU), both with --threads intra-op threads. Printed: median
seconds, the ratio torch/ORT, the max abs difference of the features and whether the greedy
answer is identical.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from config.settings import ModelSettings  # noqa: E402
from inference import prompts  # noqa: E402
from inference.image import load_image  # noqa: E402
from inference.model import Turn, load_model  # noqa: E402
from inference.onnx_vision import export_vision_onnx, use_onnx_vision  # noqa: E402
from inference.tiny import TinyGeometry, build_tiny_model  # noqa: E402

GEOMETRIES = {
    "medium": dict(tile_size=384, patch_size=14, geometry=TinyGeometry(vision_hidden=256, vision_intermediate=1024,
                                                                         vision_layers=4, vision_heads=4)),
    "small": dict(tile_size=32, patch_size=8, geometry=TinyGeometry()),
}


def features(model, inputs) -> list[torch.Tensor]:
    with torch.inference_mode():
        return list(model.model.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], vision_feature_layer=model.model.config.vision_feature_layer,
            vision_feature_select_strategy="full").pooler_output)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="medium")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and onnxruntime alike")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# bench_onnx_vision {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} threads each")
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(Path(tmp) / "model", **GEOMETRIES[args.geometry])
        started = time.perf_counter()
        export_vision_onnx(folder, Path(tmp) / "onnx")
        export_s = time.perf_counter() - started
        torch_model = load_model(ModelSettings(path=folder, max_new_tokens=16))
        ort_model = load_model(ModelSettings(path=folder, max_new_tokens=16))
        provider = use_onnx_vision(ort_model.model, Path(tmp) / "onnx", ort_model.info.weights_sha256,
                                   threads=args.threads)
        image = load_image(get_testdata_file("RG1_J2KR.dcm"))
        inputs = torch_model.encode_image(image, reuse_prefix=False).image_inputs
        tiles = int(inputs["pixel_values"].shape[1])
        times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
        outputs = {}
        for name, model in (("torch", torch_model), ("onnxruntime", ort_model)):
            features(model, inputs)  # warm-up
            for _ in range(args.repeats):
                begun = time.perf_counter()
                outputs[name] = features(model, inputs)
                times[name].append(time.perf_counter() - begun)
        diff = max((a - b).abs().max().item() for a, b in zip(outputs["torch"], outputs["onnxruntime"]))
        answers = [m.answer(m.encode_image(image), [Turn("user", prompts.REPORT_PROMPT)]).text
                   for m in (torch_model, ort_model)]
    torch_s, ort_s = statistics.median(times["torch"]), statistics.median(times["onnxruntime"])
    print(f"geometry {args.geometry}: {tiles} tiles of {GEOMETRIES[args.geometry]['tile_size']} px, "
          f"{sum(p.numel() for p in torch_model.model.model.vision_tower.parameters()) / 1e6:.1f} M vision parameters; "
          f"export {export_s:.1f} s; onnxruntime provider {provider}")
    print(f"{'encoder':<14}{'median s':>10}")
    print(f"{'torch':<14}{torch_s:>10.4f}")
    print(f"{'onnxruntime':<14}{ort_s:>10.4f}")
    print(f"ratio torch/onnxruntime: {torch_s / ort_s:.2f}x; max abs feature difference {diff:.2e}; "
          f"greedy answers identical: {answers[0] == answers[1]}")


if __name__ == "__main__":
    main()
