"""``radvlm build-dataset --config FILE --out DIR``: a thin shell over `build_from_file`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from config import ConfigError, load_typed_config
from inference.errors import InputImageError
from training.instructions import BuildConfig, BuildSummary, build_dataset, format_summary
from training.sources.errors import SourceError

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def build_from_file(config_path: Path, out_dir: Path, *, progress: bool = True) -> BuildSummary:
    """Load the job file (relative paths taken from its folder) and build the dataset."""
    config_path = Path(config_path)
    config = load_typed_config(BuildConfig, config_path, environ={})
    return build_dataset(config.resolved(config_path.parent.resolve()), out_dir, progress=progress)


def cmd_build_dataset(args: argparse.Namespace) -> int:
    try:
        summary = build_from_file(args.config, args.out, progress=not args.no_progress)
    except (SourceError, ConfigError, InputImageError) as exc:
        print(f"radvlm build-dataset: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_summary(summary))
    return EXIT_OK


def add_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "build-dataset", help="build the RadVLM instruction dataset (LLaVA JSON/JSONL)",
        description="Read the configured public datasets (and the site's own DICOMs) and write "
                    "train/test LLaVA files plus manifest.json. See docs/datasets.md.")
    parser.add_argument("--config", type=Path, required=True, help="TOML job file")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=cmd_build_dataset)
