"""Launcher entry point: ``torchrun --nproc_per_node N -m training.finetune --config job.toml``
(or ``deepspeed --module training.finetune --config job.toml``); every rank runs the job."""

from __future__ import annotations

import sys

from training.train_cli import main

if __name__ == "__main__":
    sys.exit(main())
