"""Ingest throughput of the node's SCP (spool + fsync + SQLite commit before Success) against
dcmtk storescp in the same run, with dcmtk storescu sending N distinct copies of pydicom-data's
RG1 chest CR (7.2 MB, Explicit VR Little Endian) over loopback.

    .venv/bin/python benchmarks/bench_node_ingest.py --count 60
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from config.settings import NodeSettings, Settings  # noqa: E402
from dicom_node.service import Node  # noqa: E402
from tests.conftest_node import free_port, wait_for  # noqa: E402


def make_copies(count: int, folder: Path) -> list[Path]:
    source = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    files = []
    for i in range(count):
        source.StudyInstanceUID = generate_uid()
        source.SeriesInstanceUID = generate_uid()
        source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"rg1-{i:03d}.dcm"
        source.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def send(port: int, called: str, files: list[Path]) -> float:
    started = time.perf_counter()
    done = subprocess.run(["storescu", "-aec", called, "-aet", "BENCH", "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"storescu failed: {done.stderr[-1000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "in").mkdir()
        files = make_copies(args.count, tmp / "in")
        megabytes = sum(f.stat().st_size for f in files) / 2**20

        port = free_port()
        (tmp / "dcmtk").mkdir()
        storescp = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(tmp / "dcmtk"), str(port)])
        time.sleep(0.5)
        try:
            dcmtk_s = send(port, "STORESCP", files)
        finally:
            storescp.terminate()
            storescp.wait()

        settings = Settings(node=NodeSettings(data_dir=tmp / "node", port=free_port(), bind="127.0.0.1",
                                              workers=0, http_enabled=False, min_free_space_mb=0,
                                              quiet_period_seconds=3600))
        node = Node(settings).start()
        try:
            node_s = send(node.scp_port, "RADVLM", files)
            wait_for(lambda: sum(node.jobs.counts()["studies"].values()) == args.count, 30)
        finally:
            node.stop(grace_seconds=1)
        shutil.rmtree(tmp / "dcmtk", ignore_errors=True)

    print(f"{args.count} × RG1_UNCR ({megabytes / args.count:.1f} MB each), storescu over loopback")
    print(f"dcmtk storescp:  {dcmtk_s:6.2f} s  {args.count / dcmtk_s:6.1f} instances/s  {megabytes / dcmtk_s:6.1f} MB/s")
    print(f"radvlm node SCP: {node_s:6.2f} s  {args.count / node_s:6.1f} instances/s  {megabytes / node_s:6.1f} MB/s"
          "  (fsync + SQLite commit before each Success)")


if __name__ == "__main__":
    main()
