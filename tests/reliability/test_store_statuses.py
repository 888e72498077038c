"""C-STORE answers on the failure paths, over a real association (pynetdicom SCU): Success only
after spool + job store, and every refusal audited with its status and no orphan spool file."""

from __future__ import annotations

import io
import sqlite3
import threading

import pytest
from pydicom import dcmread

from dicom_node.jobstore import JobStore
from dicom_node.service import Node
from tests.dicom_samples import DEFAULT_PATIENT_ID, make_cr_dataset, write
from tests.reliability.harness import ScpHarness, node_settings, send


@pytest.fixture
def node(tmp_path):
    harness = ScpHarness(tmp_path / "data")
    yield harness
    harness.close()


def test_job_store_runs_with_synchronous_full(tmp_path):
    """WAL + synchronous=FULL: a committed state (an acknowledged instance) survives a power loss."""
    jobs = JobStore(tmp_path / "jobs.sqlite3")
    try:
        assert jobs._read("PRAGMA synchronous")[0][0] == 2  # FULL (OFF = 0, NORMAL = 1)
        assert jobs._read("PRAGMA journal_mode")[0][0] == "wal"
    finally:
        jobs.close()


def test_job_store_error_is_never_answered_success_and_leaves_no_orphan(node):
    def fail(operation: str) -> None:
        if operation == "record_instance":
            raise sqlite3.OperationalError("disk I/O error")

    node.jobs.inject = fail
    ds = make_cr_dataset()
    [answer] = send(node.port, [ds])
    assert answer.status == 0x0110 and answer.comment == "storage error of the node"
    assert node.spool_files() == []  # the spooled file of an unacknowledged instance is removed
    [refused] = node.audit_events("store_refused")
    assert refused["status"] == "0x0110" and "job store error" in refused["reason"]
    node.jobs.inject = None
    assert send(node.port, [ds])[0].status == 0x0000
    assert node.jobs.instance(ds.SOPInstanceUID)["path"] == str(node.spool_files()[0])


