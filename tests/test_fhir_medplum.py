"""The FHIR transaction against a strict, real FHIR R4 server: Medplum's router
(@medplum/fhir-router 5.2.13) over its in-memory repository, validating every write like the
Medplum server does (tests/peers/medplum/server.mjs, run here with Debian's Node.js on loopback).

Medplum refuses a transaction of more than 8 conditional creates ("requires strict isolation"),
so these tests fail if the bundle goes back to ``ifNoneExist`` entries; and they count resources
after re-sending, so they fail if a re-send duplicates anything.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from config.settings import FhirDestination, SRSettings
from dicom_node.destinations import send_fhir
from sr_writer import write_outputs
from sr_writer.fhir import build_bundle, bundle_json
from tests.test_fhir_bundle import adversarial_result
from tests.test_sr_support import full_result, make_cr

PEER = Path(__file__).resolve().parent / "peers" / "medplum"
SETTINGS = SRSettings(fhir_patient_identifier_system="https://ehr.example.org/mrn")
TYPES = ("Patient", "Device", "ImagingStudy", "Observation", "DiagnosticReport", "Provenance")


class Medplum:
    """The peer server process; ``base`` is its FHIR R4 base URL."""

    def __init__(self, log_path: Path) -> None:
        node = shutil.which("node")
        if node is None:
            pytest.skip("node not installed (Debian package 'nodejs', scripts/apt-packages.txt)")
        if not (PEER / "node_modules" / "@medplum" / "fhir-router").is_dir():
            pytest.skip("Medplum peer not installed: npm ci --prefix tests/peers/medplum (scripts/test.sh does it)")
        self.log = open(log_path, "w+b")
        self.proc = subprocess.Popen([node, "--experimental-websocket", str(PEER / "server.mjs"), "--port", "0"],
                                     cwd=PEER, stdout=subprocess.PIPE, stderr=self.log)
        line = self._first_line(timeout=60)
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"Medplum peer did not start: {line!r} {log_path.read_text(errors='replace')[-2000:]}")
        self.base = line.split(" ", 1)[1].strip()
        assert self.base.startswith("http://127.0.0.1:")

    def _first_line(self, timeout: float) -> str:
        import selectors

        assert self.proc.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if selector.select(timeout=0.2):
                return self.proc.stdout.readline().decode(errors="replace")
            if self.proc.poll() is not None:
                return ""
        return ""

    def request(self, method: str, path: str, body: Any | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.base}/{path.lstrip('/')}", data=data, method=method,
                                         headers={"Content-Type": "application/fhir+json",
                                                  "Accept": "application/fhir+json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def count(self, resource_type: str, query: str = "") -> int:
        status, bundle = self.request("GET", f"{resource_type}?_total=accurate{'&' + query if query else ''}")
        assert status == 200, bundle
        return int(bundle["total"])

    def counts(self) -> dict[str, int]:
        return {t: self.count(t) for t in TYPES}

    def read(self, reference: str) -> dict[str, Any]:
        status, resource = self.request("GET", reference)
        assert status == 200, (reference, resource)
        return resource

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


@pytest.fixture()
def medplum(tmp_path: Path) -> Iterator[Medplum]:
    server = Medplum(tmp_path / "medplum.log")
    try:
        yield server
    finally:
        server.stop()


def _written_bundle(tmp_path: Path, source: Any, result: Any | None = None) -> dict[str, Any]:
    result = result if result is not None else full_result(source)
    out = write_outputs(result, source, SETTINGS, sr_path=tmp_path / f"{source.SOPInstanceUID}.sr.dcm",
                        gsps_path=tmp_path / f"{source.SOPInstanceUID}.pr.dcm",
                        fhir_path=tmp_path / f"{source.SOPInstanceUID}.json")
    return json.loads(out.fhir_path.read_text(encoding="utf-8"))


def _post(medplum: Medplum, bundle: dict[str, Any]) -> tuple[int, list[str]]:
    status, answer = medplum.request("POST", "", bundle)
    statuses = [e["response"]["status"] for e in answer.get("entry", [])] if isinstance(answer, dict) else []
    return status, statuses if status == 200 else [json.dumps(answer)[:300]]


def test_transaction_twice_is_accepted_resolved_and_never_duplicated(medplum: Medplum, tmp_path: Path) -> None:
    source = make_cr(600, 500, patient_id="MP-001")
    bundle = _written_bundle(tmp_path, source)
    assert len(bundle["entry"]) == 10  # > 8: the size Medplum refused as conditional creates

    first_status, first = _post(medplum, bundle)
    assert first_status == 200, first
    assert all(s.startswith("2") for s in first), first
    after_first = medplum.counts()
    second_status, second = _post(medplum, bundle)
    assert second_status == 200, second
    assert all(s.startswith("2") for s in second), second
    after_second = medplum.counts()
    print(f"\nMedplum first post: HTTP {first_status}, entries {first}\n"
          f"Medplum second post: HTTP {second_status}, entries {second}\n"
          f"resources after first {after_first}, after second {after_second}")
    assert after_first == after_second == {"Patient": 1, "Device": 1, "ImagingStudy": 1, "Observation": 5,
                                           "DiagnosticReport": 1, "Provenance": 1}

    # read back: every reference of the DiagnosticReport resolves on the server
    report_entry = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    report = medplum.read(report_entry["request"]["url"])
    assert report["status"] == "preliminary"
    patient = medplum.read(report["subject"]["reference"])
    assert patient["identifier"][0] == {"system": "https://ehr.example.org/mrn:HOSP-A", "value": "MP-001"}
    study = medplum.read(report["imagingStudy"][0]["reference"])
    assert study["subject"]["reference"] == report["subject"]["reference"]
    assert [s["modality"]["code"] for s in study["series"]] == ["CR", "SR", "PR"]
    sr = pydicom.dcmread(tmp_path / f"{source.SOPInstanceUID}.sr.dcm")
    assert study["series"][1]["instance"][0]["uid"] == sr.SOPInstanceUID
    for reference in report["result"]:
        observation = medplum.read(reference["reference"])
        assert observation["subject"]["reference"] == report["subject"]["reference"]
        medplum.read(observation["device"]["reference"])
        assert observation["derivedFrom"][0]["reference"] == report["imagingStudy"][0]["reference"]
    assert base64.b64decode(report["presentedForm"][1]["data"]).decode().startswith("<!DOCTYPE html>")
    # searchable by the identifiers the SR carries (Observation identifier = SR tracking UID)
    observation = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation")
    uid = observation["identifier"][0]["value"]
    assert medplum.count("Observation", f"identifier=urn:dicom:uid|{uid}") == 1
    assert medplum.count("ImagingStudy", f"identifier=urn:dicom:uid|urn:oid:{source.StudyInstanceUID}") == 1


def test_second_study_of_the_same_patient_shares_patient_and_device(medplum: Medplum, tmp_path: Path) -> None:
    first, second = make_cr(600, 500, patient_id="MP-002"), make_cr(600, 500, patient_id="MP-002")
    for source in (first, second, first):
        status, statuses = _post(medplum, _written_bundle(tmp_path, source))
        assert status == 200 and all(s.startswith("2") for s in statuses), statuses
    assert medplum.counts() == {"Patient": 1, "Device": 1, "ImagingStudy": 2, "Observation": 10,
                                "DiagnosticReport": 2, "Provenance": 2}


def test_adversarial_model_text_is_accepted(medplum: Medplum, tmp_path: Path) -> None:
    source = make_cr(300, 200, patient_id="MP-003")
    bundle = _written_bundle(tmp_path, source, adversarial_result(source))
    assert len(json.dumps(bundle)) > 100_000
    status, statuses = _post(medplum, bundle)
    assert status == 200 and all(s.startswith("2") for s in statuses), statuses
    report = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    stored = medplum.read(report["request"]["url"])
    assert stored["conclusion"] == report["resource"]["conclusion"]
    # the server's validator does refuse what the cleaning removed: a control character in a string
    raw = json.loads(json.dumps(report["resource"]))
    raw["conclusion"] = "Heart \x01 enlarged"
    status, outcome = medplum.request("PUT", report["request"]["url"], raw)
    assert status == 400 and "Invalid string format" in json.dumps(outcome)


def test_conditional_creates_are_what_medplum_refuses(medplum: Medplum, tmp_path: Path) -> None:
    """Why the entries are PUTs: the same bundle as conditional creates is refused outright."""
    source = make_cr(600, 500, patient_id="MP-004")
    bundle = _written_bundle(tmp_path, source)
    for entry in bundle["entry"]:
        resource = entry["resource"]
        identifier = resource.get("identifier", [{}])[0]
        entry["request"] = {"method": "POST", "url": resource["resourceType"],
                            "ifNoneExist": f"_id={resource['id']}" if not identifier else
                            f"identifier={identifier.get('system', '')}|{identifier.get('value', '')}"}
    status, statuses = _post(medplum, bundle)
    print(f"\nMedplum, the same bundle as conditional creates: HTTP {status} {statuses}")
    assert status == 400 and "strict isolation" in statuses[0]
    assert medplum.counts() == dict.fromkeys(TYPES, 0)


def test_node_fhir_sender_delivers_to_medplum(medplum: Medplum, tmp_path: Path) -> None:
    source = make_cr(600, 500, patient_id="MP-005")
    out = write_outputs(full_result(source), source, SETTINGS, sr_path=tmp_path / "sr.dcm",
                        fhir_path=tmp_path / "bundle.json")
    destination = FhirDestination(kind="fhir", url=medplum.base)
    send_fhir(destination, [out.fhir_path], 10)
    send_fhir(destination, [out.fhir_path], 10)  # a re-send (outbox retry, `radvlm outbox retry --resend`)
    assert medplum.counts() == {"Patient": 1, "Device": 1, "ImagingStudy": 1, "Observation": 5,
                                "DiagnosticReport": 1, "Provenance": 1}
