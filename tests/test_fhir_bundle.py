"""FHIR R4 bundle: validation with fhir.resources.R4B and acceptance by a real FHIR server
(fhirsnake, FastAPI in-memory, started here with uvicorn on loopback)."""

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

import pytest
from fhir.resources.R4B.bundle import Bundle

from config.settings import SRSettings
from sr_writer import write_outputs
from sr_writer.fhir import build_bundle, bundle_json, resources_for_individual_upsert
from tests.test_sr_support import full_result, make_cr, make_result

SETTINGS = SRSettings()


def _types(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["resourceType"] for e in bundle["entry"]]


def test_bundle_validates_and_has_the_contract() -> None:
    source = make_cr(600, 500)
    result = full_result(source)
    text = bundle_json(build_bundle(result, source, SETTINGS))
    Bundle.model_validate_json(text)  # strict R4B validation of the serialised form
    data = json.loads(text)
    assert data["type"] == "transaction"
    assert _types(data)[:3] == ["Patient", "Device", "ImagingStudy"] and _types(data)[-1] == "DiagnosticReport"
    urls = {e["fullUrl"] for e in data["entry"]}
    for entry in data["entry"]:
        assert entry["request"]["method"] == "POST" and entry["request"]["ifNoneExist"].startswith("identifier=")
    report = data["entry"][-1]["resource"]
    assert report["status"] == "preliminary"
    assert report["code"]["coding"][0] == {"system": "http://loinc.org", "code": "36554-4",
                                           "display": "XR Chest Single view"}
    assert {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
            "display": "Radiology"} in report["category"][0]["coding"]
    assert report["conclusion"] == result.findings_text
    assert [c["text"] for c in report["conclusionCode"]] == ["cardiomegaly", "pleural effusion"]
    assert report["imagingStudy"][0]["reference"] in urls
    assert all(r["reference"] in urls for r in report["result"])
    assert "UNVERIFIED AI RESULT" in base64.b64decode(report["presentedForm"][0]["data"]).decode()
    patient = data["entry"][0]["resource"]
    assert patient["identifier"][0]["value"] == "PAT-001"
    assert report["subject"]["identifier"]["value"] == "PAT-001"
    study = data["entry"][2]["resource"]
    assert study["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{source.StudyInstanceUID}"}
    assert study["series"][0]["instance"][0]["uid"] == source.SOPInstanceUID
    observations = [e["resource"] for e in data["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert len(observations) == 5  # one per grounded box
    first = observations[0]
    assert first["derivedFrom"][0]["reference"] == report["imagingStudy"][0]["reference"]
    assert first["bodySite"]["coding"][0]["code"] == "80891009"
    box = {c["code"]["coding"][0]["code"]: c["valueQuantity"]["value"] for c in first["component"]}
    assert [box[k] for k in ("x1", "y1", "x2", "y2")] == [0.3, 0.4, 0.75, 0.8]
    assert [box[k] for k in ("column1", "row1", "column2", "row2")] == [150.0, 240.0, 375.0, 480.0]
    assert first["component"][0]["code"]["coding"][0]["system"] == \
        "https://radvlm.invalid/fhir/CodeSystem/box"
    # deterministic: the same result gives the same bundle identifiers
    again = json.loads(bundle_json(build_bundle(result, source, SETTINGS)))
    assert [e["fullUrl"] for e in again["entry"]] == [e["fullUrl"] for e in data["entry"]]


def test_empty_result_still_gives_a_valid_bundle(tmp_path: Path) -> None:
    source = make_cr(300, 200)
    result = make_result(source, labels={}, findings=None)
    path = write_outputs(result, source, SETTINGS, fhir_path=tmp_path / "b.json").fhir_path
    data = json.loads(path.read_text())
    Bundle.model_validate(data)
    assert _types(data) == ["Patient", "Device", "ImagingStudy", "DiagnosticReport"]
    assert "conclusionCode" not in data["entry"][-1]["resource"]


def test_if_none_exist_is_an_encoded_query_of_the_whole_patient_id() -> None:
    # "identifier=sys|12&34+5#6" unencoded is a search for Patient ID "12" (another patient)
    from urllib.parse import parse_qs, urlsplit

    source = make_cr(300, 200, patient_id="12&34+5#6,7")
    data = json.loads(bundle_json(build_bundle(full_result(source), source, SETTINGS)))
    patient = data["entry"][0]
    assert patient["resource"]["resourceType"] == "Patient"
    query = patient["request"]["ifNoneExist"]
    assert urlsplit("Patient?" + query).fragment == ""
    (value,) = parse_qs(query, strict_parsing=True)["identifier"]
    system, _, patient_id = value.partition("|")
    assert system == patient["resource"]["identifier"][0]["system"]
    assert patient_id.replace("\\,", ",") == "12&34+5#6,7"
    for entry in data["entry"]:
        assert set(parse_qs(entry["request"]["ifNoneExist"], strict_parsing=True)) == {"identifier"}


def test_label_without_box_gets_an_observation() -> None:
    source = make_cr(300, 200)
    result = make_result(source, labels={"pneumothorax": True, "edema": False})
    data = json.loads(bundle_json(build_bundle(result, source, SETTINGS)))
    (obs,) = [e["resource"] for e in data["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert obs["code"]["coding"][0]["code"] == "36118008" and "component" not in obs


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

    # so each resource is sent alone, references rewritten from urn:uuid to Type/id
    resources_a = resources_for_individual_upsert(bundle_a)
    resources_b = resources_for_individual_upsert(bundle_b)
    shared = {r["id"] for r in resources_a} & {r["id"] for r in resources_b}
    assert [r["resourceType"] for r in resources_a if r["id"] in shared] == ["Device"]
    for resource in resources_a + [r for r in resources_b if r["id"] not in shared]:
        status, body = _http("POST", f"{base}/{resource['resourceType']}", resource)
        assert status == 200, body
    report_a = resources_a[-1]
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
