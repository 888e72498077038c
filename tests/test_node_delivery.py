"""Delivery is marked done only on the peer's real success (STOW-RS partial failures, FHIR
transaction-response entries, no redirect followed as a body-less GET); any sender error ends in
retry or dead-letter, never a delivery stuck in 'sending'; spool races never overwrite silently.
Peers are real HTTP servers / pynetdicom associations on loopback."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest

from config.settings import DicomWebDestination, FhirDestination, Settings
from dicom_node.audit import AuditLog
from dicom_node.destinations import PermanentDeliveryError, send_fhir, send_stow
from dicom_node.errors import DeliveryError
from dicom_node.jobstore import InstanceDecision, InstanceRecord, JobStore
from dicom_node.metrics import node_metrics
from dicom_node.outbox import Outbox
from tests.conftest_node import free_port, storescu
from tests.dicom_samples import make_cr_dataset, write
from tests.test_node_scp import Scp


class FakePeer:
    """An HTTP server answering every POST with a scripted (status, headers, body); records requests."""

    def __init__(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.requests: list[tuple[str, str]] = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, code: int, body: bytes, extra: dict[str, str]) -> None:
                self.send_response(code)
                for k, v in extra.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                peer.requests.append(("POST", self.path))
                self._answer(status, body, headers or {})

            def do_GET(self) -> None:  # noqa: N802
                peer.requests.append(("GET", self.path))
                self._answer(200, b"[]", {"Content-Type": "application/json"})

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def dicom_file(tmp_path) -> Path:
    return write(make_cr_dataset(), tmp_path / "sr.dcm")


def _stow(peer: FakePeer, path: Path) -> None:
    send_stow(DicomWebDestination(kind="dicomweb", url=peer.url + "/dicom-web"), [path], 5)


FAILED_SEQ = {"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3"]},
                                                   "00081197": {"vr": "US", "Value": [0xA700]}}]}}


@pytest.mark.parametrize("status, body", [
    (202, json.dumps(FAILED_SEQ).encode()),                  # partial failure, object form
    (200, json.dumps([FAILED_SEQ]).encode()),                # array-wrapped response data set
    (202, b"<NativeDicomModel>...</NativeDicomModel>"),      # 202 whose answer cannot be read
    (202, b""),
])
def test_stow_partial_or_unreadable_failure_is_not_delivered(dicom_file, status, body):
    peer = FakePeer(status, body, {"Content-Type": "application/dicom+json"})
    try:
        with pytest.raises(DeliveryError):
            _stow(peer, dicom_file)
    finally:
        peer.close()


def test_stow_success_and_warning_only_202_are_delivered(dicom_file):
    ok = {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3"]}}]}}
    warned = {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3"]},
                                                  "00081196": {"vr": "US", "Value": [0xB000]}}]}}
    for status, body in ((200, json.dumps(ok).encode()), (200, b""), (202, json.dumps(warned).encode())):
        peer = FakePeer(status, body)
        try:
            _stow(peer, dicom_file)
        finally:
            peer.close()


def test_redirect_is_not_followed_as_a_get(dicom_file, tmp_path):
    peer = FakePeer(301, b"", {"Location": "/moved"})
    try:
        with pytest.raises(PermanentDeliveryError, match="redirect"):
            _stow(peer, dicom_file)
        bundle = tmp_path / "bundle.json"
        bundle.write_text(json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": []}))
        with pytest.raises(PermanentDeliveryError, match="redirect"):
            send_fhir(FhirDestination(kind="fhir", url=peer.url + "/fhir"), [bundle], 5)
        assert all(method == "POST" for method, _ in peer.requests), peer.requests
    finally:
        peer.close()


def _transaction_response(*statuses: str) -> bytes:
    return json.dumps({"resourceType": "Bundle", "type": "transaction-response",
                       "entry": [{"response": {"status": s}} for s in statuses]}).encode()


@pytest.mark.parametrize("status, body, delivered", [
    (200, _transaction_response("201 Created", "201 Created"), True),
    (200, _transaction_response("201 Created", "400 Bad Request"), False),
    (200, b"<html>welcome</html>", False),
])
def test_fhir_transaction_response_is_checked(tmp_path, status, body, delivered):
    bundle = tmp_path / "bundle.json"
    bundle.write_text(json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": []}))
    peer = FakePeer(status, body, {"Content-Type": "application/fhir+json"})
    try:
        dest = FhirDestination(kind="fhir", url=peer.url + "/fhir")
        if delivered:
            send_fhir(dest, [bundle], 5)
        else:
            with pytest.raises(DeliveryError):
                send_fhir(dest, [bundle], 5)
    finally:
        peer.close()


def test_unexpected_sender_error_is_retried_then_dead_lettered(tmp_path):
    """A result file a sender cannot parse (or any non-DeliveryError) must not leave the delivery
    in 'sending' forever: it follows the normal retry/dead-letter path."""
    settings = Settings.model_validate({
        "node": {"data_dir": str(tmp_path / "data"), "max_delivery_tries": 2, "retry_base_seconds": 0.01,
                 "retry_max_seconds": 0.02},
        "destinations": [{"kind": "dicom", "host": "127.0.0.1", "port": free_port(), "ae_title": "PEER",
                          "name": "pacs"}],
    })
    jobs = JobStore(tmp_path / "data" / "jobs.sqlite3")
    audit = AuditLog(tmp_path / "data" / "audit.jsonl")
    try:
        study, sop = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        jobs.record_instance(InstanceRecord(sop, "1.2.840.10008.5.1.4.1.1.1", study, pydicom.uid.generate_uid(),
                                            "CR", None, "x", "0", 0, "PACS", None))
        row = jobs.study(study)
        assert jobs.apply_selection(study, row["last_received_at"], sop, "ViewPosition", "test",
                                    [InstanceDecision(sop, "selected", "test")])
        job = jobs.claim_job("test", 60)
        junk = tmp_path / "not-dicom.dcm"
        junk.write_bytes(b"this is not a DICOM file")
        assert jobs.mark_written(job, str(tmp_path), [("pacs", "dicom", [str(junk)])])
        outbox = Outbox(settings, jobs, audit, node_metrics(), threading.Event())
        deadline = time.monotonic() + 10
        while not jobs.deliveries("dead") and time.monotonic() < deadline:
            outbox.run_once()
            time.sleep(0.03)
        [dead] = jobs.deliveries("dead")
        assert dead.tries == 2 and dead.last_error
        assert jobs.study(study)["state"] == "failed"
    finally:
        jobs.close()
        audit.close()


def test_concurrent_different_copies_of_one_uid_never_overwrite(tmp_path):
    """Two associations deliver different objects with one SOP Instance UID at the same moment:
    the spooled file must stay the one whose hash the job store recorded; the other is a conflict."""
    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage

    node = Scp(tmp_path / "data")
    barrier = threading.Barrier(2, timeout=10)
    calls: list[int] = []
    real_write = node.spool._write_temp

    def synchronised_write(data: bytes) -> Path:
        tmp = real_write(data)
        calls.append(1)
        if len(calls) <= 2:  # both first writes pass the existence check before either is placed
            barrier.wait()
        return tmp

    node.spool._write_temp = synchronised_write
    first = make_cr_dataset()
    second = make_cr_dataset(study_instance_uid=first.StudyInstanceUID, SOPInstanceUID=first.SOPInstanceUID,
                             SeriesInstanceUID=first.SeriesInstanceUID, SeriesDescription="other copy")
    statuses: list[int] = []

    def send(ds) -> None:
        ae = AE(ae_title="PYSCU")
        ae.add_requested_context(ComputedRadiographyImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="RADVLM")
        try:
            statuses.append(int(assoc.send_c_store(ds).Status))
        finally:
            assoc.release()

    try:
        threads = [threading.Thread(target=send, args=(ds,)) for ds in (first, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert statuses == [0, 0]
        row = node.jobs.instance(first.SOPInstanceUID)
        assert hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest() == row["sha256"]
        assert len(list((tmp_path / "data" / "spool" / "conflicts").iterdir())) == 1
    finally:
        node.close()


def test_conflict_with_an_unacknowledged_first_copy_is_recorded(tmp_path):
    """The node crashed after renaming an instance into the spool but before its commit (never
    acknowledged). The sender re-sends it re-encoded (different bytes): the acknowledged copy
    must reach the job store, not only the conflicts folder."""
    node = Scp(tmp_path / "data")
    try:
        ds = make_cr_dataset()
        leftover = tmp_path / "data" / "spool" / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        leftover.parent.mkdir(parents=True)
        ds.SeriesDescription = "first encoding"
        write(ds, leftover)
        ds.SeriesDescription = "second encoding"
        sent = write(ds, tmp_path / "cr.dcm")
        result = storescu(node.port, [sent])
        assert "Received Store Response (Success)" in result.stdout + result.stderr
        row = node.jobs.instance(ds.SOPInstanceUID)
        assert row is not None, "acknowledged instance is not in the job store"
        assert row["sha256"] == hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest()
        assert pydicom.dcmread(row["path"]).SeriesDescription == "second encoding"
        assert node.jobs.study(ds.StudyInstanceUID)["state"] == "received"
    finally:
        node.close()
