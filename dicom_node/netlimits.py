"""Resource limits of the DICOM port: what one peer — or a flood, or a hostile file — may take.

pynetdicom on its own holds a whole received data set in memory however large, reads a PDU of any
declared length into memory, counts sockets that never sent an A-ASSOCIATE-RQ against
``maximum_associations`` (and keeps them for the whole ACSE timeout), and gives every association
slot to whoever comes first. This module puts every one of those under a setting
(``config.settings.NodeSettings``; the DICOM-visible behaviour is in docs/conformance-statement.md):

* **Connections** (TCP, before any PDU): at most ``max_connections`` open, at most
  ``max_connections_per_address`` from one IP address; a further connection is closed at once.
  An accepted socket gets ``network_timeout_seconds`` as its socket timeout (a peer stalled in
  the middle of a PDU is dropped) and must send its A-ASSOCIATE-RQ within
  ``acse_timeout_seconds``. With TLS the handshake runs in the connection's own thread under the
  same timeout, so a client that never says hello cannot stall the accept loop.
* **Associations** (A-ASSOCIATE-RQ received, calling AE title known): at most
  ``max_associations`` at once, at most ``max_associations_per_calling_ae`` for one calling AE
  title, and the last ``reserved_associations`` slots only for a sender that holds none yet
  (neither its calling AE title nor its IP address) — so a flooding sender, even one that
  changes its AE title, cannot lock out the others. A request over a limit gets
  A-ASSOCIATE-RJ *rejected-transient, service-provider (presentation), local-limit-exceeded*
  (result 2, source 3, reason 2), a log line and an ``association_limit`` audit line.
* **Data**: a PDU longer than the node accepts (``max_pdu_size``, or 1 MiB for association
  PDUs) or a DIMSE command set over 1 MiB aborts the association; a C-STORE data set is buffered up to ``max_instance_bytes`` and
  the rest discarded as it arrives (the C-STORE is then refused with 0xA700); a Deflated Explicit
  VR Little Endian data set is inflated in bounded chunks, never beyond ``max_inflated_bytes``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import zlib
from collections.abc import Callable
from io import BytesIO
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from config.settings import NodeSettings

log = logging.getLogger(__name__)

#: Largest non-P-DATA PDU read (an A-ASSOCIATE-RQ with many presentation contexts is a few kB).
MAX_ASSOCIATION_PDU_BYTES = 2**20
#: Largest DIMSE command set (a few hundred bytes in practice); more aborts the association.
MAX_COMMAND_SET_BYTES = 2**20
#: Inflate output per step (zlib ``max_length``).
INFLATE_CHUNK_BYTES = 2**20
#: A-ASSOCIATE-RJ: rejected-transient (2), DICOM UL service-provider presentation related (3),
#: local-limit-exceeded (2) — PS3.8 9.3.4.
LIMIT_REJECT = (0x02, 0x03, 0x02)


class InflateLimitError(ValueError):
    """A deflated data set inflates beyond the configured limit."""


# ---------------------------------------------------------------------------------------- data


class BoundedDataSetBuffer(BytesIO):
    """A DIMSE data set buffer that keeps at most ``limit`` bytes.

    Past the limit it drops what it holds, discards every further fragment (while counting it)
    and marks itself ``overflow``; the C-STORE handler then refuses the instance. The peer still
    gets a C-STORE response and the association stays usable.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.received = 0
        self.overflow = False

    def write(self, data: Any) -> int:  # type: ignore[override]
        size = len(data)
        self.received += size
        if self.overflow:
            return size
        if self.received > self.limit:
            self.overflow = True
            self.seek(0)
            self.truncate(0)  # give the memory back now, not when the message ends
            return size
        return super().write(data)


class _BoundedDIMSE(DIMSEServiceProvider):
    """Gives each incoming DIMSE message a BoundedDataSetBuffer instead of an unbounded BytesIO,
    and aborts the association when a command set grows past MAX_COMMAND_SET_BYTES (command
    fragments that never end would otherwise be kept in memory without limit)."""

    max_dataset_bytes: int = 0

    def receive_primitive(self, primitive: Any) -> None:
        if self.message is None:
            self.message = DIMSEMessage()
            self.message.data_set = BoundedDataSetBuffer(self.max_dataset_bytes)
        super().receive_primitive(primitive)
        message = self.message
        if message is not None and message.encoded_command_set.tell() > MAX_COMMAND_SET_BYTES:
            log.warning("aborting the association with %s: its DIMSE command set exceeds %d bytes",
                        self.assoc.requestor.address, MAX_COMMAND_SET_BYTES)
            self.message = None
            self.dul.event_queue.put("Evt19")  # invalid PDU: A-ABORT, as pynetdicom does for an invalid message


