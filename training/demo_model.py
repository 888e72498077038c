"""The phantom demo model's untrained base: a small LlavaOnevision built by ``inference.tiny``.

Geometry follows the CPU experiment of design §10 (SigLIP 4×128 patch 16 on 128-px single tiles,
Qwen2 4×192 with 3 heads / 1 KV head, tied embeddings); the byte-level BPE is trained on the
texts the model will read and write — instruction records of phantoms from a seed that is used
for nothing else — so reports and answers take few tokens, and every digit stays its own token.
`radvlm train` then trains this folder on fresh phantoms (``[data.phantoms]``).

    python -m training.demo_model base --out radvlm-out/phantom-demo/base
    OMP_NUM_THREADS=1 radvlm train --config config/train-phantom-demo.toml          # stage 1
    OMP_NUM_THREADS=1 radvlm train --config config/train-phantom-demo-stage2.toml   # stage 2
    OMP_NUM_THREADS=2 radvlm train --config config/train-phantom-demo-stage3.toml   # stage 3
    OMP_NUM_THREADS=1 python -m training.demo_vision train --config config/train-phantom-demo-stage4-vision.toml
    OMP_NUM_THREADS=2 radvlm train --config config/train-phantom-demo-stage5.toml   # stage 5
    python -m training.demo_model finalize --trained radvlm-out/phantom-demo/phantom-v1-stage5 \
        --earlier radvlm-out/phantom-demo/phantom-v1 --earlier radvlm-out/phantom-demo/phantom-v1-stage2 \
        --earlier radvlm-out/phantom-demo/phantom-v1-stage3 --earlier radvlm-out/phantom-demo/phantom-v1-stage4 \
        --out inference/demo_model/phantom-v1

Stage 4 (``training.demo_vision``) trains only the vision tower, with direct per-patch and per-image
targets; every other stage is a plain `radvlm train` job.

``finalize`` measures the held-out metrics (seed 1000: ``HELDOUT_COUNT`` phantoms, and the first
``CI_COUNT`` that `tests/test_demo_model.py` re-measures), writes ``metrics.json``, the recipe
(``recipe/``: job file, command, seeds, git revision) and the model card, and copies the folder
into the package, where it is the embedded default ``[model] path``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from inference.tiny import TinyGeometry, _corpus, build_tiny_model
from training.finetune.phantom_data import LABEL_GROUNDING, PHANTOM_TASKS, label_grounding_record
from training.phantoms.records import instruction_records
from training.phantoms.sampler import PhantomConfig, PhantomSampler

HELDOUT_SEED = 1_000
HELDOUT_COUNT = 200
CI_COUNT = 16
JOB_FILES = (Path("config/train-phantom-demo.toml"), Path("config/train-phantom-demo-stage2.toml"),
             Path("config/train-phantom-demo-stage3.toml"), Path("config/train-phantom-demo-stage4-vision.toml"),
             Path("config/train-phantom-demo-stage5.toml"))  # in order
CORPUS_SEED = 9_000  # tokenizer corpus only; training uses seed 1, held-out evaluation 1000+
TILE = 128
PATCH = 16
TEXT_HIDDEN = 192
TEXT_LAYERS = 4
GEOMETRY = TinyGeometry(vision_hidden=128, vision_intermediate=512, vision_layers=4, vision_heads=4,
                        text_intermediate=512, text_heads=3, text_kv_heads=1, tie_embeddings=True,
                        single_tile=True, vocab_size=1024)

CARD = """# Phantom demo model — untrained base

