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

from config.settings import FhirDestination, Settings, SRSettings
from dicom_node.destinations import send_fhir, transaction_chunks
from inference.result import Box
from sr_writer import write_outputs
from sr_writer.fhir import build_bundle, bundle_json
from tests.test_fhir_bundle import adversarial_result
from tests.test_sr_support import full_result, make_cr, make_result

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


def test_large_bundle_goes_in_several_transactions(medplum: Medplum, tmp_path: Path) -> None:
    # Medplum refuses more than 50 updates in one transaction; the sender splits, in order
    source = make_cr(300, 200, patient_id="MP-006")
    phrases = {f"Finding number {i}.": [Box(x1=0.1, y1=0.1, x2=0.2 + i / 200, y2=0.3)] for i in range(60)}
    result = make_result(source, phrase_boxes=phrases)
    bundle = _written_bundle(tmp_path, source, result)
    assert len(bundle["entry"]) == 67
    status, statuses = _post(medplum, bundle)
    assert status == 400 and "more update operations than allowed" in statuses[0]
    path = tmp_path / "large.json"
    path.write_text(json.dumps(bundle))
    destination = FhirDestination(kind="fhir", url=medplum.base)
    assert [len(t["entry"]) for t in transaction_chunks(path.read_bytes(), 50)] == [50, 17]
    send_fhir(destination, [path], 10)
    send_fhir(destination, [path], 10)
    assert medplum.counts() == {"Patient": 1, "Device": 1, "ImagingStudy": 1, "Observation": 62,
                                "DiagnosticReport": 1, "Provenance": 1}


def test_bundle_of_an_earlier_version_is_sent_as_puts(medplum: Medplum, tmp_path: Path) -> None:
    # a bundle.json queued before the upgrade (conditional creates, urn:uuid references)
    source = make_cr(600, 500, patient_id="MP-007")
    bundle = _written_bundle(tmp_path, source)
    for entry in bundle["entry"]:
        resource = entry["resource"]
        entry["request"] = {"method": "POST", "url": resource["resourceType"], "ifNoneExist": f"_id={resource['id']}"}
        del resource["id"]
    legacy = json.loads(json.dumps(bundle).replace('"reference": "', '"reference": "urn:uuid:')
                        .replace("urn:uuid:Patient/", "urn:uuid:").replace("urn:uuid:Device/", "urn:uuid:")
                        .replace("urn:uuid:ImagingStudy/", "urn:uuid:").replace("urn:uuid:Observation/", "urn:uuid:")
                        .replace("urn:uuid:DiagnosticReport/", "urn:uuid:"))
    path = tmp_path / "legacy.json"
    path.write_text(json.dumps(legacy))
    send_fhir(FhirDestination(kind="fhir", url=medplum.base), [path], 10)
    assert medplum.counts() == {"Patient": 1, "Device": 1, "ImagingStudy": 1, "Observation": 5,
                                "DiagnosticReport": 1, "Provenance": 1}
    report = next(e["fullUrl"] for e in legacy["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    stored = medplum.read("DiagnosticReport/" + report.removeprefix("urn:uuid:"))
    medplum.read(stored["subject"]["reference"])


def test_node_delivers_to_medplum_and_an_empty_patient_id_still_gets_its_sr(
        medplum: Medplum, tmp_path: Path, tiny_model_dir: Path) -> None:
    """Through the whole node (storescu in, tiny model, outbox): the FHIR destination delivers to
    Medplum; a frontal image with an empty Patient ID (legal, Type 2) gets its SR and GSPS in the
    folder destination, no FHIR bundle, the FHIR delivery not queued and the reason audited."""
    from dicom_node.audit import read_audit
    from dicom_node.commands import list_jobs, list_outbox
    from dicom_node.service import Node
    from tests.conftest_node import storescu, wait_for
    from tests.dicom_samples import chest_phantom, make_cr_dataset, write
    from tests.test_node_pipeline import node_settings

    out_dir = tmp_path / "out"
    folder_only = node_settings(tmp_path, tiny_model_dir, [{"kind": "folder", "path": str(out_dir), "name": "archive"}],
                                http_enabled=False)
    settings = Settings.model_validate({**folder_only.model_dump(), "sr": SETTINGS.model_dump(), "destinations": [
        {"kind": "folder", "path": str(out_dir), "name": "archive"}, {"kind": "fhir", "url": medplum.base, "name": "ehr"}]})
    named = make_cr_dataset(rows=96, columns=80, pixel_array=chest_phantom(96, 80), patient_id="MP-008")
    anonymous = make_cr_dataset(rows=96, columns=80, pixel_array=chest_phantom(96, 80), patient_id="")
    node = Node(settings).start()
    try:
        files = [write(named, tmp_path / "named.dcm"), write(anonymous, tmp_path / "anonymous.dcm")]
        sent = storescu(node.scp_port, files, calling="PACS")
        assert sent.returncode == 0, sent.stderr
        for ds in (named, anonymous):
            wait_for(lambda ds=ds: (list_jobs(settings, study_uid=ds.StudyInstanceUID) or [{}])[0].get("state")
                     == "delivered", 180, what="study delivered")
    finally:
        node.stop(grace_seconds=10)
    named_dir, anonymous_dir = out_dir / named.StudyInstanceUID, out_dir / anonymous.StudyInstanceUID
    assert (named_dir / "bundle.json").is_file()
    assert (anonymous_dir / "sr.dcm").is_file() and not (anonymous_dir / "bundle.json").exists()
    sr = pydicom.dcmread(anonymous_dir / "sr.dcm")
    assert sr.StudyInstanceUID == anonymous.StudyInstanceUID and sr.PatientID == ""
    ehr = [d for d in list_outbox(settings) if d["destination"] == "ehr"]
    assert [d["study_instance_uid"] for d in ehr] == [named.StudyInstanceUID]
    assert ehr[0]["state"] == "delivered"
    skipped = [e for e in read_audit(tmp_path / "data" / "audit.jsonl") if e["event"] == "fhir_skipped"]
    assert [e["study_instance_uid"] for e in skipped] == [anonymous.StudyInstanceUID]
    assert "empty Patient ID" in skipped[0]["reason"]
    counts = medplum.counts()
    assert counts["DiagnosticReport"] == 1 and counts["Patient"] == 1 and counts["ImagingStudy"] == 1
    assert medplum.count("Patient", "identifier=https://ehr.example.org/mrn|MP-008") == 1
    bundle = json.loads((named_dir / "bundle.json").read_text())
    report_url = next(e["request"]["url"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    stored = medplum.read(report_url)
    assert medplum.read(stored["subject"]["reference"])["identifier"][0]["value"] == "MP-008"


def test_logical_subject_and_no_subject_bundles_are_accepted(medplum: Medplum, tmp_path: Path) -> None:
    source = make_cr(300, 200, patient_id="MP-009")
    no_patient = SETTINGS.model_copy(update={"fhir_include_patient": False})
    logical = json.loads(bundle_json(build_bundle(full_result(source), source, no_patient)))
    anonymous = make_cr(300, 200, patient_id="")
    unattached = json.loads(bundle_json(build_bundle(
        full_result(anonymous), anonymous, SETTINGS.model_copy(update={"fhir_without_patient_id": "no-subject"}))))
    for bundle in (logical, unattached):
        status, statuses = _post(medplum, bundle)
        assert status == 200 and all(s.startswith("2") for s in statuses), statuses
    counts = medplum.counts()
    assert counts["Patient"] == 0 and counts["ImagingStudy"] == 1 and counts["DiagnosticReport"] == 2
