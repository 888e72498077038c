"""Bounded smoke runs of the batching, ONNX and GPU benchmarks (full runs: docs/performance.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    completed = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def test_bench_workers_smoke():
    out = run("benchmarks/bench_workers.py", "--studies", "2", "--max-new-tokens", "3", "--batches", "1,2",
              "--clients", "2", "--rounds", "1", "--geometry", "small", "--no-remote")
    assert "grounding batched (max_batch 8)" in out and "HTTP overhead" in out
    assert "answers identical in every mode: True" in out


def test_bench_onnx_vision_smoke():
    pytest.importorskip("onnxruntime")
    out = run("benchmarks/bench_onnx_vision.py", "--geometry", "small", "--repeats", "1")
    assert "ratio torch/onnxruntime" in out and "greedy answers identical: True" in out


def test_bench_7b_tiny_smoke():
    out = run("benchmarks/gpu/bench_7b.py", "--tiny", "--repeats", "1", "--report-tokens", "4", "--class-tokens", "2",
              "--ground-tokens", "2", "--grounding", "2", "--studies-batch", "2")
    for line in ("decode at batch 1:", "plain generate (baseline)", "prefix reuse + batched grounding",
                 "2 studies batched"):
        assert line in out
