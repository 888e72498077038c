"""TID 1500 Measurement Report in a Comprehensive 3D SR (design §3 "SR", IHE AIR style).

Content tree (one document per study result)::

    CONTAINER Imaging Measurement Report (TID 1500)
      language, observer context = device (the model), procedure reported = LN 36554-4
      CONTAINER Imaging Measurements
        CONTAINER Measurement Group (TID 1501): the classification, one CODE per label
            (finding [+ finding site]) = Present | Absent, referencing the source image
        CONTAINER Measurement Group (TID 1410) per grounded box: tracking identifier + UID,
            finding (coded), finding site, TEXT Finding = the phrase grounded,
            SCOORD POLYLINE (closed, 5 points, PIXEL coordinates of the source image),
            algorithm identification (TID 4019)
      CONTAINER Qualitative Evaluations: TEXT Findings = the report, TEXT Comment = the notice
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.coding import Code

from config.settings import SRSettings
from inference.labels import LABELS
from inference.result import UNVERIFIED_NOTICE, StudyResult
from sr_writer import codes
from sr_writer.common import (RegionBox, box_polyline, check_source, evidence_dataset,
                              region_boxes)
from sr_writer.uids import derived_uid, model_uid

GEOMETRY_PARAMETER = "source_geometry_columns_x_rows="
WEIGHTS_PARAMETER = "weights_sha256="
CLASSIFICATION_TRACKING_IDENTIFIER = "RadVLM classification"


def _uid(result: StudyResult, purpose: str, settings: SRSettings) -> str:
    return derived_uid(str(result.source.sop_instance_uid), result.model.version, purpose,
                       root=settings.uid_root)


def algorithm_identification(result: StudyResult, settings: SRSettings) -> hd.sr.AlgorithmIdentification:
    """TID 4019: model id, version and parameters (weights hash, the input geometry)."""
    return hd.sr.AlgorithmIdentification(
        name=result.model.model_id,
        version=result.model.version,
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


class ClassificationMeasurementsAndQualitativeEvaluations(hd.sr.MeasurementsAndQualitativeEvaluations):
    """TID 1501 group holding the 14-label classification as coded Present/Absent evaluations,
    each finding CODE item carrying its finding site as a concept modifier."""

    def __init__(self, result: StudyResult, evidence: Dataset, settings: SRSettings) -> None:
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
        super().__init__(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=_uid(result, "tracking-classification", settings),
                identifier=CLASSIFICATION_TRACKING_IDENTIFIER),
            algorithm_id=algorithm_identification(result, settings),
            qualitative_evaluations=evaluations or None,
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(evidence)],
        )


class GroundedRegionPlanarROIMeasurementsAndQualitativeEvaluations(
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations):
    """TID 1410 group for one grounded box: closed 5-point POLYLINE on the source image."""

    def __init__(self, item: RegionBox, result: StudyResult, evidence: Dataset,
                 settings: SRSettings) -> None:
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
        self[0].ContentSequence.append(_text_item(codes.FINDING, region.query))


class RadVLMMeasurementReport(hd.sr.MeasurementReport):
    """TID 1500 Measurement Report of one study result, plus the TID 1500 row 12 "Qualitative
    Evaluations" container with the findings text and the unverified-result notice."""

    def __init__(self, result: StudyResult, evidence: Dataset, settings: SRSettings) -> None:
        groups: list[hd.sr.MeasurementsAndQualitativeEvaluations
                     | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = [
            ClassificationMeasurementsAndQualitativeEvaluations(result, evidence, settings)]
        groups += [GroundedRegionPlanarROIMeasurementsAndQualitativeEvaluations(
            item, result, evidence, settings) for item in region_boxes(result)]
        super().__init__(
            observation_context=device_observer_context(result, settings),
            procedure_reported=codes.CHEST_XR_SINGLE_VIEW,
            imaging_measurements=groups,
        )
        texts: list[hd.sr.TextContentItem] = []
        if result.findings_text and result.findings_text.strip():
            texts.append(_text_item(codes.FINDINGS, result.findings_text.strip()))
        texts.append(_text_item(Code("121106", "DCM", "Comment"), result.notice or UNVERIFIED_NOTICE))
        container = hd.sr.ContainerContentItem(
            name=codes.QUALITATIVE_EVALUATIONS,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        container.ContentSequence = hd.sr.ContentSequence(texts)
        self[0].ContentSequence.append(container)


def contributing_equipment(result: StudyResult, settings: SRSettings) -> list[hd.ContributingEquipment]:
    """IHE AIR: the algorithm as processing equipment of the instance."""
    return [hd.ContributingEquipment(
        manufacturer=settings.manufacturer,
        purpose_of_reference=hd.sr.CodedConcept("109102", "DCM", "Processing Equipment"),
        manufacturer_model_name=result.model.model_id[:64],
        software_versions=[result.model.version[:64]],
        institution_name=settings.institution_name,
        contribution_datetime=result.created,
        contribution_description=(f"AI inference (unverified); weights sha256 "
                                  f"{result.model.weights_sha256}")[:1024],
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
        series_description=settings.series_description,
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
                          "ClassificationMeasurementsAndQualitativeEvaluations",
                          "GroundedRegionPlanarROIMeasurementsAndQualitativeEvaluations")
