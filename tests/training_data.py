"""Shared fixtures for the fine-tuning tests: a small LLaVA-style dataset and job files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

REPORT = "The heart size is normal. The lungs are clear."
ANSWER_2 = "No pleural effusion or pneumothorax."


def write_dataset(root: Path, count: int = 8) -> Path:
    """``count`` multi-turn records over PNGs of varied shapes (so AnyRes tiles differ); returns the JSONL."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        pixels = (rng.random((64 + 8 * i, 48)) * 255).astype("uint8")
        Image.fromarray(pixels).save(root / "images" / f"img{i}.png")
        records.append({"id": f"s{i}", "image": f"images/img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nProvide a radiology report for this Chest X-Ray."},
            {"from": "gpt", "value": REPORT},
            {"from": "human", "value": "Is there a pleural effusion?"},
            {"from": "gpt", "value": ANSWER_2}]})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "manifest.json").write_text(json.dumps({"counts": {"report_generation": count}, "seed": 0}))
    return path


def write_job(path: Path, *, model: Path, out: Path, data: Path, max_steps: int = 6, extra: str = "",
              deepspeed: Path | None = None) -> Path:
    """A TOML job with a high learning rate so a few steps visibly lower the loss."""
    ds_line = f'deepspeed = "{deepspeed}"\n' if deepspeed else ""
    path.write_text(
        f'model_path = "{model}"\noutput_dir = "{out}"\n{ds_line}max_steps = {max_steps}\n'
        f'per_device_batch_size = 2\nlogging_steps = 1\nsave_steps = 3\nseed = 7\n{extra}\n'
        f'[data]\ntrain_files = ["{data}"]\nimage_root = "{data.parent}"\n'
        f'[optim]\nlearning_rate = 2e-3\nvision_learning_rate = 4e-4\n')
    return path
