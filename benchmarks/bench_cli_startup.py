"""Start-up time of the `radvlm` command: wall time of fresh processes for ``radvlm --help`` and
a configuration error (``radvlm jobs --config BAD.toml``), beside a baseline of a bare interpreter and
of ``python -c "import torch"`` (what every command paid when the heavy imports sat at module level).
Also lists which heavy libraries ``--help`` imports (should be none).

    .venv/bin/python benchmarks/bench_cli_startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "highdicom", "fastapi", "uvicorn", "matplotlib")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wall(command: list[str], runs: int) -> tuple[float, float, float]:
    """(median wall, min wall, median CPU) seconds of ``runs`` fresh processes (CPU = user + system:
    what the start-up costs on an idle machine; wall also counts waiting for a busy CPU)."""
    times, cpu = [], []
    for _ in range(runs):
        started, cpu_before = time.perf_counter(), _children_cpu()
        subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - started)
        cpu.append(_children_cpu() - cpu_before)
    return statistics.median(times), min(times), statistics.median(cpu)


def heavy_imports_of_help() -> list[str]:
    probe = ("import sys\nfrom dicom_node.cli import build_parser\nbuild_parser()\n"
             f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true", help="skip the import-torch baseline")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "bad.toml"
        bad.write_text("[node]\nno_such_key = 1\n")
        rows = [("python -c pass (interpreter)", [sys.executable, "-c", "pass"]),
                ("radvlm --help", [sys.executable, "-m", "dicom_node.cli", "--help"]),
                ("radvlm jobs --config BAD.toml (config error)",
                 [sys.executable, "-m", "dicom_node.cli", "jobs", "--config", str(bad)])]
        if not args.no_torch:
            rows.append(("python -c 'import torch' (baseline)", [sys.executable, "-c", "import torch"]))
        print(f"{'command':48} {'wall median s':>13} {'wall min s':>10} {'CPU median s':>12}"
              f"   ({args.runs} fresh processes each)")
        for label, command in rows:
            median, fastest, cpu = wall(command, args.runs)
            print(f"{label:48} {median:13.3f} {fastest:10.3f} {cpu:12.3f}")
    print("heavy libraries imported by --help:", ", ".join(heavy_imports_of_help()) or "none")


if __name__ == "__main__":
    main()
