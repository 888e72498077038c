"""FHIR R4 transaction Bundle of one study result (design §3 "FHIR"), built with
``fhir.resources.R4B`` (the package's top level is R5; EHRs speak R4).

Entries (each a conditional create, ``ifNoneExist`` on a stable identifier, so re-sending the
bundle does not duplicate on a server that supports conditional create):

- Patient (optional, ``SRSettings.fhir_include_patient``): identifiers from the source DICOM;
- Device: the model (name, version, weights hash);
- ImagingStudy: Study Instance UID as ``urn:oid:`` identifier, the series and instance;
- Observation per grounded box (finding code, bodySite, ``derivedFrom`` the ImagingStudy, the box
  as components in the node's code system ``{fhir_code_system_base}/box``, docs/codes.md) and per
  positive label without a box;
- DiagnosticReport: ``preliminary``, category RAD, LOINC 36554-4, conclusion = findings text,
  conclusionCode = positive labels, presentedForm = plain-text report with the notice.

References between entries use ``urn:uuid:`` full URLs derived deterministically from the source
SOP Instance UID and model version. :func:`resources_for_individual_upsert` turns the bundle into
plain ``Type/id`` resources for servers without transaction support (e.g. fhirsnake).
"""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from fhir.resources.R4B.bundle import Bundle
from pydicom import Dataset

from config.settings import SRSettings
from inference.labels import LABELS
from inference.result import UNVERIFIED_NOTICE, StudyResult
from sr_writer import codes
from sr_writer.common import check_source, region_boxes, study_datetime
from sr_writer.errors import WriterError
from sr_writer.uids import derived_uid, derived_uuid, model_uid, model_uuid

DICOM_UID_SYSTEM = "urn:dicom:uid"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
UCUM = "http://unitsofmeasure.org"
BOX_COMPONENTS = (("x1", "box left, fraction of image width (columns)"),
                  ("y1", "box top, fraction of image height (rows)"),
                  ("x2", "box right, fraction of image width (columns)"),
                  ("y2", "box bottom, fraction of image height (rows)"))
PIXEL_COMPONENTS = (("column1", "box left, DICOM pixel column (0 = left edge of first column)"),
                    ("row1", "box top, DICOM pixel row (0 = top edge of first row)"),
                    ("column2", "box right, DICOM pixel column"),
                    ("row2", "box bottom, DICOM pixel row"))


def _iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat(timespec="seconds")


def _concept(code: Any, text: str | None = None) -> dict[str, Any]:
    concept: dict[str, Any] = {"coding": [codes.fhir_coding(code)]}
    if text:
        concept["text"] = text
    return concept


def patient_identifier(source: Dataset, settings: SRSettings) -> dict[str, str]:
    """Patient.identifier from Patient ID and its issuer (ISO OID issuers become ``urn:oid:``)."""
    patient_id = str(source.get("PatientID", "") or "").strip()
    if not patient_id:
        raise WriterError("source has no Patient ID: the FHIR subject cannot be identified")
    system = settings.fhir_patient_identifier_system
    qualifiers = source.get("IssuerOfPatientIDQualifiersSequence")
    issuer = str(source.get("IssuerOfPatientID", "") or "").strip()
    if qualifiers and qualifiers[0].get("UniversalEntityIDType") == "ISO" and \
            qualifiers[0].get("UniversalEntityID"):
        system = f"urn:oid:{qualifiers[0].UniversalEntityID}"
    elif re.fullmatch(r"[0-2](\.(0|[1-9][0-9]*))+", issuer):
        system = f"urn:oid:{issuer}"
    elif issuer:
        system = f"{system}:{quote(issuer, safe='')}"
    return {"system": system, "value": patient_id}


def _patient(source: Dataset, identifier: dict[str, str]) -> dict[str, Any]:
    patient: dict[str, Any] = {"resourceType": "Patient", "identifier": [identifier]}
    name = source.get("PatientName")
    if name:
        entry: dict[str, Any] = {"text": str(name).replace("^", " ").strip()}
        if name.family_name:
            entry["family"] = name.family_name
        given = [g for g in (name.given_name, name.middle_name) if g]
        if given:
            entry["given"] = given
        patient["name"] = [entry]
    sex = str(source.get("PatientSex", "") or "").upper()
    patient["gender"] = {"M": "male", "F": "female", "O": "other"}.get(sex, "unknown")
    birth = str(source.get("PatientBirthDate", "") or "")
    if re.fullmatch(r"\d{8}", birth):
        patient["birthDate"] = f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"
    return patient


