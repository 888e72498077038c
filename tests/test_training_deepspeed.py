"""Real DeepSpeed runs (CPU, gloo, one rank launched by torchrun) with ZeRO-2 and ZeRO-3 on the
tiny model: the loss falls and `radvlm infer` loads the exported folder."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.cli import main as radvlm
from tests.training_data import write_dataset, write_job

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_run_lowers_loss_and_exports(stage, tmp_path, tiny_model_dir, rg1_uncr):
    data = write_dataset(tmp_path / "data")
    out = tmp_path / f"zero{stage}"
    job = write_job(tmp_path / "job.toml", model=tiny_model_dir, out=out, data=data,
                    deepspeed=REPO / "config" / f"deepspeed_zero{stage}.json")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "training.finetune", "--config", str(job)]
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"^\s*\d+\s+(\d+\.\d+)$", run.stdout, re.M)]
    print(f"ZeRO-{stage} losses:", losses)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, losses
    checkpoint = out.with_name(out.name + "-checkpoints") / "checkpoint-6"
    assert (checkpoint / "global_step6").is_dir()  # DeepSpeed's own optimizer-state checkpoint
    assert f"deepspeed_zero{stage}.json" in (out / "README.md").read_text()
    assert radvlm(["infer", str(rg1_uncr), "--model", str(out), "--tasks", "report"]) == 0
