"""Registers the training package's subcommands on the `radvlm` CLI.

Each subcommand lives in its own module exposing ``add_command(subparsers)``; a module that is
not installed yet is simply not offered.
"""

from __future__ import annotations

import importlib
import importlib.util

SUBCOMMAND_MODULES = (
    "training.build_dataset_cli",   # radvlm build-dataset
    "training.conversations_cli",   # radvlm generate-conversations
    "training.filter_reports_cli",  # radvlm filter-reports
    "training.train_cli",           # radvlm train
    "training.evaluation.cli",      # radvlm evaluate
    "training.phantoms_cli",        # radvlm phantoms
)


def add_training_commands(subparsers) -> None:
    for module_name in SUBCOMMAND_MODULES:
        try:
            found = importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:  # parent package (e.g. training.evaluation) not there yet
            found = False
        if found:
            importlib.import_module(module_name).add_command(subparsers)
