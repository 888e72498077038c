"""FHIR R4 transaction Bundle of one study result (design §3 "FHIR"), built with
``fhir.resources.R4B`` (the package's top level is R5; EHRs speak R4). docs/fhir.md says what it
holds and which profile requirements are deliberately not met.

Every entry is an idempotent ``PUT Type/<id>`` with a deterministic logical id, so sending the
bundle again replaces instead of duplicating, on every server (conditional creates need
"strict isolation" on Medplum, which then refuses transactions of more than 8 entries, and mixing
them with upserts produced duplicates). References between entries are ``Type/id``. The ids:

- Patient (optional, ``SRSettings.fhir_include_patient``): from its identifier (system, value),
  so every study of one patient PUTs the same Patient;
- Device (the model): from model id + version + weights hash;
- ImagingStudy: from the Study Instance UID; lists the source image and the SR/GSPS series written
  with it (their deterministic UIDs);
- Observation per grounded box (identifier = the SR measurement group's Tracking Unique
  Identifier, so SR and FHIR name one finding alike) and per positive label without a box;
- DiagnosticReport (``preliminary``, LOINC 36554-4, conclusion, conclusionCode, presentedForm as
  plain text and HTML, narrative) and a Provenance naming the Device as author:
  from the source SOP Instance UID + model version + purpose (``sr_writer.uids.fhir_id``).

Every string from the model passes through :func:`sr_writer.text.fhir_string`; when any was
altered, the DiagnosticReport conclusion, its presentedForm and the affected Observation say so
(:data:`sr_writer.text.ALTERED_NOTICE`). HTML and narrative are escaped.

:func:`resources_for_individual_upsert` gives the plain resources for servers without
transactions (PUT each, e.g. fhirsnake).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from fhir.resources.R4B.bundle import Bundle
from pydicom import Dataset

from config.settings import SRSettings
from inference.labels import LABELS
from inference.result import DEMONSTRATION_LABEL, UNVERIFIED_NOTICE, StudyResult
from sr_writer import codes
from sr_writer.common import check_source, region_boxes, study_datetime
from sr_writer.errors import SourceAttributeError, WriterError
from sr_writer.text import ALTERED_NOTICE, fhir_string
from sr_writer.uids import derived_uid, derived_uuid, fhir_id, model_uid, model_uuid

DICOM_UID_SYSTEM = "urn:dicom:uid"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
UCUM = "http://unitsofmeasure.org"
XHTML_NAMESPACE = "http://www.w3.org/1999/xhtml"
BOX_COMPONENTS = (("x1", "box left, fraction of image width (columns)"),
                  ("y1", "box top, fraction of image height (rows)"),
                  ("x2", "box right, fraction of image width (columns)"),
                  ("y2", "box bottom, fraction of image height (rows)"))
PIXEL_COMPONENTS = (("column1", "box left, DICOM pixel column (0 = left edge of first column)"),
                    ("row1", "box top, DICOM pixel row (0 = top edge of first row)"),
                    ("column2", "box right, DICOM pixel column"),
                    ("row2", "box bottom, DICOM pixel row"))
NO_PATIENT_ID_REASON = ("the source has an empty Patient ID (0010,0020), legal for this Type 2 attribute: "
                        "the FHIR subject cannot be identified")
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_DICOM_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_ISO_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
PHRASE_TEXT_MAX = 1024


class FhirSubjectError(WriterError):
    """No FHIR bundle for this source: the patient cannot be identified (empty Patient ID) and
    ``SRSettings.fhir_without_patient_id`` is ``skip``. The SR and GSPS do not depend on it."""


def _iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat(timespec="seconds")


def _concept(code: Any, text: str | None = None) -> dict[str, Any]:
    concept: dict[str, Any] = {"coding": [codes.fhir_coding(code)]}
    if text:
        concept["text"] = text
    return concept


def _header_text(value: object, max_characters: int = 1024) -> str:
    """A DICOM header value as a FHIR string ("" when nothing is left): header values are not
    model text, so cleaning them is not reported as an alteration."""
    return fhir_string("" if value is None else value, max_characters).text


class _ModelText:
    """Cleans every model-derived string of one bundle and remembers whether any was altered."""

    def __init__(self) -> None:
        self.altered = False

    def __call__(self, value: object, max_characters: int = 65536) -> tuple[str, bool]:
        clean = fhir_string("" if value is None else value, max_characters)
        self.altered |= clean.altered
        return clean.text, clean.altered


def _uid(source: Dataset, keyword: str) -> str:
    """A UID of the source as FHIR ``id``/``oid`` text; refuses a malformed one."""
    value = str(source.get(keyword, "") or "").strip().rstrip("\x00").strip()
    if len(value) > 64 or not _DICOM_UID.fullmatch(value):
        raise SourceAttributeError(f"source {keyword} is not a valid DICOM UID")
    return value


def patient_identifier(source: Dataset, settings: SRSettings) -> dict[str, Any] | None:
    """Patient.identifier from Patient ID and its issuer, or None when the Patient ID is empty.

    System: ``urn:oid:<issuer>`` for an ISO issuer (IssuerOfPatientIDQualifiersSequence or an OID
    in IssuerOfPatientID); else ``SRSettings.fhir_patient_identifier_system`` (with
    ``:<Issuer of Patient ID>`` appended when the DICOM names a non-OID issuer, so two issuers'
    equal IDs never meet in one Patient); unset: no system, the issuer as ``assigner.display``.
    """
    patient_id = _header_text(source.get("PatientID", ""), 64)
    if not patient_id:
        return None
    system = settings.fhir_patient_identifier_system
    qualifiers = source.get("IssuerOfPatientIDQualifiersSequence")
    issuer = _header_text(source.get("IssuerOfPatientID", ""), 64)
    identifier: dict[str, Any] = {"value": patient_id}
    if qualifiers and qualifiers[0].get("UniversalEntityIDType") == "ISO" and \
            _DICOM_UID.fullmatch(str(qualifiers[0].get("UniversalEntityID", "") or "").strip()):
        identifier["system"] = f"urn:oid:{str(qualifiers[0].UniversalEntityID).strip()}"
    elif _ISO_OID.fullmatch(issuer):
        identifier["system"] = f"urn:oid:{issuer}"
    elif system:
        identifier["system"] = f"{system}:{quote(issuer, safe='')}" if issuer else system
    elif issuer:
        identifier["assigner"] = {"display": issuer}
    return identifier


def patient_resource_id(identifier: dict[str, Any]) -> str:
    """The Patient's logical id, a function of its identifier only: two studies of one patient
    PUT the same Patient; two issuers' equal Patient IDs do not meet."""
    namespace = identifier.get("system") or "assigner:" + (identifier.get("assigner") or {}).get("display", "")
    return str(derived_uuid(namespace, identifier["value"], "fhir-patient"))


