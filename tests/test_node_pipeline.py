"""The whole node in-process on loopback with the tiny model: dcmtk storescu in, selection,
inference, SR/GSPS/FHIR written, delivered to a folder and to a real dcmtk storescp (which is
down at first: retried with backoff, delivered when it comes up), /healthz and /metrics."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom

from config.settings import ModelSettings, NodeSettings, Settings
from dicom_node.audit import read_audit
from dicom_node.commands import list_jobs, list_outbox, retry_outbox
from dicom_node.service import Node
from tests.conftest_node import free_port, need_tool, storescu, wait_for
from tests.dicom_samples import DEFAULT_PATIENT_ID, DEFAULT_PATIENT_NAME, chest_phantom, make_cr_dataset, write


def node_settings(tmp_path: Path, model_dir: Path, destinations: list[dict], **node: object) -> Settings:
    base = dict(data_dir=tmp_path / "data", port=free_port(), bind="127.0.0.1", http_port=free_port(),
                min_free_space_mb=0, quiet_period_seconds=0.3, poll_interval_seconds=0.1,
                retry_base_seconds=0.3, retry_max_seconds=1.0, max_delivery_tries=50, delivery_timeout_seconds=10)
    base.update(node)
    return Settings.model_validate({
        "model": ModelSettings(path=model_dir, max_new_tokens=24).model_dump(),
        "inference": {"max_grounding_questions": 2},
        "node": NodeSettings(**base).model_dump(),
        "destinations": destinations,
    })


def _get(port: int, path: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_study_to_sr_in_folder_and_dicom_peer_with_retry(tmp_path, tiny_model_dir):
    need_tool("storescp")
    peer_port = free_port()
    peer_dir = tmp_path / "peer"
    peer_dir.mkdir()
    out_dir = tmp_path / "out"
    settings = node_settings(tmp_path, tiny_model_dir, [
        {"kind": "folder", "path": str(out_dir), "name": "archive"},
        {"kind": "dicom", "host": "127.0.0.1", "port": peer_port, "ae_title": "PEER", "name": "pacs"},
    ], http_token="s3cret")
    node = Node(settings).start()
    peer = None
    try:
        study = pydicom.uid.generate_uid()
        pa = make_cr_dataset(rows=96, columns=80, pixel_array=chest_phantom(96, 80), study_instance_uid=study)
        lat = make_cr_dataset(view_position="LL", study_instance_uid=study, PatientOrientation=["A", "F"])
        hand = make_cr_dataset(BodyPartExamined="HAND")
        files = [write(pa, tmp_path / "pa.dcm"), write(lat, tmp_path / "lat.dcm"), write(hand, tmp_path / "hand.dcm")]
        sent = storescu(node.scp_port, files, calling="PACS")
        assert sent.returncode == 0 and sent.stderr.count("(Success)") + sent.stdout.count("(Success)") == 3

        # folder delivery succeeds; the DICOM peer is down so that delivery is retried
        wait_for(lambda: (out_dir / study / "sr.dcm").is_file(), 120, what="SR in the folder destination")
        sr = pydicom.dcmread(out_dir / study / "sr.dcm")
        assert sr.StudyInstanceUID == study and sr.SeriesInstanceUID != pa.SeriesInstanceUID
        assert sr.PatientID == pa.PatientID and sr.Modality == "SR"
        assert (out_dir / study / "bundle.json").is_file()
        wait_for(lambda: any(d["destination"] == "pacs" and d["tries"] >= 2 and d["state"] == "pending"
                             for d in list_outbox(settings)), 30, what="retries to the down peer")
        row = next(r for r in list_jobs(settings) if r["study_instance_uid"] == study)
        assert row["state"] == "written"
        decisions = {d["sop_instance_uid"]: d for d in row["decisions"]}
        assert decisions[pa.SOPInstanceUID]["decision"] == "selected"
        assert decisions[lat.SOPInstanceUID]["decision"] == "lateral"
        hand_row = list_jobs(settings, study_uid=hand.StudyInstanceUID)[0]
        assert hand_row["state"] == "skipped" and "BodyPartExamined=HAND" in hand_row["reason"]

        # the peer comes up: delivered once, with the peer's success
        peer = subprocess.Popen([need_tool("storescp"), "-aet", "PEER", "-od", str(peer_dir), "+xa",
                                 str(peer_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: list_jobs(settings, study_uid=study)[0]["state"] == "delivered", 60,
                 what="delivery to the DICOM peer")
        received = [pydicom.dcmread(p) for p in peer_dir.iterdir()]
        assert [r.SOPInstanceUID for r in received if r.Modality == "SR"] == [sr.SOPInstanceUID]

        # re-sending by CLI function: same deterministic UID, the peer gets the same instance again
        assert retry_outbox(settings, study_uid=study, include_delivered=True) == 2
        wait_for(lambda: list_jobs(settings, study_uid=study)[0]["state"] == "delivered", 60, what="re-send")

        code, health = _get(node.http_port, "/healthz")
        assert code == 200 and json.loads(health)["status"] == "ok"
        assert _get(node.http_port, "/metrics")[0] == 401
        code, metrics = _get(node.http_port, "/metrics", "s3cret")
        assert code == 200
        assert 'radvlm_instances_received_total{outcome="new"} 3' in metrics
        assert 'radvlm_studies{state="delivered"} 1' in metrics
        assert 'radvlm_deliveries_total{kind="dicom",outcome="delivered"}' in metrics
        assert "radvlm_inference_seconds_count 1" in metrics
        assert "radvlm_delivery_retries_total" in metrics
    finally:
        node.stop(grace_seconds=10)
        if peer is not None:
            peer.terminate()
            peer.wait(10)
    audit_text = (tmp_path / "data" / "audit.jsonl").read_text()
    assert DEFAULT_PATIENT_ID not in audit_text and DEFAULT_PATIENT_NAME not in audit_text
    events = [e["event"] for e in read_audit(tmp_path / "data" / "audit.jsonl")]
    for expected in ("instance_received", "study_selected", "study_skipped", "result_written", "delivered"):
        assert expected in events


def test_dead_letter_then_cli_retry(tmp_path, tiny_model_dir):
    settings = node_settings(tmp_path, tiny_model_dir, [
        {"kind": "dicom", "host": "127.0.0.1", "port": free_port(), "ae_title": "NOBODY", "name": "gone"},
    ], max_delivery_tries=2, retry_base_seconds=0.1, http_enabled=False)
    node = Node(settings).start()
    try:
        ds = make_cr_dataset()
        assert storescu(node.scp_port, [write(ds, tmp_path / "a.dcm")]).returncode == 0
        wait_for(lambda: list_outbox(settings, "dead"), 120, what="dead letter")
        [dead] = list_outbox(settings, "dead")
        assert dead["tries"] == 2 and "no association" in dead["last_error"]
        row = list_jobs(settings, study_uid=ds.StudyInstanceUID)[0]
        assert row["state"] == "failed" and "gone" in row["reason"]
        assert retry_outbox(settings, [dead["id"]]) == 1
        assert list_jobs(settings, study_uid=ds.StudyInstanceUID)[0]["state"] == "written"
        wait_for(lambda: list_outbox(settings, "dead"), 30, what="dead again")
    finally:
        node.stop(grace_seconds=5)
