"""A `radvlm serve` child process with the tiny model on loopback for the long drivers (issue 12):
config, start, peak memory (VmHWM of the child from /proc), job-store reads, and a C-STORE
stream sender that records what was acknowledged."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.conftest_node import free_port
from tests.reliability.scp_process import process_memory

ROOT = Path(__file__).resolve().parents[3]
TERMINAL = ("delivered", "skipped", "failed")


def write_config(work: Path, model_dir: Path, *, workers: int = 1, http: bool = False) -> Path:
    cfg = work / "radvlm.toml"
    cfg.write_text(f"""
[model]
path = "{model_dir}"
max_new_tokens = 8

[inference]
tasks = ["report"]
max_grounding_questions = 0

[sr]
gsps_enabled = false
fhir_patient_identifier_system = "urn:oid:1.2.3.4"

[node]
port = {free_port()}
bind = "127.0.0.1"
data_dir = "{work / 'data'}"
min_free_space_mb = 0
quiet_period_seconds = 0.5
poll_interval_seconds = 0.1
workers = {workers}
http_enabled = {str(http).lower()}

[[destinations]]
kind = "folder"
path = "{work / 'out'}"
""")
    return cfg


class Serve:
    """`python -m dicom_node serve --config CFG`; ``port`` once it listens."""

    def __init__(self, config: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.log_path = config.parent / "serve.log"
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "dicom_node", "serve", "--config", str(config)],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("serve exited: " + self.log_path.read_text()[-3000:])
        self.port = json.loads(line)["scp_port"]

    def memory(self) -> dict[str, int]:
        """VmRSS (now) and VmHWM (peak) of the node process, bytes."""
        return process_memory(self.proc.pid)

    def term(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        self.log.close()
        return code


def db(data: Path, sql: str, *args) -> list:
    with sqlite3.connect(data / "jobs.sqlite3", timeout=30) as conn:
        return conn.execute(sql, args).fetchall()


def stream(port: int, datasets, acked: list[str], answers: dict[str, int], calling: str = "LONGRUN") -> None:
    """C-STORE the data sets one by one on one association; Success → ``acked``."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for key in {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}:
        ae.add_requested_context(*key)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADVLM")
    try:
        for ds in datasets:
            if not assoc.is_established:
                answers["no association"] = answers.get("no association", 0) + 1
                continue
            rsp = assoc.send_c_store(ds)
            status = getattr(rsp, "Status", None)
            key = "no answer" if status is None else f"0x{int(status):04X}"
            answers[key] = answers.get(key, 0) + 1
            if status is not None and int(status) == 0:
                acked.append(str(ds.SOPInstanceUID))
    finally:
        if assoc.is_established:
            assoc.release()
