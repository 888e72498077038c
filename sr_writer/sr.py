"""TID 1500 Measurement Report in a Comprehensive 3D SR (design §3 "SR", IHE AIR style).

Content tree (one document per study result; every container ContinuityOfContent SEPARATE, so
that renderers such as dcmtk ``dsr2html`` show "Cardiomegaly: Present" item by item)::

    CONTAINER Imaging Measurement Report (TID 1500)
      language, observer context = device (the model), procedure reported = LN 36554-4
      CONTAINER Imaging Measurements (DCM 126010)
        CONTAINER Measurement Group (TID 1410) per grounded box: tracking identifier + UID,
            finding (coded, when the box is of a label), finding site,
            algorithm identification (TID 4019), geometric purpose Bounded by,
            SCOORD POLYLINE (closed, 5 points, PIXEL coordinates of the source image),
            TEXT Comment (DCM 121106) = the phrase grounded
      CONTAINER Qualitative Evaluations (TID 1500 row 12, UMLS C0034375)
        CODE finding [+ finding site] = Present | Absent, one per label (the classification)
        TEXT Findings = the report, TEXT Comment = the notice [, TEXT Comment = ALTERED_NOTICE]

Every measurement group under Imaging Measurements carries a SCOORD: OHIF (3.13.2) crashes on a
group without coordinates, and loads a group as a measurement labelled with its Comment (a TEXT
"Finding", which TID 1410 defines only as CODE, stops it). Model text passes through
:mod:`sr_writer.text` before it is written; when any was altered, the Qualitative Evaluations
container says so.
"""
from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from highdicom.sr.templates import Template
from pydicom import Dataset
from pydicom.sr.coding import Code

from config.settings import SRSettings
from inference.labels import LABELS
from inference.result import UNVERIFIED_NOTICE, StudyResult
from sr_writer import codes
from sr_writer.common import (RegionBox, box_polyline, check_source, evidence_dataset,
                              region_boxes)
from sr_writer.text import ALTERED_NOTICE, TextCleaner
from sr_writer.uids import derived_uid, model_uid

GEOMETRY_PARAMETER = "source_geometry_columns_x_rows="
WEIGHTS_PARAMETER = "weights_sha256="
CLASSIFICATION_TRACKING_IDENTIFIER = "RadVLM classification"
"""Tracking identifier of the classification group that SRs written before issue 11 carry."""
COMMENT = codes.COMMENT
SEPARATE = "SEPARATE"


def _uid(result: StudyResult, purpose: str, settings: SRSettings) -> str:
    return derived_uid(str(result.source.sop_instance_uid), result.model.version, purpose,
                       root=settings.uid_root)


def algorithm_identification(result: StudyResult, settings: SRSettings) -> hd.sr.AlgorithmIdentification:
    """TID 4019: model id, version and parameters (weights hash, the input geometry)."""
    return hd.sr.AlgorithmIdentification(
        name=TextCleaner().dicom(result.model.model_id, "LO"),
        version=TextCleaner().dicom(result.model.version, "LO"),
        parameters=[f"{WEIGHTS_PARAMETER}{result.model.weights_sha256}",
                    f"{GEOMETRY_PARAMETER}{result.source.columns}x{result.source.rows}",
                    f"result_schema_version={result.schema_version}"],
        manufacturer=settings.manufacturer,
    )


def device_observer_context(result: StudyResult, settings: SRSettings) -> hd.sr.ObservationContext:
    """TID 1001/1002/1004: the algorithm is the (device) observer."""
    attributes = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=model_uid(result.model.model_id, result.model.version, result.model.weights_sha256),
        name=result.model.model_id,
        manufacturer_name=settings.manufacturer,
        model_name=f"{result.model.model_id} {result.model.version}",
    )
    observer = hd.sr.ObserverContext(observer_type=codes.ALGORITHM_OBSERVER_ROLE,
                                     observer_identifying_attributes=attributes)
    return hd.sr.ObservationContext(observer_device_context=observer)


