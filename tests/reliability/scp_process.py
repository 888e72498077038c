"""Run the node's C-STORE SCP (spool + job store + audit, as `radvlm serve` wires them) in a child
process so that a test can measure its memory (peak RSS from /proc) apart from the sender's.

    python -m tests.reliability.scp_process DATA_DIR '{"max_instance_bytes": 1048576}'

prints ``PORT <n>`` once listening and runs until its stdin closes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from config.settings import NodeSettings


def _serve(data_dir: Path, overrides: dict) -> None:
    from dicom_node.audit import AuditLog
    from dicom_node.identity import Pseudonymizer
    from dicom_node.jobstore import JobStore
    from dicom_node.metrics import node_metrics
    from dicom_node.scp import StorageSCP
    from dicom_node.spool import Spool

    settings = NodeSettings(data_dir=data_dir, port=0, bind="127.0.0.1", min_free_space_mb=0, **overrides)
    data_dir.mkdir(parents=True, exist_ok=True)
    jobs = JobStore(data_dir / "jobs.sqlite3")
    audit = AuditLog(data_dir / "audit.jsonl")
    scp = StorageSCP(settings, Spool(data_dir / "spool", 0), jobs, audit, Pseudonymizer(b"k" * 32), node_metrics())
    port = scp.start()
    print(f"PORT {port}", flush=True)
    sys.stdin.read()  # until the parent closes the pipe
    scp.stop()
    jobs.close()
    audit.close()


def process_memory(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of process ``pid``, bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


class ScpProcess:
    """The child process; ``memory()`` reads its VmRSS / VmHWM (peak) in bytes."""

    def __init__(self, data_dir: Path, **overrides: object) -> None:
        self.data_dir = data_dir
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.scp_process", str(data_dir), json.dumps(overrides)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(data_dir.parent / "scp.log", "ab"),
            cwd=Path(__file__).resolve().parents[2], text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.close()
            raise AssertionError(f"SCP child did not start: {(data_dir.parent / 'scp.log').read_text()[-3000:]}")
        self.port = int(line.split()[1])

    def memory(self) -> dict[str, int]:
        return process_memory(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), json.loads(sys.argv[2]) if len(sys.argv) > 2 else {})
    time.sleep(0)
