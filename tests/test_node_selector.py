"""Frontal selection rules (header-only) and the job-store transitions around them."""

from __future__ import annotations

import time

from pydicom.dataset import Dataset

from dicom_node.jobstore import InstanceRecord, JobStore
from dicom_node.scheduler import decide_study
from dicom_node.selector import Candidate, classify, select
from tests.dicom_samples import make_cr_dataset, make_sr_dataset, write


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
    return item


def _cand(ds: Dataset, order: int = 0) -> Candidate:
    return Candidate(str(ds.SOPInstanceUID), ds, None, order)


def test_view_position_rule():
    c = classify(_cand(make_cr_dataset(view_position="PA")))
    assert (c.decision, c.rule, c.projection) == ("frontal", "ViewPosition", "PA")
    lat = classify(_cand(make_cr_dataset(view_position="LL", PatientOrientation=["A", "F"])))
    assert (lat.decision, lat.rule) == ("lateral", "ViewPosition") and "ViewPosition=LL" in lat.reason


def test_view_code_sequence_when_view_position_missing():
    ds = make_cr_dataset(view_position=None, ViewCodeSequence=[_code("399348003", "antero-posterior")])
    c = classify(_cand(ds))
    assert (c.decision, c.rule, c.projection) == ("frontal", "ViewCodeSequence", "AP")
    ds = make_cr_dataset(view_position=None, ViewCodeSequence=[_code("399173006", "left lateral")])
    assert classify(_cand(ds)).decision == "lateral"


def test_patient_orientation_then_keywords():
    c = classify(_cand(make_cr_dataset(view_position=None, PatientOrientation=["P", "F"])))
    assert (c.decision, c.rule) == ("lateral", "PatientOrientation")
    c = classify(_cand(make_cr_dataset(view_position=None, PatientOrientation=["L", "F"])))
    assert (c.decision, c.rule) == ("frontal", "PatientOrientation")
    c = classify(_cand(make_cr_dataset(view_position=None, SeriesDescription="Thorax p.a. stehend")))
    assert (c.decision, c.rule) == ("frontal", "keywords")
    c = classify(_cand(make_cr_dataset(view_position=None, SeriesDescription="CHEST LAT",
                                       StudyDescription="CHEST")))
    assert (c.decision, c.rule) == ("lateral", "keywords")
    # an ambiguous study description decides nothing
    c = classify(_cand(make_cr_dataset(view_position=None, SeriesDescription=None,
                                       StudyDescription="CHEST PA AND LAT")))
    assert c.decision == "unknown-view"


def test_non_chest_non_image_multiframe():
    c = classify(_cand(make_cr_dataset(BodyPartExamined="HAND")))
    assert c.decision == "non-chest" and "BodyPartExamined=HAND" in c.reason
    c = classify(_cand(make_cr_dataset(BodyPartExamined=None, StudyDescription="KNEE", SeriesDescription="knee")))
    assert c.decision == "non-chest" and "unknown" in c.reason
    c = classify(_cand(make_cr_dataset(BodyPartExamined=None, StudyDescription="RX THORAX")))
    assert c.decision == "frontal"
    assert classify(_cand(make_sr_dataset())).decision == "not-an-image"
    assert classify(Candidate("1.2.3", None, "truncated file")).decision == "unreadable"


def test_best_frontal_is_chosen_and_every_instance_has_a_reason():
    lateral = make_cr_dataset(view_position="LL")
    ap_small = make_cr_dataset(view_position="AP", rows=32, columns=32)
    pa = make_cr_dataset(view_position="PA", rows=32, columns=32)
    keyword = make_cr_dataset(view_position=None, PatientOrientation=None, SeriesDescription="PA", rows=64, columns=64)
    sel = select([_cand(lateral, 0), _cand(ap_small, 1), _cand(keyword, 2), _cand(pa, 3)])
    assert sel.chosen == pa.SOPInstanceUID and sel.rule == "ViewPosition"
    decisions = {d.sop_instance_uid: d.decision for d in sel.decisions}
    assert decisions[lateral.SOPInstanceUID] == "lateral"
    assert decisions[ap_small.SOPInstanceUID] == "frontal-not-chosen"
    assert all(d.reason for d in sel.decisions)
    none = select([_cand(lateral)])
    assert none.chosen is None and none.rule == "no-frontal-chest" and "lateral" in none.reason


def _record(jobs: JobStore, ds: Dataset, path) -> str:
    return jobs.record_instance(InstanceRecord(
        ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality,
        str(ds.file_meta.TransferSyntaxUID), str(path), "0" * 64, 1, "TEST", "p-x"))


def test_quiet_period_selection_and_reopen(tmp_path):
    jobs = JobStore(tmp_path / "jobs.sqlite3")
    study = "1.2.826.0.1.3680043.8.498.1"
    lat = make_cr_dataset(view_position="LL", study_instance_uid=study)
    assert _record(jobs, lat, write(lat, tmp_path / "lat.dcm")) == "new"
    assert _record(jobs, lat, tmp_path / "lat.dcm") == "duplicate"
    assert jobs.studies_ready(quiet_seconds=60) == []  # still inside the quiet period
    [(uid, last)] = jobs.studies_ready(quiet_seconds=0, now=time.time() + 1)
    sel = decide_study(jobs, uid, last)
    assert sel is not None and sel.chosen is None
    assert jobs.study(study)["state"] == "skipped" and "lateral" in jobs.study(study)["reason"]
    # a frontal image arriving later reopens the study
    pa = make_cr_dataset(view_position="PA", study_instance_uid=study)
    assert _record(jobs, pa, write(pa, tmp_path / "pa.dcm")) == "new"
    assert jobs.study(study)["state"] == "received"
    [(uid, last)] = jobs.studies_ready(quiet_seconds=0, now=time.time() + 1)
    # an instance arriving between reading and committing the decision wins: the study waits again
    assert decide_study(jobs, uid, last - 1) is None
    sel = decide_study(jobs, uid, last)
    row = jobs.study(study)
    assert row["state"] == "selected" and row["selected_sop_instance_uid"] == pa.SOPInstanceUID
    assert row["rule"] == "ViewPosition"
    late = make_cr_dataset(view_position="PA", study_instance_uid=study)
    job = jobs.claim_job("w1", lease_seconds=60)
    assert job is not None and job.sop_instance_uid == pa.SOPInstanceUID
    assert _record(jobs, late, write(late, tmp_path / "late.dcm")) == "late"
    assert jobs.claim_job("w2", lease_seconds=60) is None  # leased
    states = [e["state"] for e in jobs.events(study)]
    assert states == ["received", "skipped", "received", "selected", "inferring"]
    jobs.close()


def test_expired_lease_is_taken_again_and_attempts_are_bounded(tmp_path):
    jobs = JobStore(tmp_path / "jobs.sqlite3")
    ds = make_cr_dataset()
    _record(jobs, ds, write(ds, tmp_path / "a.dcm"))
    [(uid, last)] = jobs.studies_ready(0, now=time.time() + 1)
    decide_study(jobs, uid, last)
    for attempt in (1, 2, 3):
        job = jobs.claim_job(f"w{attempt}", lease_seconds=0.01, max_interrupted=3)
        assert job is not None and job.attempts == attempt
        time.sleep(0.02)
    assert jobs.claim_job("w4", lease_seconds=0.01, max_interrupted=3) is None
    row = jobs.study(ds.StudyInstanceUID)
    assert row["state"] == "failed" and "3 attempts" in row["reason"]
    jobs.close()
