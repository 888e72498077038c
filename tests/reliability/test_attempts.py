"""Attempt counting (issue 12 item 9): a node crash during inference is counted apart from a
processing error, so an innocent study survives restarts while a study that keeps crashing the
node — or keeps failing in the model — ends; `radvlm jobs rerun` runs a failed study again."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dicom_node.cli import main
from dicom_node.commands import list_jobs, rerun_studies
from dicom_node.errors import NodeError
from dicom_node.jobstore import InstanceRecord, JobStore
from dicom_node.scheduler import decide_study
from tests.dicom_samples import make_cr_dataset, write


def _selected_study(tmp_path: Path, jobs: JobStore) -> str:
    ds = make_cr_dataset(view_position="PA")
    path = write(ds, tmp_path / f"{ds.SOPInstanceUID}.dcm")
    jobs.record_instance(InstanceRecord(ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                        "CR", None, str(path), "0" * 64, 1, "T", None))
    [(study, last)] = jobs.studies_ready(0, now=time.time() + 1)
    assert decide_study(jobs, study, last).chosen == ds.SOPInstanceUID
    return study


def _crash_and_restart(path: Path, max_interrupted: int = 5) -> tuple[JobStore, object]:
    """A worker claims the study and the process dies (no outcome recorded); the next start releases."""
    jobs = JobStore(path)
    jobs.release_all_leases()
    job = jobs.claim_job("node-worker", 600, max_attempts=3, max_interrupted=max_interrupted)
    jobs.close()  # the process is gone
    return job


def test_three_node_crashes_do_not_fail_an_innocent_study(tmp_path):
    db = tmp_path / "jobs.sqlite3"
    jobs = JobStore(db)
    study = _selected_study(tmp_path, jobs)
    jobs.close()
    for crash in range(3):
        assert _crash_and_restart(db) is not None, f"crash {crash + 1}"
    jobs = JobStore(db)
    try:
        jobs.release_all_leases()
        job = jobs.claim_job("node-worker", 600, max_attempts=3, max_interrupted=5)
        assert job is not None and job.attempts == 4 and job.errors == 0
        assert jobs.mark_written(job, str(tmp_path), [])
        row = jobs.study(study)
        assert row["state"] == "written" and row["interrupted"] == 3 and row["attempts"] == 0
    finally:
        jobs.close()


def test_a_study_that_keeps_crashing_the_node_ends(tmp_path):
    db = tmp_path / "jobs.sqlite3"
    jobs = JobStore(db)
    study = _selected_study(tmp_path, jobs)
    jobs.close()
    for _ in range(5):
        assert _crash_and_restart(db) is not None
    assert _crash_and_restart(db) is None
    jobs = JobStore(db)
    try:
        row = jobs.study(study)
        assert row["state"] == "failed" and "5 attempts" in row["reason"] and "interrupted" in row["reason"]
    finally:
        jobs.close()


def test_processing_errors_are_bounded_separately(tmp_path):
    jobs = JobStore(tmp_path / "jobs.sqlite3")
    try:
        study = _selected_study(tmp_path, jobs)
        for attempt in range(3):
            job = jobs.claim_job("w", 600, max_attempts=3, max_interrupted=5)
            assert job is not None and job.errors == attempt
            assert jobs.retry_job(job, "model error")
        assert jobs.claim_job("w", 600, max_attempts=3, max_interrupted=5) is None
        row = jobs.study(study)
        assert row["state"] == "failed" and "failed 3 times" in row["reason"] and row["interrupted"] == 0
        # a deferral (disk full) and a release (shutdown) are not counted at all
        jobs.rerun_study(study)
        [(uid, last)] = jobs.studies_ready(0, now=time.time() + 1)
        decide_study(jobs, uid, last)
        job = jobs.claim_job("w", 600)
        assert jobs.defer_job(job, "disk full", 0.0)
        job = jobs.claim_job("w", 600)
        assert jobs.release_job(job, "shutdown")
        row = jobs.study(study)
        assert (row["state"], row["attempts"], row["interrupted"]) == ("selected", 0, 0)
    finally:
        jobs.close()


def test_rerun_command_queues_a_failed_study_again(tmp_path, capsys):
    data = tmp_path / "data"
    config = tmp_path / "radvlm.toml"
    config.write_text(f'[node]\ndata_dir = "{data}"\n')
    jobs = JobStore(data / "jobs.sqlite3")
    study = _selected_study(tmp_path, jobs)
    job = jobs.claim_job("w", 600)
    jobs.mark_failed(job, "inference did not complete after 5 attempts")
    jobs.close()
    from config import load_settings

    settings = load_settings(config)
    assert main(["jobs", "rerun", study, "--config", str(config)]) == 0
    assert f"study {study} (failed) queued" in capsys.readouterr().out
    [row] = list_jobs(settings, study_uid=study)
    assert row["state"] == "received" and row["attempts"] == 0 and row["interrupted"] == 0
    assert all(d["decision"] is None for d in row["decisions"])
    with pytest.raises(NodeError, match="already queued or in progress"):
        rerun_studies(settings, [study])
    assert main(["jobs", "rerun", "1.2.3.999", "--config", str(config)]) == 4
    assert "no study 1.2.3.999" in capsys.readouterr().err
    assert main(["jobs", "rerun", "--config", str(config)]) == 2
