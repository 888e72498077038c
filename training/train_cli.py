"""`radvlm train --config FILE`: a thin shell over :func:`training.finetune.run_training`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from config import ConfigError, load_typed_config


def load_train_config(path: Path):
    """The typed job file (unknown keys and bad values are a ConfigError naming the key)."""
    from training.finetune.config import TrainConfig

    return load_typed_config(TrainConfig, path, env_prefix="RADVLM_TRAIN_")


def train_from_file(path: Path):
    """Load the job file and run it; returns the TrainResult."""
    from training.finetune import run_training

    cfg = load_train_config(path)
    return run_training(cfg, config_text=Path(path).read_text(encoding="utf-8"))


def cmd_train(args: argparse.Namespace) -> int:
    from training.finetune.data import ChatTemplateError, DatasetFormatError
    from training.finetune.trainer import TrainingSetupError
    from inference.errors import RadVLMError

    try:
        result = train_from_file(args.config)
    except (ConfigError, DatasetFormatError, ChatTemplateError, TrainingSetupError, RadVLMError) as exc:
        print(f"radvlm train: {exc}")
        return 2
    if result.losses:
        print("step  loss")
        for step, loss in result.losses:
            print(f"{step:>4}  {loss:.4f}")
    print(f"model written to {result.output_dir} after {result.global_step} steps")
    return 0


def add_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="fine-tune a llava_onevision folder on LLaVA-style records (transformers + DeepSpeed)")
    parser.add_argument("--config", type=Path, required=True, help="TOML job file (see docs/training.md)")
    parser.set_defaults(handler=cmd_train)


def main(argv: list[str] | None = None) -> int:
    """Entry point for launchers (``python -m training.finetune``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="radvlm train")
    subparsers = parser.add_subparsers(dest="command")
    add_command(subparsers)
    args = parser.parse_args(["train", *(argv if argv is not None else sys.argv[1:])])
    return args.handler(args)
