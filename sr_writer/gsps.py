"""Grayscale Softcopy Presentation State with the boxes as outlines (design §3, issue 3 item 2),
for viewers that do not render SR regions. One graphic layer; per box a closed POLYLINE and a
text label anchored at the box's top-left corner, in PIXEL units of the source image.

Labels are model text: they pass through :mod:`sr_writer.text` for their VR (Unformatted Text
Value is ST, Tracking ID is LO). When any had to be altered, one more text annotation in the
top-left corner of the display says so (:data:`ALTERED_NOTICE`)."""

from __future__ import annotations

import highdicom as hd
from pydicom import Dataset

from config.settings import SRSettings
from inference.result import StudyResult
from sr_writer.common import box_polyline, check_source, evidence_dataset, region_boxes
from sr_writer.errors import WriterError
from sr_writer.text import ALTERED_NOTICE, VR_MAX_CHARACTERS, TextCleaner, cut_at_word
from sr_writer.uids import derived_uid

GRAPHIC_LAYER = "RADVLM_AI"
CONTENT_LABEL = "RADVLM_AI"
LABEL_CHARACTERS = 64
ALTERED_NOTICE_BOX = (0.01, 0.01, 0.6, 0.08)
"""Where the altered-text notice goes, in DISPLAY units (fractions of the displayed area)."""


def _voi(evidence: Dataset) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    """A VOI window over the stored range when the source has none (highdicom copies the
    source's own window/VOI LUT otherwise)."""
    if "WindowCenter" in evidence or "VOILUTSequence" in evidence:
        return None
    bits = int(evidence.get("BitsStored", 8) or 8)
    slope = float(evidence.get("RescaleSlope", 1) or 1)
    intercept = float(evidence.get("RescaleIntercept", 0) or 0)
    low = intercept
    if int(evidence.get("PixelRepresentation", 0) or 0) == 1:
        low = intercept - slope * 2 ** (bits - 1)
    width = slope * (2 ** bits)
    return [hd.pr.SoftcopyVOILUTTransformation(window_center=low + width / 2, window_width=width)]


class GspsSkipped(WriterError):
    """The source's VOI attributes cannot be carried into a presentation state (e.g. a
    WindowWidth that is no number, zero or not finite): the GSPS is left out, the SR and FHIR are
    written. The message names the attribute, never its value."""

    def __init__(self, attribute: str) -> None:
        super().__init__(f"GSPS not written: the source's {attribute} cannot be used as a VOI window "
                         f"(malformed); its value is not shown")
        self.attribute = attribute


_VOI_FUNCTIONS = frozenset({"LINEAR", "LINEAR_EXACT", "SIGMOID"})


def _unusable_voi_attribute(evidence: Dataset) -> str | None:
    """The first VOI attribute of ``evidence`` that highdicom could not copy into the GSPS (it
    copies the source's window/VOI LUT), or None when they are usable or absent."""
    import math

    from pydicom.multival import MultiValue

    counts: dict[str, int] = {}
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword not in evidence:
            continue
        try:
            value = evidence[keyword].value
            values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
            numbers = [float(v) for v in values]
        except Exception:
            return keyword
        if not numbers or not all(math.isfinite(x) and abs(x) < 1e15 for x in numbers):
            return keyword
        if keyword == "WindowWidth" and not all(x > 0 for x in numbers):
            return keyword
        counts[keyword] = len(numbers)
    if len(counts) == 1:  # a window centre without a width, or the reverse
        return next(iter(counts))
    if counts and counts["WindowCenter"] != counts["WindowWidth"]:
        return "WindowCenter/WindowWidth"  # value counts differ
    if counts and "VOILUTSequence" in evidence:
        return "VOILUTSequence"
    try:
        if counts and "WindowCenterWidthExplanation" in evidence:
            value = evidence["WindowCenterWidthExplanation"].value
            values = [value] if isinstance(value, str) else list(value)
            if len(values) != counts["WindowCenter"] or not all(isinstance(v, str) and len(v) <= 64 and "\\" not in v
                                                                 for v in values):
                return "WindowCenterWidthExplanation"
    except Exception:
        return "WindowCenterWidthExplanation"
    try:
        if counts and "VOILUTFunction" in evidence and str(evidence.VOILUTFunction or "LINEAR") not in _VOI_FUNCTIONS:
            return "VOILUTFunction"
    except Exception:
        return "VOILUTFunction"
    return None


