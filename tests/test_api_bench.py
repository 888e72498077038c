"""A bounded run of benchmarks/bench_api.py (the full run's figures are in docs/api.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_api_benchmark_reports_percentiles():
    completed = subprocess.run([sys.executable, "benchmarks/bench_api.py", "--requests", "3", "--max-tokens", "4",
                                "--image-size", "64", "--json"], cwd=ROOT, capture_output=True, text=True,
                               timeout=300, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    rows = json.loads(completed.stdout[completed.stdout.index("[\n"):])  # other libraries may log to stdout first
    assert [r["case"] for r in rows][:3] == ["first turn (new image)", "follow-up (cached image prefix)",
                                             "GET /v1/models"]
    assert all(r["n"] == 3 and 0 < r["p50_ms"] <= r["p95_ms"] for r in rows)