Random weights with the geometry and tokenizer of the phantom demo model (training/demo_model.py).
Not a medical device.
"""


def phantom_corpus(count: int = 400, seed: int = CORPUS_SEED, size: int = TILE) -> list[str]:
    """Questions and answers of every phantom task for ``count`` phantoms, both phrasing modes."""
    import numpy as np

    sampler = PhantomSampler(seed, PhantomConfig(size=size))
    texts = list(_corpus())
    for index in range(count):
        phantom = sampler.sample(index)
        variants = "canonical" if index % 2 else "random"
        tasks = tuple(t for t in PHANTOM_TASKS if t != LABEL_GROUNDING)
        records = instruction_records(phantom, "x.png", variants, tasks=tasks)
        extra = label_grounding_record(phantom, "x.png", np.random.default_rng(index), index % 2 == 1)
        for record in records + ([extra] if extra else []):
            texts += [turn["value"].replace("<image>\n", "") for turn in record["conversations"]]
    return texts


def build_base(out: Path | str, seed: int = 0) -> Path:
    """Write the untrained base folder (random weights, phantom tokenizer, single-tile processor)."""
    return build_tiny_model(out, seed=seed, tile_size=TILE, patch_size=PATCH, text_hidden=TEXT_HIDDEN,
                            text_layers=TEXT_LAYERS, geometry=GEOMETRY, corpus=phantom_corpus(),
                            version=f"phantom-base-seed{seed}", card=CARD)


def measure(model_dir: Path, seed: int = HELDOUT_SEED, count: int = HELDOUT_COUNT,
            ci_count: int = CI_COUNT) -> dict:
    """Held-out metrics of a trained folder, loaded as inference loads it (CPU, fp32)."""
    from config.settings import ModelSettings
    from inference.model import load_model
    from training.evaluation.phantoms import TARGETS, evaluate_phantoms, score_phantom_predictions

    model = load_model(ModelSettings(path=model_dir, device="cpu", dtype="float32"))
    started = time.perf_counter()
    _, predictions = evaluate_phantoms(model, seed, range(count), TILE)
    seconds = time.perf_counter() - started
    metrics = score_phantom_predictions(predictions)
    subset = type(predictions)()
    subset.report = predictions.report[:ci_count]
    subset.classification = predictions.classification[:ci_count]
    keep = {f"phantom-s{seed}-{i:06d}" for i in range(ci_count)}
    subset.grounding = [r for r in predictions.grounding if r["phantom"] in keep]
    return {"model_version": model.info.version, "weights_sha256": model.info.weights_sha256,
            "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": "cpu", "dtype": "float32", "decoding": "greedy",
            "heldout": {"seed": seed, "indices": [0, count - 1], "phantom_size": TILE, **metrics},
            "ci_subset": {"seed": seed, "indices": [0, ci_count - 1], "phantom_size": TILE,
                          **score_phantom_predictions(subset)},
            "targets": TARGETS,
            "met": {key: metrics.get(key) is not None and metrics[key] >= target for key, target in TARGETS.items()},
            "seconds": round(seconds, 1),
            "examples": {"report": predictions.report[:3], "classification": predictions.classification[:3],
                         "grounding": predictions.grounding[:6]}}


WEAK_BELOW = 0.3  # per-label F1 / per-query mAP under which the card lists a weak spot


def _weak_spots(held: dict) -> str:
    """The labels and grounding queries the model scores under ``WEAK_BELOW`` on, named in the card."""
    spots = [f"classification of {label} (F1 {value:.2f})"
             for label, value in (held.get("classification_f1_per_label") or {}).items() if value < WEAK_BELOW]
    spots += [f"boxes for {query} (AP50 {value:.2f})"
              for query, value in (held.get("grounding_abnormality_map_0.5_by_query") or {}).items()
              if value < WEAK_BELOW]
    return "; ".join(spots) if spots else "none under " + str(WEAK_BELOW)


def _per_label_tables(metrics: dict) -> str:
    """Per-label classification F1 (with the vision probe's F1 when measured) and per-query AP50."""
    held = metrics["heldout"]
    probe = metrics.get("vision_probe_f1") or {}
    labels = "\n".join(f"| {label} | {f1:.2f} | {probe[label]:.2f} |" if label in probe else f"| {label} | {f1:.2f} | – |"
                       for label, f1 in (held.get("classification_f1_per_label") or {}).items())
    queries = "\n".join(f"| {query} | {ap:.2f} |"
                        for query, ap in (held.get("grounding_abnormality_map_0.5_by_query") or {}).items())
    return f"""| label | classification F1 | vision-feature probe F1 |
|---|---|---|
{labels}

| abnormality query | AP@0.5 |
|---|---|
{queries}"""


def model_card(metrics: dict, training_card: str, size_bytes: int, parameters: int,
               jobs: list[Path] | None = None, wall_seconds: float | None = None) -> str:
    """The shipped README.md: what the model is, how it was made, what it measured."""
    held = metrics["heldout"]
    trained_by = " then ".join(f"`{stage_program(job)}`" for job in (jobs or JOB_FILES))
    how_long = f", {wall_seconds / 3600:.1f} h in all" if wall_seconds else ""
    rows = "\n".join(
        f"| {name} | {held.get(key, float('nan')):.3f} | ≥ {target:.2f} | {'met' if metrics['met'][key] else 'missed'} |"
        for key, target, name in (
            ("classification_macro_f1", metrics["targets"]["classification_macro_f1"],
             "classification macro-F1 (phantom labels, parser rule)"),
            ("grounding_abnormality_map_0.5", metrics["targets"]["grounding_abnormality_map_0.5"],
             "abnormality grounding mAP@0.5"),
            ("grounding_anatomy_map_0.5", metrics["targets"]["grounding_anatomy_map_0.5"],
             "anatomical grounding mAP@0.5"),
            ("report_rouge_l", metrics["targets"]["report_rouge_l"], "report ROUGE-L")))
    return f"""# phantom-v1 — synthetic-phantom demo model

> **Synthetic-phantom model for demonstration and testing. NOT FOR CLINICAL USE.** It was trained
> only on geometric chest *phantoms* drawn by `training/phantoms` (lungs, heart, ribs, simple
> high-contrast findings); it has never seen a radiograph and its answers about real images are
> meaningless. It exists so that a fresh install runs the whole chain — DICOM in, prompts, boxes,
> TID 1500 SR and FHIR out — against a known truth (`radvlm demo`).

| | |
|---|---|
| architecture | HF `llava_onevision`: SigLIP 4×128 (patch 16, one 128-px tile, 64+1 image tokens), Qwen2 4×192 (3 heads / 1 KV head, tied embeddings) |
| parameters | {parameters:,} ({size_bytes / 2**20:.1f} MiB fp32 safetensors) |
| tokenizer | byte-level BPE, {GEOMETRY.vocab_size} tokens, one token per digit, trained on phantom questions/answers (seed {CORPUS_SEED}) |
| processor | single tile (`single_tile` in `processor_config.json`, `inference/processor.py`): pad to square, resize to 128 |
| trained by | {trained_by} (plain runs, CPU, one or two threads{how_long}) from the random base of `python -m training.demo_model base` |
| data | a fresh phantom for every sample (phantom seeds in the job files under `recipe/`, never the held-out seed), tasks: report, classification, abnormality / label / phrase grounding, anatomical grounding (8 regions), detection, 3-turn conversations |
| held-out evaluation | seed {held['seed']}, phantoms {held['indices'][0]}–{held['indices'][1]}, DICOM path, greedy, CPU fp32 (`metrics.json`) |
| version | `{metrics['model_version']}`, weights sha256 `{metrics['weights_sha256'][:16]}…` |

## Held-out metrics (evaluation pipeline, {held['n_phantoms']} phantoms)

| metric | measured | target (issues 8, 16) | |
|---|---|---|---|
{rows}

Mean IoU: abnormality {held.get('grounding_abnormality_mean_iou') or 0:.3f}, anatomy {held.get('grounding_anatomy_mean_iou') or 0:.3f}.
Classification macro-F1 is over the eight labels the generator produces (its seven finding families
and "no finding"); the six CheXpert labels it never draws would each add an F1 of 0. Per-label and
per-query figures, the CI subset (first {metrics['ci_subset']['indices'][1] + 1} phantoms, re-measured by
`tests/test_demo_model.py`) and example answers are in `metrics.json`.

{_per_label_tables(metrics)}

## Recipe

`recipe/` holds the job file(s), the exact commands, the seeds, the git revision and the model card
`radvlm train` wrote for each stage (loss history, data manifest, job configuration). Reproduce with
the commands in `recipe/command.txt`. The `-vision` stage (`training/demo_vision.py`) trains the vision
tower alone on per-patch finding targets, because a linear probe showed the tower's features did not
carry pneumothorax, lung opacity or nodules (docs/phantoms.md, "What limited the demo model").

## Limits

Geometric phantoms, 128 px, one lesion at most, fixed device courses; a model trained on them learns
these shapes, not radiology. Small nodules are a few pixels at the 128-px tile: they are the
hardest finding to name and to box. Measured weak spots (held-out, under {WEAK_BELOW}):
{_weak_spots(held)}.

---

## Training record (written by `radvlm train`)

{training_card.replace("# Fine-tuned RadVLM (llava_onevision)", "### radvlm train model card", 1)}
"""


def is_vision_stage(job: Path) -> bool:
    """A vision-tower pre-training job (``training.demo_vision``) rather than a `radvlm train` job."""
    return Path(job).stem.endswith("-vision")


def stage_program(job: Path) -> str:
    """The command line that runs one stage's job file."""
    if is_vision_stage(job):
        return f"python -m training.demo_vision train --config {job}"
    return f"radvlm train --config {job}"


def stage_command(job: Path) -> str:
    """``stage_program`` with the thread count the job file's header says it was run with (CPU
    float sums depend on it), else one thread."""
    found = re.search(r"OMP_NUM_THREADS=(\d+)", Path(job).read_text())
    return f"OMP_NUM_THREADS={found.group(1) if found else 1} {stage_program(job)}"


def _stage_seeds(job: Path) -> dict:
    """The job file of one training stage with its trainer seed and its phantom data seed."""
    from config import load_typed_config

    if is_vision_stage(job):
        from training.demo_vision import VisionPretrainConfig

        vision = load_typed_config(VisionPretrainConfig, job, environ={})
        return {"job": str(job), "seed": vision.seed, "phantom_seed": vision.phantom_seed,
                "max_steps": vision.steps, "kind": "vision pre-training"}
    from training.finetune.config import TrainConfig

    config = load_typed_config(TrainConfig, job, environ={})
    return {"job": str(job), "seed": config.seed, "phantom_seed": config.data.phantoms.seed,
            "max_steps": config.max_steps, "kind": "radvlm train"}


def finalize(trained: Path, out: Path, *, count: int = HELDOUT_COUNT, wall_seconds: float | None = None,
             jobs: list[Path] | None = None, earlier: list[Path] | None = None) -> dict:
    """Measure ``trained``, then write it with metrics, recipe and card to ``out`` (replaced).

    ``jobs``: the job files of every training stage in order (default: the one-stage recipe);
    ``earlier``: the output folders of the stages before the last, whose model cards are kept.
    """
    from safetensors import safe_open

    from training.finetune.export import git_revision

    trained, out = Path(trained), Path(out)
    jobs = [Path(j) for j in (jobs or JOB_FILES)]
    earlier = [Path(e) for e in (earlier or [])]
    metrics = measure(trained, count=count)
    from training.demo_vision import probe

    metrics["vision_probe_f1"] = probe(trained)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(trained, out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    recipe = out / "recipe"
    recipe.mkdir()
    commands = [
        "# from the repository root, Python 3.11 venv with torch 2.13 (CPU) and transformers 5.24",
        "python -m training.demo_model base --out radvlm-out/phantom-demo/base   # random base, seed 0",
    ]
    for job in jobs:
        shutil.copy2(job, recipe / job.name)
        commands.append(stage_command(job))
    extra = "".join(f" --job {job}" for job in jobs) + "".join(f" --earlier {e}" for e in earlier)
    commands.append(f"python -m training.demo_model finalize --trained {trained}{extra} --out {out}")
    (recipe / "command.txt").write_text("\n".join(commands) + "\n")
    (recipe / "provenance.json").write_text(json.dumps({
        "git_revision": git_revision(), "base_seed": 0,
        "stages": [_stage_seeds(job) for job in jobs],
        "tokenizer_corpus_seed": CORPUS_SEED, "heldout_seed": HELDOUT_SEED,
        "training_wall_seconds": wall_seconds, "finalized": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }, indent=2) + "\n")
    for number, folder in enumerate(earlier, 1):
        shutil.copy2(folder / "README.md", recipe / f"training-card-stage{number}.md")
    weights = out / "model.safetensors"
    with safe_open(str(weights), "pt") as handle:
        parameters = sum(_numel(handle.get_slice(key).get_shape()) for key in handle.keys())
    training_card = (trained / "README.md").read_text()
    (recipe / "training-card.md").write_text(training_card)
    (out / "README.md").write_text(model_card(metrics, training_card, weights.stat().st_size, parameters, jobs,
                                                    wall_seconds))
    return metrics


def _numel(shape) -> int:
    total = 1
    for dim in shape:
        total *= int(dim)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    base = sub.add_parser("base", help="write the untrained base folder")
    base.add_argument("--out", type=Path, required=True)
    base.add_argument("--seed", type=int, default=0)
    final = sub.add_parser("finalize", help="measure a trained folder and package it with metrics, recipe, card")
    final.add_argument("--trained", type=Path, required=True)
    final.add_argument("--out", type=Path, required=True)
    final.add_argument("--count", type=int, default=HELDOUT_COUNT)
    final.add_argument("--wall-seconds", type=float)
    final.add_argument("--job", type=Path, action="append", help="job file of each stage, in order")
    final.add_argument("--earlier", type=Path, action="append", help="output folder of each earlier stage")
    args = parser.parse_args(argv)
    if args.command == "base":
        print(build_base(args.out, args.seed))
        return 0
    metrics = finalize(args.trained, args.out, count=args.count, wall_seconds=args.wall_seconds,
                       jobs=args.job, earlier=args.earlier)
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("examples",)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