def _label_text(value: str, text: TextCleaner) -> str:
    """The on-image label (Unformatted Text Value, ST): one line, no control characters and no
    backslash (highdicom refuses it in ST), i.e. the single-line rules of LO, at most
    LABEL_CHARACTERS long, shortened at a word boundary with "..."."""
    clean = text.dicom(value, "LO", max_characters=VR_MAX_CHARACTERS["ST"])
    if len(clean) <= LABEL_CHARACTERS:
        return clean
    return cut_at_word(clean, LABEL_CHARACTERS - 3) + "..."


def _altered_notice() -> hd.pr.TextObject:
    return hd.pr.TextObject(text_value=ALTERED_NOTICE, units=hd.pr.AnnotationUnitsValues.DISPLAY,
                            bounding_box=ALTERED_NOTICE_BOX,
                            text_justification=hd.pr.TextJustificationValues.LEFT)


def build_gsps(result: StudyResult, source: Dataset,
               settings: SRSettings) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """A GSPS over ``source`` drawing every grounded box of ``result`` (none: an empty layer)."""
    check_source(result, source)
    evidence = evidence_dataset(source)
    unusable = _unusable_voi_attribute(evidence)
    if unusable is not None:
        raise GspsSkipped(unusable)
    columns, rows = result.source.columns, result.source.rows
    uid = lambda purpose: derived_uid(str(result.source.sop_instance_uid), result.model.version,  # noqa: E731
                                      purpose, root=settings.uid_root)
    layer = hd.pr.GraphicLayer(layer_name=GRAPHIC_LAYER, order=1,
                               description="RadVLM AI boxes - UNVERIFIED")
    graphic_objects: list[hd.pr.GraphicObject] = []
    text_objects: list[hd.pr.TextObject] = []
    text = TextCleaner()
    for item in region_boxes(result):
        tracking_uid = uid(item.purpose)
        graphic_objects.append(hd.pr.GraphicObject(
            graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
            graphic_data=box_polyline(item.box, columns, rows),
            units=hd.pr.AnnotationUnitsValues.PIXEL,
            tracking_id=item.tracking_identifier, tracking_uid=tracking_uid))
        c1, r1, _, _ = item.box.to_pixels(columns, rows)
        text_objects.append(hd.pr.TextObject(
            text_value=(_label_text(item.region.label or item.region.query, text)
                        or item.tracking_identifier.rstrip(" :")),  # Type 1: never empty
            units=hd.pr.AnnotationUnitsValues.PIXEL,
            anchor_point=(float(c1), float(r1)),
            anchor_point_visible=False,
            tracking_id=item.tracking_identifier, tracking_uid=tracking_uid))
    if text.altered:
        text_objects.append(_altered_notice())
    annotations = []
    if graphic_objects:
        annotations.append(hd.pr.GraphicAnnotation(
            referenced_images=[evidence], graphic_layer=layer,
            graphic_objects=graphic_objects, text_objects=text_objects))
    presentation_lut = None
    if str(evidence.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        # the GSPS pipeline ignores Photometric Interpretation: keep MONOCHROME1's sense
        presentation_lut = hd.PresentationLUTTransformation(
            presentation_lut_shape=hd.PresentationLUTShapeValues.INVERSE)
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[evidence],
        series_instance_uid=uid("gsps-series"),
        series_number=settings.gsps_series_number,
        sop_instance_uid=uid("gsps"),
        instance_number=1,
        manufacturer=settings.manufacturer,
        manufacturer_model_name=settings.manufacturer_model_name,
        software_versions=settings.software_version,
        device_serial_number=settings.device_serial_number,
        content_label=CONTENT_LABEL,
        content_description="UNVERIFIED AI RESULT boxes, not for diagnostic use",
        graphic_annotations=annotations or None,
        graphic_layers=[layer],
        institution_name=settings.institution_name,
        institutional_department_name=settings.institutional_department_name,
        voi_lut_transformations=_voi(evidence),
        presentation_lut_transformation=presentation_lut,
        series_description=result.series_description(settings.series_description),  # demo model: labelled
    )
    # General Series Laterality is Type 2C (paired body parts): copy the source's body part so
    # validators can tell (chest: unpaired, no Laterality); empty only when unknown
    if evidence.get("BodyPartExamined"):
        gsps.BodyPartExamined = evidence.BodyPartExamined
    if evidence.get("Laterality"):
        gsps.Laterality = evidence.Laterality
    elif not evidence.get("BodyPartExamined"):
        gsps.Laterality = None
    created = result.created
    gsps.PresentationCreationDate = created.strftime("%Y%m%d")
    gsps.PresentationCreationTime = created.strftime("%H%M%S")
    return gsps
