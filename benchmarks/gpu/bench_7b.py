"""RadVLM-7B serving cost on one GPU, measured on a random-weight model with the real geometry.

    python benchmarks/gpu/bench_7b.py                 # GPU: bf16, ~1–2 minutes on an H100/H200
    python benchmarks/gpu/bench_7b.py --tiny          # CPU smoke run (tiny geometry, fp32)

No download: LlavaOnevision is built from its config with random weights — Qwen2-7B text (28 layers,
3584 wide, 18944 MLP, 28 heads / 4 KV heads, 152,064 vocabulary), SigLIP-so400m-patch14-384 vision
(26 layers as LLaVA-OneVision uses it, 1152 wide), 2-layer projector, AnyRes pinpoints 384…2304 and
anyres_max_9 — and the 1955×1841 chest CR of pydicom-data (RG1; a synthetic image of that size when
pydicom-data is missing). Random weights never emit the stop token, so every answer runs to its
token limit: the plan is report (--report-tokens), classification (--class-tokens) and
--grounding questions (--ground-tokens each).

Printed, each beside plain transformers ``generate`` (every question prefilled from the pixels,
no reuse, no batching) and beside the physical limit of the GPU:
* prefill of the image prompt (s) and decode (ms/token at batch 1);
* the per-study plan: plain generate, prefix reuse, prefix reuse + batched grounding;
* studies/hour at batch 1 and with --studies-batch studies answered together (one generate call
  per task across the studies, each with its own image prefix).

Physical limits: decode ≈ weight bytes / HBM bandwidth per token (batch 1), prefill ≈ 2·params·tokens
/ peak dense bf16 FLOP/s; the GPU's figures come from a table of known GPUs (or --hbm-tbps and
--peak-tflops). Works with transformers ≥ 5.17 (the runner picks ``cache`` or ``past_key_values``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,  # noqa: E402
                          SiglipVisionConfig)

from config.settings import ModelSettings  # noqa: E402
from inference import prompts  # noqa: E402
from inference.image import ModelImage  # noqa: E402
from inference.model import RadVLMModel, Turn  # noqa: E402
from inference.processor import load_processor  # noqa: E402
from inference.result import ModelInfo, SourceImage  # noqa: E402
from inference.tiny import TinyGeometry, build_tiny_model  # noqa: E402

# (HBM TB/s, dense bf16 TFLOP/s) from the vendors' data sheets, matched on the device name
GPUS = {"H200": (4.8, 989.0), "H100 SXM": (3.35, 989.0), "H100 80GB HBM3": (3.35, 989.0), "H100 PCIe": (2.0, 756.0),
        "H100 NVL": (3.9, 835.0), "A100-SXM4-80GB": (2.039, 312.0), "A100 80GB PCIe": (1.935, 312.0),
        "A100-SXM4-40GB": (1.555, 312.0), "L40S": (0.864, 362.0), "L4": (0.3, 121.0), "B200": (8.0, 2250.0)}


def gpu_limits(device: torch.device, hbm: float | None, tflops: float | None) -> tuple[str, float | None, float | None]:
    if device.type != "cuda":
        return platform.processor() or platform.machine(), hbm, tflops
    name = torch.cuda.get_device_name(device)
    for key, (bandwidth, peak) in GPUS.items():
        if key in name:
            return name, hbm or bandwidth, tflops or peak
    return name, hbm, tflops


def build_model(tiny: bool, image_token: int, video_token: int, device: torch.device,
                dtype: torch.dtype) -> LlavaOnevisionForConditionalGeneration:
    if tiny:
        geometry = TinyGeometry()
        vision = SiglipVisionConfig(hidden_size=geometry.vision_hidden, intermediate_size=geometry.vision_intermediate,
                                    num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
        text = Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32768,
                           tie_word_embeddings=False)
        pinpoints = [[32 * r, 32 * c] for r in range(1, 7) for c in range(1, 7)]
    else:
        vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                    num_attention_heads=16, image_size=384, patch_size=14)
        text = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                           num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                           rope_theta=1_000_000.0, tie_word_embeddings=False)
        pinpoints = [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)]
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                                  vision_feature_select_strategy="full", vision_feature_layer=-1,
                                  vision_aspect_ratio="anyres_max_9", image_token_index=image_token,
                                  video_token_index=video_token, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    with torch.device(device):  # random init in fp32 on the device (every init op exists there), then cast
        model = LlavaOnevisionForConditionalGeneration(config)
    return model.to(dtype).eval()


def chest_image(columns: int, rows: int) -> ModelImage:
    try:
        from pydicom.data import get_testdata_file

        from inference.image import load_image

        return load_image(get_testdata_file("RG1_J2KR.dcm"))
    except Exception:  # pydicom-data (or a codec) missing on this machine: a synthetic image of the same size
        y, x = np.mgrid[0:rows, 0:columns]
        pixels = (128 + 60 * np.sin(x / 97) * np.cos(y / 131)).astype(np.uint8)
        return ModelImage(pixels=pixels, source=SourceImage(rows=rows, columns=columns))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, function, repeats: int = 1):
    times, value = [], None
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        value = function()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times), value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny geometry, fp32")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    parser.add_argument("--report-tokens", type=int, default=100)
    parser.add_argument("--class-tokens", type=int, default=24)
    parser.add_argument("--ground-tokens", type=int, default=32)
    parser.add_argument("--grounding", type=int, default=5, help="grounding questions per study")
    parser.add_argument("--studies-batch", type=int, default=8, help="studies answered together")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hbm-tbps", type=float, help="HBM bandwidth (TB/s) when the GPU is not in the table")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 TFLOP/s when the GPU is not in the table")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    begun = time.perf_counter()
    torch.manual_seed(0)
    name, hbm, peak = gpu_limits(device, args.hbm_tbps, args.peak_tflops)
    print(f"# bench_7b {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {name}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {dtype}, {'tiny geometry' if args.tiny else 'RadVLM-7B geometry'}")

    with tempfile.TemporaryDirectory() as tmp:  # tokenizer + processor (real 384-px AnyRes unless --tiny)
        folder = build_tiny_model(Path(tmp) / "p", **({} if args.tiny else {"tile_size": 384, "patch_size": 14}))
        processor = load_processor(folder)
    tokenizer = processor.tokenizer
    model = build_model(args.tiny, tokenizer.convert_tokens_to_ids("<image>"),
                        tokenizer.convert_tokens_to_ids("<video>"), device, dtype)
    params = sum(p.numel() for p in model.parameters())
    vision_params = sum(p.numel() for p in model.model.vision_tower.parameters())
    text_params = params - vision_params
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    info = ModelInfo(model_id="random-7b-geometry", version="bench", weights_sha256="0" * 64)
    runner = RadVLMModel(model, processor, info, ModelSettings(path=folder, max_new_tokens=4096), device)
    image = chest_image(1841, 1955)
    print(f"model: {params / 1e9:.2f} B parameters ({vision_params / 1e6:.0f} M vision), {weight_bytes / 2**30:.1f} GiB;"
          f" built in {time.perf_counter() - begun:.0f} s; image {image.source.columns}×{image.source.rows}")

    questions = [prompts.abnormality_grounding_prompt(label) for label in
                 ("cardiomegaly", "pleural effusion", "lung opacity", "atelectasis", "edema", "consolidation",
                  "pneumothorax", "fracture")][: args.grounding]
    plan = [(prompts.REPORT_PROMPT, args.report_tokens), (prompts.CLASSIFICATION_PROMPT, args.class_tokens)]
    plan += [(q, args.ground_tokens) for q in questions]
    new_tokens = sum(n for _, n in plan)

    # -- prefill and decode ----------------------------------------------------------------
    runner.encode_image(image)  # warm-up (kernels, allocator)
    preprocess_s, bare = timed(device, lambda: runner.encode_image(image, reuse_prefix=False), args.repeats)
    prefill_s, prefix = timed(device, lambda: runner.encode_image(image), args.repeats)
    prefix_tokens = len(prefix.prefix_ids)
    tiles = int(bare.image_inputs["pixel_values"].shape[1])
    one_s, _ = timed(device, lambda: runner.answer(prefix, [Turn("user", questions[0])], max_new_tokens=1), args.repeats)
    many = 64
    many_s, generated = timed(device, lambda: runner.answer(prefix, [Turn("user", questions[0])],
                                                            max_new_tokens=many), args.repeats)
    decode_ms = (many_s - one_s) / max(generated.new_tokens - 1, 1) * 1000
    # the same through plain transformers generate (pixels in, full prompt prefilled, no cache kept)
    plain_one_s, _ = timed(device, lambda: runner.answer(bare, [Turn("user", questions[0])], max_new_tokens=1),
                           args.repeats)
    plain_many_s, plain_generated = timed(device, lambda: runner.answer(bare, [Turn("user", questions[0])],
                                                                        max_new_tokens=many), args.repeats)
    plain_decode_ms = (plain_many_s - plain_one_s) / max(plain_generated.new_tokens - 1, 1) * 1000
    prefill_only = prefill_s - preprocess_s
    vision_flops = 2 * vision_params * tiles * (384 // 14) ** 2 if not args.tiny else 2 * vision_params * tiles * 16
    prefill_flops = 2 * text_params * prefix_tokens + vision_flops
    limit_prefill = prefill_flops / (peak * 1e12) if peak else None
    limit_decode_ms = weight_bytes / (hbm * 1e12) * 1000 if hbm else None

    def beside(value: float, limit: float | None, unit: str) -> str:
        return f"physical limit {limit:.4g} {unit} (measured = {value / limit:.1f}x the limit)" if limit \
            else "physical limit n/a (unknown device: --hbm-tbps, --peak-tflops)"

    print(f"\nimage prompt: {tiles} tiles, prefix {prefix_tokens} tokens; preprocessing {preprocess_s:.3f} s")
    print(f"prefill (vision + {prefix_tokens} tokens): {prefill_only:.3f} s; {beside(prefill_only, limit_prefill, 's')}")
    print(f"plain generate (preprocessed pixels in): vision + prefill + first token {plain_one_s:.3f} s; "
          f"decode {plain_decode_ms:.2f} ms/token")
    print(f"decode at batch 1: {decode_ms:.2f} ms/token; "
          f"{beside(decode_ms, limit_decode_ms, 'ms/token')}")

    # -- per-study plan --------------------------------------------------------------------
    def plain() -> None:  # transformers generate from pixels for every question, no reuse, no batching
        for question, limit in plan:
            runner.answer(runner.encode_image(image, reuse_prefix=False), [Turn("user", question)],
                          max_new_tokens=limit)

    def reuse(batched: bool) -> None:
        encoded = runner.encode_image(image)
        for question, limit in plan[:2]:
            runner.answer(encoded, [Turn("user", question)], max_new_tokens=limit)
        grounding = [runner.prepare(encoded, [Turn("user", q)], max_new_tokens=limit) for q, limit in plan[2:]]
        if batched:
            runner.answer_batch(grounding)
        else:
            for item in grounding:
                runner.answer_batch([item])

    def studies_batched(count: int) -> None:  # `count` studies at once: one generate call per task step
        encoded = [runner.encode_image(image) for _ in range(count)]
        for question, limit in plan[:2]:
            runner.answer_batch([runner.prepare(e, [Turn("user", question)], max_new_tokens=limit) for e in encoded])
        grounding = [runner.prepare(e, [Turn("user", q)], max_new_tokens=limit) for e in encoded for q, limit in plan[2:]]
        for start in range(0, len(grounding), count):
            runner.answer_batch(grounding[start: start + count])

    plain_s, _ = timed(device, plain, args.repeats)
    reuse_s, _ = timed(device, lambda: reuse(False), args.repeats)
    batched_s, _ = timed(device, lambda: reuse(True), args.repeats)
    many_studies_s, _ = timed(device, lambda: studies_batched(args.studies_batch), 1)
    per_study_batched = many_studies_s / args.studies_batch
    limit_plan = (limit_prefill + new_tokens * limit_decode_ms / 1000) if limit_prefill and limit_decode_ms else None
    print(f"\nper-study plan: report {args.report_tokens} + classification {args.class_tokens} + {len(questions)} × "
          f"grounding {args.ground_tokens} = {new_tokens} new tokens")
    print(f"{'mode':<44}{'s/study':>9}{'studies/h':>11}{'vs plain':>10}{'vs limit':>10}")
    rows = [("plain generate (baseline)", plain_s), ("prefix reuse", reuse_s),
            ("prefix reuse + batched grounding", batched_s),
            (f"{args.studies_batch} studies batched (+ reuse, grounding)", per_study_batched)]
    limit_batched = None
    if limit_prefill and limit_decode_ms:  # batch B: weights read once per step for B rows, or compute-bound
        step = max(limit_decode_ms / 1000 / args.studies_batch, 2 * params / (peak * 1e12))
        limit_batched = limit_prefill + new_tokens * step
    for index, (label, seconds) in enumerate(rows):
        limit = limit_batched if index == len(rows) - 1 else limit_plan
        versus_limit = f"{seconds / limit:>9.1f}x" if limit else f"{'n/a':>10}"
        print(f"{label:<44}{seconds:>9.3f}{3600 / seconds:>11.0f}{plain_s / seconds:>9.2f}x{versus_limit}")
    if limit_plan and limit_batched:
        print(f"{'physical limit at batch 1 (prefill + decode)':<44}{limit_plan:>9.3f}{3600 / limit_plan:>11.0f}")
        print(f"{f'physical limit, {args.studies_batch} studies batched':<44}{limit_batched:>9.3f}"
              f"{3600 / limit_batched:>11.0f}")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    print(f"total run time {time.perf_counter() - begun:.0f} s")


if __name__ == "__main__":
    main()