def _patient(source: Dataset, identifier: dict[str, Any], patient_id: str) -> dict[str, Any]:
    patient: dict[str, Any] = {"resourceType": "Patient", "id": patient_id, "identifier": [identifier]}
    name = source.get("PatientName")
    if name:
        entry: dict[str, Any] = {}
        text = _header_text(str(name).replace("^", " "), 256)
        if text:
            entry["text"] = text
        family = _header_text(getattr(name, "family_name", ""), 256)
        if family:
            entry["family"] = family
        given = [g for g in (_header_text(getattr(name, "given_name", ""), 256),
                             _header_text(getattr(name, "middle_name", ""), 256)) if g]
        if given:
            entry["given"] = given
        if entry:
            patient["name"] = [entry]
    sex = str(source.get("PatientSex", "") or "").strip().upper()
    patient["gender"] = {"M": "male", "F": "female", "O": "other"}.get(sex, "unknown")
    birth = str(source.get("PatientBirthDate", "") or "").strip()
    if re.fullmatch(r"\d{8}", birth):
        try:
            datetime(int(birth[:4]), int(birth[4:6]), int(birth[6:]))
        except ValueError:
            pass
        else:
            patient["birthDate"] = f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"
    return patient


class _Ids:
    """Deterministic logical ids and DICOM-UID identifiers of one result's resources."""

    def __init__(self, result: StudyResult, settings: SRSettings) -> None:
        self.sop = str(result.source.sop_instance_uid)
        self.version = result.model.version
        self.root = settings.uid_root

    def id(self, purpose: str) -> str:
        return fhir_id(self.sop, self.version, "fhir-" + purpose)

    def identifier(self, purpose: str) -> dict[str, str]:
        return {"system": DICOM_UID_SYSTEM,
                "value": "urn:oid:" + derived_uid(self.sop, self.version, purpose, root=self.root)}


def _entry(resource: dict[str, Any]) -> dict[str, Any]:
    """A transaction entry that PUTs ``resource`` at its deterministic ``Type/id``."""
    kind, rid = resource["resourceType"], resource["id"]
    if not _FHIR_ID.fullmatch(rid):
        raise WriterError(f"{kind} id {rid!r} is not a FHIR id")
    return {"fullUrl": f"urn:uuid:{rid}", "resource": resource, "request": {"method": "PUT", "url": f"{kind}/{rid}"}}