class _Ids:
    """Deterministic full URLs and identifiers of one result's resources."""

    def __init__(self, result: StudyResult, settings: SRSettings) -> None:
        self.sop = str(result.source.sop_instance_uid)
        self.version = result.model.version
        self.root = settings.uid_root

    def full_url(self, purpose: str) -> str:
        return f"urn:uuid:{derived_uuid(self.sop, self.version, 'fhir-' + purpose)}"

    def identifier(self, purpose: str) -> dict[str, str]:
        return {"system": DICOM_UID_SYSTEM,
                "value": "urn:oid:" + derived_uid(self.sop, self.version, purpose, root=self.root)}


def identifier_query(identifier: dict[str, str]) -> str:
    """``identifier=system|value`` as a URL query: ``\\ | , $`` in either part escaped with a
    backslash (FHIR search escaping), then percent-encoded, so a Patient ID such as ``12&34`` or
    ``A+B#1`` is searched as itself, never as ``12`` (another patient's record)."""
    def escape(text: str) -> str:
        return re.sub(r"([\\|,$])", r"\\\1", text)

    return "identifier=" + quote(f"{escape(identifier['system'])}|{escape(identifier['value'])}", safe=":/|")


def _entry(full_url: str, resource: dict[str, Any], if_none_exist: dict[str, str]) -> dict[str, Any]:
    return {"fullUrl": full_url, "resource": resource,
            "request": {"method": "POST", "url": resource["resourceType"],
                        "ifNoneExist": identifier_query(if_none_exist)}}


