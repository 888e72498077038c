"""The C-STORE / C-ECHO SCP (pynetdicom).

The C-STORE handler never raises: it answers a DICOM status. Success (0x0000) is sent only after
the instance is durably in the spool AND recorded in the job store (both committed). Failure
statuses used (PS3.4 Table B.2-1):

* 0xA700 Refused: Out of Resources — data directory below ``node.min_free_space_mb`` or full; an
  instance larger than ``node.max_instance_bytes`` or a deflated one inflating beyond
  ``node.max_inflated_bytes`` (resource limits, dicom_node/netlimits.py);
* 0xA900 Error: Data Set does not match SOP Class — the object's SOP Class/Instance UID differs
  from the C-STORE request;
* 0xC000 Error: Cannot understand — unparsable data set, missing/malformed UIDs, or a Patient ID
  that cannot be read (e.g. an unknown VR): a retry cannot fix these, so no 0x0110;
* 0xC001 Error: Cannot understand — the SOP Instance UID is already recorded in ANOTHER study
  (a SOP Instance UID is globally unique, so the sender is wrong); nothing is kept, the conflict is
  recorded on both studies (``radvlm jobs --study``) and in the audit log. A different object with
  the UID of an instance of the SAME study is answered Success and kept under
  ``spool/conflicts/`` (recorded as a conflict of that study);
* 0x0110 Processing failure — the spool or job store failed (disk or database error); the file
  written so far is removed, so nothing unacknowledged stays in the spool.

Every refusal writes a ``store_refused`` audit line with the status and a reason that names
attributes, never header values. Failure answers carry an Error Comment (0000,0902).
"""

from __future__ import annotations

import logging
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForProcessing,
    DigitalXRayImageStorageForPresentation,
    SecondaryCaptureImageStorage,
    Verification,
)

from config.settings import NodeSettings
from dicom_node.audit import AuditLog
from dicom_node.errors import InvalidInstanceError, OutOfSpaceError, SpoolError
from dicom_node.identity import Pseudonymizer, is_valid_uid
from dicom_node.jobstore import InstanceRecord, JobStore
from dicom_node.metrics import Metrics
from dicom_node.netlimits import (
    AdmissionControl,
    BoundedDataSetBuffer,
    InflateLimitError,
    deflated_size,
    start_guarded_server,
)
from dicom_node.phi import code_location, error_reason
from dicom_node.spool import Spool, SpooledFile

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES = {
    str(ComputedRadiographyImageStorage): "CR Image Storage",
    str(DigitalXRayImageStorageForPresentation): "Digital X-Ray Image Storage - For Presentation",
    str(DigitalXRayImageStorageForProcessing): "Digital X-Ray Image Storage - For Processing",
    str(SecondaryCaptureImageStorage): "Secondary Capture Image Storage",
}
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
DUPLICATE_IN_OTHER_STUDY = 0xC001
PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    outcome: str  # new | duplicate | conflict | late | refused reason
    study_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    comment: str | None = None  # Error Comment sent with a failure status (≤ 64 characters, no header values)


def _tls_context(settings: NodeSettings) -> ssl.SSLContext | None:
    tls = settings.tls
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_certificates))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return ctx


