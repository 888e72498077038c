"""The whole node in-process (tiny model, loopback, folder destination): one poison header does not
stop the others, also after a restart; a failing selector and a full disk make /healthz degraded
and heal without a restart; leases are renewed while a slow model runs; header values never
reach logs, reasons or the viewer API."""

from __future__ import annotations

import errno
import logging
import sqlite3
import time

import pytest

from dicom_node.commands import list_jobs
from dicom_node.service import Node
from inference import durable
from tests.conftest_node import wait_for
from tests.dicom_samples import DEFAULT_PATIENT_ID, make_cr_dataset
from tests.reliability.harness import http_json, node_settings, send, with_raw_value

TERMINAL = {"delivered", "skipped", "failed"}


def _states(node: Node, studies) -> dict[str, str]:
    return {s: (node.jobs.study(s) or {"state": None})["state"] for s in studies}


def _all_terminal(node: Node, studies) -> bool:
    return all(state in TERMINAL for state in _states(node, studies).values())


def test_poison_headers_then_good_studies_also_after_restart(tmp_path, tiny_model_dir, caplog):
    caplog.set_level(logging.INFO)
    settings = node_settings(tmp_path, tiny_model_dir, api_token="t0ken")
    secret_name, secret_date = "Zyxwvut^Qrstu", b"born on a tuesday"
    frames = with_raw_value(make_cr_dataset(view_position="PA"), "NumberOfFrames", "IS", b"ab")
    birth = with_raw_value(make_cr_dataset(view_position="PA", patient_name=secret_name), "PatientBirthDate", "DA",
                           secret_date)
    good = [make_cr_dataset(view_position="PA") for _ in range(3)]
    studies = [ds.StudyInstanceUID for ds in (frames, birth, *good)]
    node = Node(settings).start()
    try:
        answers = send(node.scp_port, [frames, birth, *good])
        assert [a.status for a in answers] == [0] * 5
        wait_for(lambda: _all_terminal(node, studies), 120, 0.1, "every study terminal")
        states = _states(node, studies)
        assert states[frames.StudyInstanceUID] == "skipped"
        assert "NumberOfFrames" in node.jobs.study(frames.StudyInstanceUID)["reason"]
        assert node.jobs.instance(frames.SOPInstanceUID)["decision"] == "unreadable-header"
        # an unconvertible PatientBirthDate is copied empty: the study is not failed for it
        assert states[birth.StudyInstanceUID] == "delivered"
        assert all(states[ds.StudyInstanceUID] == "delivered" for ds in good)
        code, health = http_json(node.http_port, "/healthz")
        assert code == 200 and health["status"] == "ok", health
        code, listing = http_json(node.http_port, "/api/studies", "t0ken")
        assert code == 200
        # the authenticated study list shows the patient's name by design (issue 14: the viewer's
        # list); every other field (reasons above all) must carry no header value
        assert all("patient_name" in study for study in listing["studies"])
        api_text = str([{k: v for k, v in study.items() if k != "patient_name"}
                        for study in listing["studies"]])
    finally:
        node.stop(grace_seconds=5)
    # after a restart nothing is re-decided and new studies still flow
    node = Node(settings).start()
    try:
        late = make_cr_dataset(view_position="PA")
        assert send(node.scp_port, [late])[0].status == 0
        wait_for(lambda: _all_terminal(node, [late.StudyInstanceUID]), 120, 0.1, "the study after the restart")
        assert _states(node, studies) == states
    finally:
        node.stop(grace_seconds=5)
    jobs_text = str(list_jobs(settings, limit=100))
    audit_text = (settings.node.data_dir / "audit.jsonl").read_text()
    log_text = "\n".join(r.getMessage() for r in caplog.records)
    for where, text in (("log", log_text), ("radvlm jobs", jobs_text), ("audit", audit_text), ("/api/studies", api_text)):
        for value in (secret_date.decode(), "Zyxwvut", DEFAULT_PATIENT_ID, "'ab'"):
            assert value not in text, f"{value!r} in the {where}"


def test_failing_selector_degrades_healthz_and_heals(tmp_path, tiny_model_dir):
    settings = node_settings(tmp_path, tiny_model_dir)
    node = Node(settings).start()
    try:
        def fail(operation: str) -> None:
            if operation == "apply_selection":
                raise sqlite3.OperationalError("database disk image is malformed")

        node.jobs.inject = fail
        ds = make_cr_dataset(view_position="PA")
        assert send(node.scp_port, [ds])[0].status == 0
        code, health = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(http_json(node.http_port, "/healthz")),
                                30, 0.1, "degraded health")
        assert "selection pass failed: OperationalError" in health["checks"]["selector"]
        assert node.selector.is_alive()
        node.jobs.inject = None
        wait_for(lambda: node.jobs.study(ds.StudyInstanceUID)["state"] == "delivered", 120, 0.1, "recovery")
        code, health = http_json(node.http_port, "/healthz")
        assert code == 200 and health["status"] == "ok", health
    finally:
        node.stop(grace_seconds=5)


