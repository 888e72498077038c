"""`radvlm serve` as a real process: kill -9 after instances were acknowledged (and again while a
job is inferring) loses nothing; SIGTERM stops gracefully; a second node on the same data
directory is refused."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from config import load_settings
from dicom_node.audit import read_audit
from dicom_node.cli import main
from dicom_node.commands import list_jobs
from tests.conftest_node import free_port, storescu, wait_for
from tests.dicom_samples import DEFAULT_PATIENT_ID, DEFAULT_PATIENT_NAME, chest_phantom, make_cr_dataset, write

ROOT = Path(__file__).resolve().parent.parent


def write_config(tmp_path: Path, model_dir: Path, quiet: float) -> Path:
    cfg = tmp_path / "radvlm.toml"
    cfg.write_text(f"""
[model]
path = "{model_dir}"
max_new_tokens = 24

[inference]
max_grounding_questions = 2

[node]
ae_title = "RADVLM"
port = {free_port()}
bind = "127.0.0.1"
data_dir = "{tmp_path / 'data'}"
min_free_space_mb = 0
quiet_period_seconds = {quiet}
poll_interval_seconds = 0.1
http_port = {free_port()}

[[destinations]]
kind = "folder"
path = "{tmp_path / 'out'}"
""")
    return cfg


class ServeProcess:
    def __init__(self, config: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "dicom_node", "serve", "--config", str(config),
                                      "--grace", "20"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=open(config.parent / "serve.log", "ab"), text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError("serve exited: " + (config.parent / "serve.log").read_text()[-3000:])
        self.ready = json.loads(line)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def _state(db: Path, study: str) -> str | None:
    with sqlite3.connect(db, timeout=10) as conn:
        row = conn.execute("SELECT state FROM studies WHERE study_instance_uid=?", (study,)).fetchone()
    return row[0] if row else None


def test_kill9_after_ack_and_during_inference_loses_nothing(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, quiet=3.0)
    settings = load_settings(config)
    node = ServeProcess(config)
    datasets = [make_cr_dataset(rows=64, columns=64, pixel_array=chest_phantom(64, 64)) for _ in range(4)]
    files = [write(ds, tmp_path / f"s{i}.dcm") for i, ds in enumerate(datasets)]
    sent = storescu(node.ready["scp_port"], files)
    assert (sent.stdout + sent.stderr).count("(Success)") == 4
    node.kill9()  # acknowledged, not yet selected (quiet period 3 s)
    db = tmp_path / "data" / "jobs.sqlite3"
    assert {_state(db, ds.StudyInstanceUID) for ds in datasets} == {"received"}

    node = ServeProcess(config)
    # second crash while a study is being inferred (best effort: the tiny model is fast)
    killed_while_inferring = False
    try:
        wait_for(lambda: any(_state(db, ds.StudyInstanceUID) == "inferring" for ds in datasets), 30, 0.01,
                 "a job in progress")
        node.kill9()
        killed_while_inferring = True
        node = ServeProcess(config)
    except AssertionError:
        pass
    try:
        for ds in datasets:
            wait_for(lambda: _state(db, ds.StudyInstanceUID) == "delivered", 120, what="every study delivered")
            assert (tmp_path / "out" / ds.StudyInstanceUID / "sr.dcm").is_file()
        assert all(r["state"] == "delivered" for r in list_jobs(settings))
    finally:
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(30) == 0
    events = read_audit(tmp_path / "data" / "audit.jsonl")
    assert events[-1]["event"] == "node_stopped"
    assert sum(e["event"] == "node_started" for e in events) == (3 if killed_while_inferring else 2)
    if killed_while_inferring:
        with sqlite3.connect(db) as conn:
            released = conn.execute("SELECT COUNT(*) FROM events WHERE detail LIKE 'lease of a stopped node%'")
            assert released.fetchone()[0] == 1
    log_text = (tmp_path / "serve.log").read_text()
    assert "inference for study" in log_text and "delivered to" in log_text
    assert DEFAULT_PATIENT_ID not in log_text and DEFAULT_PATIENT_NAME.split("^")[0] not in log_text


def test_sigterm_releases_and_second_node_is_refused(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir, quiet=0.2)
    node = ServeProcess(config)
    try:
        assert main(["serve", "--config", str(config)]) == 4
        assert "already running" in capsys.readouterr().err
        assert main(["jobs", "--config", str(config), "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == []
        assert main(["outbox", "list", "--config", str(config)]) == 0
        assert main(["outbox", "retry", "--config", str(config)]) == 2
    finally:
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(30) == 0
    assert "stopping" in (tmp_path / "serve.log").read_text()


def _listening_socket():
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


def test_port_in_use_exits_4_with_one_line_and_creates_nothing(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir, quiet=0.2)
    text = config.read_text()
    busy = _listening_socket()  # another program on the DICOM port
    try:
        port = busy.getsockname()[1]
        dicom = tmp_path / "dicom-busy.toml"
        dicom.write_text(text.replace(f"port = {load_settings(config).node.port}\n", f"port = {port}\n", 1))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        done = subprocess.run([sys.executable, "-m", "dicom_node", "serve", "--config", str(dicom)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 4, done.stderr
        assert done.stdout == ""
        assert done.stderr.splitlines() == [
            f"radvlm: cannot listen on the DICOM port 127.0.0.1:{port}: already in use by another program "
            "(stop the other program or change [node] port)"]
        assert not (tmp_path / "data").exists()

        http = tmp_path / "http-busy.toml"
        http.write_text(text.replace(f"http_port = {load_settings(config).node.http_port}\n", f"http_port = {port}\n"))
        assert main(["serve", "--config", str(http)]) == 4
        err = capsys.readouterr().err
        assert err.splitlines() == [f"radvlm: cannot listen on the HTTP port 127.0.0.1:{port}: already in use by "
                                    "another program (stop the other program or change [node] http_port)"]
        assert not (tmp_path / "data").exists()
    finally:
        busy.close()


def test_node_start_with_a_taken_port_is_undone(tmp_path, tiny_model_dir):
    """A port taken between the check and the bind: Node.start reports it and releases the data dir."""
    from dicom_node.errors import PortInUseError
    from dicom_node.service import Node

    settings = load_settings(write_config(tmp_path, tiny_model_dir, quiet=0.2))
    settings.node.workers = 0
    busy = _listening_socket()
    try:
        settings.node.http_port = busy.getsockname()[1]
        with pytest.raises(PortInUseError, match="HTTP port"):
            Node(settings).start()
    finally:
        busy.close()
    node = Node(settings).start()  # the lock and the DICOM port were released
    node.stop(grace_seconds=1)
