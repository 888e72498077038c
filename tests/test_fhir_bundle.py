"""FHIR R4 bundle: the contract (PUT entries, deterministic ids, references, Observation <-> SR
link, ImagingStudy listing SR/GSPS, presentedForm, text safety, empty Patient ID rule), validation
with fhir.resources.R4B, and acceptance by fhirsnake (FastAPI in-memory, started here with uvicorn
on loopback; no transactions: resources PUT one by one). The strict transaction server (Medplum)
is tested in tests/test_fhir_medplum.py."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import re
from xml.etree import ElementTree

import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from config.settings import Settings, SRSettings
from inference.result import Box
from sr_writer import write_outputs
from sr_writer.fhir import (FhirSubjectError, build_bundle, bundle_json, put_transaction,
                            resources_for_individual_upsert)
from sr_writer.text import ALTERED_NOTICE
from tests.test_sr_support import full_result, make_cr, make_result

SETTINGS = SRSettings()


def _types(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["resourceType"] for e in bundle["entry"]]


def _by_ref(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{e['resource']['resourceType']}/{e['resource']['id']}": e["resource"] for e in bundle["entry"]}


def _references(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "reference" and isinstance(v, str)] + \
            [r for k, v in node.items() if k != "reference" for r in _references(v)]
    if isinstance(node, list):
        return [r for v in node for r in _references(v)]
    return []


def _tracking_uids(sr: Any) -> list[str]:
    """Tracking Unique Identifier (DCM 112040) values of an SR content tree, in document order."""
    found: list[str] = []

    def walk(items: Any) -> None:
        for item in items or []:
            name = item.get("ConceptNameCodeSequence")
            if name and name[0].CodeValue == "112040" and item.get("ValueType") == "UIDREF":
                found.append(str(item.UID))
            walk(item.get("ContentSequence"))

    walk(sr.ContentSequence)
    return found


def test_bundle_validates_and_has_the_contract(tmp_path: Path) -> None:
    source = make_cr(600, 500)
    result = full_result(source)
    written = write_outputs(result, source, SETTINGS, sr_path=tmp_path / "sr.dcm", gsps_path=tmp_path / "pr.dcm",
                            fhir_path=tmp_path / "b.json")
    text = written.fhir_path.read_text(encoding="utf-8")
    Bundle.model_validate_json(text)  # strict R4B validation of the serialised form
    data = json.loads(text)
    assert data["type"] == "transaction"
    assert _types(data)[:3] == ["Patient", "Device", "ImagingStudy"]
    assert _types(data)[-2:] == ["DiagnosticReport", "Provenance"]
    # every entry an idempotent PUT at a deterministic Type/id; every reference resolves in the bundle
    resources = _by_ref(data)
    for entry in data["entry"]:
        resource = entry["resource"]
        assert entry["request"] == {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}
        assert entry["fullUrl"] == f"urn:uuid:{resource['id']}"
        assert "ifNoneExist" not in entry["request"]
        assert re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", resource["id"])
    assert set(_references(data)) <= set(resources)
    report = data["entry"][-2]["resource"]
    assert report["status"] == "preliminary"
    assert report["code"]["coding"][0] == {"system": "http://loinc.org", "code": "36554-4",
                                           "display": "XR Chest Single view"}
    assert {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
            "display": "Radiology"} in report["category"][0]["coding"]
    assert report["conclusion"] == result.findings_text
    assert [c["text"] for c in report["conclusionCode"]] == ["cardiomegaly", "pleural effusion"]
    assert report["imagingStudy"][0]["reference"].startswith("ImagingStudy/")
    plain, page = (base64.b64decode(form["data"]).decode() for form in report["presentedForm"])
    assert [f["contentType"] for f in report["presentedForm"]] == ["text/plain; charset=utf-8",
                                                                   "text/html; charset=utf-8"]
    assert "UNVERIFIED AI RESULT" in plain and result.findings_text in plain
    assert result.findings_text in page and ElementTree.fromstring(page.split(">", 1)[1])  # well-formed XHTML
    assert report["presentedForm"][0]["size"] == len(plain.encode())
    ElementTree.fromstring(report["text"]["div"])
    assert "meta" not in report  # no profile claimed (docs/fhir.md)
    sr = pydicom.dcmread(written.sr_path)
    gsps = pydicom.dcmread(written.gsps_path)
    assert {"system": "urn:dicom:uid", "value": f"urn:oid:{sr.SOPInstanceUID}",
            "type": {"text": "DICOM SR SOP Instance UID"}} in report["identifier"]
    patient = data["entry"][0]["resource"]
    assert patient["identifier"][0]["value"] == "PAT-001"
    assert report["subject"] == {"reference": f"Patient/{patient['id']}", "identifier": patient["identifier"][0]}
    study = data["entry"][2]["resource"]
    assert study["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{source.StudyInstanceUID}"}
    # the ImagingStudy lists the source image and the SR and GSPS written with it
    assert [(s["uid"], s["modality"]["code"], s["instance"][0]["uid"]) for s in study["series"]] == [
        (source.SeriesInstanceUID, "CR", source.SOPInstanceUID),
        (sr.SeriesInstanceUID, "SR", sr.SOPInstanceUID),
        (gsps.SeriesInstanceUID, "PR", gsps.SOPInstanceUID)]
    assert study["numberOfSeries"] == 3 and study["numberOfInstances"] == 3
    observations = [e["resource"] for e in data["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert len(observations) == 5  # one per grounded box
    # Observation <-> SR: each box Observation's identifier is its SR group's Tracking Unique Identifier
    tracking = _tracking_uids(sr)
    for observation in observations:
        uid = observation["identifier"][0]["value"].removeprefix("urn:oid:")
        assert uid in tracking
    first = observations[0]
    assert first["derivedFrom"][0]["reference"] == report["imagingStudy"][0]["reference"]
    assert first["device"]["reference"] == f"Device/{data['entry'][1]['resource']['id']}"
    assert first["bodySite"]["coding"][0]["code"] == "80891009"
    box = {c["code"]["coding"][0]["code"]: c["valueQuantity"]["value"] for c in first["component"]}
    assert [box[k] for k in ("x1", "y1", "x2", "y2")] == [0.3, 0.4, 0.75, 0.8]
    assert [box[k] for k in ("column1", "row1", "column2", "row2")] == [150.0, 240.0, 375.0, 480.0]
    assert first["component"][0]["code"]["coding"][0]["system"] == \
        "https://radvlm.invalid/fhir/CodeSystem/box"
    provenance = data["entry"][-1]["resource"]
    assert provenance["agent"][0]["who"] == first["device"]
    assert provenance["target"][0]["reference"] == f"DiagnosticReport/{report['id']}"
    # deterministic: the same result gives the same bundle, ids and all
    again = json.loads(bundle_json(build_bundle(result, source, SETTINGS, sr=sr, gsps=gsps)))
    assert again == data


def test_empty_result_still_gives_a_valid_bundle(tmp_path: Path) -> None:
    source = make_cr(300, 200)
    result = make_result(source, labels={}, findings=None)
    path = write_outputs(result, source, SETTINGS, fhir_path=tmp_path / "b.json").fhir_path
    data = json.loads(path.read_text())
    Bundle.model_validate(data)
    assert _types(data) == ["Patient", "Device", "ImagingStudy", "DiagnosticReport", "Provenance"]
    assert "conclusionCode" not in data["entry"][-2]["resource"]
    assert "result" not in data["entry"][-2]["resource"]


def test_patient_id_depends_on_the_identifier_only() -> None:
    # two studies of one patient PUT one Patient; another issuer's equal ID is another Patient
    first, second = make_cr(300, 200, patient_id="12&34+5#6,7"), make_cr(300, 200, patient_id="12&34+5#6,7")
    other_issuer = make_cr(300, 200, patient_id="12&34+5#6,7")
    other_issuer.IssuerOfPatientID = "HOSP-B"
    patients = []
    for source in (first, second, other_issuer):
        data = json.loads(bundle_json(build_bundle(full_result(source), source, SETTINGS)))
        patient = data["entry"][0]["resource"]
        assert patient["resourceType"] == "Patient"
        assert patient["identifier"][0]["value"] == "12&34+5#6,7"  # the whole ID, as itself
        patients.append(patient["id"])
        assert data["entry"][1]["resource"]["id"] == json.loads(bundle_json(build_bundle(
            full_result(first), first, SETTINGS)))["entry"][1]["resource"]["id"]  # one Device per model
    assert patients[0] == patients[1] != patients[2]


def test_patient_identifier_system() -> None:
    source = make_cr(300, 200)
    unset = json.loads(bundle_json(build_bundle(full_result(source), source, SETTINGS)))["entry"][0]["resource"]
    assert unset["identifier"] == [{"value": "PAT-001", "assigner": {"display": "HOSP-A"}}]
    site = SRSettings(fhir_patient_identifier_system="https://ehr.example.org/mrn")
    configured = json.loads(bundle_json(build_bundle(full_result(source), source, site)))["entry"][0]["resource"]
    assert configured["identifier"] == [{"system": "https://ehr.example.org/mrn:HOSP-A", "value": "PAT-001"}]
    source.IssuerOfPatientID = "1.2.826.0.1.3680043.10.99"
    oid = json.loads(bundle_json(build_bundle(full_result(source), source, site)))["entry"][0]["resource"]
    assert oid["identifier"] == [{"system": "urn:oid:1.2.826.0.1.3680043.10.99", "value": "PAT-001"}]
    del source.IssuerOfPatientID
    plain = json.loads(bundle_json(build_bundle(full_result(source), source, site)))["entry"][0]["resource"]
    assert plain["identifier"] == [{"system": "https://ehr.example.org/mrn", "value": "PAT-001"}]


def test_a_fhir_destination_needs_the_patient_identifier_system() -> None:
    fhir = {"kind": "fhir", "url": "http://127.0.0.1:1/fhir"}
    with pytest.raises(ValidationError, match="fhir_patient_identifier_system"):
        Settings.model_validate({"destinations": [fhir]})
    Settings.model_validate({"destinations": [fhir],
                             "sr": {"fhir_patient_identifier_system": "https://ehr.example.org/mrn"}})
    Settings.model_validate({"destinations": [{"kind": "folder", "path": "/tmp/x"}]})


def test_empty_patient_id_skips_fhir_but_writes_sr(tmp_path: Path) -> None:
    source = make_cr(300, 200, patient_id="")
    result = full_result(source)
    (tmp_path / "b.json").write_text("stale")
    written = write_outputs(result, source, SETTINGS, sr_path=tmp_path / "sr.dcm", gsps_path=tmp_path / "pr.dcm",
                            fhir_path=tmp_path / "b.json")
    assert written.sr_path.is_file() and written.gsps_path.is_file()
    assert written.fhir_path is None and not (tmp_path / "b.json").exists()
    assert "empty Patient ID" in written.fhir_skipped_reason
    with pytest.raises(FhirSubjectError):
        build_bundle(result, source, SETTINGS)


def test_empty_patient_id_without_subject_when_allowed() -> None:
    source = make_cr(300, 200, patient_id="")
    settings = SRSettings(fhir_without_patient_id="no-subject")
    data = json.loads(bundle_json(build_bundle(full_result(source), source, settings)))
    Bundle.model_validate(data)
    assert "Patient" not in _types(data) and "ImagingStudy" not in _types(data)  # ImagingStudy.subject is 1..1
    assert all("subject" not in e["resource"] for e in data["entry"])
    assert set(_references(data)) <= set(_by_ref(data))
    report = data["entry"][-2]["resource"]
    assert source.StudyInstanceUID in base64.b64decode(report["presentedForm"][0]["data"]).decode()


def test_label_without_box_gets_an_observation() -> None:
    source = make_cr(300, 200)
    result = make_result(source, labels={"pneumothorax": True, "edema": False})
    data = json.loads(bundle_json(build_bundle(result, source, SETTINGS)))
    (obs,) = [e["resource"] for e in data["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert obs["code"]["coding"][0]["code"] == "36118008" and "component" not in obs


ADVERSARIAL = ("Heart <b>enlarged</b> & <script>alert('x')</script> \x00\x01\x1b[31m\x7f\x85 "
               "\ud800 lone surrogate \udfff, \ufffe, bidi \u202e tfel\u202c ]]> --> </div> " + "word " * 20_000)


def adversarial_result(source: Any) -> Any:
    """A result whose report and grounded phrase hold control characters, lone surrogates, HTML
    and ~100 kB of text (what a random-weight model can emit)."""
    result = make_result(source, findings=ADVERSARIAL, phrase_boxes={
        "Opacity \x00\x07 <img src=x onerror=alert(1)> \ud83d": [Box(x1=0.1, y1=0.1, x2=0.4, y2=0.5)]})
    return result


def test_adversarial_model_text_is_cleaned_escaped_and_recorded() -> None:
    source = make_cr(300, 200)
    text = bundle_json(build_bundle(adversarial_result(source), source, SETTINGS))
    Bundle.model_validate_json(text)
    text.encode("utf-8")  # no lone surrogates left
    data = json.loads(text)
    for value in _strings(data):
        assert not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\u202e]", value), value[:80]
    report = data["entry"][-2]["resource"]
    assert report["conclusion"].endswith(ALTERED_NOTICE)
    assert len(report["conclusion"]) <= 65536 + len(ALTERED_NOTICE) + 2
    div = ElementTree.fromstring(report["text"]["div"])  # well-formed: the model's tags are text
    assert not [e for e in div.iter() if e.tag.split("}")[-1] in ("script", "img", "div") and e is not div]
    assert "<script>" in "".join(div.itertext())
    page = base64.b64decode(report["presentedForm"][1]["data"]).decode()
    assert "<script>" not in page and "&lt;script&gt;" in page and ALTERED_NOTICE in page
    (phrase,) = [e["resource"] for e in data["entry"] if "component" in e["resource"]]
    assert ALTERED_NOTICE in [n["text"] for n in phrase["note"]]


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def test_clean_model_text_is_not_marked_altered() -> None:
    source = make_cr(300, 200)
    data = json.loads(bundle_json(build_bundle(full_result(source), source, SETTINGS)))
    assert ALTERED_NOTICE not in json.dumps(data)


def test_upsert_resources_of_a_legacy_conditional_create_bundle() -> None:
    # a bundle.json written by an earlier version (POST + ifNoneExist, urn:uuid references) still
    # becomes plain Type/id resources, e.g. when it waits in the outbox across an upgrade
    legacy = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:0b8c3b0e-2f9a-5d0e-9a57-1c1d2f3e4a5b",
         "resource": {"resourceType": "Patient", "identifier": [{"system": "urn:x", "value": "1"}]},
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:x|1"}},
        {"fullUrl": "urn:uuid:1b8c3b0e-2f9a-5d0e-9a57-1c1d2f3e4a5b",
         "resource": {"resourceType": "Observation", "status": "preliminary", "code": {"text": "x"},
                      "subject": {"reference": "urn:uuid:0b8c3b0e-2f9a-5d0e-9a57-1c1d2f3e4a5b"}},
         "request": {"method": "POST", "url": "Observation", "ifNoneExist": "identifier=urn:x|2"}}]}
    patient, observation = resources_for_individual_upsert(Bundle.model_validate(legacy))
    assert patient["id"] == "0b8c3b0e-2f9a-5d0e-9a57-1c1d2f3e4a5b"
    assert observation["subject"] == {"reference": f"Patient/{patient['id']}"}
    transaction = put_transaction([patient, observation])
    Bundle.model_validate(transaction)
    assert [e["request"]["method"] for e in transaction["entry"]] == ["PUT", "PUT"]


# --- a real FHIR server ------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: Any | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/fhir+json",
                                              "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw or b"null")
        except ValueError:
            return exc.code, raw.decode(errors="replace")


@pytest.fixture()
def fhirsnake(tmp_path: Path) -> Iterator[str]:
    """fhirsnake's FastAPI app under uvicorn on 127.0.0.1 (it has no CLI: it imports its sibling
    module ``files`` and reads ./resources, so run with --app-dir = its package, cwd = tmp)."""
    try:
        import fhirsnake as package
        import uvicorn  # noqa: F401
    except ImportError:
        pytest.skip("fhirsnake/uvicorn not installed (pip install -e '.[test]')")
    (tmp_path / "resources").mkdir()
    port = _free_port()
    log = open(tmp_path / "fhirsnake.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", os.path.dirname(package.__file__),
         "main:app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if _http("GET", base + "/")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("fhirsnake did not start: " + (tmp_path / "fhirsnake.log").read_text())
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_fhirsnake_accepts_the_bundle(fhirsnake: str) -> None:
    base = fhirsnake
    source_a = make_cr(600, 500, patient_id="PAT-A01")
    source_b = make_cr(600, 500, patient_id="PAT-B02", patient_name="ROE^RICHARD")
    bundle_a = build_bundle(full_result(source_a), source_a, SETTINGS)
    bundle_b = build_bundle(full_result(source_b), source_b, SETTINGS)

    # fhirsnake 1.1 has no transaction endpoint (POST [base] with a Bundle): record that.
    status, _ = _http("POST", base + "/", json.loads(bundle_json(bundle_a)))
    assert status in (404, 405), "fhirsnake now answers transactions: update the test and the docs"

    # so each resource is sent alone (ids and Type/id references are already in the bundle)
    resources_a = resources_for_individual_upsert(bundle_a)
    resources_b = resources_for_individual_upsert(bundle_b)
    shared = {r["id"] for r in resources_a} & {r["id"] for r in resources_b}
    assert [r["resourceType"] for r in resources_a if r["id"] in shared] == ["Device"]
    for resource in resources_a + [r for r in resources_b if r["id"] not in shared]:
        status, body = _http("POST", f"{base}/{resource['resourceType']}", resource)
        assert status == 200, body
    report_a = resources_a[-2]
    assert report_a["resourceType"] == "DiagnosticReport"

    status, stored = _http("GET", f"{base}/DiagnosticReport/{report_a['id']}")
    assert status == 200 and stored["status"] == "preliminary"
    assert stored["subject"]["identifier"]["value"] == "PAT-A01"
    patient_ref = stored["subject"]["reference"]
    status, _ = _http("GET", f"{base}/{patient_ref}")
    assert status == 200

    # search by subject: fhirsnake ignores every search parameter but _id and returns all of a
    # type, so filter the searchset client side and record that it did not filter.
    status, searchset = _http("GET", f"{base}/DiagnosticReport?subject={patient_ref}")
    assert status == 200 and searchset["type"] == "searchset"
    mine = [e["resource"] for e in searchset["entry"] if e["resource"]["subject"]["reference"] == patient_ref]
    assert [r["id"] for r in mine] == [report_a["id"]]
    assert searchset["total"] == 2, "fhirsnake filters by subject now: tighten this test"
    status, by_id = _http("GET", f"{base}/DiagnosticReport?_id={report_a['id']}")
    assert status == 200 and by_id["total"] == 1

    # posting twice: no conditional create (ifNoneExist is a transaction feature), but our ids
    # are deterministic, so a second POST is refused as a duplicate and PUT is an idempotent upsert.
    for resource in resources_a:
        status, body = _http("POST", f"{base}/{resource['resourceType']}", resource)
        assert status == 400 and "already exists" in json.dumps(body)
        status, _ = _http("PUT", f"{base}/{resource['resourceType']}/{resource['id']}", resource)
        assert status == 200
    status, all_reports = _http("GET", f"{base}/DiagnosticReport")
    assert all_reports["total"] == 2
    status, observations = _http("GET", f"{base}/Observation")
    assert observations["total"] == 10  # 5 boxes per patient, none duplicated


def test_node_upsert_sender_delivers_to_fhirsnake(fhirsnake: str, tmp_path: Path) -> None:
    from config.settings import FhirDestination
    from dicom_node.destinations import send_fhir

    source = make_cr(600, 500, patient_id="PAT-C03")
    path = write_outputs(full_result(source), source, SETTINGS, fhir_path=tmp_path / "bundle.json").fhir_path
    destination = FhirDestination(kind="fhir", url=fhirsnake, mode="upsert")
    send_fhir(destination, [path], 10)
    send_fhir(destination, [path], 10)  # a re-send replaces, never duplicates
    totals = {kind: _http("GET", f"{fhirsnake}/{kind}")[1]["total"]
              for kind in ("Patient", "Device", "ImagingStudy", "Observation", "DiagnosticReport", "Provenance")}
    assert totals == {"Patient": 1, "Device": 1, "ImagingStudy": 1, "Observation": 5, "DiagnosticReport": 1,
                      "Provenance": 1}
