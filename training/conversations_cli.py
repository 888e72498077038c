"""`radvlm generate-conversations --config FILE`: a thin shell over
:func:`training.conversations.generate_conversations`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from config import ConfigError, load_typed_config


def load_conversation_config(path: Path, *, input_path: Path | None = None, output: Path | None = None,
                             limit: int | None = None, dataset_config: Path | None = None):
    """The typed job file, with command-line overrides applied (and validated again); ``--input``
    and ``--dataset-config`` each replace both facts settings of the file."""
    from pydantic import ValidationError

    from training.conversations import ConversationJobConfig

    cfg = load_typed_config(ConversationJobConfig, path, env_prefix="RADVLM_CONV_")
    updates = {k: v for k, v in (("input", input_path), ("output", output), ("limit", limit),
                                 ("dataset_config", dataset_config)) if v is not None}
    if input_path is not None:
        updates["dataset_config"] = None
    elif dataset_config is not None:
        updates["input"] = None
    try:
        return ConversationJobConfig.model_validate({**cfg.model_dump(), **updates}) if updates else cfg
    except ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def cmd_generate_conversations(args: argparse.Namespace) -> int:
    from training.conversations import APIError, InputFileError, generate_conversations
    from config import ConfigError as LoadError
    from training.prompts import PromptFileError

    try:
        cfg = load_conversation_config(args.config, input_path=args.input, output=args.out, limit=args.limit,
                                       dataset_config=args.dataset_config)
    except ConfigError as exc:
        print(f"radvlm generate-conversations: {exc}", file=sys.stderr)
        return 2

    def progress(summary) -> None:
        print(f"\rwritten {summary.written}  cached {summary.from_cache}  failed {summary.failed}  "
              f"requests {summary.requests}", end="", file=sys.stderr, flush=True)

    try:
        summary = generate_conversations(cfg, progress=progress)
    except (APIError, InputFileError, PromptFileError, LoadError) as exc:
        print(f"\nradvlm generate-conversations: {exc}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    print(f"written {summary.written} (from cache {summary.from_cache}), already done {summary.already_done}, "
          f"failed {summary.failed}, requests {summary.requests} → {cfg.output}")
    for record_id, reason in summary.failures:
        print(f"  failed {record_id}: {reason}")
    return 1 if summary.failed else 0


def add_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate-conversations",
        help="write RadVLM (grounded) conversations with an OpenAI-compatible LLM endpoint")
    parser.add_argument("--config", type=Path, required=True, help="TOML job file (see docs/training.md)")
    parser.add_argument("--input", type=Path, help="override [input]: JSONL of de-identified image facts")
    parser.add_argument("--dataset-config", type=Path, help="override [dataset_config]: read the facts from the "
                        "sources of this build-dataset job file (MIMIC-CXR, MS-CXR, PadChest-GR)")
    parser.add_argument("--out", type=Path, help="override [output]: JSONL of training records (appended)")
    parser.add_argument("--limit", type=int, help="stop after this many new records")
    parser.set_defaults(handler=cmd_generate_conversations)
