"""kill -9 of `radvlm serve` in the middle of a C-STORE stream (3 trials × 30 instances, bounded
for CI; long runs: benchmarks): after a restart every acknowledged instance is in the job store
and complete on disk, and once the sender has re-sent what was not acknowledged, every study
reaches a terminal state with exactly one SR."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from tests.conftest_node import wait_for
from tests.dicom_samples import chest_phantom, make_cr_dataset
from tests.reliability.long.node_proc import write_config

ROOT = Path(__file__).resolve().parents[2]
# CI: 3 trials × 30 instances. Long run (docs/reliability.md; not RADVLM_*: those configure the node):
#   RELIABILITY_KILL9_TRIALS=20 RELIABILITY_KILL9_INSTANCES=210 .venv/bin/python -m pytest tests/reliability/test_kill9_stream.py -s
PER_STUDY = 3
TRIALS = int(os.environ.get("RELIABILITY_KILL9_TRIALS", "3"))
STUDIES = max(int(os.environ.get("RELIABILITY_KILL9_INSTANCES", "30")) // PER_STUDY, 2)


class Serve:
    def __init__(self, config: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.log = open(config.parent / "serve.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "dicom_node", "serve", "--config", str(config)],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError("serve exited: " + (config.parent / "serve.log").read_text()[-3000:])
        self.port = json.loads(line)["scp_port"]

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def term(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self.log.close()
        return code


def _stream(port: int, datasets, acked: list[str], after: int, reached: threading.Event) -> None:
    """Send one by one on one association; record what was acknowledged (Success)."""
    from pynetdicom import AE

    ae = AE(ae_title="STREAMER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(str(datasets[0].SOPClassUID), str(datasets[0].file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", port, ae_title="RADVLM")
    try:
        for ds in datasets:
            if not assoc.is_established:
                break
            status = assoc.send_c_store(ds)
            if status is not None and int(getattr(status, "Status", -1)) == 0:
                acked.append(str(ds.SOPInstanceUID))
                if len(acked) >= after:
                    reached.set()
    except Exception:  # the node died under us: what was acknowledged is recorded above
        pass
    finally:
        reached.set()
        if assoc.is_established:
            assoc.release()


def _db(data: Path, sql: str, *args):
    with sqlite3.connect(data / "jobs.sqlite3", timeout=10) as conn:
        return conn.execute(sql, args).fetchall()


@pytest.mark.parametrize("trial", range(TRIALS))
def test_kill9_during_a_stream_loses_no_acknowledged_instance(tmp_path, tiny_model_dir, trial):
    rng = random.Random(trial)
    config = write_config(tmp_path, tiny_model_dir)
    datasets = []
    for _ in range(STUDIES):
        study = make_cr_dataset().StudyInstanceUID
        views = ["PA", "LL", "AP"][:PER_STUDY]
        datasets += [make_cr_dataset(rows=48, columns=48, pixel_array=chest_phantom(48, 48), view_position=v,
                                     study_instance_uid=study) for v in views]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    kill_after = rng.randint(5, len(datasets) - 5)

    node = Serve(config)
    acked: list[str] = []
    reached = threading.Event()
    sender = threading.Thread(target=_stream, args=(node.port, datasets, acked, kill_after, reached), daemon=True)
    sender.start()
    assert reached.wait(60)
    node.kill9()
    sender.join(30)
    acknowledged = list(acked)
    assert len(acknowledged) >= kill_after

    node = Serve(config)  # restart: recovery runs before the SCP listens
    try:
        data = tmp_path / "data"
        recorded = {uid: path for uid, path in _db(data, "SELECT sop_instance_uid, path FROM instances")}
        missing = [uid for uid in acknowledged if uid not in recorded]
        assert not missing, f"{len(missing)} acknowledged instances lost"
        for uid in acknowledged:
            stored = dcmread(recorded[uid])
            assert np.array_equal(stored.pixel_array, by_uid[uid].pixel_array)
        # no file in the spool that the job store does not know
        spooled = {p.stem for p in (data / "spool").glob("*/*.dcm")}
        assert spooled == set(recorded)
        # the sender re-sends what was not acknowledged (a PACS does), then every study ends
        rest = [ds for ds in datasets if str(ds.SOPInstanceUID) not in set(acknowledged)]
        again: list[str] = []
        if rest:
            _stream(node.port, rest, again, len(rest), threading.Event())
        assert len(again) == len(rest)
        studies = {str(ds.StudyInstanceUID) for ds in datasets}
        wait_for(lambda: {s for s, state in _db(data, "SELECT study_instance_uid, state FROM studies")
                          if state in ("delivered", "skipped", "failed")} == studies, 180, 0.25,
                 "every study terminal")
        states = dict(_db(data, "SELECT study_instance_uid, state FROM studies"))
        assert set(states.values()) == {"delivered"}, states
        for study in studies:  # exactly one SR per study, never a second one after a crash
            assert [p.name for p in (tmp_path / "out" / study).glob("*.dcm")] == ["sr.dcm"]
        print(f"kill9 trial {trial}: {len(datasets)} instances, killed after {len(acknowledged)} acknowledged,"
              f" lost 0, re-sent {len(rest)}, {len(studies)} studies delivered")
    finally:
        assert node.term() == 0
