"""Selection never stalls on a bad header, and ranks frontal candidates as documented
(for-presentation before for-processing, ORIGINAL before DERIVED); evaluation counts a box as a
hit only at IoU ≥ 0.5 (upstream ``evaluate_boxes``)."""

from __future__ import annotations

import time

from dicom_node.jobstore import InstanceRecord, JobStore
from dicom_node.scheduler import decide_study
from dicom_node.selector import Candidate, classify, select
from tests.dicom_samples import DEFAULT_PATIENT_NAME, make_cr_dataset, write
from tests.reliability.harness import with_raw_value
from training.evaluation.grounding import box_iou, grounding_metrics, sample_average_precision, upstream_grounding_map


def _cands(*datasets) -> list[Candidate]:
    return [Candidate(str(ds.SOPInstanceUID), ds, None, order) for order, ds in enumerate(datasets)]


def test_for_presentation_is_chosen_over_a_larger_earlier_for_processing_image():
    processing = make_cr_dataset(modality="DX", view_position="PA", rows=64, columns=64,
                                 PresentationIntentType="FOR PROCESSING")
    presentation = make_cr_dataset(modality="DX", view_position="PA", rows=32, columns=32,
                                   PresentationIntentType="FOR PRESENTATION")
    assert select(_cands(processing, presentation)).chosen == presentation.SOPInstanceUID


def test_original_is_chosen_over_a_larger_earlier_derived_image():
    derived = make_cr_dataset(view_position="PA", rows=64, columns=64, ImageType=["DERIVED", "SECONDARY"])
    original = make_cr_dataset(view_position="PA", rows=32, columns=32, ImageType=["ORIGINAL", "PRIMARY"])
    assert select(_cands(derived, original)).chosen == original.SOPInstanceUID


def test_poison_number_of_frames_is_one_decision_not_a_stalled_study():
    poison = with_raw_value(make_cr_dataset(view_position="PA"), "NumberOfFrames", "IS", b"ab")
    c = classify(Candidate(str(poison.SOPInstanceUID), poison))
    assert c.decision == "unreadable-header" and c.rule == "NumberOfFrames"
    assert "NumberOfFrames" in c.reason and "'ab'" not in c.reason
    good = make_cr_dataset(view_position="PA", study_instance_uid=poison.StudyInstanceUID)
    selection = select(_cands(poison, good))
    assert selection.chosen == good.SOPInstanceUID


def test_free_text_values_never_reach_a_reason():
    ds = make_cr_dataset(view_position=None, SeriesDescription=f"PA chest of {DEFAULT_PATIENT_NAME}")
    c = classify(Candidate(str(ds.SOPInstanceUID), ds))
    assert c.decision == "frontal" and "Testpatient" not in c.reason and "SeriesDescription" in c.reason
    odd = make_cr_dataset(BodyPartExamined="Doe^John")
    c = classify(Candidate(str(odd.SOPInstanceUID), odd))
    assert c.decision == "non-chest" and "Doe" not in c.reason.upper() and "BodyPartExamined" in c.reason


def test_study_of_poison_headers_only_is_decided_and_later_studies_follow(tmp_path):
    jobs = JobStore(tmp_path / "jobs.sqlite3")
    try:
        poison = with_raw_value(make_cr_dataset(view_position="PA"), "NumberOfFrames", "IS", b"ab")
        good = make_cr_dataset(view_position="PA")
        for ds in (poison, good):
            path = write(ds, tmp_path / f"{ds.SOPInstanceUID}.dcm")
            jobs.record_instance(InstanceRecord(ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID,
                                                ds.SeriesInstanceUID, "CR", None, str(path), "0" * 64, 1, "T", None))
        for study, last in jobs.studies_ready(0, now=time.time() + 1):
            decide_study(jobs, study, last)
        assert jobs.study(poison.StudyInstanceUID)["state"] == "skipped"
        assert "NumberOfFrames" in jobs.study(poison.StudyInstanceUID)["reason"]
        assert jobs.instance(poison.SOPInstanceUID)["decision"] == "unreadable-header"
        assert jobs.study(good.StudyInstanceUID)["state"] == "selected"
    finally:
        jobs.close()


def test_iou_threshold_is_one_half():
    reference = [[0.0, 0.0, 1.0, 1.0]]
    near = [[0.0, 0.0, 0.4, 1.0]]  # IoU 0.4: a miss at 0.5, a hit at 0.3
    hit = [[0.0, 0.0, 0.5, 1.0]]  # IoU exactly 0.5: a hit
    assert abs(box_iou(near[0], reference[0]) - 0.4) < 1e-9
    assert sample_average_precision(near, reference) == 0.0
    assert sample_average_precision(hit, reference) == 1.0
    records = [{"output": "The lesion is located at the coordinates [0.0, 0.0, 0.4, 1.0] on the image.",
                "boxes": reference}]
    assert upstream_grounding_map(records)["mAP_0.5"] == 0.0
    assert grounding_metrics(records)["mAP_0.5"] == 0.0
