"""Read a RadVLM TID 1500 SR back (tests, the web viewer, the demo): boxes, labels, texts,
tracking UIDs.

Parsing goes through highdicom's MeasurementReport API; the items highdicom has no accessor for
(the grounded phrase, the findings text, the classification in the Qualitative Evaluations
container) are read from the content items. SRs written before issue 11 (classification in a
TID 1501 group under Imaging Measurements, phrase as TEXT "Finding") are still read.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.coding import Code

from inference.labels import LABELS
from inference.result import Box
from sr_writer import codes
from sr_writer.common import polyline_box
from sr_writer.errors import SRReadError
from sr_writer.sr import CLASSIFICATION_TRACKING_IDENTIFIER, GEOMETRY_PARAMETER
from sr_writer.text import ALTERED_NOTICE

_FINDING_TO_LABEL: dict[tuple[str, str], str] = {
    (c.finding.scheme_designator, c.finding.value): label for label, c in codes.LABEL_CODES.items()}
_FINDING_TO_LABEL.update({(code.scheme_designator, code.value): "support devices"
                          for _, code in codes.DEVICE_KEYWORDS})


@dataclass(frozen=True)
class SRRegion:
    """One grounded box as stored in the SR."""

    tracking_uid: str
    tracking_identifier: str
    label: str | None
    finding: Code | None
    text: str | None
    finding_sites: tuple[str, ...]
    polyline: np.ndarray
    box: Box
    referenced_sop_instance_uid: str


@dataclass(frozen=True)
class SRContents:
    """Everything the writers put into the SR that a reader needs."""

    patient_id: str
    study_instance_uid: str
    referenced_sop_instance_uid: str
    algorithm_name: str
    algorithm_version: str
    findings_text: str | None
    labels: dict[str, bool]
    regions: list[SRRegion]
    text_altered: bool = False
    """Whether the writer had to alter model text (the SR carries :data:`ALTERED_NOTICE`)."""


def label_for_finding(code: Code | hd.sr.CodedConcept | None) -> str | None:
    """The label a finding code was written for (device codes → "support devices")."""
    if code is None:
        return None
    return _FINDING_TO_LABEL.get((code.scheme_designator, code.value))


def _report(sr_dataset: Dataset) -> hd.sr.Comprehensive3DSR:
    if getattr(sr_dataset, "Modality", None) != "SR" or "ContentSequence" not in sr_dataset:
        raise SRReadError("not an SR document with content")
    try:
        return hd.sr.Comprehensive3DSR.from_dataset(sr_dataset, copy=True)
    except (ValueError, AttributeError, TypeError, KeyError) as exc:
        raise SRReadError(f"cannot parse SR: {exc}") from exc


def _measurement_report(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementReport:
    try:
        return hd.sr.MeasurementReport.from_sequence([sr.content[0]])
    except ValueError as exc:
        raise SRReadError(f"not a TID 1500 measurement report: {exc}") from exc


def _geometry(group: hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
              ) -> tuple[int, int] | None:
    for item in group[0].ContentSequence:
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "111002":
            value = str(item.TextValue)
            if value.startswith(GEOMETRY_PARAMETER):
                columns, rows = value[len(GEOMETRY_PARAMETER):].split("x")
                return int(columns), int(rows)
    return None


def _texts(group_item: Dataset, code: Code) -> list[str]:
    return [str(item.TextValue) for item in getattr(group_item, "ContentSequence", [])
            if item.ValueType == "TEXT"
            and item.ConceptNameCodeSequence[0].CodeValue == code.value
            and item.ConceptNameCodeSequence[0].CodingSchemeDesignator == code.scheme_designator]


def read_sr_regions(sr_dataset: Dataset, *, columns: int | None = None,
                    rows: int | None = None) -> list[SRRegion]:
    """Every grounded box of a RadVLM SR, in document order. Normalised boxes use the source
    geometry recorded in the algorithm parameters unless ``columns``/``rows`` are given."""
    report = _measurement_report(_report(sr_dataset))
    regions: list[SRRegion] = []
    for group in report.get_planar_roi_measurement_groups():
        roi = group.roi
        if not isinstance(roi, hd.sr.ImageRegion):
            continue
        if roi.GraphicType != "POLYLINE":
            raise SRReadError(f"unexpected graphic type {roi.GraphicType}")
        geometry = (columns, rows) if columns and rows else _geometry(group)
        if geometry is None:
            raise SRReadError("source geometry unknown: pass columns and rows")
        points = roi.value
        x1, y1, x2, y2 = polyline_box(points, *geometry)
        texts = _texts(group[0], codes.COMMENT) or _texts(group[0], codes.FINDING)
        finding = group.finding_type
        regions.append(SRRegion(
            tracking_uid=str(group.tracking_uid),
            tracking_identifier=str(group.tracking_identifier),
            label=label_for_finding(finding),
            finding=Code(finding.value, finding.scheme_designator, finding.meaning) if finding else None,
            text=texts[0] if texts else None,
            finding_sites=tuple(site.value.meaning for site in group.finding_sites),
            polyline=np.asarray(points, dtype=float).reshape(-1, 2),
            box=Box(x1=min(max(x1, 0.0), 1.0), y1=min(max(y1, 0.0), 1.0),
                    x2=min(max(x2, 0.0), 1.0), y2=min(max(y2, 0.0), 1.0)),
            referenced_sop_instance_uid=str(roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID),
        ))
    return regions


def _label_evaluations(items) -> dict[str, bool]:
    """label → present from coded evaluations (finding = Present | Absent) among ``items``."""
    labels: dict[str, bool] = {}
    for item in items:
        if item.ValueType != "CODE" or item.RelationshipType != "CONTAINS":
            continue
        name = item.ConceptNameCodeSequence[0]
        label = _FINDING_TO_LABEL.get((name.CodingSchemeDesignator, name.CodeValue))
        value = item.ConceptCodeSequence[0].CodeValue
        if label is not None and value in (codes.PRESENT.value, codes.ABSENT.value):
            labels[label] = value == codes.PRESENT.value
    return labels


def _qualitative_evaluations(root: Dataset) -> list[Dataset]:
    """The TID 1500 row 12 "Qualitative Evaluations" containers of the report."""
    return [item for item in getattr(root, "ContentSequence", [])
            if item.ValueType == "CONTAINER"
            and item.ConceptNameCodeSequence[0].CodeValue == codes.QUALITATIVE_EVALUATIONS.value
            and item.ConceptNameCodeSequence[0].CodingSchemeDesignator
            == codes.QUALITATIVE_EVALUATIONS.scheme_designator]


def read_sr_labels(sr_dataset: Dataset) -> dict[str, bool]:
    """The classification (label → present) of a RadVLM SR: the coded evaluations of the
    Qualitative Evaluations container, or (SRs written before issue 11) of the classification
    measurement group."""
    sr = _report(sr_dataset)
    labels: dict[str, bool] = {}
    for container in _qualitative_evaluations(sr.content[0]):
        labels.update(_label_evaluations(getattr(container, "ContentSequence", [])))
    if not labels:
        for group in _measurement_report(sr).get_image_measurement_groups():
            if group.tracking_identifier == CLASSIFICATION_TRACKING_IDENTIFIER:
                labels.update(_label_evaluations(group[0].ContentSequence))
    return {label: labels[label] for label in LABELS if label in labels}


def read_sr(sr_dataset: Dataset) -> SRContents:
    """Identifiers, algorithm, findings text, labels and regions of a RadVLM SR."""
    sr = _report(sr_dataset)
    root = sr.content[0]
    findings: list[str] = []
    comments: list[str] = []
    for container in _qualitative_evaluations(root):
        findings += _texts(container, codes.FINDINGS)
        comments += _texts(container, codes.COMMENT)
    evidence = sr.get("CurrentRequestedProcedureEvidenceSequence", [])
    refs = [sop.ReferencedSOPInstanceUID for study in evidence
            for series in study.ReferencedSeriesSequence for sop in series.ReferencedSOPSequence]
    if len(refs) != 1:
        raise SRReadError(f"expected one referenced image, found {len(refs)}")
    name = version = ""
    for item in _walk(root):
        code = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else ""
        if code == "111001" and not name:
            name = str(item.TextValue)
        elif code == "111003" and not version:
            version = str(item.TextValue)
    return SRContents(
        patient_id=str(sr.PatientID), study_instance_uid=str(sr.StudyInstanceUID),
        referenced_sop_instance_uid=str(refs[0]), algorithm_name=name, algorithm_version=version,
        findings_text=findings[0] if findings else None, labels=read_sr_labels(sr_dataset),
        regions=read_sr_regions(sr_dataset), text_altered=ALTERED_NOTICE in comments)


def _walk(item: Dataset):
    for child in getattr(item, "ContentSequence", []):
        yield child
        yield from _walk(child)
