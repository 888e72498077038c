"""The operations page and its API/CLI (dicom_node/operations.py).

* CLI, over a real job store driven through its own methods and the real outbox: ``jobs --json``
  carries the per-stage timeline, ``outbox retry`` keeps the attempt history, ``outbox retry 999``
  is an error (exit 2), ``jobs --study`` lists per-instance decisions without --json, and a
  delivered study stays delivered when a re-send to a since-renamed destination is dead-lettered.
* API, against a running node with the tiny model: a CR whose folder destination is broken (the
  path is a file) ends dead-lettered; list, detail, timeline, auth; the folder comes back, a retry
  delivers it, the attempt history shows both; a re-run replaces the outputs (one delivery row).
* Headless Chromium: the page lists the study with patient/accession/date, opens its timeline,
  retries the delivery through the confirmation dialog and shows it delivered; the file really is
  in the folder. Screenshot to docs/screenshots/operations.png with RADVLM_UPDATE_SCREENSHOT=1.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest

from config.settings import Settings
from dicom_node.audit import AuditLog
from dicom_node.cli import main
from dicom_node.jobstore import InstanceDecision, InstanceRecord, JobStore
from dicom_node.metrics import Metrics
from dicom_node.outbox import Outbox
from dicom_node.service import Node
from tests.api_node_helpers import TOKEN, http
from tests.conftest_node import free_port, storescu, wait_for
from tests.dicom_samples import chest_phantom, make_cr_dataset, write

DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "screenshots" / "operations.png"
PATIENT = "Operations^Olivia"
PATIENT_ID = "OPS-PID-7731"
ACCESSION = "ACC-OPS-42"


# ---- CLI over a job store ---------------------------------------------------------------------
def _config(tmp_path: Path, destinations: list[dict] | None = None) -> Path:
    data = tmp_path / "data"
    lines = ["[node]", f'data_dir = "{data}"', "max_delivery_tries = 1", ""]
    for d in destinations or []:
        lines += ["[[destinations]]"] + [f'{k} = "{v}"' for k, v in d.items()] + [""]
    path = tmp_path / "radvlm.toml"
    path.write_text("\n".join(lines))
    return path


def _written_study(tmp_path: Path, destination: str = "archive") -> tuple[JobStore, str, str, int]:
    """A study through ingest, selection and inference to 'written' with one queued delivery."""
    jobs = JobStore(tmp_path / "data" / "jobs.sqlite3")
    ds = make_cr_dataset(patient_name=PATIENT, patient_id=PATIENT_ID)
    path = write(ds, tmp_path / "cr.dcm")
    rec = InstanceRecord(ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, "CR",
                         str(ds.file_meta.TransferSyntaxUID), str(path), "0" * 64, path.stat().st_size, "PACS", "h1")
    assert jobs.record_instance(rec) == "new"
    [(study, last)] = jobs.studies_ready(0)
    assert jobs.apply_selection(study, last, ds.SOPInstanceUID, "ViewPosition", "frontal chest: PA",
                                [InstanceDecision(ds.SOPInstanceUID, "selected", "frontal chest: ViewPosition PA")])
    job = jobs.claim_job("test-worker", 60)
    assert job is not None
    results = tmp_path / "data" / "results" / study
    results.mkdir(parents=True)
    (results / "result.json").write_text("{}")
    assert jobs.mark_written(job, str(results), [(destination, "folder", [str(results / "result.json")])])
    [delivery] = jobs.deliveries(study_uid=study)
    return jobs, study, ds.SOPInstanceUID, delivery.id


def _outbox(settings: Settings, jobs: JobStore, tmp_path: Path) -> Outbox:
    return Outbox(settings, jobs, AuditLog(tmp_path / "audit.jsonl"), Metrics(), threading.Event())


def test_outbox_retry_keeps_attempt_history(tmp_path, capsys):
    broken = tmp_path / "archive"
    broken.write_text("a file where the folder should be")
    config = _config(tmp_path, [{"kind": "folder", "name": "archive", "path": str(broken)}])
    settings = Settings.model_validate({"node": {"data_dir": str(tmp_path / "data"), "max_delivery_tries": 1},
                                        "destinations": [{"kind": "folder", "name": "archive", "path": str(broken)}]})
    jobs, study, _, delivery_id = _written_study(tmp_path)
    outbox = _outbox(settings, jobs, tmp_path)
    assert outbox.run_once("archive")
    assert jobs.delivery(delivery_id).state == "dead"

    broken.unlink()
    broken.mkdir()  # the destination came back
    assert main(["outbox", "retry", str(delivery_id), "--config", str(config)]) == 0
    assert "1 deliveries queued again" in capsys.readouterr().out
    assert outbox.run_once("archive")
    assert (broken / study / "result.json").exists()

    assert main(["outbox", "list", "--json", "--config", str(config)]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["state"] == "delivered" and row["attempts_total"] == 2
    assert [a["outcome"] for a in row["attempts"]] == ["dead", "requeued", "delivered"]
    assert "cannot write to folder" in row["attempts"][0]["error"]
    assert jobs.study(study)["state"] == "delivered"


def test_outbox_retry_unknown_id_is_an_error(tmp_path, capsys):
    config = _config(tmp_path)
    jobs, study, _, delivery_id = _written_study(tmp_path)
    assert main(["outbox", "retry", "999", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert "no delivery with id 999" in captured.err and "queued" not in captured.out
    # a mix of known and unknown ids queues nothing
    assert main(["outbox", "retry", str(delivery_id), "999", "--config", str(config)]) == 2
    assert jobs.delivery_attempts(delivery_id) == []
    assert main(["outbox", "retry", "--study", "1.2.3.999", "--config", str(config)]) == 2
    assert "no study 1.2.3.999" in capsys.readouterr().err


def test_jobs_json_has_timeline_and_study_table_shows_decisions(tmp_path, capsys):
    config = _config(tmp_path)
    jobs, study, sop, _ = _written_study(tmp_path)
    assert main(["jobs", "--json", "--config", str(config)]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert set(row["states"]) == {"received", "selected", "inferring", "written", "delivered"}
    assert all(row["states"][s] for s in ("received", "selected", "inferring", "written"))
    assert row["states"]["delivered"] is None
    stages = [s["stage"] for s in row["timeline"]]
    assert stages == ["received", "selected", "inferring", "written", "delivered"]
    assert all(isinstance(s["seconds_to_next"], float) and s["seconds_to_next"] >= 0 for s in row["timeline"][:3])
    assert row["timeline"][3]["seconds_to_next"] is None

    assert main(["jobs", "--study", study, "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "instances:" in out and sop in out and "selected: frontal chest: ViewPosition PA" in out
    assert "timeline:" in out and "written" in out and "deliveries:" in out and "archive: pending" in out
    assert PATIENT not in out and PATIENT_ID not in out  # the CLI shows no patient data


def test_resend_to_renamed_destination_keeps_study_delivered(tmp_path):
    old = tmp_path / "old-folder"
    old.mkdir()
    before = Settings.model_validate({"node": {"data_dir": str(tmp_path / "data")},
                                      "destinations": [{"kind": "folder", "name": "archive", "path": str(old)}]})
    jobs, study, _, delivery_id = _written_study(tmp_path)
    assert _outbox(before, jobs, tmp_path).run_once("archive")
    assert jobs.study(study)["state"] == "delivered"

    # the destination is renamed in the config; an old delivery to "archive" is re-sent
    after = Settings.model_validate({"node": {"data_dir": str(tmp_path / "data")},
                                     "destinations": [{"kind": "folder", "name": "archive-2", "path": str(old)}]})
    from dicom_node.commands import retry_outbox

    assert retry_outbox(after, [delivery_id], include_delivered=True) == 1
    assert jobs.study(study)["state"] == "delivered"
    assert _outbox(after, jobs, tmp_path).run_once(unconfigured=True)
    delivery = jobs.delivery(delivery_id)
    assert delivery.state == "dead" and "no longer configured" in delivery.last_error
    assert jobs.study(study)["state"] == "delivered", jobs.study(study)["reason"]
    assert [a["outcome"] for a in jobs.delivery_attempts(delivery_id)] == ["delivered", "requeued", "dead"]


# ---- a running node -----------------------------------------------------------------------------
def _start_node(tmp_path: Path, model_dir: Path) -> tuple[Node, str, Path]:
    """A node whose folder destination is broken (a file sits at its path): the study's delivery
    is dead-lettered after one try, the study failed."""
    folder = tmp_path / "archive"
    folder.write_text("not a folder yet")
    settings = Settings.model_validate({
        "model": {"path": str(model_dir), "max_new_tokens": 8},
        "inference": {"max_grounding_questions": 1, "phrase_grounding": False},
        "node": {"data_dir": str(tmp_path / "data"), "port": free_port(), "bind": "127.0.0.1",
                 "http_port": free_port(), "min_free_space_mb": 0, "quiet_period_seconds": 0.2,
                 "poll_interval_seconds": 0.1, "max_delivery_tries": 1},
        "api": {"token": TOKEN},
        "sr": {"gsps_enabled": False},
        "destinations": [{"kind": "folder", "name": "archive", "path": str(folder)}],
    })
    node = Node(settings).start()
    try:
        ds = make_cr_dataset(rows=256, columns=208, pixel_array=chest_phantom(256, 208), patient_name=PATIENT,
                             patient_id=PATIENT_ID, AccessionNumber=ACCESSION, StudyDate="20261130",
                             WindowCenter=2048, WindowWidth=4096)
        sent = storescu(node.scp_port, [write(ds, tmp_path / "cr.dcm")], calling="PACS")
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: (node.jobs.study(ds.StudyInstanceUID) or {"state": None})["state"] == "failed", 120,
                 what="the study's delivery dead-lettered")
    except BaseException:
        node.stop(grace_seconds=5)
        raise
    return node, ds.StudyInstanceUID, folder


def test_operations_api(tmp_path, tiny_model_dir, caplog):
    caplog.set_level(logging.DEBUG)
    node, study, folder = _start_node(tmp_path, tiny_model_dir)
    base = f"http://127.0.0.1:{node.http_port}/api/operations"
    try:
        for method, path in (("GET", "/queue"), ("GET", "/studies"), ("GET", f"/studies/{study}"),
                             ("GET", f"/studies/{study}/timeline"), ("GET", "/deliveries"),
                             ("POST", f"/studies/{study}/rerun"), ("POST", "/deliveries/1/retry")):
            status, body, _ = http(method, base + path, token=None)
            assert status == 401, (path, body)
            assert PATIENT.split("^")[0] not in body.decode()
            assert http(method, base + path, token="wrong")[0] == 401
        assert node.jobs.study(study)["state"] == "failed"  # the unauthenticated POSTs changed nothing

        status, body, _ = http("GET", base + "/studies")
        assert status == 200
        data = json.loads(body)
        [row] = [s for s in data["studies"] if s["study_instance_uid"] == study]
        assert (row["patient_name"], row["patient_id"], row["accession_number"], row["study_date"]) == (
            PATIENT, PATIENT_ID, ACCESSION, "2026-11-30")
        assert row["state"] == "failed" and row["deliveries"] == {"archive": "dead"}
        assert row["selection_rule"] and row["reason"] == "delivery dead-lettered: archive"
        assert data["queue"]["deliveries_dead"] == 1 and data["throughput"]["last_hour"]["studies_written"] == 1

        status, body, _ = http("GET", f"{base}/studies/{study}")
        detail = json.loads(body)
        stages = {s["stage"]: s for s in detail["timeline"]["stages"]}
        assert all(stages[s]["at"] for s in ("received", "selected", "inferring", "written"))
        assert stages["delivered"]["at"] is None
        assert stages["inferring"]["seconds_to_next"] > 0  # the tiny model took some time
        assert detail["timeline"]["ended"]["state"] == "failed"
        assert [d["decision"] for d in detail["decisions"]] == ["selected"]
        [delivery] = detail["deliveries"]
        assert delivery["state"] == "dead" and delivery["attempts_total"] == 1
        [attempt] = delivery["attempts"]
        assert attempt["outcome"] == "dead" and "cannot write to folder" in attempt["error"]
        assert json.loads(http("GET", f"{base}/studies/{study}/timeline")[1])["stages"] == detail["timeline"]["stages"]
        assert http("GET", f"{base}/studies/1.2.3.4")[0] == 404
        assert http("POST", f"{base}/deliveries/999/retry")[0] == 404
        assert http("POST", f"{base}/studies/1.2.3.4/rerun")[0] == 404

        folder.unlink()
        folder.mkdir()  # the destination came back
        status, body, _ = http("POST", f"{base}/deliveries/{delivery['id']}/retry")
        assert status == 200 and json.loads(body) == {"id": delivery["id"], "queued": 1, "was": "dead"}
        wait_for(lambda: node.jobs.study(study)["state"] == "delivered", 60, what="the retried delivery")
        assert (folder / study / "sr.dcm").exists()
        [delivery] = json.loads(http("GET", f"{base}/studies/{study}")[1])["deliveries"]
        assert [a["outcome"] for a in delivery["attempts"]] == ["dead", "requeued", "delivered"]

        # re-run: the outputs are replaced, the delivery row reused (never a duplicate)
        first_sr = (folder / study / "sr.dcm").read_bytes()
        status, body, _ = http("POST", f"{base}/studies/{study}/rerun")
        assert status == 200 and json.loads(body)["was"] == "delivered"
        wait_for(lambda: node.jobs.study(study)["state"] == "delivered"
                 and (folder / study / "sr.dcm").read_bytes() != first_sr, 120, what="the re-run delivered")
        assert len(node.jobs.deliveries(study_uid=study)) == 1
        [again] = node.jobs.deliveries(study_uid=study)
        assert sorted(p.name for p in (folder / study).iterdir()) == sorted(Path(f).name for f in again.files)
        timeline = json.loads(http("GET", f"{base}/studies/{study}/timeline")[1])
        assert timeline["runs"] == 2 and timeline["ended"] is None and timeline["total_seconds"] > 0
    finally:
        node.stop(grace_seconds=5)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert PATIENT not in logged and PATIENT_ID not in logged and ACCESSION not in logged


def test_operations_page_retry_redelivers(tmp_path, tiny_model_dir, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    node, study, folder = _start_node(tmp_path, tiny_model_dir)
    wait = WebDriverWait(browser, 60, poll_frequency=0.2)
    try:
        browser.get(f"http://127.0.0.1:{node.http_port}/viewer/operations.html")
        wait.until(lambda d: d.find_element(By.ID, "token-input").is_displayed())
        browser.find_element(By.ID, "token-input").send_keys(TOKEN)
        browser.find_element(By.ID, "token-save").click()

        row = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f'#studies tr[data-uid="{study}"]'))
        assert row.get_attribute("data-state") == "failed"
        assert PATIENT in row.text and PATIENT_ID in row.text and ACCESSION in row.text and "2026-11-30" in row.text
        assert "archive: dead" in row.text
        wait.until(lambda d: "1 dead" in d.find_element(By.ID, "queue").text)
        row.click()

        wait.until(lambda d: d.find_element(By.ID, "detail").get_attribute("data-uid") == study)
        stages = browser.find_elements(By.CSS_SELECTOR, "#timeline li")
        assert [s.get_attribute("data-stage") for s in stages] == ["received", "selected", "inferring", "written",
                                                                   "delivered"]
        assert [s.get_attribute("class") for s in stages] == ["reached"] * 4 + ["missing"]
        assert "→" in stages[2].text  # inferring → written took a duration
        assert "cannot write to folder" in browser.find_element(By.CSS_SELECTOR, "#deliveries .delivery").text

        folder.unlink()
        folder.mkdir()  # the destination came back
        # a cancelled confirmation does nothing
        browser.find_element(By.CSS_SELECTOR, "#deliveries button.retry").click()
        wait.until(lambda d: d.find_element(By.ID, "confirm").get_attribute("open") is not None)
        browser.find_element(By.ID, "confirm-cancel").click()
        assert node.jobs.deliveries(study_uid=study)[0].state == "dead"
        browser.find_element(By.CSS_SELECTOR, "#deliveries button.retry").click()
        wait.until(lambda d: d.find_element(By.ID, "confirm").get_attribute("open") is not None)
        assert "Retry delivery" in browser.find_element(By.ID, "confirm-text").text
        browser.find_element(By.ID, "confirm-ok").click()

        wait.until(lambda d: d.find_element(By.ID, "detail").get_attribute("data-state") == "delivered")
        delivery = browser.find_element(By.CSS_SELECTOR, "#deliveries .delivery")
        assert delivery.get_attribute("data-state") == "delivered"
        outcomes = [r.get_attribute("data-outcome") for r in delivery.find_elements(By.CSS_SELECTOR, ".attempts tr")]
        assert outcomes == ["dead", "requeued", "delivered"]
        assert (folder / study / "sr.dcm").exists()
        assert browser.find_element(By.CSS_SELECTOR, "#timeline li[data-stage=delivered]").get_attribute(
            "class") == "reached"
        browser.save_screenshot(str(tmp_path / "operations.png"))
        assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        node.stop(grace_seconds=5)
    assert (tmp_path / "operations.png").stat().st_size > 10_000
    if os.environ.get("RADVLM_UPDATE_SCREENSHOT"):  # refresh the docs picture on purpose, never in CI
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "operations.png", DOCS_SCREENSHOT)