class _BoundedSocket(AssociationSocket):
    """Refuses to read a PDU longer than the node accepts: pynetdicom reads a PDU's declared length
    into memory in one go, so a 6-byte header claiming 4 GiB would otherwise cost 4 GiB."""

    max_pdu_bytes: int = MAX_ASSOCIATION_PDU_BYTES

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.max_pdu_bytes:
            peer = getattr(self.assoc.requestor, "address", "?")
            log.warning("aborting the association with %s: it sent a PDU of %d bytes, more than the %d this node"
                        " accepts (node.max_pdu_size)", peer, nr_bytes, self.max_pdu_bytes)
            raise OSError(f"PDU of {nr_bytes} bytes exceeds the {self.max_pdu_bytes} bytes accepted")
        return super().recv(nr_bytes)


def deflated_size(data: bytes | memoryview, limit: int, chunk: int = INFLATE_CHUNK_BYTES) -> int:
    """Inflated size of raw-deflate ``data`` (DICOM Deflated Explicit VR Little Endian, PS3.5 A.5),
    found in steps of at most ``chunk`` output bytes that are discarded as they come, so memory
    stays O(chunk) whatever the data inflates to. Raises InflateLimitError past ``limit``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    pending: bytes | memoryview = memoryview(data)
    while True:  # zlib.error (not deflate data) propagates: the data set parser refuses it as unreadable
        out = inflater.decompress(pending, chunk)
        total += len(out)
        del out
        pending = inflater.unconsumed_tail
        if not pending and not inflater.eof:
            total += len(inflater.flush())
        if total > limit:
            raise InflateLimitError(f"the deflated data set inflates to more than {limit} bytes"
                                    " (node.max_inflated_bytes)")
        if not pending:
            return total


# --------------------------------------------------------------------------------- admission


def _calling_ae(assoc: Any) -> str:
    primitive = getattr(assoc.requestor, "primitive", None)
    title = getattr(primitive, "calling_ae_title", None) or assoc.requestor.ae_title or ""
    return str(title).strip()


class AdmissionControl:
    """Connection and association limits (see the module docstring). ``on_refused(kind, reason,
    calling_ae, peer)`` is told about every refusal (the SCP logs, counts and audits it)."""

    def __init__(self, settings: NodeSettings,
                 on_refused: Callable[[str, str, str | None, str], None] | None = None) -> None:
        self.settings = settings
        self.on_refused = on_refused
        self._lock = threading.Lock()

    # -- connections (TCP) ------------------------------------------------------------------
    @staticmethod
    def _open(server: "GuardedAssociationServer") -> list[Any]:
        return [a for a in server.ae.active_associations if a.is_acceptor and a._server is server]

    def admit_connection(self, server: "GuardedAssociationServer", address: str) -> str | None:
        """None = admitted; else the reason the new connection is closed."""
        s = self.settings
        open_ = self._open(server)
        if len(open_) >= s.max_connections:
            return f"{len(open_)} connections open, node.max_connections is {s.max_connections}"
        same = sum(1 for a in open_ if a.requestor.address == address)
        if same >= s.max_connections_per_address:
            return (f"{same} connections open from {address}, node.max_connections_per_address is "
                    f"{s.max_connections_per_address}")
        return None

    # -- associations (A-ASSOCIATE-RQ) --------------------------------------------------------
    def _would_be_rejected_anyway(self, assoc: Any) -> bool:
        """Calling/called AE checks pynetdicom does next: leave those rejections to it, so each
        rejection names its real reason."""
        primitive = assoc.requestor.primitive
        allowed = [t.strip() for t in self.settings.allowed_calling_ae_titles]
        if allowed and str(primitive.calling_ae_title).strip() not in allowed:
            return True
        return str(primitive.called_ae_title).strip() != self.settings.ae_title.strip()

    def check_association(self, assoc: Any) -> str | None:
        """Decide (and record) the admission of an association whose A-ASSOCIATE-RQ just arrived."""
        s = self.settings
        if self._would_be_rejected_anyway(assoc):
            return None
        calling = _calling_ae(assoc)
        with self._lock:
            admitted = [a for a in self._open(assoc._server)
                        if a is not assoc and getattr(a, "_radvlm_admitted", False)
                        and not (a.is_released or a.is_aborted or a.is_rejected)]
            mine = sum(1 for a in admitted if _calling_ae(a) == calling)
            address = assoc.requestor.address
            same_address = sum(1 for a in admitted if a.requestor.address == address)
            if len(admitted) >= s.max_associations:
                return f"{len(admitted)} associations open, node.max_associations is {s.max_associations}"
            if mine >= s.max_associations_per_calling_ae:
                return (f"calling AE title already holds {mine} associations, "
                        f"node.max_associations_per_calling_ae is {s.max_associations_per_calling_ae}")
            if (mine or same_address) and len(admitted) >= s.max_associations - s.reserved_associations:
                return (f"{len(admitted)} of {s.max_associations} associations open: the last "
                        f"{s.reserved_associations} (node.reserved_associations) are kept for a sender (calling"
                        " AE title and IP address) that holds none")
            assoc._radvlm_admitted = True
        return None

    def on_requested(self, event: evt.Event) -> None:
        """EVT_REQUESTED handler: rejects an association over a limit before it is negotiated."""
        assoc = event.assoc
        reason = self.check_association(assoc)
        if reason is None:
            return
        calling = _calling_ae(assoc)
        peer = f"{assoc.requestor.address}:{assoc.requestor.port}"
        assoc._radvlm_limit_reason = reason
        assoc.acse.send_reject(*LIMIT_REJECT)
        if self.on_refused is not None:
            self.on_refused("association", reason, calling, peer)
        # as pynetdicom does after its own rejections: let the DUL send the A-ASSOCIATE-RJ and wait for the
        # peer to close (at most the ARTIM timer, acse_timeout_seconds) before the socket is shut
        assoc.kill()


# ------------------------------------------------------------------------------------ server


class GuardedRequestHandler(RequestHandler):
    """Creates each acceptor association with the bounded DIMSE buffer and PDU reader."""

    server: "GuardedAssociationServer"

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        limits = self.server.limits
        assoc.dimse.__class__ = _BoundedDIMSE
        assoc.dimse.max_dataset_bytes = limits.max_instance_bytes
        sock = assoc.dul.socket
        sock.__class__ = _BoundedSocket
        pdu = limits.max_pdu_size if limits.max_pdu_size else limits.max_instance_bytes
        sock.max_pdu_bytes = max(pdu, MAX_ASSOCIATION_PDU_BYTES) + 6
        return assoc


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with connection admission, socket timeouts and a TLS handshake
    that happens in the connection's thread (pynetdicom does it in the accept loop, without a
    timeout: one silent TLS client would stop the node from accepting anything)."""

    limits: NodeSettings
    admission: AdmissionControl
    #: listen backlog (socketserver's default is 5: a burst of senders would wait for SYN retransmits)
    request_queue_size = 128

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = self.socket.accept()
        client.settimeout(self.limits.network_timeout_seconds)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        address = str(client_address[0])
        reason = self.admission.admit_connection(self, address)
        if reason is None:
            return True
        if self.admission.on_refused is not None:
            self.admission.on_refused("connection", reason, None, f"{address}:{client_address[1]}")
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        # finish_request only creates the Association object and starts its thread: done inline so
        # that the next admission decision already counts this connection
        try:
            if self.ssl_context is not None:
                request = self._start_tls(request)
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def _start_tls(self, request: socket.socket) -> socket.socket:
        """Wrap without handshaking here; OpenSSL performs the server handshake on the first read in
        the association's thread, bounded by the socket timeout set in get_request."""
        assert self.ssl_context is not None
        return self.ssl_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("connection from %s failed before its association started", client_address[0],
                    exc_info=True)


def start_guarded_server(ae: Any, address: tuple[str, int], settings: NodeSettings,
                         ssl_context: ssl.SSLContext | None, evt_handlers: list,
                         admission: AdmissionControl) -> GuardedAssociationServer:
    """Like ``ae.start_server(address, block=False, ...)``, with the guarded server class."""
    # pynetdicom's own limit counts sockets that have not sent A-ASSOCIATE-RQ; admission control
    # decides instead, so pynetdicom's check must never be the one that triggers
    ae.maximum_associations = settings.max_connections + 1
    handlers = [(evt.EVT_REQUESTED, admission.on_requested), *evt_handlers]
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=handlers,
                            server_class=GuardedAssociationServer, request_handler=GuardedRequestHandler)
    server.limits = settings
    server.admission = admission
    thread = threading.Thread(target=server.serve_forever, name=f"radvlm-scp-{address[1]}", daemon=True)
    thread.start()
    ae._servers.append(server)
    return server