def test_dataset_uid_differing_from_the_request_is_refused_a900(node, tmp_path):
    ds = make_cr_dataset()
    path = write(ds, tmp_path / "mismatch.dcm")
    # the request's Affected SOP Instance UID comes from the file meta; the data set says otherwise
    raw = dcmread(path)
    raw.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.424242"
    raw.save_as(path)  # file meta written as set (enforce_file_format would copy the data set's UID)
    from pynetdicom import AE, _config

    ae = AE(ae_title="RELTEST")
    ae.add_requested_context(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", node.port, ae_title="RADVLM")
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file as is: request UIDs from its file meta
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    assert int(status.Status) == 0xA900
    assert node.spool_files() == [] and node.jobs.instance(ds.SOPInstanceUID) is None
    assert node.audit_events("store_refused")[0]["status"] == "0xA900"


def test_shutdown_refuses_with_a700_and_audits(node):
    ds = make_cr_dataset()
    node.scp._accepting.clear()  # what stop() does first, before the server closes
    outcome = node.scp.store(_encoded(ds), "RELTEST", str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    assert outcome.status == 0xA700 and outcome.outcome == "shutting down"
    assert node.spool_files() == [] and node.jobs.instance(ds.SOPInstanceUID) is None
    assert node.audit_events("store_refused")[0]["reason"] == "node shutting down"


def test_instances_arriving_during_node_stop_are_refused_not_lost(tmp_path, tiny_model_dir):
    """Over the wire: while Node.stop() runs, an association still open gets 0xA700, never a
    Success for an instance the stopping node would not record."""
    settings = node_settings(tmp_path, tiny_model_dir, workers=0, http_enabled=False)
    node = Node(settings).start()
    from pynetdicom import AE

    first, second = make_cr_dataset(), make_cr_dataset()
    ae = AE(ae_title="RELTEST")
    ae.add_requested_context(str(first.SOPClassUID), str(first.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", node.scp_port, ae_title="RADVLM")
    stopper = None
    try:
        assert int(assoc.send_c_store(first).Status) == 0x0000
        node.scp._accepting.clear()  # Node.stop()'s first step: no new instance is accepted
        status = assoc.send_c_store(second)
        assert int(status.Status) == 0xA700 and str(status.ErrorComment) == "node shutting down"
    finally:
        assoc.release()
        stopper = threading.Thread(target=node.stop, kwargs={"grace_seconds": 5})
        stopper.start()
        stopper.join(30)
    jobs = JobStore(settings.node.data_dir / "jobs.sqlite3")
    try:
        assert jobs.instance(first.SOPInstanceUID) is not None and jobs.instance(second.SOPInstanceUID) is None
    finally:
        jobs.close()


def _encoded(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_unknown_vr_patient_id_is_refused_c000_without_orphan(node):
    ds = make_cr_dataset()
    data = _encoded(ds)
    at = data.index(b"\x10\x00\x20\x00LO")  # (0010,0020) Patient ID, explicit VR little endian
    bad = dcmread(io.BytesIO(data[:at + 4] + b"ZZ" + data[at + 6:]))
    [answer] = send(node.port, [bad])
    assert answer.status == 0xC000, hex(answer.status or 0)
    assert node.spool_files() == [] and node.jobs.instance(ds.SOPInstanceUID) is None
    [refused] = node.audit_events("store_refused")
    assert refused["status"] == "0xC000" and "PatientID" in refused["reason"]
    assert DEFAULT_PATIENT_ID not in (node.data_dir / "audit.jsonl").read_text()


def test_uid_known_in_another_study_is_refused_and_the_conflict_recorded(node):
    first = make_cr_dataset()
    other = make_cr_dataset(patient_id="OTHER-PATIENT-7")
    other.SOPInstanceUID = first.SOPInstanceUID
    other.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    assert send(node.port, [first])[0].status == 0x0000
    [answer] = send(node.port, [other])
    assert answer.status == 0xC001 and "another study" in answer.comment
    # nothing of the refused copy stays; the first is untouched; both studies show the conflict
    assert node.spool_files() == [node.spool.path_for(first.StudyInstanceUID, first.SOPInstanceUID)]
    assert node.jobs.instance(first.SOPInstanceUID)["study_instance_uid"] == first.StudyInstanceUID
    for study in (first.StudyInstanceUID, other.StudyInstanceUID):
        [conflict] = node.jobs.conflicts(study)
        assert conflict["sop_instance_uid"] == first.SOPInstanceUID and conflict["kind"] == "other-study"
    [refused] = node.audit_events("store_refused")
    assert refused["status"] == "0xC001" and refused["reason"] == "SOP Instance UID already received in another study"


def test_different_object_same_uid_same_study_is_kept_and_recorded(node):
    first = make_cr_dataset()
    second = make_cr_dataset(study_instance_uid=first.StudyInstanceUID, SeriesDescription="again")
    second.SOPInstanceUID = first.SOPInstanceUID
    second.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    assert [a.status for a in send(node.port, [first, second])] == [0x0000, 0x0000]
    conflict_files = list((node.data_dir / "spool" / "conflicts").iterdir())
    assert len(conflict_files) == 1
    [conflict] = node.jobs.conflicts(first.StudyInstanceUID)
    assert conflict["kind"] == "different-object" and conflict["path"] == str(conflict_files[0])
    assert [e["outcome"] for e in node.audit_events("instance_received")] == ["new", "conflict"]


def test_second_patient_under_one_study_is_flagged(node):
    first = make_cr_dataset()
    second = make_cr_dataset(study_instance_uid=first.StudyInstanceUID, patient_id="SOMEONE-ELSE")
    assert [a.status for a in send(node.port, [first, second])] == [0x0000, 0x0000]
    assert node.jobs.study(first.StudyInstanceUID)["flags"] == "second patient under this Study Instance UID"
    [flag] = node.audit_events("study_flagged")
    assert flag["sop_instance_uid"] == second.SOPInstanceUID and "SOMEONE-ELSE" not in str(flag)


def test_invalid_uid_refusal_is_audited(node):
    ds = make_cr_dataset()
    ds.StudyInstanceUID = "1.2.x.3"
    [answer] = send(node.port, [ds])
    assert answer.status == 0xC000
    assert node.audit_events("store_refused")[0]["reason"] == "missing or malformed StudyInstanceUID"


def test_startup_sweep_removes_unrecorded_spool_files(tmp_path, tiny_model_dir):
    """A crash between the spool rename and the job-store commit leaves a complete file nobody
    acknowledged: the next start removes it (and keeps every recorded one)."""
    settings = node_settings(tmp_path, tiny_model_dir, workers=0, http_enabled=False)
    node = Node(settings).start()
    kept = make_cr_dataset()
    try:
        assert send(node.scp_port, [kept])[0].status == 0x0000
    finally:
        node.stop(grace_seconds=5)
    orphan = settings.node.data_dir / "spool" / "1.2.3" / "1.2.3.4.dcm"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"patient data never acknowledged")
    node = Node(settings).start()
    try:
        assert not orphan.exists() and not orphan.parent.exists()
        assert (settings.node.data_dir / "spool" / kept.StudyInstanceUID / f"{kept.SOPInstanceUID}.dcm").is_file()
    finally:
        node.stop(grace_seconds=5)
    swept = [line for line in (settings.node.data_dir / "audit.jsonl").read_text().splitlines() if "spool_swept" in line]
    assert len(swept) == 1 and '"removed_unrecorded":1' in swept[0]


def test_job_store_disk_full_is_refused_a700_and_healthz_can_tell(node):
    def full(operation: str) -> None:
        if operation == "record_instance":
            raise sqlite3.OperationalError("database or disk is full")

    node.jobs.inject = full
    ds = make_cr_dataset()
    [answer] = send(node.port, [ds])
    assert answer.status == 0xA700 and answer.comment == "out of disk space"
    assert node.spool_files() == [] and node.scp.refusing_for_space()
    node.jobs.inject = None
    assert send(node.port, [ds])[0].status == 0x0000 and not node.scp.refusing_for_space()
