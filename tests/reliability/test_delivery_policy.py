"""Outbox policy on real sockets: a permanent refusal is dead-lettered at once, transient failures
are retried with capped exponential backoff, and a peer's C-STORE failure status is never taken as
"stored"."""

from __future__ import annotations

import http.server
import random
import threading
import time
from pathlib import Path

import pytest

from config.settings import Settings
from dicom_node.audit import AuditLog
from dicom_node.jobstore import InstanceRecord, JobStore
from dicom_node.metrics import node_metrics
from dicom_node.outbox import Outbox, backoff_seconds, delivery_lease_seconds
from dicom_node.results import write_result_files
from tests.conftest_node import free_port
from tests.dicom_samples import make_cr_dataset, write


def _settings(tmp_path: Path, destinations: list[dict], **node: object) -> Settings:
    base = dict(data_dir=tmp_path / "data", min_free_space_mb=0, retry_base_seconds=10.0,
                retry_max_seconds=1000.0, max_delivery_tries=10, delivery_timeout_seconds=5,
                allow_demo_model_delivery=True)
    base.update(node)
    return Settings.model_validate({"node": base, "destinations": destinations,
                                    "sr": {"fhir_patient_identifier_system": "urn:oid:1.2.3.4.5"}})


def _queued_delivery(tmp_path: Path, settings: Settings, kind: str, model) -> tuple[JobStore, Outbox]:
    """One study through the job store to 'written' with the tiny model's result files, its delivery queued."""
    from config.settings import InferenceSettings
    from inference.image import image_from_dataset
    from inference.tasks import run_study

    jobs = JobStore(tmp_path / "data" / "jobs.sqlite3")
    ds = make_cr_dataset()
    path = write(ds, tmp_path / "cr.dcm")
    jobs.record_instance(InstanceRecord(ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                        "CR", str(ds.file_meta.TransferSyntaxUID), str(path), "0" * 64, 1, "T", None))
    [(study, last)] = jobs.studies_ready(0, now=time.time() + 1)
    jobs.apply_selection(study, last, ds.SOPInstanceUID, "ViewPosition", "test", [])
    job = jobs.claim_job("w", 60)
    result = run_study(model, image_from_dataset(ds), InferenceSettings(tasks=["report"]))
    files = write_result_files(result, ds, settings.sr, tmp_path / "data" / "results" / study)
    dest = settings.destinations[0]
    from dicom_node.destinations import destination_name, files_for

    assert jobs.mark_written(job, str(files.directory),
                             [(destination_name(dest), kind, [str(p) for p in files_for(dest, files)])])
    outbox = Outbox(settings, jobs, AuditLog(tmp_path / "data" / "audit.jsonl"), node_metrics(), threading.Event())
    return jobs, outbox


class _Answer(http.server.BaseHTTPRequestHandler):
    status = 400

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"resourceType": "OperationOutcome"}'
        self.send_response(self.status)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_peer():
    servers = []

    def start(status: int) -> str:
        handler = type("Handler", (_Answer,), {"status": status})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/fhir"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _attempt_due(jobs: JobStore, outbox: Outbox) -> None:
    delivery = jobs.claim_delivery(delivery_lease_seconds(outbox.settings.node), now=time.time() + 10**6)
    assert delivery is not None
    outbox.attempt(delivery)


def test_permanent_refusal_is_dead_lettered_at_the_first_try(tmp_path, http_peer, tiny_model):
    settings = _settings(tmp_path, [{"kind": "fhir", "url": http_peer(400), "name": "ehr"}])
    jobs, outbox = _queued_delivery(tmp_path, settings, "fhir", tiny_model)
    _attempt_due(jobs, outbox)
    [delivery] = jobs.deliveries()
    assert delivery.state == "dead" and delivery.tries == 1 and "HTTP 400" in delivery.last_error


def test_transient_failure_is_retried_not_dead_lettered(tmp_path, http_peer, tiny_model):
    settings = _settings(tmp_path, [{"kind": "fhir", "url": http_peer(503), "name": "ehr"}])
    jobs, outbox = _queued_delivery(tmp_path, settings, "fhir", tiny_model)
    _attempt_due(jobs, outbox)
    [delivery] = jobs.deliveries()
    assert delivery.state == "pending" and delivery.tries == 1 and "HTTP 503" in delivery.last_error


class _Highest(random.Random):
    """The top of the jitter range, so the delay is exactly the capped exponential."""

    def random(self) -> float:
        return 1.0


def test_backoff_doubles_per_try_up_to_the_cap():
    delays = [backoff_seconds(tries, 5.0, 100.0, _Highest()) for tries in range(1, 8)]
    assert delays == [5.0, 10.0, 20.0, 40.0, 80.0, 100.0, 100.0]
    jittered = [backoff_seconds(3, 5.0, 100.0, random.Random(seed)) for seed in range(50)]
    assert all(10.0 <= d <= 20.0 for d in jittered) and len(set(jittered)) > 1


def test_outbox_schedules_retries_exponentially(tmp_path, tiny_model):
    """Real failed sends (nobody listens): each retry is scheduled base·2^(tries−1)·[0.5, 1] later."""
    settings = _settings(tmp_path, [{"kind": "dicom", "host": "127.0.0.1", "port": free_port(),
                                     "ae_title": "NOBODY", "name": "pacs"}])
    jobs, outbox = _queued_delivery(tmp_path, settings, "dicom", tiny_model)
    for tries in range(1, 6):
        before = time.time()
        _attempt_due(jobs, outbox)
        [delivery] = jobs.deliveries()
        assert delivery.state == "pending" and delivery.tries == tries
        delay = delivery.next_attempt_at - before
        full = 10.0 * 2 ** (tries - 1)
        assert 0.5 * full - 1 <= delay <= full + 1, (tries, delay)


def test_peer_failure_status_is_not_taken_as_stored(tmp_path, tiny_model):
    """A PACS that answers C-STORE with 0xA700 (out of resources) has not stored the SR."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    peer = AE(ae_title="FULLPACS")
    peer.supported_contexts = AllStoragePresentationContexts
    received: list[int] = []

    def refuse(event: evt.Event) -> int:
        received.append(1)
        return 0xA700

    port = free_port()
    server = peer.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, refuse)])
    try:
        settings = _settings(tmp_path, [{"kind": "dicom", "host": "127.0.0.1", "port": port,
                                         "ae_title": "FULLPACS", "name": "pacs"}])
        jobs, outbox = _queued_delivery(tmp_path, settings, "dicom", tiny_model)
        _attempt_due(jobs, outbox)
        [delivery] = jobs.deliveries()
        assert received, "the peer was reached"
        assert delivery.state == "pending" and delivery.delivered_at is None
        assert "0xA700" in delivery.last_error
        assert jobs.study(delivery.study_instance_uid)["state"] == "written"
    finally:
        server.shutdown()
