"""Inference-core benchmark: DICOM decode + preprocessing, and the per-study plan with vs without
image-prefix reuse, measured in one run so the ratios compare like with like.

    .venv/bin/python benchmarks/bench_inference_core.py [--repeats 3] [--geometry real|small]

1. pydicom-data's real chest CR RG1 (1955 rows × 1841 columns, MONOCHROME1, 15-bit), uncompressed
   (RG1_UNCR) and JPEG 2000 lossless (RG1_J2KR): decode + Modality/VOI LUT + 8-bit (load_image), and
   the processor's AnyRes preprocessing with the REAL RadVLM image-processor geometry (384 px tiles,
   pinpoints 384…2304, anyres_max_9).
2. A tiny random LlavaOnevision (the real token geometry by default: 384 px tiles, patch 14 →
   729 tokens per tile, so the image prefix is ~7k tokens as for RadVLM) answers a study plan of 7
   questions (report, classification, 3 abnormality groundings, 2 phrase groundings) with a fixed
   number of new tokens, once re-using the image prefix's KV cache and once prefilling every question
   from scratch. Printed: seconds per plan, prefill tokens per plan, and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pydicom.data import get_testdata_file
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from config.settings import ModelSettings
from inference import prompts
from inference.image import load_image
from inference.model import Turn, load_model
from inference.tiny import build_tiny_model

PLAN = [prompts.REPORT_PROMPT, prompts.CLASSIFICATION_PROMPT,
        prompts.abnormality_grounding_prompt("cardiomegaly"), prompts.abnormality_grounding_prompt("pleural effusion"),
        prompts.abnormality_grounding_prompt("lung opacity"),
        prompts.phrase_grounding_prompt("Small left pleural effusion."),
        prompts.phrase_grounding_prompt("The heart is enlarged.")]


def _median_seconds(function, repeats: int) -> tuple[float, object]:
    times, value = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        value = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), value


def bench_decode(repeats: int) -> None:
    real_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 384, "width": 384},
        image_grid_pinpoints=[[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)],
        image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pad=True)
    print("## DICOM decode + LUTs → 8-bit, and AnyRes preprocessing (real 384-px geometry)")
    print(f"{'file':<14}{'decode+LUT s':>14}{'preprocess s':>14}{'crops':>8}")
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm"):
        path = get_testdata_file(name)
        decode_s, image = _median_seconds(lambda: load_image(path), repeats)
        preprocess_s, processed = _median_seconds(
            lambda: real_processor(images=[image.to_pil_rgb()], return_tensors="pt"), repeats)
        crops = processed["pixel_values"].shape[1]
        print(f"{name:<14}{decode_s:>14.3f}{preprocess_s:>14.3f}{crops:>8}")


def bench_plan(repeats: int, geometry: str, max_new_tokens: int) -> None:
    tile, patch = (384, 14) if geometry == "real" else (32, 8)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(Path(tmp) / "tiny", tile_size=tile, patch_size=patch)
        model = load_model(ModelSettings(path=folder, max_new_tokens=max_new_tokens))
        image = load_image(get_testdata_file("RG1_J2KR.dcm"))

        def plan(reuse: bool) -> tuple[int, list[str]]:
            prefix = model.encode_image(image, reuse_prefix=reuse)
            generations = [model.answer(prefix, [Turn("user", q)]) for q in PLAN]
            prefill = sum(g.prompt_tokens for g in generations) + (len(prefix.prefix_ids) if reuse else 0)
            return prefill, [g.text for g in generations]

        plan(True)  # warm-up
        reuse_s, (reuse_tokens, reuse_texts) = _median_seconds(lambda: plan(True), repeats)
        fresh_s, (fresh_tokens, fresh_texts) = _median_seconds(lambda: plan(False), repeats)
        prefix_tokens = len(model.encode_image(image, reuse_prefix=False).prefix_ids)
    print(f"\n## Per-study plan on the tiny model ({geometry} geometry: {tile}-px tiles, patch {patch}; "
          f"{len(PLAN)} questions, ≤{max_new_tokens} new tokens each; image prefix {prefix_tokens} tokens)")
    print(f"{'mode':<22}{'plan s':>10}{'prefill tokens':>16}")
    print(f"{'prefix reuse':<22}{reuse_s:>10.3f}{reuse_tokens:>16}")
    print(f"{'fresh per question':<22}{fresh_s:>10.3f}{fresh_tokens:>16}")
    print(f"ratio fresh/reuse: time {fresh_s / reuse_s:.2f}x, prefill tokens {fresh_tokens / reuse_tokens:.2f}x; "
          f"answers identical: {reuse_texts == fresh_texts}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--geometry", choices=["real", "small"], default="real")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    bench_decode(args.repeats)
    bench_plan(args.repeats, args.geometry, args.max_new_tokens)


if __name__ == "__main__":
    main()