def _ref(resource: dict[str, Any]) -> dict[str, str]:
    return {"reference": f"{resource['resourceType']}/{resource['id']}"}


def _xhtml_paragraphs(paragraphs: list[tuple[str, str]]) -> str:
    """``(heading, text)`` pairs as escaped XHTML paragraphs (line breaks kept as ``<br/>``)."""
    out = []
    for heading, text in paragraphs:
        body = "<br/>".join(html.escape(line, quote=True) for line in text.split("\n"))
        out.append(f"<p><b>{html.escape(heading, quote=True)}</b> {body}</p>" if heading else f"<p>{body}</p>")
    return "".join(out)


def _attachment(content_type: str, title: str, data: bytes, created: str) -> dict[str, Any]:
    return {"contentType": content_type, "language": "en", "title": title,
            "data": base64.b64encode(data).decode("ascii"), "size": len(data),
            "hash": base64.b64encode(hashlib.sha1(data).digest()).decode("ascii"),  # noqa: S324 - FHIR's hash is SHA-1
            "creation": created}


def _dicom_series(dataset: Dataset) -> dict[str, Any]:
    """ImagingStudy.series entry for an SR or GSPS the writers built (their deterministic UIDs)."""
    series: dict[str, Any] = {
        "uid": str(dataset.SeriesInstanceUID),
        "modality": {"system": codes.FHIR_SYSTEMS["DCM"], "code": str(dataset.Modality)},
        "numberOfInstances": 1,
        "instance": [{"uid": str(dataset.SOPInstanceUID),
                      "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{dataset.SOPClassUID}"},
                      "number": int(dataset.get("InstanceNumber", 1) or 1)}],
    }
    if dataset.get("SeriesNumber") is not None:
        series["number"] = int(dataset.SeriesNumber)
    description = _header_text(dataset.get("SeriesDescription", ""), 1024)
    if description:
        series["description"] = description
    return series


