"""The SCP against real dcmtk clients on loopback: C-ECHO, C-STORE (uncompressed and compressed),
calling-AE filter, duplicates, free-space floor. Durability: Success only after spool + job store."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pydicom
import pytest

from config.settings import NodeSettings
from tests.conftest_node import dcmtk_convert, echoscu, storescu
from dicom_node.audit import AuditLog, read_audit
from dicom_node.identity import Pseudonymizer
from dicom_node.jobstore import JobStore
from dicom_node.metrics import node_metrics
from dicom_node.scp import StorageSCP
from dicom_node.spool import Spool
from tests.dicom_samples import DEFAULT_PATIENT_ID, DEFAULT_PATIENT_NAME, make_cr_dataset, write


class Scp:
    def __init__(self, data_dir: Path, **node: object) -> None:
        self.settings = NodeSettings(data_dir=data_dir, port=0, bind="127.0.0.1", min_free_space_mb=0, **node)
        self.spool = Spool(data_dir / "spool", self.settings.min_free_space_mb * 2**20)
        self.jobs = JobStore(data_dir / "jobs.sqlite3")
        self.audit = AuditLog(data_dir / "audit.jsonl")
        self.metrics = node_metrics()
        self.scp = StorageSCP(self.settings, self.spool, self.jobs, self.audit, Pseudonymizer(b"k" * 32), self.metrics)
        self.port = self.scp.start()

    def close(self) -> None:
        self.scp.stop()
        self.jobs.close()
        self.audit.close()


@pytest.fixture
def scp(tmp_path):
    node = Scp(tmp_path / "data")
    yield node
    node.close()


def test_echo(scp):
    result = echoscu(scp.port)
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr


def test_store_uncompressed_is_spooled_and_recorded(scp, tmp_path):
    ds = make_cr_dataset()
    path = write(ds, tmp_path / "cr.dcm")
    result = storescu(scp.port, [path])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Received Store Response (Success)" in result.stdout + result.stderr
    spooled = tmp_path / "data" / "spool" / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert spooled.is_file()
    again = pydicom.dcmread(spooled)
    assert again.SOPInstanceUID == ds.SOPInstanceUID and (again.pixel_array == ds.pixel_array).all()
    study = scp.jobs.study(ds.StudyInstanceUID)
    assert study["state"] == "received" and study["instances"] == 1 and study["calling_ae"] == "STORESCU"
    # the job store is committed: a separate connection sees it
    with sqlite3.connect(tmp_path / "data" / "jobs.sqlite3") as db:
        assert db.execute("SELECT sha256 FROM instances").fetchone()[0] == hashlib.sha256(
            spooled.read_bytes()).hexdigest()
    events = read_audit(tmp_path / "data" / "audit.jsonl")
    assert events[-1]["event"] == "instance_received" and events[-1]["patient"].startswith("p-")
    text = (tmp_path / "data" / "audit.jsonl").read_text()
    assert DEFAULT_PATIENT_ID not in text and DEFAULT_PATIENT_NAME.split("^")[0] not in text


@pytest.mark.parametrize("kind", ["j2k", "jpeg-lossless", "jpeg-ls", "rle", "deflate"])
def test_store_compressed_syntaxes(scp, tmp_path, kind, rg1_j2kr):
    ds = make_cr_dataset(rows=64, columns=48)
    plain = write(ds, tmp_path / "plain.dcm")
    if kind == "j2k":
        src, option, uid = rg1_j2kr, "-xv", pydicom.uid.JPEG2000Lossless
    elif kind == "jpeg-lossless":
        src, option, uid = dcmtk_convert("dcmcjpeg", plain, tmp_path / "jl.dcm", "+e1"), "-xs", pydicom.uid.JPEGLosslessSV1
    elif kind == "jpeg-ls":
        src, option, uid = dcmtk_convert("dcmcjpls", plain, tmp_path / "jls.dcm", "+el"), "-xt", pydicom.uid.JPEGLSLossless
    elif kind == "rle":
        src, option, uid = dcmtk_convert("dcmcrle", plain, tmp_path / "rle.dcm"), "-xr", pydicom.uid.RLELossless
    else:
        src, option, uid = dcmtk_convert("dcmconv", plain, tmp_path / "defl.dcm", "+td"), "-xd", pydicom.uid.DeflatedExplicitVRLittleEndian
    sent = pydicom.dcmread(src)
    assert sent.file_meta.TransferSyntaxUID == uid
    result = storescu(scp.port, [src], options=[option])
    assert "Received Store Response (Success)" in result.stdout + result.stderr, result.stdout + result.stderr
    spooled = tmp_path / "data" / "spool" / sent.StudyInstanceUID / f"{sent.SOPInstanceUID}.dcm"
    stored = pydicom.dcmread(spooled)
    assert stored.file_meta.TransferSyntaxUID == uid  # kept as sent, no transcoding
    assert (stored.pixel_array == sent.pixel_array).all()
    assert scp.jobs.instances_of(sent.StudyInstanceUID)[0]["transfer_syntax_uid"] == uid


def test_rejected_calling_ae(tmp_path):
    node = Scp(tmp_path / "data", allowed_calling_ae_titles=["PACS1"])
    try:
        bad = echoscu(node.port, calling="INTRUDER")
        assert bad.returncode != 0
        assert "Association Rejected" in bad.stdout + bad.stderr
        assert "Calling AE Title Not Recognized" in bad.stdout + bad.stderr
        assert echoscu(node.port, calling="PACS1").returncode == 0
        ds = make_cr_dataset()
        refused = storescu(node.port, [write(ds, tmp_path / "a.dcm")], calling="INTRUDER")
        assert refused.returncode != 0 and node.jobs.study(ds.StudyInstanceUID) is None
        assert any(e["event"] == "association_rejected" and e["calling_ae"] == "INTRUDER"
                   for e in read_audit(tmp_path / "data" / "audit.jsonl"))
        wrong_called = echoscu(node.port, calling="PACS1", called="OTHER")
        assert wrong_called.returncode != 0
    finally:
        node.close()


def test_duplicates_are_idempotent_and_conflicts_kept(scp, tmp_path):
    ds = make_cr_dataset()
    path = write(ds, tmp_path / "cr.dcm")
    for _ in range(2):
        result = storescu(scp.port, [path])
        assert "Received Store Response (Success)" in result.stdout + result.stderr
    assert scp.jobs.study(ds.StudyInstanceUID)["instances"] == 1
    assert scp.metrics.value("radvlm_instances_received_total", outcome="duplicate") == 1
    # same SOP Instance UID, different content: first copy kept, the other saved aside
    ds.SeriesDescription = "changed"
    changed = write(ds, tmp_path / "changed.dcm")
    result = storescu(scp.port, [changed])
    assert "Received Store Response (Success)" in result.stdout + result.stderr
    spooled = tmp_path / "data" / "spool" / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert pydicom.dcmread(spooled).SeriesDescription == "Chest"
    conflicts = list((tmp_path / "data" / "spool" / "conflicts").iterdir())
    assert len(conflicts) == 1 and pydicom.dcmread(conflicts[0]).SeriesDescription == "changed"
    assert scp.jobs.study(ds.StudyInstanceUID)["instances"] == 1


def test_free_space_floor_answers_out_of_resources(tmp_path):
    node = Scp(tmp_path / "data")
    node.spool.min_free_bytes = node.spool.free_bytes() + 2**40  # floor far above what is free
    try:
        ds = make_cr_dataset()
        result = storescu(node.port, [write(ds, tmp_path / "cr.dcm")])
        out = result.stdout + result.stderr
        assert "Refused: OutOfResources" in out, out
        assert node.jobs.study(ds.StudyInstanceUID) is None
        assert not (tmp_path / "data" / "spool" / ds.StudyInstanceUID).exists()
        assert node.metrics.value("radvlm_instances_refused_total", reason="out of space") == 1
    finally:
        node.close()


def test_unparsable_and_mismatched_objects_are_refused_node_keeps_serving(scp, tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage

    ds = make_cr_dataset()
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="RADVLM")
    assert assoc.is_established
    try:
        no_uid = make_cr_dataset(StudyInstanceUID=None)
        status = assoc.send_c_store(no_uid)
        assert status.Status == 0xC000
        assert scp.jobs.studies() == []
        status = assoc.send_c_store(ds)
        assert status.Status == 0x0000
    finally:
        assoc.release()
    assert echoscu(scp.port).returncode == 0