def _finding_site(site: codes.AnatomicSite | None) -> list[hd.sr.FindingSite] | None:
    if site is None:
        return None
    return [hd.sr.FindingSite(anatomic_location=site.location, laterality=site.laterality,
                              topographical_modifier=site.modifier)]


def _text_item(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value,
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _separate(container: Dataset) -> None:
    """ContinuityOfContent SEPARATE: each child is a separate statement (not one running text)."""
    container.ContinuityOfContent = SEPARATE


def label_evaluations(result: StudyResult) -> list[hd.sr.QualitativeEvaluation]:
    """The 14-label classification as coded qualitative evaluations (TID 1500 row 13): finding
    = Present | Absent, the label's default finding site as a concept modifier."""
    evaluations = []
    for label in LABELS:
        if label not in result.labels:
            continue
        evaluation = hd.sr.QualitativeEvaluation(
            name=codes.finding_for_label(label),
            value=codes.PRESENT if result.labels[label] else codes.ABSENT)
        site = codes.LABEL_CODES[label].site
        if site is not None:
            evaluation[0].ContentSequence = hd.sr.ContentSequence(
                [hd.sr.FindingSite(anatomic_location=site)])
        evaluations.append(evaluation)
    return evaluations


class ImagingMeasurementReportQualitativeEvaluations(Template):
    """TID 1500 row 12 "Qualitative Evaluations" container: the classification (row 13) and the
    report texts (row 14): findings, the unverified-result notice and, when model text had to be
    altered to be valid DICOM, :data:`ALTERED_NOTICE`."""

    def __init__(self, result: StudyResult, text: TextCleaner) -> None:
        container = hd.sr.ContainerContentItem(
            name=codes.QUALITATIVE_EVALUATIONS, is_content_continuous=False,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        items: list[hd.sr.ContentItem] = []
        for evaluation in label_evaluations(result):
            items.extend(evaluation)
        findings = text.dicom(result.findings_text, "UT")
        if findings:
            items.append(_text_item(codes.FINDINGS, findings))
        notice = TextCleaner().dicom(result.notice or UNVERIFIED_NOTICE, "UT") or UNVERIFIED_NOTICE
        items.append(_text_item(COMMENT, notice))
        if text.altered:
            items.append(_text_item(COMMENT, ALTERED_NOTICE))
        container.ContentSequence = hd.sr.ContentSequence(items)
        super().__init__([container])


class GroundedRegionPlanarROIMeasurementsAndQualitativeEvaluations(
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations):
    """TID 1410 group for one grounded box: closed 5-point POLYLINE on the source image, the
    phrase as TEXT Comment (DCM 121106)."""

    def __init__(self, item: RegionBox, result: StudyResult, evidence: Dataset,
                 settings: SRSettings, text: TextCleaner) -> None:
        region = item.region
        finding = codes.finding_for_label(region.label, region.query) if region.label else None
        polyline = box_polyline(item.box, result.source.columns, result.source.rows)
        image_region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=polyline,
            source_image=hd.sr.SourceImageForRegion.from_source_image(evidence))
        super().__init__(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=_uid(result, item.purpose, settings), identifier=item.tracking_identifier),
            referenced_region=image_region,
            finding_type=finding,
            algorithm_id=algorithm_identification(result, settings),
            finding_sites=_finding_site(codes.site_for(region.label, region.query)),
            geometric_purpose=codes.BOUNDED_BY,
        )
        _separate(self[0])
        phrase = text.dicom(region.query, "UT")
        if phrase:
            self[0].ContentSequence.append(_text_item(COMMENT, phrase))