def build_bundle(result: StudyResult, source: Dataset, settings: SRSettings) -> Bundle:
    """The transaction Bundle for ``result``; patient identifiers come from ``source`` only."""
    check_source(result, source)
    ids = _Ids(result, settings)
    issued = _iso(result.created)
    effective = _iso(study_datetime(source) or result.created)
    pid = patient_identifier(source, settings)
    entries: list[dict[str, Any]] = []

    subject: dict[str, Any] = {"identifier": pid}
    if settings.fhir_include_patient:
        patient_url = f"urn:uuid:{derived_uuid(pid['system'], pid['value'], 'fhir-patient')}"
        entries.append(_entry(patient_url, _patient(source, pid), pid))
        subject = {"reference": patient_url, "identifier": pid}

    model = result.model
    device_url = f"urn:uuid:{model_uuid(model.model_id, model.version, model.weights_sha256)}"
    device_identifier = {"system": DICOM_UID_SYSTEM,
                         "value": "urn:oid:" + model_uid(model.model_id, model.version,
                                                         model.weights_sha256)}
    entries.append(_entry(device_url, {
        "resourceType": "Device",
        "identifier": [device_identifier],
        "status": "active",
        "manufacturer": settings.manufacturer,
        "deviceName": [{"name": model.model_id, "type": "model-name"}],
        "type": {"text": "AI algorithm (vision-language model)"},
        "version": [{"type": {"text": "model version"}, "value": model.version},
                    {"type": {"text": "weights sha256"}, "value": model.weights_sha256}],
        "note": [{"text": UNVERIFIED_NOTICE}],
    }, device_identifier))

    study_uid = str(source.StudyInstanceUID)
    study_identifier = {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}"}
    study_url = f"urn:uuid:{derived_uuid(study_uid, 'imaging-study', 'fhir-imaging-study')}"
    study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "identifier": [study_identifier],
        "status": "available",
        "subject": subject,
        "series": [{
            "uid": str(source.SeriesInstanceUID),
            "modality": {"system": codes.FHIR_SYSTEMS["DCM"], "code": str(source.get("Modality", "CR") or "CR")},
            "instance": [{"uid": str(source.SOPInstanceUID),
                          "sopClass": {"system": "urn:ietf:rfc:3986",
                                       "code": f"urn:oid:{source.SOPClassUID}"}}],
        }],
    }
    if study_datetime(source):
        study["started"] = effective
    if source.get("AccessionNumber"):
        study["identifier"].append({"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
                                    "value": str(source.AccessionNumber)})
    if source.get("StudyDescription"):
        study["description"] = str(source.StudyDescription)
    entries.append(_entry(study_url, study, study_identifier))

    common = {"status": "preliminary",
              "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging",
                                        "display": "Imaging"}]}],
              "subject": subject, "effectiveDateTime": effective, "issued": issued,
              "device": {"reference": device_url}, "derivedFrom": [{"reference": study_url}],
              "note": [{"text": UNVERIFIED_NOTICE}]}
    box_system = f"{settings.fhir_code_system_base.rstrip('/')}/box"
    observation_urls: list[str] = []
    labels_with_box: set[str] = set()
    for item in region_boxes(result):
        region = item.region
        if region.label:
            labels_with_box.add(region.label)
            code = _concept(codes.finding_for_label(region.label, region.query), region.label)
        else:
            code = _concept(codes.FINDING, region.query)
        pixels = item.box.to_pixels(result.source.columns, result.source.rows)
        components = [{"code": {"coding": [{"system": box_system, "code": c, "display": d}]},
                       "valueQuantity": {"value": round(v, 6), "unit": "1", "system": UCUM, "code": "1"}}
                      for (c, d), v in zip(BOX_COMPONENTS, item.box.as_list())]
        components += [{"code": {"coding": [{"system": box_system, "code": c, "display": d}]},
                        "valueQuantity": {"value": round(v, 3), "unit": "pixel", "system": UCUM,
                                          "code": "{pixel}"}}
                       for (c, d), v in zip(PIXEL_COMPONENTS, pixels)]
        identifier = ids.identifier(item.purpose)  # = the SR group's Tracking Unique Identifier
        observation: dict[str, Any] = {
            "resourceType": "Observation", "identifier": [identifier], **common, "code": code,
            "valueCodeableConcept": _concept(codes.PRESENT, "present"),
            "component": components,
        }
        observation["note"] = [{"text": f"{region.task}: {region.query}"}, *common["note"]]
        site = codes.site_for(region.label, region.query)
        if site is not None:
            observation["bodySite"] = _concept(site.location, " ".join(
                c.meaning.lower() for c in (site.laterality, site.modifier, site.location) if c))
        url = ids.full_url(item.purpose)
        observation_urls.append(url)
        entries.append(_entry(url, observation, identifier))
    for label in result.positive_labels:
        if label in labels_with_box:
            continue
        identifier = ids.identifier(f"label-{label}")
        observation = {"resourceType": "Observation", "identifier": [identifier], **common,
                       "code": _concept(codes.finding_for_label(label), label),
                       "valueCodeableConcept": _concept(codes.PRESENT, "present")}
        site = codes.LABEL_CODES[label].site
        if site is not None:
            observation["bodySite"] = _concept(site)
        url = ids.full_url(f"label-{label}")
        observation_urls.append(url)
        entries.append(_entry(url, observation, identifier))

    report_identifier = ids.identifier("fhir-diagnostic-report")
    positive = result.positive_labels
    text = "\n\n".join(part for part in (
        result.notice or UNVERIFIED_NOTICE,
        f"Findings: {result.findings_text.strip()}" if result.findings_text else "Findings: (none)",
        "Positive labels: " + (", ".join(positive) if positive else "none"),
        f"Model: {model.model_id} {model.version} (weights sha256 {model.weights_sha256})",
    ))
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [report_identifier],
        "status": "preliminary",
        "category": [{"coding": [codes.fhir_coding(codes.RADIOLOGY_CATEGORY_LOINC),
                                 {"system": codes.FHIR_RAD_CATEGORY_SYSTEM, "code": "RAD",
                                  "display": "Radiology"}]}],
        "code": _concept(codes.CHEST_XR_SINGLE_VIEW, "Chest X-ray (AI preliminary read)"),
        "subject": subject,
        "effectiveDateTime": effective,
        "issued": issued,
        "imagingStudy": [{"reference": study_url}],
        "result": [{"reference": url} for url in observation_urls],
        "conclusion": (result.findings_text or "").strip() or "No findings text was produced.",
        "presentedForm": [{"contentType": "text/plain; charset=utf-8", "language": "en",
                           "title": "UNVERIFIED AI RESULT",
                           "data": base64.b64encode(text.encode("utf-8")).decode("ascii")}],
    }
    conclusion_codes = [_concept(codes.finding_for_label(label), label) for label in LABELS
                        if label in positive]
    if conclusion_codes:
        report["conclusionCode"] = conclusion_codes
    entries.append(_entry(ids.full_url("diagnostic-report"), report, report_identifier))
    return Bundle.model_validate({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def bundle_json(bundle: Bundle) -> str:
    """The bundle as FHIR JSON text."""
    return bundle.model_dump_json(exclude_none=True, by_alias=True)


def resources_for_individual_upsert(bundle: Bundle) -> list[dict[str, Any]]:
    """For servers without transactions: each entry's resource with ``id`` = its ``urn:uuid``
    and references rewritten to ``Type/id``, in dependency order (PUT ``Type/id`` is then an
    idempotent, duplicate-free upsert)."""
    data = json.loads(bundle_json(bundle))
    mapping: dict[str, str] = {}
    for entry in data.get("entry", []):
        url = entry["fullUrl"]
        if not url.startswith("urn:uuid:"):
            raise WriterError(f"unexpected fullUrl {url!r}")
        mapping[url] = f"{entry['resource']['resourceType']}/{url[len('urn:uuid:'):]}"

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (mapping.get(v, v) if k == "reference" and isinstance(v, str) else rewrite(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    out = []
    for entry in data.get("entry", []):
        resource = rewrite(entry["resource"])
        resource["id"] = mapping[entry["fullUrl"]].split("/", 1)[1]
        out.append(resource)
    return out