def build_bundle(result: StudyResult, source: Dataset, settings: SRSettings, *,
                 sr: Dataset | None = None, gsps: Dataset | None = None) -> Bundle:
    """The transaction Bundle for ``result``; patient identifiers come from ``source`` only.

    ``sr`` / ``gsps``: the DICOM objects written with it, listed in the ImagingStudy (and the SR's
    SOP Instance UID as a DiagnosticReport identifier). Raises :class:`FhirSubjectError` when the
    Patient ID is empty and ``settings.fhir_without_patient_id`` is ``skip``.
    """
    check_source(result, source)
    ids = _Ids(result, settings)
    model_text = _ModelText()
    issued = _iso(result.created)
    effective = _iso(study_datetime(source) or result.created)
    notice = _header_text(result.notice or UNVERIFIED_NOTICE, 4096) or UNVERIFIED_NOTICE
    pid = patient_identifier(source, settings)
    if pid is None and settings.fhir_without_patient_id == "skip":
        raise FhirSubjectError(NO_PATIENT_ID_REASON)
    study_uid = _uid(source, "StudyInstanceUID")
    entries: list[dict[str, Any]] = []

    subject: dict[str, Any] | None = None
    if pid is not None:
        subject = {"identifier": pid}
        if settings.fhir_include_patient:
            patient = _patient(source, pid, patient_resource_id(pid))
            entries.append(_entry(patient))
            subject = {**_ref(patient), "identifier": pid}
    with_subject = {"subject": subject} if subject else {}

    model = result.model
    model_id = _header_text(model.model_id, 256) or "unnamed model"
    model_version = _header_text(model.version, 256) or "unknown"
    weights = _header_text(model.weights_sha256, 128)
    device = {
        "resourceType": "Device", "id": str(model_uuid(model.model_id, model.version, model.weights_sha256)),
        "identifier": [{"system": DICOM_UID_SYSTEM,
                        "value": "urn:oid:" + model_uid(model.model_id, model.version, model.weights_sha256)}],
        "status": "active",
        "manufacturer": _header_text(settings.manufacturer, 64) or "RadVLM PACS node",
        "deviceName": [{"name": model_id, "type": "model-name"}],
        "type": {"text": "AI algorithm (vision-language model)"},
        "version": [{"type": {"text": "model version"}, "value": model_version}]
        + ([{"type": {"text": "weights sha256"}, "value": weights}] if weights else []),
        "note": [{"text": notice}],
    }
    entries.append(_entry(device))

    study: dict[str, Any] | None = None
    if subject is not None:  # ImagingStudy.subject is 1..1
        source_series: dict[str, Any] = {
            "uid": _uid(source, "SeriesInstanceUID"),
            "modality": {"system": codes.FHIR_SYSTEMS["DCM"],
                         "code": _header_text(source.get("Modality", ""), 16).replace(" ", "") or "CR"},
            "numberOfInstances": 1,
            "instance": [{"uid": _uid(source, "SOPInstanceUID"),
                          "sopClass": {"system": "urn:ietf:rfc:3986",
                                       "code": f"urn:oid:{_uid(source, 'SOPClassUID')}"}}],
        }
        series = [source_series] + [_dicom_series(d) for d in (sr, gsps) if d is not None]
        study = {
            "resourceType": "ImagingStudy",
            "id": str(derived_uuid(study_uid, "imaging-study", "fhir-imaging-study")),
            "identifier": [{"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}"}],
            "status": "available",
            "subject": subject,
            "numberOfSeries": len(series),
            "numberOfInstances": sum(s["numberOfInstances"] for s in series),
            "series": series,
        }
        if study_datetime(source):
            study["started"] = effective
        accession = _header_text(source.get("AccessionNumber", ""), 64)
        if accession:
            study["identifier"].append({"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
                                        "value": accession})
        description = _header_text(source.get("StudyDescription", ""), 1024)
        if description:
            study["description"] = description
        entries.append(_entry(study))

    common: dict[str, Any] = {
        "status": "preliminary",
        "category": [{"coding": [{"system": OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}],
        **with_subject, "effectiveDateTime": effective, "issued": issued, "device": _ref(device)}
    if study is not None:
        common["derivedFrom"] = [_ref(study)]
    box_system = f"{settings.fhir_code_system_base.rstrip('/')}/box"
    observations: list[dict[str, Any]] = []
    labels_with_box: set[str] = set()
    for item in region_boxes(result):
        region = item.region
        notes: list[dict[str, str]] = []
        query, query_altered = model_text(region.query, PHRASE_TEXT_MAX)
        if region.label:
            labels_with_box.add(region.label)
            code = _concept(codes.finding_for_label(region.label, region.query), region.label)
        else:
            code = _concept(codes.FINDING, query or None)
        pixels = item.box.to_pixels(result.source.columns, result.source.rows)
        components = [{"code": {"coding": [{"system": box_system, "code": c, "display": d}]},
                       "valueQuantity": {"value": round(v, 6), "unit": "1", "system": UCUM, "code": "1"}}
                      for (c, d), v in zip(BOX_COMPONENTS, item.box.as_list())]
        components += [{"code": {"coding": [{"system": box_system, "code": c, "display": d}]},
                        "valueQuantity": {"value": round(v, 3), "unit": "pixel", "system": UCUM,
                                          "code": "{pixel}"}}
                       for (c, d), v in zip(PIXEL_COMPONENTS, pixels)]
        if query:
            notes.append({"text": f"{region.task}: {query}"})
        notes.append({"text": notice})
        if query_altered:
            notes.append({"text": ALTERED_NOTICE})
        observation: dict[str, Any] = {
            "resourceType": "Observation", "id": ids.id(item.purpose),
            "identifier": [ids.identifier(item.purpose)],  # = the SR group's Tracking Unique Identifier
            **common, "code": code,
            "valueCodeableConcept": _concept(codes.PRESENT, "present"),
            "note": notes, "component": components,
        }
        site = codes.site_for(region.label, region.query)
        if site is not None:
            observation["bodySite"] = _concept(site.location, " ".join(
                c.meaning.lower() for c in (site.laterality, site.modifier, site.location) if c))
        observations.append(observation)
    positive = result.positive_labels
    for label in positive:
        if label in labels_with_box:
            continue
        observation = {"resourceType": "Observation", "id": ids.id(f"label-{label}"),
                       "identifier": [ids.identifier(f"label-{label}")], **common,
                       "code": _concept(codes.finding_for_label(label), label),
                       "valueCodeableConcept": _concept(codes.PRESENT, "present"),
                       "note": [{"text": notice}]}
        site = codes.LABEL_CODES[label].site
        if site is not None:
            observation["bodySite"] = _concept(site)
        observations.append(observation)
    entries.extend(_entry(o) for o in observations)

    findings, _ = model_text(result.findings_text)
    conclusion = findings or "No findings text was produced."
    labels_text = ", ".join(positive) if positive else "none"
    paragraphs: list[tuple[str, str]] = [("", notice), ("Findings:", findings or "(none)"),
                                         ("Positive labels:", labels_text),
                                         ("Model:", f"{model_id} {model_version}"
                                          + (f" (weights sha256 {weights})" if weights else ""))]
    if study is None:
        accession = _header_text(source.get("AccessionNumber", ""), 64)
        paragraphs.append(("Study:", f"Study Instance UID {study_uid}"
                                     + (f", accession number {accession}" if accession else "")
                                     + " (no Patient ID in the source: sent without subject)"))
    if model_text.altered:
        conclusion = f"{conclusion}\n\n{ALTERED_NOTICE}"
        paragraphs.append(("", ALTERED_NOTICE))
    plain = "\n\n".join(f"{h} {t}" if h else t for h, t in paragraphs)
    title = f"{DEMONSTRATION_LABEL} - UNVERIFIED AI RESULT" if result.model.demonstration else "UNVERIFIED AI RESULT"
    body = _xhtml_paragraphs(paragraphs)
    page = (f'<!DOCTYPE html><html xmlns="{XHTML_NAMESPACE}" lang="en"><head><meta charset="utf-8"/>'
            f"<title>{html.escape(title)}</title></head><body>{body}</body></html>")
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport", "id": ids.id("diagnostic-report"),
        "text": {"status": "generated", "div": f'<div xmlns="{XHTML_NAMESPACE}">{body}</div>'},
        "identifier": [ids.identifier("fhir-diagnostic-report")],
        "status": "preliminary",
        "category": [{"coding": [codes.fhir_coding(codes.RADIOLOGY_CATEGORY_LOINC),
                                 {"system": codes.FHIR_RAD_CATEGORY_SYSTEM, "code": "RAD",
                                  "display": "Radiology"}]}],
        "code": _concept(codes.CHEST_XR_SINGLE_VIEW, "Chest X-ray (AI preliminary read)"),
        **with_subject,
        "effectiveDateTime": effective,
        "issued": issued,
        "result": [_ref(o) for o in observations],
        "conclusion": conclusion,
        "presentedForm": [_attachment("text/plain; charset=utf-8", title, plain.encode("utf-8"), issued),
                          _attachment("text/html; charset=utf-8", title, page.encode("utf-8"), issued)],
    }
    if sr is not None:
        report["identifier"].append({"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{sr.SOPInstanceUID}",
                                     "type": {"text": "DICOM SR SOP Instance UID"}})
    if study is not None:
        report["imagingStudy"] = [_ref(study)]
    if not report["result"]:
        del report["result"]
    conclusion_codes = [_concept(codes.finding_for_label(label), label) for label in LABELS if label in positive]
    if conclusion_codes:
        report["conclusionCode"] = conclusion_codes
    entries.append(_entry(report))

    provenance: dict[str, Any] = {
        "resourceType": "Provenance", "id": ids.id("provenance"),
        "target": [_ref(report), *(_ref(o) for o in observations)],
        "recorded": issued,
        "agent": [{"type": {"coding": [{"system": PROVENANCE_PARTICIPANT, "code": "author",
                                        "display": "Author"}]},
                   "who": _ref(device)}],
    }
    if study is not None:
        provenance["entity"] = [{"role": "source", "what": _ref(study)}]
    entries.append(_entry(provenance))
    return Bundle.model_validate({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def bundle_json(bundle: Bundle) -> str:
    """The bundle as FHIR JSON text."""
    return bundle.model_dump_json(exclude_none=True, by_alias=True)


def resources_for_individual_upsert(bundle: Bundle) -> list[dict[str, Any]]:
    """For servers without transactions: each entry's resource with its ``id``, in dependency
    order, references as ``Type/id`` (PUT ``Type/id`` is an idempotent, duplicate-free upsert).

    Also reads bundles of earlier versions (conditional creates with ``urn:uuid`` references
    between entries), rewriting those references and using the uuid as the id.
    """
    data = json.loads(bundle_json(bundle))
    mapping: dict[str, str] = {}
    for entry in data.get("entry", []):
        resource = entry["resource"]
        url = entry.get("fullUrl", "")
        rid = resource.get("id") or (url[len("urn:uuid:"):] if url.startswith("urn:uuid:") else None)
        if not rid or not _FHIR_ID.fullmatch(rid):
            raise WriterError(f"bundle entry {resource['resourceType']} has neither an id nor a urn:uuid fullUrl")
        if url:
            mapping[url] = f"{resource['resourceType']}/{rid}"
        resource["id"] = rid

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (mapping.get(v, v) if k == "reference" and isinstance(v, str) else rewrite(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    return [rewrite(entry["resource"]) for entry in data.get("entry", [])]


def put_transaction(resources: list[dict[str, Any]]) -> dict[str, Any]:
    """A transaction Bundle (as JSON data) that PUTs each resource at ``Type/id``."""
    return {"resourceType": "Bundle", "type": "transaction",
            "entry": [_entry(resource) for resource in resources]}
