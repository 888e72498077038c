"""Shared pieces of the reliability tests: an in-process SCP on a real socket, a pynetdicom sender
that reports the DICOM status (and Error Comment) of every C-STORE, node settings with short
timings, and a poison-header instance builder."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from config.settings import ModelSettings, NodeSettings, Settings
from dicom_node.audit import AuditLog, read_audit
from dicom_node.identity import Pseudonymizer
from dicom_node.jobstore import JobStore
from dicom_node.metrics import node_metrics
from dicom_node.scp import StorageSCP
from dicom_node.spool import Spool
from tests.conftest_node import free_port


class ScpHarness:
    """The SCP with its spool, job store and audit log on ``data_dir``, listening on loopback."""

    def __init__(self, data_dir: Path, **node: object) -> None:
        base: dict[str, object] = dict(data_dir=data_dir, port=0, bind="127.0.0.1", min_free_space_mb=0)
        base.update(node)
        self.settings = NodeSettings(**base)
        self.data_dir = data_dir
        self.spool = Spool(data_dir / "spool", self.settings.min_free_space_mb * 2**20)
        self.jobs = JobStore(data_dir / "jobs.sqlite3")
        self.audit = AuditLog(data_dir / "audit.jsonl")
        self.scp = StorageSCP(self.settings, self.spool, self.jobs, self.audit, Pseudonymizer(b"k" * 32),
                              node_metrics())
        self.port = self.scp.start()

    def spool_files(self) -> list[Path]:
        return sorted(p for p in (self.data_dir / "spool").rglob("*") if p.is_file())

    def audit_events(self, event: str | None = None) -> list[dict]:
        events = read_audit(self.data_dir / "audit.jsonl")
        return [e for e in events if event is None or e["event"] == event]

    def close(self) -> None:
        self.scp.stop()
        self.jobs.close()
        self.audit.close()


@dataclass(frozen=True)
class StoreAnswer:
    status: int | None  # None: no answer (association not established or aborted)
    comment: str | None = None


def send(port: int, datasets: Sequence[Dataset], *, called: str = "RADVLM", calling: str = "RELTEST",
         timeout: float = 30) -> list[StoreAnswer]:
    """C-STORE each data set on one association (pynetdicom SCU); the status of every answer."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for key in {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}:
        ae.add_requested_context(*key)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return [StoreAnswer(None) for _ in datasets]
    answers = []
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            status = getattr(rsp, "Status", None)
            answers.append(StoreAnswer(None if status is None else int(status),
                                       str(rsp.ErrorComment) if rsp is not None and "ErrorComment" in rsp else None))
    finally:
        if assoc.is_established:
            assoc.release()
    return answers


def send_raw(port: int, ds: Dataset, encoded: bytes, *, calling: str = "RELTEST") -> StoreAnswer:
    """C-STORE an already-encoded data set (no file meta, in the data set's transfer syntax): for
    instances that pydicom would not encode (e.g. an unknown VR)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", port, ae_title="RADVLM")
    assert assoc.is_established
    try:
        # pynetdicom sends what the data set encodes to: hand it a data set whose encoding is ours
        from pydicom import dcmread

        parsed = dcmread(io.BytesIO(encoded), force=True)
        parsed.file_meta = ds.file_meta
        rsp = assoc.send_c_store(parsed)
        status = getattr(rsp, "Status", None)
        return StoreAnswer(None if status is None else int(status),
                           str(rsp.ErrorComment) if rsp is not None and "ErrorComment" in rsp else None)
    finally:
        assoc.release()


def node_settings(tmp_path: Path, model_dir: Path, destinations: list[dict] | None = None,
                  api_token: str | None = None, **node: object) -> Settings:
    base: dict[str, object] = dict(
        data_dir=tmp_path / "data", port=free_port(), bind="127.0.0.1", http_port=free_port(),
        min_free_space_mb=0, quiet_period_seconds=0.2, poll_interval_seconds=0.05, retry_base_seconds=0.2,
        retry_max_seconds=1.0, max_delivery_tries=20, delivery_timeout_seconds=10, io_retry_seconds=0.3)
    base.update(node)
    return Settings.model_validate({
        "model": ModelSettings(path=model_dir, max_new_tokens=8).model_dump(),
        "inference": {"tasks": ["report"], "max_grounding_questions": 0, "phrase_grounding": False},
        "node": NodeSettings(**base).model_dump(),
        "sr": {"gsps_enabled": False},
        "api": {"token": api_token},
        "destinations": destinations if destinations is not None else [
            {"kind": "folder", "path": str(tmp_path / "out"), "name": "archive"}],
    })


def http_json(port: int, path: str, token: str | None = None) -> tuple[int, dict | list]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def with_raw_value(ds: Dataset, keyword: str, vr: str, raw: bytes) -> Dataset:
    """``ds`` with ``keyword`` holding bytes that fail to convert (e.g. NumberOfFrames = b"ab"): the
    data set is written and read back, the element left raw, as a sender would deliver it."""
    from pydicom import dcmread
    from pydicom.datadict import tag_for_keyword

    placeholder = {"IS": "7", "DA": "20000101", "DS": "1", "US": 1}.get(vr, "X")
    ds.add_new(tag_for_keyword(keyword), vr, placeholder)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    marker = vr.encode() + len(str(placeholder).encode() + (b" " if len(str(placeholder)) % 2 else b"")).to_bytes(2, "little")
    padded = str(placeholder).encode() + (b" " if len(str(placeholder)) % 2 else b"")
    value = raw + (b" " if len(raw) % 2 else b"")
    old = marker + padded
    assert data.count(old) == 1, f"cannot place the raw {keyword} value"
    data = data.replace(old, vr.encode() + len(value).to_bytes(2, "little") + value)
    return dcmread(io.BytesIO(data))
