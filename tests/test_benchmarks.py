"""Bounded runs of the benchmarks (the full runs are documented in the README, outside CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_inference_core_benchmark_runs_and_reports_identical_answers():
    completed = subprocess.run(
        [sys.executable, "benchmarks/bench_inference_core.py", "--repeats", "1", "--geometry", "small",
         "--max-new-tokens", "4"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "RG1_J2KR.dcm" in completed.stdout
    assert "answers identical: True" in completed.stdout
    assert "ratio fresh/reuse" in completed.stdout
