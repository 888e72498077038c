"""Supervised pre-training of the phantom demo model's vision tower (issue 16).

The real RadVLM starts from a vision tower that already sees (SigLIP, pre-trained on images); the
phantom demo model's tower starts from random weights and learns only through the language
model's answers. A linear probe of its patch features after three stages of `radvlm train` found
what the held-out classification showed: cardiomegaly, devices and effusions are in the features,
pneumothorax, lung opacity and nodules are not (probe F1 0.00, 0.18, 0.15;
`python -m training.demo_vision probe`). This stage gives the
tower a direct signal instead, on fresh phantoms of its own seed:

- per patch (the 8×8 grid of 16-px patches the language model reads): which finding families'
  drawn pixels (the phantom's footprints) fall in that patch — binary cross-entropy;
- per image: the phantom's labels (seven families and "no finding") from mean+max-pooled patch
  features — binary cross-entropy.

The two linear heads are thrown away; only the vision tower's weights change, and the following
`radvlm train` stage re-aligns the projector and language model to them. Images are the phantom's
8-bit display pixels padded to a square exactly as the single-tile processor pads them (checked
against the processor at start-up).

    OMP_NUM_THREADS=1 python -m training.demo_vision train --config config/train-phantom-demo-stage4-vision.toml
    python -m training.demo_vision probe --model inference/demo_model/phantom-v1

``probe`` is the measurement that chose this stage: logistic-regression probes, one per label, on the
tower's mean- and max-pooled patch features (and the projector's max-pooled output), fitted on
phantoms of ``PROBE_SEED`` and scored (F1) on the held-out phantoms. A label the probe cannot read is
a label the language model cannot name.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader, Dataset

from inference.labels import LABELS
from training.phantoms.sampler import DEFAULT_RATES, Phantom, PhantomConfig, PhantomSampler

FAMILIES: tuple[str, ...] = tuple(DEFAULT_RATES)                     # the seven finding families
IMAGE_LABELS: tuple[str, ...] = tuple(label for label in LABELS if label in DEFAULT_RATES) + ("no finding",)
PROBE_SEED = 900          # phantoms the probes are fitted on (never a training or held-out seed)


class VisionPretrainConfig(BaseModel):
    """The job file (TOML) of the vision pre-training stage."""

    model_config = ConfigDict(extra="forbid")

    model_path: Path                    # a model folder (llava_onevision, single-tile processor)
    output_dir: Path                    # the same folder with the vision tower replaced
    seed: int = 0                       # torch seed (head initialisation, order of nothing else)
    phantom_seed: int = Field(ge=0)     # PhantomSampler seed: disjoint from every other stage and the held-out set
    size: int = Field(default=128, ge=64)
    steps: int = Field(ge=1)
    batch_size: int = Field(default=64, ge=1)
    learning_rate: float = Field(default=5e-4, gt=0)
    warmup_steps: int = Field(default=50, ge=0)
    min_lr_ratio: float = Field(default=0.05, ge=0, le=1)
    patch_weight: float = Field(default=1.0, ge=0)
    image_weight: float = Field(default=1.0, ge=0)
    normal_fraction: float | None = Field(default=None, ge=0, le=1)
    rates: dict[str, float] | None = None
    logging_steps: int = Field(default=50, ge=1)
    workers: int = Field(default=1, ge=0)


class PhantomPatchDataset(Dataset):
    """Phantom ``i`` as (normalised square image, per-patch family targets, image labels)."""

    def __init__(self, sampler: PhantomSampler, length: int, tile: int, patch: int,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        self.sampler, self.length, self.tile, self.patch = sampler, length, tile, patch
        self.mean = np.array(mean, dtype=np.float32)[:, None, None]
        self.std = np.array(std, dtype=np.float32)[:, None, None]
        self.fill = np.uint8(int(round(255 * float(np.mean(mean)))))

    def __len__(self) -> int:
        return self.length

    def square(self, phantom: Phantom) -> tuple[np.ndarray, int, int]:
        """The 8-bit square the processor builds (mean-colour padding, image centred) and the offsets."""
        rows, columns = phantom.pixels.shape
        side = max(rows, columns)
        square = np.full((side, side), self.fill, dtype=np.uint8)
        top, left = (side - rows) // 2, (side - columns) // 2
        square[top:top + rows, left:left + columns] = phantom.pixels
        return square, top, left

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        phantom = self.sampler.sample(index)
        square, top, left = self.square(phantom)
        if square.shape[0] != self.tile:
            raise ValueError(f"phantom size {square.shape[0]} differs from the tile {self.tile}: "
                             "this stage trains on tile-sized phantoms only")
        pixels = np.repeat(square[None].astype(np.float32) / 255.0, 3, axis=0)
        pixels = (pixels - self.mean) / self.std
        grid = self.tile // self.patch
        patches = np.zeros((grid * grid, len(FAMILIES)), dtype=np.float32)
        for finding, footprints in zip(phantom.findings, phantom.footprints):
            family = FAMILIES.index(finding.kind)
            for mask in footprints:
                placed = np.zeros((self.tile, self.tile), dtype=bool)
                placed[top:top + mask.shape[0], left:left + mask.shape[1]] = mask
                hit = placed.reshape(grid, self.patch, grid, self.patch).any(axis=(1, 3)).reshape(-1)
                patches[hit, family] = 1.0
        labels = np.array([1.0 if phantom.labels[label] else 0.0 for label in IMAGE_LABELS], dtype=np.float32)
        return torch.from_numpy(pixels), torch.from_numpy(patches), torch.from_numpy(labels)


class VisionHeads(torch.nn.Module):
    """Linear per-patch and per-image heads over the tower's last hidden states (discarded after)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.patch = torch.nn.Linear(hidden, len(FAMILIES))
        self.image = torch.nn.Linear(2 * hidden, len(IMAGE_LABELS))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = torch.cat([hidden.mean(dim=1), hidden.amax(dim=1)], dim=-1)
        return self.patch(hidden), self.image(pooled)