class StorageSCP:
    """Receives instances into the spool + job store. ``start()`` returns the bound port."""

    def __init__(self, settings: NodeSettings, spool: Spool, jobs: JobStore, audit: AuditLog,
                 pseudonymizer: Pseudonymizer, metrics: Metrics,
                 on_instance: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.spool = spool
        self.jobs = jobs
        self.audit = audit
        self.pseudo = pseudonymizer
        self.metrics = metrics
        self.on_instance = on_instance
        self._server = None
        self._accepting = threading.Event()
        self.last_success_at = 0.0  # /healthz: degraded while every instance since the last success was
        self.last_space_refusal_at = 0.0  # refused for space (the floor can pass while full-size instances fail)

    # ---- association ------------------------------------------------------------------------
    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_pdu_size = s.max_pdu_size
        ae.acse_timeout = s.acse_timeout_seconds
        ae.dimse_timeout = s.dimse_timeout_seconds
        ae.network_timeout = s.network_timeout_seconds
        ae.maximum_associations = s.max_connections + 1  # the limits are decided by netlimits.AdmissionControl
        ae.require_called_aet = True
        ae.require_calling_aet = list(s.allowed_calling_ae_titles)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        return ae

    def start(self) -> int:
        ae = self._make_ae()
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        self._accepting.set()
        self._server = start_guarded_server(ae, (self.settings.bind, self.settings.port), self.settings,
                                            _tls_context(self.settings), handlers,
                                            AdmissionControl(self.settings, self._on_limit))
        port = int(self._server.server_address[1])
        log.info("DICOM SCP %s listening on %s:%d%s", self.settings.ae_title, self.settings.bind, port,
                 " (TLS)" if self.settings.tls.enabled else "")
        return port

    def stop(self) -> None:
        """Stop accepting; associations in progress are finished by pynetdicom's shutdown."""
        self._accepting.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    @staticmethod
    def _peer(event: evt.Event) -> tuple[str, str]:
        req = event.assoc.requestor
        return str(req.ae_title).strip(), f"{req.address}:{req.port}"

    def _on_accepted(self, event: evt.Event) -> None:
        calling, peer = self._peer(event)
        self.metrics.inc("radvlm_associations_total", result="accepted")
        log.info("association accepted from %s (%s)", calling, peer)

    def _on_rejected(self, event: evt.Event) -> None:
        calling, peer = self._peer(event)
        self.metrics.inc("radvlm_associations_total", result="rejected")
        called = str(event.assoc.requestor.primitive.called_ae_title).strip()
        allowed = [t.strip() for t in self.settings.allowed_calling_ae_titles]
        if allowed and calling not in allowed:
            reason = "calling AE title not in node.allowed_calling_ae_titles"
        elif called != self.settings.ae_title.strip():
            reason = f"called AE title {called!r} is not ours ({self.settings.ae_title!r})"
        else:
            reason = "rejected by the association negotiation"
        log.warning("association rejected from calling AE %r (%s): %s", calling, peer, reason)
        self.audit.write("association_rejected", calling_ae=calling, peer=peer, reason=reason)

    def _on_limit(self, kind: str, reason: str, calling: str | None, peer: str) -> None:
        """A connection closed or an association rejected by a resource limit (netlimits)."""
        self.metrics.inc("radvlm_associations_total", result="limit" if kind == "association" else "connection limit")
        if kind == "association":
            log.warning("association from calling AE %r (%s) rejected (transient, local limit exceeded): %s",
                        calling, peer, reason)
        else:
            log.warning("connection from %s closed before association: %s", peer, reason)
        self.audit.write("association_limit", kind=kind, calling_ae=calling, peer=peer, reason=reason)

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    # ---- C-STORE ----------------------------------------------------------------------------
    def _received(self, event: evt.Event, calling: str) -> bytes | StoreOutcome:
        """The received instance as a Part 10 byte string, or the refusal of an oversized one. The
        receive buffer is emptied once copied: an instance costs ~2× its size at that copy, then ~1×."""
        buffer = event.request.DataSet
        if isinstance(buffer, BoundedDataSetBuffer) and buffer.overflow:
            sop_instance = str(event.request.AffectedSOPInstanceUID)
            log.warning("refused instance %s from %s: %d bytes, more than node.max_instance_bytes (%d)",
                        sop_instance, calling, buffer.received, buffer.limit)
            return self._refused(calling, sop_instance, StoreOutcome(
                OUT_OF_RESOURCES, "too large", comment="instance larger than node.max_instance_bytes"),
                f"instance of {buffer.received} bytes exceeds node.max_instance_bytes")
        with buffer.getbuffer() as view:
            encoded = b"".join((b"\x00" * 128, b"DICM", encode_file_meta(event.file_meta), view))
        buffer.seek(0)
        buffer.truncate(0)
        return encoded

    def _on_store(self, event: evt.Event) -> int:
        calling, peer = self._peer(event)
        try:
            received = self._received(event, calling)
            result = received if isinstance(received, StoreOutcome) else self.store(
                received, calling, str(event.request.AffectedSOPClassUID), str(event.request.AffectedSOPInstanceUID))
            del received
        except Exception as exc:  # a handler must answer, never raise
            log.error("unexpected error while storing an instance from %s: %s at %s", calling, error_reason(exc),
                      code_location(exc))
            result = self._refused(calling, str(event.request.AffectedSOPInstanceUID), StoreOutcome(
                PROCESSING_FAILURE, "internal error", comment="internal error of the node"), "internal error")
        if result.status == SUCCESS:
            self.metrics.inc("radvlm_instances_received_total", outcome=result.outcome)
            return SUCCESS
        self.metrics.inc("radvlm_instances_refused_total", reason=result.outcome)
        if not result.comment:
            return result.status
        answer = Dataset()
        answer.Status = result.status
        answer.ErrorComment = result.comment[:64]
        return answer

    def _refused(self, calling_ae: str, sop_instance: str, result: StoreOutcome, reason: str) -> StoreOutcome:
        """Audit line of a refusal; returns ``result`` for the caller to answer."""
        try:
            self.audit.write("store_refused", calling_ae=calling_ae, sop_instance_uid=sop_instance,
                             status=f"0x{result.status:04X}", reason=reason)
        except OSError as exc:  # the audit log is on the full disk too: the refusal still goes out
            log.error("could not write the audit line of a refusal: %s", error_reason(exc))
        if result.outcome == "out of space":
            self.last_space_refusal_at = time.time()
        return result

    def refusing_for_space(self) -> bool:
        """True while every instance since the last stored one was refused for space."""
        return self.last_space_refusal_at > self.last_success_at

    def _check_size(self, encoded: bytes, calling_ae: str, request_sop_instance: str) -> StoreOutcome | None:
        """0xA700 for an instance over node.max_instance_bytes, or a deflated one that inflates over
        node.max_inflated_bytes (checked in bounded steps before anything parses it)."""
        limits = self.settings
        reason, comment = None, "instance larger than node.max_instance_bytes"
        if len(encoded) > limits.max_instance_bytes + 2**16:  # instances not received through _on_store
            reason = f"instance of {len(encoded)} bytes exceeds node.max_instance_bytes"
        else:
            try:
                fp = BytesIO(encoded)
                read_preamble(fp, False)
                meta = _read_file_meta_info(fp)
                if str(meta.get("TransferSyntaxUID", "")) == DeflatedExplicitVRLittleEndian:
                    deflated_size(memoryview(encoded)[fp.tell():], limits.max_inflated_bytes)
            except InflateLimitError as exc:
                reason, comment = str(exc), "inflates beyond node.max_inflated_bytes"
            except Exception:  # not Part 10: the parser below refuses it with its own reason
                return None
        if reason is None:
            return None
        log.warning("refused instance %s from %s: %s", request_sop_instance, calling_ae, reason)
        return self._refused(calling_ae, request_sop_instance, StoreOutcome(OUT_OF_RESOURCES, "too large",
                                                                            comment=comment), reason)

    def store(self, encoded: bytes, calling_ae: str, request_sop_class: str, request_sop_instance: str) -> StoreOutcome:
        """Spool + record one encoded instance (file meta included); returns the status to send."""
        refuse = self._refused
        if not self._accepting.is_set():
            log.warning("refused an instance from %s: the node is shutting down", calling_ae)
            return refuse(calling_ae, request_sop_instance, StoreOutcome(
                OUT_OF_RESOURCES, "shutting down", comment="node shutting down"), "node shutting down")
        try:
            self.spool.check_room(len(encoded))
        except OutOfSpaceError as exc:
            log.error("%s", exc)
            return refuse(calling_ae, request_sop_instance, StoreOutcome(
                OUT_OF_RESOURCES, "out of space", comment="out of disk space"), "free-space floor")
        refusal = self._check_size(encoded, calling_ae, request_sop_instance)
        if refusal is not None:
            return refusal
        try:
            ds: Dataset = dcmread(BytesIO(encoded), stop_before_pixels=True)
            study = str(ds.get("StudyInstanceUID", ""))
            series = str(ds.get("SeriesInstanceUID", ""))
            sop_instance = str(ds.get("SOPInstanceUID", ""))
            sop_class = str(ds.get("SOPClassUID", ""))
            modality = str(ds.get("Modality", "")) or None
            transfer_syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", "")) or None
        except Exception as exc:
            reason = f"unparsable data set: {error_reason(exc)}"
            log.warning("refused an instance from %s (SOP Instance %s): %s", calling_ae, request_sop_instance, reason)
            return refuse(calling_ae, request_sop_instance, StoreOutcome(
                CANNOT_UNDERSTAND, "unparsable", comment="data set cannot be parsed"), reason)
        missing = [name for name, uid in (("StudyInstanceUID", study), ("SeriesInstanceUID", series),
                                          ("SOPInstanceUID", sop_instance)) if not is_valid_uid(uid)]
        if missing:
            reason = "missing or malformed " + ", ".join(missing)
            log.warning("refused instance %s from %s: %s", request_sop_instance, calling_ae, reason)
            return refuse(calling_ae, request_sop_instance, StoreOutcome(
                CANNOT_UNDERSTAND, "missing uids", comment=reason), reason)
        if sop_class != request_sop_class or sop_instance != request_sop_instance:
            reason = "data set UIDs differ from the C-STORE request"
            log.warning("refused instance %s from %s: %s", request_sop_instance, calling_ae, reason)
            return refuse(calling_ae, request_sop_instance, StoreOutcome(
                DATASET_MISMATCH, "uid mismatch", comment=reason), reason)
        try:
            patient = self.pseudo.patient(ds)
        except Exception as exc:  # e.g. an unknown VR: a retry cannot fix it, so C000 (not 0x0110)
            reason = f"PatientID or IssuerOfPatientID cannot be read: {error_reason(exc)}"
            log.warning("refused instance %s from %s: %s", sop_instance, calling_ae, reason)
            return refuse(calling_ae, sop_instance, StoreOutcome(
                CANNOT_UNDERSTAND, "unreadable patient id", comment="Patient ID cannot be read"), reason)
        spooled: SpooledFile | None = None
        try:
            spooled = self.spool.store(study, sop_instance, encoded)
            record = InstanceRecord(sop_instance, sop_class, study, series, modality, transfer_syntax,
                                    str(spooled.path), spooled.sha256, spooled.size, calling_ae, patient)
            notes: list[str] = []
            # a conflict copy is recorded too when no row exists yet (the first file was never acknowledged:
            # the node crashed before its commit), so the acknowledged copy is the one processed
            outcome = self.jobs.record_instance(record, notes=notes)
            if outcome == "other-study":
                if spooled.outcome == "new":
                    self.spool.discard(spooled.path)
                reason = "SOP Instance UID already received in another study"
                log.warning("refused instance %s from %s (study %s): %s", sop_instance, calling_ae, study, reason)
                return refuse(calling_ae, sop_instance, StoreOutcome(
                    DUPLICATE_IN_OTHER_STUDY, "uid in other study", comment=reason), reason)
            if spooled.outcome == "conflict":
                log.warning("instance %s from %s has the UID of a different object: %s, saved as %s",
                            sop_instance, calling_ae, "kept the first" if outcome == "duplicate" else
                            "the first was never acknowledged, this copy is used", spooled.path)
                if outcome == "duplicate":
                    outcome = "conflict"
                    self.jobs.record_conflict(record, "different-object",
                                              f"a different object with SOP Instance UID {sop_instance} was received"
                                              f" from {calling_ae}; the first is kept, the copy saved as"
                                              f" {spooled.path.name} in spool/conflicts")
        except OutOfSpaceError as exc:
            log.error("%s", exc)
            self._discard_unrecorded(spooled)
            return refuse(calling_ae, sop_instance, StoreOutcome(
                OUT_OF_RESOURCES, "out of space", comment="out of disk space"), "out of space while writing")
        except InvalidInstanceError as exc:
            log.warning("refused instance from %s: %s", calling_ae, exc)
            return refuse(calling_ae, request_sop_instance, StoreOutcome(
                CANNOT_UNDERSTAND, "invalid uid", comment="invalid UID"), str(exc))
        except (SpoolError, OSError, sqlite3.Error) as exc:
            reason = f"{'spool' if spooled is None else 'job store'} error: {error_reason(exc)}"
            log.error("could not store instance %s: %s", sop_instance, reason)
            self._discard_unrecorded(spooled)
            if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):  # SQLITE_FULL: the disk
                return refuse(calling_ae, sop_instance, StoreOutcome(
                    OUT_OF_RESOURCES, "out of space", comment="out of disk space"), "job store: disk full")
            return refuse(calling_ae, sop_instance, StoreOutcome(
                PROCESSING_FAILURE, "spool error" if spooled is None else "job store error",
                comment="storage error of the node"), reason)
        self.last_success_at = time.time()
        self.audit.write("instance_received", calling_ae=calling_ae, study_instance_uid=study,
                         series_instance_uid=series, sop_instance_uid=sop_instance, sop_class_uid=sop_class,
                         modality=modality, patient=patient, bytes=spooled.size, sha256=spooled.sha256,
                         outcome=outcome)
        for note in notes:
            log.warning("study %s flagged: %s", study, note)
            self.audit.write("study_flagged", study_instance_uid=study, sop_instance_uid=sop_instance,
                             patient=patient, reason=note)
        if self.on_instance is not None and outcome == "new":
            self.on_instance(study)
        return StoreOutcome(SUCCESS, outcome, study, sop_instance)

    def _discard_unrecorded(self, spooled: SpooledFile | None) -> None:
        """A file spooled for an instance that is not acknowledged must not stay (orphan PHI)."""
        if spooled is None or spooled.outcome != "new":
            return
        try:
            recorded = self.jobs.is_recorded(spooled.path)
        except sqlite3.Error:
            recorded = False  # the store failed with the commit: the instance is not acknowledged
        if not recorded:
            self.spool.discard(spooled.path)
