"""`radvlm generate-conversations --config FILE`: a thin shell over
:func:`training.conversations.generate_conversations`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from config import ConfigError, load_typed_config


def load_conversation_config(path: Path, *, input_path: Path | None = None, output: Path | None = None,
                             limit: int | None = None):
    """The typed job file, with command-line overrides applied (and validated again)."""
    from training.conversations import ConversationJobConfig

    cfg = load_typed_config(ConversationJobConfig, path, env_prefix="RADVLM_CONV_")
    updates = {k: v for k, v in (("input", input_path), ("output", output), ("limit", limit)) if v is not None}
    return ConversationJobConfig.model_validate({**cfg.model_dump(), **updates}) if updates else cfg


def cmd_generate_conversations(args: argparse.Namespace) -> int:
    from training.conversations import APIError, InputFileError, generate_conversations
    from training.prompts import PromptFileError

    try:
        cfg = load_conversation_config(args.config, input_path=args.input, output=args.out, limit=args.limit)
    except ConfigError as exc:
        print(f"radvlm generate-conversations: {exc}", file=sys.stderr)
        return 2

    def progress(summary) -> None:
        print(f"\rwritten {summary.written}  cached {summary.from_cache}  failed {summary.failed}  "
              f"requests {summary.requests}", end="", file=sys.stderr, flush=True)

    try:
        summary = generate_conversations(cfg, progress=progress)
    except (APIError, InputFileError, PromptFileError) as exc:
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
    parser.add_argument("--out", type=Path, help="override [output]: JSONL of training records (appended)")
    parser.add_argument("--limit", type=int, help="stop after this many new records")
    parser.set_defaults(handler=cmd_generate_conversations)