def tower_features(vision_tower, pixels: torch.Tensor) -> torch.Tensor:
    """What llava_onevision reads from the tower: the last layer's hidden states (feature layer -1)."""
    return vision_tower(pixels, output_hidden_states=True).hidden_states[-1]


def _check_against_processor(processor, dataset: PhantomPatchDataset, pixels: torch.Tensor) -> None:
    """The dataset's own square/normalise must equal the single-tile processor's pixel values."""
    from PIL import Image

    phantom = dataset.sampler.sample(0)
    expected = processor(images=[Image.fromarray(phantom.pixels).convert("RGB")], return_tensors="pt")["pixel_values"]
    expected = expected.reshape(-1, *expected.shape[-3:])[0]
    difference = float((expected - pixels).abs().max())
    if difference > 1e-2:
        raise RuntimeError(f"vision pre-training input differs from the processor's by {difference:.3g}")


def _lr_factor(step: int, cfg: VisionPretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def pretrain(cfg: VisionPretrainConfig, *, job_text: str | None = None, log=print) -> dict:
    """Train the vision tower of ``cfg.model_path`` and write the folder to ``cfg.output_dir``."""
    from config.settings import ModelSettings
    from inference.model import load_model

    torch.manual_seed(cfg.seed)
    radvlm = load_model(ModelSettings(path=cfg.model_path, device="cpu", dtype="float32"))
    model, processor = radvlm.model, radvlm.processor
    vision = model.model.vision_tower
    vision_config = vision.config
    tile, patch = int(vision_config.image_size), int(vision_config.patch_size)
    image_processor = processor.image_processor
    phantom_config = PhantomConfig(size=cfg.size, **({"rates": {**DEFAULT_RATES, **cfg.rates}} if cfg.rates else {}),
                                   **({"normal_fraction": cfg.normal_fraction} if cfg.normal_fraction is not None else {}))
    dataset = PhantomPatchDataset(PhantomSampler(cfg.phantom_seed, phantom_config), cfg.steps * cfg.batch_size,
                                  tile, patch, tuple(image_processor.image_mean), tuple(image_processor.image_std))
    _check_against_processor(processor, dataset, dataset[0][0])
    heads = VisionHeads(int(vision_config.hidden_size))
    parameters = list(vision.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=cfg.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, cfg))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers,
                        persistent_workers=cfg.workers > 0)
    bce = torch.nn.BCEWithLogitsLoss()
    vision.train()
    history, started, window = [], time.perf_counter(), []
    for step, (pixels, patch_targets, image_targets) in enumerate(loader):
        patch_logits, image_logits = heads(tower_features(vision, pixels))
        loss = cfg.patch_weight * bce(patch_logits, patch_targets) + cfg.image_weight * bce(image_logits, image_targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        window.append(loss.item())
        if (step + 1) % cfg.logging_steps == 0 or step + 1 == cfg.steps:
            entry = {"step": step + 1, "loss": round(float(np.mean(window)), 4),
                     "lr": round(scheduler.get_last_lr()[0], 7), "seconds": round(time.perf_counter() - started, 1)}
            history.append(entry)
            log(json.dumps(entry))
            window = []
    vision.eval()
    out = Path(cfg.output_dir)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(cfg.model_path, out, ignore=shutil.ignore_patterns("model.safetensors", "*.safetensors.index.json"))
    model.save_pretrained(out)
    record = {"stage": "vision pre-training (training/demo_vision.py)", "base": str(cfg.model_path),
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "config": json.loads(cfg.model_dump_json()), "loss": history,
              "seconds": round(time.perf_counter() - started, 1)}
    (out / "vision_pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    if job_text is not None:
        (out / "vision_pretrain.toml").write_text(job_text)
    readme = out / "README.md"
    readme.write_text(_card(record))
    return record


def _card(record: dict) -> str:
    rows = "\n".join(f"| {h['step']} | {h['loss']:.4f} |" for h in record["loss"])
    return f"""# Phantom demo model — vision tower pre-trained (training/demo_vision.py)

Base `{record['base']}`; only the vision tower changed (per-patch finding families and image labels,
binary cross-entropy, heads discarded). Not a medical device.

| step | loss |
|---|---|
{rows}
"""


def pooled_features(radvlm, phantoms) -> np.ndarray:
    """Per phantom: mean- and max-pooled tower features and the max-pooled projector output."""
    from PIL import Image

    rows = []
    model = radvlm.model
    for phantom in phantoms:
        pixels = radvlm.processor(images=[Image.fromarray(phantom.pixels).convert("RGB")],
                                  return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            hidden = tower_features(model.model.vision_tower, pixels.reshape(-1, *pixels.shape[-3:]))
            projected = model.model.multi_modal_projector(hidden)
        rows.append(torch.cat([hidden.mean(1)[0], hidden.amax(1)[0], projected.amax(1)[0]]).numpy())
    return np.stack(rows)


def probe(model_dir: Path, *, fit_count: int = 1500, heldout_seed: int = 1000, heldout_count: int = 200,
          size: int = 128) -> dict[str, float]:
    """Per-label F1 of linear probes of the vision features on the held-out phantoms."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    from config.settings import ModelSettings
    from inference.model import load_model

    radvlm = load_model(ModelSettings(path=Path(model_dir), device="cpu", dtype="float32"))

    def data(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        sampler = PhantomSampler(seed, PhantomConfig(size=size))
        phantoms = [sampler.sample(i) for i in range(count)]
        labels = np.array([[phantom.labels[label] for label in IMAGE_LABELS] for phantom in phantoms])
        return pooled_features(radvlm, phantoms), labels

    fit_x, fit_y = data(PROBE_SEED, fit_count)
    test_x, test_y = data(heldout_seed, heldout_count)
    mean, std = fit_x.mean(0), fit_x.std(0) + 1e-6
    fit_x, test_x = (fit_x - mean) / std, (test_x - mean) / std
    scores = {}
    for k, label in enumerate(IMAGE_LABELS):
        classifier = LogisticRegression(C=0.5, max_iter=3000).fit(fit_x, fit_y[:, k])
        scores[label] = round(float(f1_score(test_y[:, k], classifier.predict(test_x))), 3)
    scores["macro"] = round(float(np.mean([scores[label] for label in IMAGE_LABELS])), 3)
    return scores


def main(argv: list[str] | None = None) -> int:
    from config import load_typed_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="pre-train the vision tower (a stage of the demo model recipe)")
    train.add_argument("--config", type=Path, required=True, help="the stage's TOML job file")
    measure = sub.add_parser("probe", help="per-label linear-probe F1 of a model's vision features")
    measure.add_argument("--model", type=Path, required=True)
    measure.add_argument("--fit-count", type=int, default=1500)
    measure.add_argument("--heldout-count", type=int, default=200)
    args = parser.parse_args(argv)
    if args.command == "probe":
        print(json.dumps(probe(args.model, fit_count=args.fit_count, heldout_count=args.heldout_count), indent=2))
        return 0
    cfg = load_typed_config(VisionPretrainConfig, args.config, environ={})
    record = pretrain(cfg, job_text=args.config.read_text())
    print(json.dumps({"output_dir": str(cfg.output_dir), "seconds": record["seconds"],
                      "final_loss": record["loss"][-1]["loss"] if record["loss"] else None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