def test_selection_stall_is_reported(tmp_path, tiny_model_dir):
    """A study waiting far beyond its quiet period (selector wedged) makes /healthz degraded."""
    settings = node_settings(tmp_path, tiny_model_dir, selection_stall_seconds=0.5, workers=0)
    node = Node(settings).start()
    try:
        node.stop_event.set()  # the selector thread ends: selection is wedged
        node.selector.join(5)
        node.stop_event.clear()
        assert send(node.scp_port, [make_cr_dataset()])[0].status == 0
        code, health = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(http_json(node.http_port, "/healthz")),
                                30, 0.2, "stall reported")
        assert "1 studies waiting for selection" in health["checks"]["selector"]
    finally:
        node.stop(grace_seconds=5)


def test_enospc_while_writing_results_then_space_returns_without_restart(tmp_path, tiny_model_dir):
    settings = node_settings(tmp_path, tiny_model_dir, workers=2)
    node = Node(settings).start()
    datasets = [make_cr_dataset(view_position="PA") for _ in range(4)]
    studies = [ds.StudyInstanceUID for ds in datasets]
    try:
        with durable.inject("write", errno.ENOSPC, match="/results/") as fault:
            assert [a.status for a in send(node.scp_port, datasets)] == [0] * 4
            wait_for(lambda: fault.hits >= 8, 60, 0.1, "every study hitting the full disk twice")
            code, health = http_json(node.http_port, "/healthz")
            assert code == 503 and "No space left on device" in health["checks"]["workers"], health
            assert all(state in ("selected", "inferring") for state in _states(node, studies).values())
            assert all(w.is_alive() for w in node.workers)
        wait_for(lambda: all(s == "delivered" for s in _states(node, studies).values()), 120, 0.1,
                 "delivery once space is back")
        assert all(node.jobs.study(s)["attempts"] == 0 for s in studies)  # a full disk is not the study's fault
        code, health = http_json(node.http_port, "/healthz")
        assert code == 200, health
    finally:
        node.stop(grace_seconds=5)


def test_lease_is_renewed_while_a_slow_model_runs(tmp_path, tiny_model_dir):
    from inference.model import load_model
    from inference.tasks import run_study

    settings = node_settings(tmp_path, tiny_model_dir, lease_seconds=1.0)
    model = load_model(settings.model)

    def slow(image):  # the tiny model is fast; a real one takes seconds: hold the job 3 lease lengths
        time.sleep(3.0)
        return run_study(model, image, settings.inference)

    node = Node(settings, analyze=slow).start()
    try:
        ds = make_cr_dataset(view_position="PA")
        assert send(node.scp_port, [ds])[0].status == 0
        wait_for(lambda: node.jobs.study(ds.StudyInstanceUID)["state"] == "inferring", 30, 0.05, "inference")
        stolen = []
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:  # another node's worker polling: the lease must never look expired
            job = node.jobs.claim_job("thief", 60)
            if job is not None:
                stolen.append(job)
                break
            time.sleep(0.1)
        assert not stolen, "the lease expired while the model was running"
        wait_for(lambda: node.jobs.study(ds.StudyInstanceUID)["state"] == "delivered", 60, 0.1, "delivery")
        inferring = [e for e in node.jobs.events(ds.StudyInstanceUID) if e["state"] == "inferring"]
        assert len(inferring) == 1
    finally:
        node.stop(grace_seconds=5)


def test_healthz_degraded_while_every_instance_is_refused_for_space(tmp_path, tiny_model_dir):
    """The free-space floor can pass (check_room(0)) while every full-size instance still fails to fit."""
    settings = node_settings(tmp_path, tiny_model_dir, workers=0)
    node = Node(settings).start()
    try:
        with durable.inject("write", errno.ENOSPC, match=".incoming"):
            assert send(node.scp_port, [make_cr_dataset()])[0].status == 0xA700
            code, health = http_json(node.http_port, "/healthz")
            assert code == 503 and "refused" in health["checks"]["disk"], health
        assert send(node.scp_port, [make_cr_dataset()])[0].status == 0
        code, health = http_json(node.http_port, "/healthz")
        assert code == 200, health
    finally:
        node.stop(grace_seconds=5)


def test_job_store_errors_of_the_workers_heal_without_new_work(tmp_path, tiny_model_dir):
    settings = node_settings(tmp_path, tiny_model_dir)
    node = Node(settings).start()
    try:
        def fail(operation: str) -> None:
            if operation == "claim_job":
                raise sqlite3.OperationalError("disk I/O error")

        node.jobs.inject = fail
        code, health = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(http_json(node.http_port, "/healthz")),
                                30, 0.1, "degraded health")
        assert "job store error while claiming a job" in health["checks"]["workers: job store"]
        assert all(w.is_alive() for w in node.workers)
        node.jobs.inject = None  # no study arrives: the next empty claim heals the report
        wait_for(lambda: http_json(node.http_port, "/healthz")[0] == 200, 30, 0.1, "healthy again")
    finally:
        node.stop(grace_seconds=5)
