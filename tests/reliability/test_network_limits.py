"""Association exhaustion (issue 12 item 4), against the real SCP on loopback sockets.

* A flood of associations from one sender (own IP address 127.0.0.2, held open) takes at most
  ``max_associations_per_calling_ae`` slots; the rest are rejected *transient, local limit
  exceeded* with an ``association_limit`` audit line, and a legitimate sender (127.0.0.1, another
  AE title) stores an instance during the flood. Even a flood that changes its AE title for every
  association leaves the reserved slots to a sender that holds none.
* TCP connections that never send an A-ASSOCIATE-RQ neither count against the association limit
  nor stay longer than ``acse_timeout_seconds``; past ``max_connections_per_address`` they are
  closed at once.
* A PDU header declaring more than the node accepts aborts the association without reading it.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from dicom_node.audit import read_audit
from tests.conftest_node import need_tool
from tests.dicom_samples import make_cr_dataset
from tests.test_node_scp import Scp
from tests.test_node_tls import pki  # noqa: F401 - the test PKI fixture

FLOOD_ADDRESS = "127.0.0.2"  # Linux routes all of 127/8 to lo: the flood comes from its own address


def _flood_address_usable() -> bool:
    try:
        with socket.socket() as s:
            s.bind((FLOOD_ADDRESS, 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _flood_address_usable(), reason=f"cannot bind {FLOOD_ADDRESS} (not Linux?)")


def _associate(port: int, calling: str, address: str = "127.0.0.1", timeout: float = 10):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(ComputedRadiographyImageStorage)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="RADVLM", bind_address=(address, 0))


def _flood(port: int, count: int, calling: str | None) -> tuple[list, int]:
    """``count`` simultaneous associations from FLOOD_ADDRESS; returns (established ones, rejected count)."""
    results: list = [None] * count

    def one(i: int) -> None:
        results[i] = _associate(port, calling or f"FLOOD{i}", FLOOD_ADDRESS)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    established = [a for a in results if a is not None and a.is_established]
    rejected = sum(1 for a in results if a is not None and a.is_rejected)
    return established, rejected


def _legitimate_store(port: int) -> tuple[int | None, float]:
    started = time.monotonic()
    assoc = _associate(port, "PACS1")
    if not assoc.is_established:
        return None, time.monotonic() - started
    try:
        status = assoc.send_c_store(make_cr_dataset())
        return getattr(status, "Status", None), time.monotonic() - started
    finally:
        assoc.release()


@pytest.mark.parametrize("rotating_ae_titles", [False, True], ids=["one-ae-title", "new-ae-title-each"])
def test_association_flood_leaves_room_for_a_legitimate_sender(tmp_path, rotating_ae_titles):
    node = Scp(tmp_path / "data", max_connections_per_address=64)
    s = node.settings
    held: list = []
    try:
        held, rejected = _flood(node.port, 40, None if rotating_ae_titles else "FLOOD")
        expected = s.max_associations - s.reserved_associations if rotating_ae_titles \
            else s.max_associations_per_calling_ae
        assert len(held) == expected and rejected == 40 - expected, (len(held), rejected)
        status, seconds = _legitimate_store(node.port)
        assert status == 0x0000, "the legitimate sender got nothing through during the flood"
        assert seconds < 5, seconds
        print(f"\nflood of 40 ({'rotating AE titles' if rotating_ae_titles else 'one AE title'}): "
              f"{len(held)} accepted, {rejected} rejected; legitimate C-STORE during the flood in {seconds:.2f}s")
        limits = [e for e in read_audit(tmp_path / "data" / "audit.jsonl") if e["event"] == "association_limit"]
        assert len(limits) == rejected and all(e["kind"] == "association" and e["reason"] for e in limits)
        assert not any(e["event"] == "association_rejected" for e in read_audit(tmp_path / "data" / "audit.jsonl"))
        assert node.metrics.value("radvlm_associations_total", result="limit") == rejected
    finally:
        for assoc in held:
            assoc.release()
        node.close()


def test_flood_rejection_is_transient_local_limit(tmp_path):
    node = Scp(tmp_path / "data", max_associations=3, reserved_associations=1, max_associations_per_calling_ae=2)
    held: list = []
    try:
        held = [_associate(node.port, "FLOOD", FLOOD_ADDRESS) for _ in range(2)]
        assert all(a.is_established for a in held)
        third = _associate(node.port, "FLOOD", FLOOD_ADDRESS)
        assert third.is_rejected
        rj = third.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        other = _associate(node.port, "OTHER", FLOOD_ADDRESS)  # same address, holds none by AE but by address
        assert other.is_rejected
        assert _legitimate_store(node.port)[0] == 0x0000
    finally:
        for assoc in held:
            assoc.release()
        node.close()


def _idle_connection(port: int, timeout: float) -> socket.socket:
    s = socket.socket()
    s.bind((FLOOD_ADDRESS, 0))
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    return s


def _closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connections_are_closed_and_do_not_lock_the_node_out(tmp_path):
    """20 connections that never send an A-ASSOCIATE-RQ (twice max_associations): a legitimate
    sender still stores at once, and each idle one is closed after acse_timeout_seconds."""
    timeout = 1.5
    node = Scp(tmp_path / "data", acse_timeout_seconds=timeout)
    idle: list[tuple[socket.socket, float]] = []
    try:
        for _ in range(20):
            idle.append((_idle_connection(node.port, timeout + 5), time.monotonic()))
        status, seconds = _legitimate_store(node.port)
        assert status == 0x0000, "idle connections locked the node out"
        lifetimes = []
        for s, opened in idle:
            assert _closed_by_peer(s), "an idle connection was not closed"
            lifetimes.append(time.monotonic() - opened)
        assert max(lifetimes) < timeout + 2.5, lifetimes  # margin: 2 busy cores
        print(f"\n20 idle sockets: legitimate C-STORE in {seconds:.2f}s; idle sockets closed after "
              f"{min(lifetimes):.2f}-{max(lifetimes):.2f}s (acse_timeout_seconds={timeout})")
    finally:
        for s, _ in idle:
            s.close()
        node.close()


def test_connections_per_address_are_capped(tmp_path):
    node = Scp(tmp_path / "data", acse_timeout_seconds=30, max_connections_per_address=4)
    server = node.scp._server
    idle: list[socket.socket] = []
    try:
        for i in range(8):
            idle.append(_idle_connection(node.port, 5))
            deadline = time.monotonic() + 5  # the node has taken (or closed) this one before the next
            while (len(server.admission._open(server)) < min(i + 1, 4)) and time.monotonic() < deadline:
                time.sleep(0.01)
        time.sleep(0.2)
        for s in idle[4:]:
            s.settimeout(2)
            assert _closed_by_peer(s), "a connection over max_connections_per_address was kept"
        for s in idle[:4]:
            s.settimeout(0.2)
            assert not _closed_by_peer(s), "a connection within the limit was closed"
        assert _legitimate_store(node.port)[0] == 0x0000  # another address is not affected
        limits = [e for e in read_audit(tmp_path / "data" / "audit.jsonl") if e["event"] == "association_limit"]
        assert len(limits) == 4 and all(e["kind"] == "connection" and "max_connections_per_address" in e["reason"]
                                        for e in limits)
    finally:
        for s in idle:
            s.close()
        node.close()


def test_pdu_longer_than_accepted_aborts_without_reading_it(tmp_path):
    node = Scp(tmp_path / "data")
    try:
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as s:
            # an A-ASSOCIATE-RQ PDU header declaring 2 GiB, then a trickle
            s.sendall(struct.pack(">BBL", 0x01, 0x00, 2**31) + b"\x00" * 1024)
            s.settimeout(5)
            try:
                while s.recv(65536):
                    pass
            except ConnectionResetError:
                pass  # closed, as expected (a TimeoutError here: the node kept reading)
        assert _legitimate_store(node.port)[0] == 0x0000
    finally:
        node.close()


def test_silent_tls_client_does_not_stop_the_accept_loop(tmp_path, pki):
    """pynetdicom performs the TLS handshake in its accept loop without a timeout: one client that
    connects and never sends a ClientHello stopped the node from accepting anything. The handshake
    now runs in the connection's thread under the socket timeouts."""
    node = Scp(tmp_path / "data", acse_timeout_seconds=1.5,
               tls={"enabled": True, "certificate": pki / "server.pem", "private_key": pki / "server.key"})
    silent = _idle_connection(node.port, 10)
    opened = time.monotonic()
    try:
        echo = subprocess.run([need_tool("echoscu"), "-aec", "RADVLM", "+tla", "+cf", str(pki / "ca.pem"),
                               "-to", "10", "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        assert _closed_by_peer(silent) and time.monotonic() - opened < 1.5 + 3
    finally:
        silent.close()
        node.close()


def test_endless_command_set_aborts_the_association(tmp_path):
    """P-DATA command fragments that never end (each PDU within max_pdu_size) were kept in memory
    without limit; past 1 MiB the association is aborted and the node keeps serving."""
    node = Scp(tmp_path / "data")
    try:
        assoc = _associate(node.port, "PACS1", timeout=60)  # our own idle timeout must not be what ends it
        assert assoc.is_established
        context_id = assoc.accepted_contexts[0].context_id
        fragment = b"\x00" * 60000
        # P-DATA-TF: type 4; one PDV: length, context, control header 0x01 (command, not last)
        pdv = struct.pack(">LB", len(fragment) + 2, context_id) + b"\x01" + fragment
        pdu = struct.pack(">BBL", 0x04, 0x00, len(pdv)) + pdv
        sock = assoc.dul.socket.socket
        sent = 0
        try:
            for _ in range(64):  # ~3.8 MB of command set
                sock.sendall(pdu)
                sent += len(fragment)
        except OSError:
            pass  # the node aborted and closed while we were still sending
        deadline = time.monotonic() + 8
        while not assoc.is_aborted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert assoc.is_aborted, "the association survived an endless command set"
        assert _legitimate_store(node.port)[0] == 0x0000
    finally:
        node.close()
