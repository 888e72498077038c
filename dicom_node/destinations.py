"""Senders for each destination kind. A sender returns only after the peer's success; anything
else raises DeliveryError (retried) or PermanentDeliveryError (dead-lettered at once).

One try of a delivery has a deadline, ``node.delivery_timeout_seconds``, over everything it does
(connect — itself bounded by ``delivery_connect_timeout_seconds`` —, A-ASSOCIATE or HTTP request,
every object, the answer): socket and DIMSE timeouts are cut to what is left of it, and when it
passes, the open association is aborted or the HTTP socket shut, so a peer that accepts TCP and
then says nothing — or trickles bytes — fails the try on time.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom import dcmread

from config.settings import (
    DicomDestination,
    DicomWebDestination,
    FhirDestination,
    FolderDestination,
    NodeSettings,
)
from dicom_node.errors import DeliveryError
from dicom_node.results import ResultFiles
from inference.durable import durable_write

Destination = DicomDestination | DicomWebDestination | FhirDestination | FolderDestination
# C-STORE statuses that mean "stored" (PS3.4 B.2-1: Success and the Warnings)
STORE_OK = {0x0000, 0xB000, 0xB006, 0xB007}
HTTP_PERMANENT = {400, 401, 403, 404, 405, 406, 410, 413, 415, 422}


class PermanentDeliveryError(DeliveryError):
    """The destination refused the result in a way a retry will not fix (e.g. HTTP 400/403)."""


def destination_name(dest: Destination) -> str:
    if dest.name:
        return dest.name
    if isinstance(dest, DicomDestination):
        return f"dicom:{dest.ae_title}@{dest.host}:{dest.port}"
    if isinstance(dest, FolderDestination):
        return f"folder:{dest.path}"
    return f"{dest.kind}:{dest.url}"


def files_for(dest: Destination, files: ResultFiles) -> list[Path]:
    if isinstance(dest, (DicomDestination, DicomWebDestination)):
        return files.dicom
    if isinstance(dest, FhirDestination):
        return [files.bundle] if files.bundle else []
    return [p for p in (files.sr, files.gsps, files.bundle, files.result) if p is not None]


def send_folder(dest: FolderDestination, study_uid: str, paths: Sequence[Path]) -> None:
    """Copy durably (``inference.durable``), owner-only (0600) like ``results/``: results are patient data."""
    target = Path(dest.path) / study_uid
    try:
        for src in paths:
            durable_write(target / src.name, src.read_bytes(), mode=0o600)
    except OSError as exc:
        raise DeliveryError(f"cannot write to folder {target}: {exc.strerror or exc}") from exc


class Deadline:
    """The time limit of one delivery try. Senders cut their timeouts to ``remaining()``; what is
    registered with ``on_expiry`` (abort the association, shut the socket) runs when it passes."""

    _current = threading.local()

    def __init__(self, seconds: float, connect_seconds: float | None = None) -> None:
        self.seconds = seconds
        self.connect_seconds = min(connect_seconds or seconds, seconds)
        self.at = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._on_expiry: list[Callable[[], None]] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    @classmethod
    def current(cls) -> "Deadline | None":
        return getattr(cls._current, "deadline", None)

    def __enter__(self) -> "Deadline":
        self._outer = Deadline.current()
        Deadline._current.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        Deadline._current.deadline = self._outer

    def remaining(self, what: str) -> float:
        """Seconds left; DeliveryError when none."""
        left = self.at - time.monotonic()
        if left <= 0 or self.expired:
            raise self.error(what)
        return left

    def error(self, what: str) -> DeliveryError:
        return DeliveryError(f"{what}: no complete answer within the delivery deadline of {self.seconds:g}s"
                             " (node.delivery_timeout_seconds)")

    def on_expiry(self, action: Callable[[], None]) -> None:
        with self._lock:
            run_now = self.expired
            if not run_now:
                self._on_expiry.append(action)
        if run_now:
            action()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            actions, self._on_expiry = self._on_expiry, []
        for action in actions:
            try:
                action()
            except Exception:  # closing something already closed
                pass


def send_dicom(dest: DicomDestination, node: NodeSettings, paths: Sequence[Path], timeout: float) -> None:
    """C-STORE ``paths`` on one association, within the try's deadline (``deliver`` sets it; a direct
    call gets one of ``timeout`` seconds)."""
    deadline = Deadline.current()
    if deadline is None:
        with Deadline(timeout, node.delivery_connect_timeout_seconds) as deadline:
            _send_dicom(dest, node, paths, deadline)
    else:
        _send_dicom(dest, node, paths, deadline)


def _send_dicom(dest: DicomDestination, node: NodeSettings, paths: Sequence[Path], deadline: Deadline) -> None:
    from pynetdicom import AE

    datasets = [dcmread(p) for p in paths]
    ae = AE(ae_title=dest.calling_ae_title or node.ae_title)
    where = f"{dest.ae_title} at {dest.host}:{dest.port}"
    left = deadline.remaining(where)
    # connect + A-ASSOCIATE-AC together stay within the deadline
    ae.connection_timeout = min(deadline.connect_seconds, left)
    ae.acse_timeout = max(left - ae.connection_timeout, 0.5)
    ae.dimse_timeout = ae.network_timeout = left
    proposed = set()
    for ds in datasets:  # propose exactly the SOP classes and transfer syntaxes we send
        key = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        if key not in proposed:
            ae.add_requested_context(*key)
            proposed.add(key)
    tls_args = None
    if dest.tls:
        ctx = ssl.create_default_context(cafile=str(dest.ca_certificates) if dest.ca_certificates else None)
        tls_args = (ctx, dest.host)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        if deadline.expired or deadline.at - time.monotonic() <= 0.05:
            raise deadline.error(f"association with {where}")
        raise DeliveryError(f"no association with {where} (refused, rejected, unreachable, or no A-ASSOCIATE"
                            f" answer within {ae.acse_timeout:.0f}s)")
    deadline.on_expiry(assoc.abort)
    try:
        for ds in datasets:
            assoc.dimse_timeout = deadline.remaining(f"C-STORE to {where}")
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                if deadline.expired:
                    raise deadline.error(f"C-STORE of {ds.SOPInstanceUID} to {where}")
                raise DeliveryError(f"{dest.ae_title} did not answer the C-STORE of {ds.SOPInstanceUID} "
                                    "(timeout or aborted association)")
            if code not in STORE_OK:
                raise DeliveryError(f"{dest.ae_title} answered C-STORE status 0x{code:04X} for {ds.SOPInstanceUID}")
    finally:
        if assoc.is_established:
            assoc.release()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib turns a redirected POST into a body-less GET, whose 200 would read as "delivered":
    never follow a redirect; the 3xx comes back as an HTTPError."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _connect_within_deadline(conn: http.client.HTTPConnection, connect: Callable[[], None]) -> None:
    """TCP connect bounded by delivery_connect_timeout_seconds; the socket then shut at the deadline."""
    deadline = Deadline.current()
    if deadline is None:
        connect()
        return
    op_timeout = conn.timeout
    conn.timeout = min(deadline.connect_seconds, deadline.remaining(f"connect to {conn.host}:{conn.port}"))
    try:
        connect()
    finally:
        conn.timeout = op_timeout
    conn.sock.settimeout(op_timeout)
    deadline.on_expiry(lambda sock=conn.sock: _shut(sock))


class _DeadlineHTTPConnection(http.client.HTTPConnection):
    def connect(self) -> None:
        _connect_within_deadline(self, super().connect)


class _DeadlineHTTPSConnection(http.client.HTTPSConnection):
    def connect(self) -> None:
        _connect_within_deadline(self, super().connect)


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_DeadlineHTTPConnection, req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_DeadlineHTTPSConnection, req, context=self._context)


_OPENER = urllib.request.build_opener(_NoRedirect, _DeadlineHTTPHandler, _DeadlineHTTPSHandler)


def _http(url: str, body: bytes, content_type: str, accept: str, token: str | None,
          timeout: float, method: str = "POST") -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": content_type, "Accept": accept})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if Deadline.current() is None:
        with Deadline(timeout):
            return _http(url, body, content_type, accept, token, timeout, method)
    deadline = Deadline.current()
    assert deadline is not None
    try:
        op_timeout = min(timeout, deadline.remaining(f"{method} {url}"))
        with _OPENER.open(request, timeout=op_timeout) as response:  # noqa: S310 - configured URL
            status, payload = response.status, response.read()
        if deadline.expired:  # the socket was shut under a response still arriving: it is cut short
            raise deadline.error(f"{method} {url}")
        return status, payload
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            raise PermanentDeliveryError(f"{url} answered HTTP {exc.code}, a redirect to "
                                         f"{exc.headers.get('Location')!r}: configure the destination URL the server"
                                         " redirects to") from exc
        detail = exc.read()[:500].decode("utf-8", "replace")
        error = PermanentDeliveryError if exc.code in HTTP_PERMANENT else DeliveryError
        raise error(f"{url} answered HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        if deadline.expired:
            raise deadline.error(f"{method} {url}") from exc
        raise DeliveryError(f"{url} unreachable: {getattr(exc, 'reason', exc)}") from exc


def send_stow(dest: DicomWebDestination, paths: Sequence[Path], timeout: float) -> None:
    boundary = f"radvlm-{uuid.uuid4().hex}"
    parts = []
    for path in paths:
        parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    url = dest.url.rstrip("/") + "/studies"
    status, payload = _http(url, body, f'multipart/related; type="application/dicom"; boundary={boundary}',
                            "application/dicom+json", dest.token, timeout)
    if status not in (200, 202):
        raise DeliveryError(f"STOW-RS {url} answered HTTP {status}")
    try:
        answer = json.loads(payload) if payload.strip() else None
    except ValueError:
        answer = None
    if isinstance(answer, list) and len(answer) == 1:  # some servers wrap the response data set in an array
        answer = answer[0]
    if not isinstance(answer, dict):
        if status == 202:  # "stored some but not all" (PS3.18 10.5.3): without a readable answer, send again
            raise DeliveryError(f"STOW-RS {url} answered HTTP 202 without a readable response data set")
        return
    failed = (answer.get("00081198") or {}).get("Value")
    if failed:
        raise DeliveryError(f"STOW-RS {url} refused {len(failed)} instance(s): {json.dumps(failed)[:500]}")


def _check_transaction_response(base: str, payload: bytes, sent: int = 0) -> None:
    """A transaction succeeded only if the answer is a Bundle with an entry for each of the ``sent``
    entries and every entry has a 2xx status."""
    try:
        answer = json.loads(payload)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or answer.get("resourceType") != "Bundle":
        raise DeliveryError(f"FHIR server {base} did not answer the transaction with a Bundle")
    statuses = [str((entry.get("response") or {}).get("status", "")) for entry in answer.get("entry") or []]
    refused = [s for s in statuses if not s.strip().startswith("2")]
    if refused:
        raise DeliveryError(f"FHIR server {base} refused {len(refused)} of {len(statuses)} transaction entries:"
                            f" {', '.join(refused)[:300]}")
    if len(statuses) < sent:
        raise DeliveryError(f"FHIR server {base} answered {len(statuses)} of {sent} transaction entries")


def transaction_chunks(bundle: bytes, max_entries: int) -> list[dict]:
    """The transactions that send ``bundle``: its PUT entries in order, at most ``max_entries`` per
    transaction (Medplum refuses more than 50 updates in one). A bundle of an earlier version
    (conditional creates, which strict servers refuse) is turned into PUT entries first. Every entry
    is an idempotent PUT, so a retry after a partial failure re-sends all without duplicates."""
    data = json.loads(bundle)
    entries = data.get("entry") or []
    if any((entry.get("request") or {}).get("method") != "PUT" for entry in entries):
        from fhir.resources.R4B.bundle import Bundle

        from sr_writer.fhir import put_transaction, resources_for_individual_upsert

        entries = put_transaction(resources_for_individual_upsert(Bundle.model_validate(data)))["entry"]
    parts = [entries[i:i + max_entries] for i in range(0, len(entries), max_entries)] or [[]]
    return [{"resourceType": "Bundle", "type": "transaction", "entry": part} for part in parts]


def send_fhir(dest: FhirDestination, paths: Sequence[Path], timeout: float) -> None:
    base = dest.url.rstrip("/")
    for path in paths:
        if dest.mode == "transaction":
            try:
                transactions = transaction_chunks(path.read_bytes(), dest.max_entries_per_transaction)
            except ValueError as exc:  # not JSON / not a Bundle: a retry cannot fix the file
                raise PermanentDeliveryError(f"{path.name} is not a FHIR Bundle ({type(exc).__name__});"
                                             " re-run the study") from exc
            for transaction in transactions:
                status, payload = _http(base, json.dumps(transaction).encode(), "application/fhir+json",
                                        "application/fhir+json", dest.token, timeout)
                if status not in (200, 201):
                    raise DeliveryError(f"FHIR server {base} answered HTTP {status} to the transaction")
                _check_transaction_response(base, payload, len(transaction["entry"]))
            continue
        from fhir.resources.R4B.bundle import Bundle

        from sr_writer.fhir import resources_for_individual_upsert

        bundle = Bundle.model_validate_json(path.read_bytes())
        for resource in resources_for_individual_upsert(bundle):
            url = f"{base}/{resource['resourceType']}/{resource['id']}"
            status, _ = _http(url, json.dumps(resource).encode(), "application/fhir+json", "application/fhir+json",
                              dest.token, timeout, method="PUT")
            if status not in (200, 201):
                raise DeliveryError(f"FHIR server answered HTTP {status} to PUT {url}")


def deliver(dest: Destination, node: NodeSettings, study_uid: str, files: Sequence[str]) -> None:
    paths = [Path(f) for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise PermanentDeliveryError(f"result files missing: {', '.join(missing)} (re-run the study)")
    timeout = node.delivery_timeout_seconds
    if isinstance(dest, FolderDestination):
        send_folder(dest, study_uid, paths)
        return
    with Deadline(timeout, node.delivery_connect_timeout_seconds):
        if isinstance(dest, DicomDestination):
            send_dicom(dest, node, paths, timeout)
        elif isinstance(dest, DicomWebDestination):
            send_stow(dest, paths, timeout)
        else:
            send_fhir(dest, paths, timeout)
