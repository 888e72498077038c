"""A hung peer delays the others (issue 12 item 5): a PACS that accepted TCP and never answered
held a folder destination's delivery for 180 s although the delivery timeout was 60 s.

Real sockets on loopback, the real Outbox thread: next to a working folder destination, three
hung ones — a TCP server that accepts and never answers (DICOM), a DICOM SCP that accepts the
association and never answers the C-STORE, an HTTP server that trickles its response header one
byte at a time (so no single socket operation ever times out). The folder delivers at once; each
hung try fails within ``delivery_timeout_seconds`` (+ margin) naming the deadline, and is retried.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComputedRadiographyImageStorage

from config.settings import Settings
from dicom_node.audit import AuditLog
from dicom_node.jobstore import InstanceDecision, InstanceRecord, JobStore
from dicom_node.metrics import node_metrics
from dicom_node.outbox import Outbox
from tests.dicom_samples import make_cr_dataset, write

TIMEOUT = 2.0
MARGIN = 1.5  # two busy cores


class SilentServer:
    """Accepts TCP connections and never sends a byte; ``trickle`` answers an HTTP request with a
    status line and then one header byte every 0.3 s, forever."""

    def __init__(self, trickle: bool = False) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.trickle = trickle
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.trickle:
                threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while not self.stop.wait(0.3):
                conn.sendall(b"a")
        except OSError:
            pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        for conn in self.conns:
            conn.close()


class StuckScp:
    """A DICOM SCP that accepts the association and never answers a C-STORE."""

    def __init__(self) -> None:
        self.release = threading.Event()
        ae = AE(ae_title="STUCK")
        ae.add_supported_context(ComputedRadiographyImageStorage)
        ae.network_timeout = ae.dimse_timeout = 60

        def handle_store(event: evt.Event) -> int:
            self.release.wait(30)
            return 0xA700

        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
        self.port = self.server.server_address[1]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture
def peers():
    silent, stuck, trickle = SilentServer(), StuckScp(), SilentServer(trickle=True)
    yield silent, stuck, trickle
    for peer in (silent, stuck, trickle):
        peer.close()


def _written_study(jobs: JobStore, deliveries: list[tuple[str, str, list[str]]]) -> str:
    study, sop = generate_uid(), generate_uid()
    jobs.record_instance(InstanceRecord(sop, str(ComputedRadiographyImageStorage), study, generate_uid(), "CR", None,
                                        "x", "0", 0, "PACS", None))
    row = jobs.study(study)
    assert jobs.apply_selection(study, row["last_received_at"], sop, "ViewPosition", "test",
                                [InstanceDecision(sop, "selected", "test")])
    job = jobs.claim_job("test", 60)
    assert jobs.mark_written(job, "/nonexistent", deliveries)
    return study


def test_hung_destinations_do_not_delay_a_working_one(tmp_path, peers):
    silent, stuck, trickle = peers
    sr = write(make_cr_dataset(), tmp_path / "result.dcm")
    settings = Settings.model_validate({
        "node": {"data_dir": str(tmp_path / "data"), "delivery_timeout_seconds": TIMEOUT,
                 "delivery_connect_timeout_seconds": 1.0, "retry_base_seconds": 0.5, "retry_max_seconds": 1.0,
                 "max_delivery_tries": 10, "poll_interval_seconds": 0.1, "allow_demo_model_delivery": True},
        "destinations": [
            {"kind": "dicom", "name": "pacs-silent", "host": "127.0.0.1", "port": silent.port, "ae_title": "SILENT"},
            {"kind": "dicom", "name": "pacs-stuck", "host": "127.0.0.1", "port": stuck.port, "ae_title": "STUCK"},
            {"kind": "dicomweb", "name": "web-trickle", "url": f"http://127.0.0.1:{trickle.port}/dicom-web"},
            {"kind": "folder", "name": "archive", "path": str(tmp_path / "archive")},
        ],
    })
    (tmp_path / "data").mkdir()
    jobs = JobStore(tmp_path / "data" / "jobs.sqlite3")
    audit = AuditLog(tmp_path / "data" / "audit.jsonl")
    stop = threading.Event()
    files = [str(sr)]
    # the folder delivery queued last, behind the three hung ones (a single delivery thread took them in order)
    studies = [_written_study(jobs, [("pacs-silent", "dicom", files), ("pacs-stuck", "dicom", files),
                                     ("web-trickle", "dicomweb", files), ("archive", "folder", files)])
               for _ in range(2)]
    outbox = Outbox(settings, jobs, audit, node_metrics(), stop)
    started = time.monotonic()
    outbox.start()
    try:
        first_failure: dict[str, float] = {}
        folder_done = None
        deadline = started + 3 * TIMEOUT + 4 * MARGIN
        while time.monotonic() < deadline:
            now = time.monotonic() - started
            rows = jobs.deliveries()
            if folder_done is None and all(d.state == "delivered" for d in rows if d.destination == "archive"):
                folder_done = now
            for d in rows:
                if d.destination != "archive" and d.last_error and d.destination not in first_failure:
                    first_failure[d.destination] = now
            retried = {d.destination for d in rows if d.destination != "archive" and d.tries >= 2}
            if folder_done is not None and len(first_failure) == 3 and len(retried) == 3:
                break
            time.sleep(0.05)
        print(f"\nfolder delivered {len(studies)} studies after {folder_done}s; first hung tries failed after "
              + ", ".join(f"{k} {v:.2f}s" for k, v in sorted(first_failure.items())))
        assert folder_done is not None and folder_done < 1.0, "the folder destination waited for the hung ones"
        assert set(first_failure) == {"pacs-silent", "pacs-stuck", "web-trickle"}, first_failure
        for name, seconds in first_failure.items():
            assert seconds < TIMEOUT + MARGIN, f"{name}: a try took {seconds:.1f}s with a {TIMEOUT}s deadline"
        assert len(retried) == 3, "the hung destinations were not retried"
        errors = {d.destination: d.last_error for d in jobs.deliveries() if d.destination != "archive"}
        assert "delivery deadline" in errors["web-trickle"], errors
        assert "delivery deadline" in errors["pacs-stuck"], errors
        assert all(d.state in ("pending", "sending") for d in jobs.deliveries() if d.destination != "archive")
        assert all(Path(tmp_path / "archive" / s / "result.dcm").is_file() for s in studies)
    finally:
        stop.set()
        outbox.wake.set()
        outbox.join(TIMEOUT + 5)
        jobs.close()
        audit.close()
    assert not outbox.is_alive()
