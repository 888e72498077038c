"""Write the fine-tuned model as a llava_onevision folder `radvlm infer` loads unchanged.

Weights come from the Trainer (ZeRO-3 shards gathered; LoRA adapters merged), the processor,
tokenizer and chat template are copied byte for byte from the base folder (so the model is
prompted exactly as it was trained), and a model card records the data manifest, the git
revision of this code, the job configuration and the seed.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

from inference.model_folder import check_model_folder, files_sha256
from training.finetune.config import TrainConfig

# Files of the base folder that are weights or model config (rewritten by save_pretrained).
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "README.md", "training_args.bin")
REPO_ROOT = Path(__file__).resolve().parents[2]


def git_revision(root: Path = REPO_ROOT) -> str:
    """``<commit>`` (``+dirty`` when the working tree has changes), or ``unknown`` outside git."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def data_manifest(cfg: TrainConfig, records: int) -> dict:
    """The training files with their hashes, plus the dataset builder's manifest when there is one;
    for a phantom source, the generator version, its settings and the phantom index range."""
    if cfg.data.phantoms is not None:
        from training.phantoms.sampler import GENERATOR_VERSION

        source = cfg.data.phantoms
        return {"records": records, "source": "phantoms", "generator_version": GENERATOR_VERSION,
                "seed": source.seed, "indices": [source.start, source.start + source.samples - 1],
                "phantom_config": source.phantom_config().as_dict(),
                "settings": source.model_dump(mode="json")}
    manifest_path = cfg.data.manifest
    if manifest_path is None:
        candidate = Path(cfg.data.train_files[0]).with_name("manifest.json")
        manifest_path = candidate if candidate.is_file() else None
    builder_manifest = None
    if manifest_path is not None:
        try:
            builder_manifest = json.loads(Path(manifest_path).read_text())
        except (OSError, ValueError) as exc:
            builder_manifest = {"error": f"cannot read {manifest_path}: {exc}"}
    return {"records": records,
            "files": [{"path": str(f), "sha256": files_sha256([Path(f)])} for f in cfg.data.train_files],
            "image_root": str(cfg.data.image_root),
            "builder_manifest": builder_manifest}


def copy_processor_files(base: Path, out: Path) -> list[str]:
    """Copy tokenizer, processor and chat-template files of ``base`` that ``out`` lacks."""
    copied = []
    for path in sorted(Path(base).iterdir()):
        if path.is_file() and path.name not in MODEL_FILES and not path.name.startswith("model-"):
            shutil.copy2(path, out / path.name)
            copied.append(path.name)
    return copied


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}
    for name in ("deepspeed", "peft"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            continue
    return versions


def model_card(cfg: TrainConfig, *, manifest: dict, losses: list[tuple[int, float]], global_step: int,
               resumed_from: Path | None, config_text: str | None) -> str:
    config_json = json.dumps(cfg.model_dump(mode="json"), indent=2)
    loss_lines = "\n".join(f"| {step} | {loss:.4f} |" for step, loss in losses) or "| – | – |"
    return f"""# Fine-tuned RadVLM (llava_onevision)

**Not a medical device.** Outputs are unverified AI suggestions that must be reviewed by a
qualified reader before any clinical use.

| | |
|---|---|
| base model | `{cfg.model_path}` |
| trained | {datetime.now(timezone.utc).isoformat(timespec="seconds")} |
| code revision (git) | `{git_revision()}` |
| seed | {cfg.seed} |
| optimizer steps | {global_step} |
| resumed from | `{resumed_from or "–"}` |
| LoRA (merged) | {"yes" if cfg.lora.enabled else "no"} |
| DeepSpeed | `{cfg.deepspeed or "none"}` |
| versions | {", ".join(f"{k} {v}" for k, v in _versions().items())} |

Loss: assistant tokens only, every turn; answers follow the chat template's generation prompt.

## Training loss

| step | loss |
|---|---|
{loss_lines}

## Data manifest

```json
{json.dumps(manifest, indent=2)}
```

## Job configuration

```json
{config_json}
```
""" + (f"\n### Job file as given\n\n```toml\n{config_text}\n```\n" if config_text else "")


def _save_weights(trainer, cfg: TrainConfig) -> None:
    out = cfg.output_dir
    if cfg.lora.enabled:
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        if trainer.is_world_process_zero():
            merged.save_pretrained(out)
    else:
        trainer.save_model(str(out))  # every rank: ZeRO-3 gathers its shards here
    trainer.accelerator.wait_for_everyone()


def export_model_folder(trainer, cfg: TrainConfig, *, records: int, losses: list[tuple[int, float]],
                        resumed_from: Path | None, config_text: str | None) -> Path | None:
    """Save weights (all ranks) and, on rank 0, complete the folder and check it like inference does."""
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    _save_weights(trainer, cfg)
    if not trainer.is_world_process_zero():
        return None
    (out / "training_args.bin").unlink(missing_ok=True)
    config_path = out / "config.json"
    model_config = json.loads(config_path.read_text())
    model_config.pop("radvlm_version", None)  # the base's version no longer describes these weights
    if cfg.model_version:
        model_config["radvlm_version"] = cfg.model_version
    config_path.write_text(json.dumps(model_config, indent=2))
    copy_processor_files(cfg.model_path, out)
    (out / "README.md").write_text(model_card(
        cfg, manifest=data_manifest(cfg, records), losses=losses, global_step=trainer.state.global_step,
        resumed_from=resumed_from, config_text=config_text))
    if write_loss_plot(losses, out / "loss.png"):
        with (out / "README.md").open("a") as card:
            card.write("\n![training loss per logged step](loss.png)\n")
    check_model_folder(out)
    return out


def write_loss_plot(losses: list[tuple[int, float]], path: Path) -> bool:
    """The logged training loss against the step as a PNG next to the model card (False: nothing logged)."""
    if not losses:
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps, values = zip(*losses)
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    try:
        axes.plot(steps, values, marker="o" if len(losses) < 30 else None, linewidth=1.5)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("training loss")
        axes.set_title("Training loss")
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
        figure.tight_layout()
        figure.savefig(path)
    finally:
        plt.close(figure)
    return True
