"""Against a real Orthanc (Debian package) on loopback: Orthanc auto-routes a chest CR to the
node with the Lua script from docs/orthanc-routing.lua; the node's SR comes back into the same
patient/study as a new series, over DICOM (C-STORE) and DICOMweb (STOW-RS). Orthanc is down
when the result is first ready: the node retries and delivers when it is back, no duplicates."""

from __future__ import annotations

import pydicom

from dicom_node.commands import list_jobs, list_outbox, retry_outbox
from dicom_node.service import Node
from tests.conftest_node import ROUTING_LUA, Orthanc, storescu, wait_for
from tests.test_node_pipeline import node_settings


def _series_by_modality(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict]]:
    found = [f for f in orthanc.get_post("/tools/lookup", study_uid) if f["Type"] == "Study"]
    if not found:
        return {}
    result: dict[str, list[dict]] = {}
    for series in orthanc.get(f"/studies/{found[0]['ID']}/series"):
        result.setdefault(series["MainDicomTags"].get("Modality", ""), []).append(series)
    return result


def test_orthanc_routes_to_node_and_receives_sr_despite_outage(tmp_path, tiny_model_dir, rg1_j2kr):
    orthanc = Orthanc(tmp_path / "orthanc", lua=ROUTING_LUA.read_text())
    settings = node_settings(tmp_path, tiny_model_dir, [
        {"kind": "dicom", "host": "127.0.0.1", "port": orthanc.dicom_port, "ae_title": "ORTHANC", "name": "orthanc"},
        {"kind": "dicomweb", "url": f"http://127.0.0.1:{orthanc.http_port}/dicom-web", "name": "orthanc-web"},
    ], quiet_period_seconds=3.0, allowed_calling_ae_titles=["ORTHANC"], http_enabled=False)
    orthanc.node_port = settings.node.port
    node = Node(settings).start()
    try:
        orthanc.start()
        source = pydicom.dcmread(rg1_j2kr, stop_before_pixels=True)
        study = source.StudyInstanceUID
        sent = storescu(orthanc.dicom_port, [rg1_j2kr], called="ORTHANC", calling="MODALITY", options=["-xv"])
        assert "(Success)" in sent.stdout + sent.stderr, sent.stdout + sent.stderr
        # Orthanc's Lua routes the CR to the node; as soon as the node has it, Orthanc goes down
        wait_for(lambda: list_jobs(settings, study_uid=study) if settings.node.data_dir.joinpath(
            "jobs.sqlite3").exists() else None, 60, what="routed instance at the node")
        orthanc.stop()
        wait_for(lambda: (rows := list_outbox(settings)) and all(r["tries"] >= 2 for r in rows), 120,
                 what="failed delivery attempts while Orthanc is down")
        assert list_jobs(settings, study_uid=study)[0]["state"] == "written"
        orthanc.start()
        wait_for(lambda: list_jobs(settings, study_uid=study)[0]["state"] == "delivered", 120,
                 what="delivery after Orthanc came back")
        by_modality = _series_by_modality(orthanc, study)
        assert set(by_modality) >= {"CR", "SR"}
        assert len(by_modality["SR"]) == 1 and len(by_modality["SR"][0]["Instances"]) == 1
        sr_id = by_modality["SR"][0]["Instances"][0]
        tags = orthanc.get(f"/instances/{sr_id}/simplified-tags")
        assert tags["StudyInstanceUID"] == study and tags["PatientID"] == source.PatientID
        assert tags["SeriesInstanceUID"] != source.SeriesInstanceUID
        assert tags["VerificationFlag"] == "UNVERIFIED"
        patients = orthanc.get("/patients")
        assert len(patients) == 1
        total = len(orthanc.instances_of_study(study))

        # re-send everything (DICOM + STOW-RS of the same deterministic UIDs): no duplicates
        assert retry_outbox(settings, study_uid=study, include_delivered=True) == 2
        wait_for(lambda: all(r["state"] == "delivered" and r["tries"] == 1 for r in list_outbox(settings)), 60,
                 what="re-send")
        assert len(orthanc.instances_of_study(study)) == total
        assert len(_series_by_modality(orthanc, study)["SR"][0]["Instances"]) == 1
    finally:
        node.stop(grace_seconds=10)
        orthanc.stop()

