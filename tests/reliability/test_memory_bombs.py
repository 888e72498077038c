"""Decompression and size bombs (issue 12 item 3) against the SCP in a child process, whose peak
RSS (VmHWM) is read from /proc: before the limits, a 1 MB deflated instance (1 GiB inflated) cost
the node +2 GB and was answered Success; a 256 MB instance +0.5 GB.

Now: an instance over ``node.max_instance_bytes`` is discarded as it arrives, a deflated one is
inflated in 1 MiB steps up to ``node.max_inflated_bytes``; both are refused with 0xA700 (with an
Error Comment and a ``store_refused`` audit line), the association stays usable and the node
keeps accepting. The worker's decoded-size guard is ``[inference] max_image_pixels``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pynetdicom import AE, _config
from pynetdicom.sop_class import ComputedRadiographyImageStorage
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicom_node.audit import read_audit
from inference.errors import UndecodablePixelDataError
from inference.image import image_from_dataset
from tests.dicom_samples import make_cr_dataset
from tests.reliability.bombs import write_deflate_bomb, write_oversize_instance
from tests.reliability.scp_process import ScpProcess

MiB = 2**20


@pytest.fixture
def chunked_send():
    """Send files from disk as they are (pynetdicom reads them in PDU-sized chunks), so the test
    process neither inflates nor holds the bombs."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = previous


def _association(port: int, transfer_syntax: str):
    ae = AE(ae_title="PACS1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(ComputedRadiographyImageStorage, [transfer_syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="RADVLM")
    assert assoc.is_established
    return assoc


def _store_normal(port: int) -> int:
    """A normal instance, sent as a data set (not chunked from a file)."""
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = False
    try:
        assoc = _association(port, ExplicitVRLittleEndian)
        try:
            return int(assoc.send_c_store(make_cr_dataset()).Status)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


@pytest.fixture
def node(tmp_path):
    nodes: list[ScpProcess] = []

    def start(**overrides: object) -> ScpProcess:
        (tmp_path / "data").mkdir(exist_ok=True)
        nodes.append(ScpProcess(tmp_path / "data", **overrides))
        return nodes[-1]

    yield start
    for n in nodes:
        n.close()


def _refused(data_dir: Path, sop_instance: str) -> dict:
    [event] = [e for e in read_audit(data_dir / "audit.jsonl")
               if e["event"] == "store_refused" and e["sop_instance_uid"] == sop_instance]
    return event


def test_deflate_bomb_is_refused_with_bounded_memory(tmp_path, node, chunked_send):
    bomb, header = write_deflate_bomb(tmp_path / "bomb.dcm", inflated_bytes=1024 * MiB)
    assert bomb.stat().st_size < 2 * MiB
    scp = node(max_inflated_bytes=64 * MiB)
    assert _store_normal(scp.port) == 0x0000
    before = scp.memory()["VmHWM"]
    assoc = _association(scp.port, DeflatedExplicitVRLittleEndian)
    try:
        status = assoc.send_c_store(bomb)
        assert status.Status == 0xA700
        assert "max_inflated_bytes" in str(status.get("ErrorComment", ""))
    finally:
        assoc.release()
    growth = scp.memory()["VmHWM"] - before
    print(f"\ndeflate bomb ({bomb.stat().st_size / MiB:.2f} MB -> 1 GiB): 0xA700, node peak RSS +{growth / MiB:.0f} MiB")
    assert growth < 48 * MiB, f"node peak RSS grew by {growth / MiB:.0f} MiB"
    assert "max_inflated_bytes" in _refused(scp.data_dir, header.SOPInstanceUID)["reason"]
    assert not (scp.data_dir / "spool" / header.StudyInstanceUID).exists()
    assert scp.alive() and _store_normal(scp.port) == 0x0000


def test_oversize_instance_is_refused_association_stays_usable(tmp_path, node, chunked_send):
    big, header = write_oversize_instance(tmp_path / "big.dcm", size_bytes=96 * MiB)
    scp = node(max_instance_bytes=8 * MiB)
    assert _store_normal(scp.port) == 0x0000
    before = scp.memory()["VmHWM"]
    assoc = _association(scp.port, ExplicitVRLittleEndian)
    try:
        status = assoc.send_c_store(big)
        assert status.Status == 0xA700
        assert "max_instance_bytes" in str(status.get("ErrorComment", ""))
        # the same association goes on: the refusal did not cost the sender its association
        _config.STORE_SEND_CHUNKED_DATASET = False
        assert assoc.send_c_store(make_cr_dataset()).Status == 0x0000
    finally:
        assoc.release()
    growth = scp.memory()["VmHWM"] - before
    print(f"\noversize instance (96 MiB, limit 8 MiB): 0xA700, node peak RSS +{growth / MiB:.0f} MiB")
    assert growth < 8 * MiB + 32 * MiB, f"node peak RSS grew by {growth / MiB:.0f} MiB"
    assert "max_instance_bytes" in _refused(scp.data_dir, header.SOPInstanceUID)["reason"]
    assert not (scp.data_dir / "spool" / header.StudyInstanceUID).exists()
    assert scp.alive() and _store_normal(scp.port) == 0x0000


def test_deflated_instance_within_the_limit_is_stored(tmp_path, node, chunked_send):
    """The bounded inflate check must not refuse a legitimate deflated instance (20 MiB inflated)."""
    path, header = write_deflate_bomb(tmp_path / "ok.dcm", inflated_bytes=20 * MiB)
    scp = node(max_inflated_bytes=64 * MiB)
    assoc = _association(scp.port, DeflatedExplicitVRLittleEndian)
    try:
        assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()
    spooled = scp.data_dir / "spool" / header.StudyInstanceUID / f"{header.SOPInstanceUID}.dcm"
    assert _data_set_bytes(spooled) == _data_set_bytes(path)  # kept as sent (deflated), new file meta


def _data_set_bytes(path: Path) -> bytes:
    with path.open("rb") as fp:
        read_preamble(fp, False)
        _read_file_meta_info(fp)
        return fp.read()


def test_worker_pixel_limit_is_a_setting():
    """The decoded-size guard refuses before decoding, at the configured number of pixels."""
    ds = make_cr_dataset(rows=64, columns=48)
    assert image_from_dataset(ds, max_pixels=64 * 48).source.rows == 64
    with pytest.raises(UndecodablePixelDataError, match="max_image_pixels"):
        image_from_dataset(ds, max_pixels=64 * 48 - 1)