class RadVLMMeasurementReport(hd.sr.MeasurementReport):
    """TID 1500 Measurement Report of one study result: one TID 1410 group per grounded box under
    Imaging Measurements, the classification and report texts under Qualitative Evaluations."""

    def __init__(self, result: StudyResult, evidence: Dataset, settings: SRSettings) -> None:
        text = TextCleaner()
        groups = [GroundedRegionPlanarROIMeasurementsAndQualitativeEvaluations(
            item, result, evidence, settings, text) for item in region_boxes(result)]
        super().__init__(
            observation_context=device_observer_context(result, settings),
            procedure_reported=codes.CHEST_XR_SINGLE_VIEW,
            imaging_measurements=groups or [_placeholder_group(result, evidence, settings)],
        )
        root = self[0]
        _separate(root)
        measurements = _child_container(root, codes.IMAGING_MEASUREMENTS)
        _separate(measurements)
        if not groups:
            # highdicom requires one group, TID 1500 does not: Imaging Measurements (row 6) is
            # needed only without Qualitative Evaluations (row 12). An empty container would be
            # invalid (dciodvfy: empty Type 1C ContentSequence), so a result without boxes has
            # none; highdicom and OHIF 3.13.2 read such a report as one without measurements.
            root.ContentSequence.remove(measurements)
        root.ContentSequence.extend(ImagingMeasurementReportQualitativeEvaluations(result, text))


def _placeholder_group(result: StudyResult, evidence: Dataset,
                       settings: SRSettings) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A group only to satisfy highdicom's constructor; removed again by the caller."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid(result, "placeholder", settings),
                                                     identifier="placeholder"))


def _child_container(parent: Dataset, name: Code) -> Dataset:
    for item in parent.ContentSequence:
        concept = item.ConceptNameCodeSequence[0]
        if item.ValueType == "CONTAINER" and (concept.CodeValue, concept.CodingSchemeDesignator) == (
                name.value, name.scheme_designator):
            return item
    raise ValueError(f"no {name.meaning} container")


def contributing_equipment(result: StudyResult, settings: SRSettings) -> list[hd.ContributingEquipment]:
    """IHE AIR: the algorithm as processing equipment of the instance."""
    return [hd.ContributingEquipment(
        manufacturer=settings.manufacturer,
        purpose_of_reference=hd.sr.CodedConcept("109102", "DCM", "Processing Equipment"),
        manufacturer_model_name=TextCleaner().dicom(result.model.model_id, "LO"),
        software_versions=[TextCleaner().dicom(result.model.version, "LO")],
        institution_name=settings.institution_name,
        contribution_datetime=result.created,
        contribution_description=TextCleaner().dicom(
            f"AI inference (unverified); weights sha256 {result.model.weights_sha256}", "ST"),
    )]


def build_sr(result: StudyResult, source: Dataset, settings: SRSettings) -> hd.sr.Comprehensive3DSR:
    """A Comprehensive 3D SR (TID 1500) of ``result`` in the Patient/Study of ``source``, in a
    new series with deterministic UIDs; VerificationFlag UNVERIFIED, PreliminaryFlag
    PRELIMINARY. Raises SourceMismatchError when the result was not computed from ``source``."""
    check_source(result, source)
    evidence = evidence_dataset(source)
    report = RadVLMMeasurementReport(result, evidence, settings)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[evidence],
        content=report[0],
        series_instance_uid=_uid(result, "sr-series", settings),
        series_number=settings.sr_series_number,
        sop_instance_uid=_uid(result, "sr", settings),
        instance_number=1,
        manufacturer=settings.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=settings.institution_name,
        institutional_department_name=settings.institutional_department_name,
        series_description=result.series_description(settings.series_description),  # demo model: labelled
        contributing_equipment=contributing_equipment(result, settings),
    )
    _stamp(sr, result, settings)
    return sr


def _stamp(instance: Dataset, result: StudyResult, settings: SRSettings) -> None:
    """Attributes highdicom leaves out: device description and a stable content time."""
    instance.ManufacturerModelName = settings.manufacturer_model_name
    instance.SoftwareVersions = [settings.software_version]
    instance.DeviceSerialNumber = settings.device_serial_number
    created = result.created
    instance.ContentDate = created.strftime("%Y%m%d")
    instance.ContentTime = created.strftime("%H%M%S")
    instance.SeriesDate = instance.ContentDate
    instance.SeriesTime = instance.ContentTime


__all__: Sequence[str] = ("build_sr", "RadVLMMeasurementReport",
                          "ImagingMeasurementReportQualitativeEvaluations",
                          "GroundedRegionPlanarROIMeasurementsAndQualitativeEvaluations")
