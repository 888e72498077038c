"""What the SR, GSPS and FHIR writers share: checking that a result belongs to its source DICOM,
the evidence dataset (header only) and the box → pixel polygon conversion."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timezone

import numpy as np
from pydicom import Dataset

from inference.result import Box, Region, StudyResult
from sr_writer.errors import SourceAttributeError, SourceMismatchError
from sr_writer.text import dicom_text

REQUIRED_SOURCE_ATTRIBUTES = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                              "SeriesInstanceUID", "Rows", "Columns")
TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                       "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                       "ReferringPhysicianName")


def check_source(result: StudyResult, source: Dataset) -> None:
    """Refuse to write when ``result`` was not computed from ``source`` (patient safety).

    The result carries UIDs only; every patient identifier is taken from ``source``, so a result
    paired with the wrong dataset would put findings into another patient's record.
    """
    if not isinstance(source, Dataset):
        raise TypeError(f"source must be a pydicom Dataset, got {type(source).__name__}")
    missing = [k for k in REQUIRED_SOURCE_ATTRIBUTES if k not in source or source[k].value in (None, "")]
    if missing:
        raise SourceAttributeError(f"source DICOM lacks {', '.join(missing)}")
    pairs = (("sop_instance_uid", "SOPInstanceUID"), ("study_instance_uid", "StudyInstanceUID"),
             ("series_instance_uid", "SeriesInstanceUID"), ("sop_class_uid", "SOPClassUID"))
    for field, keyword in pairs:
        expected = getattr(result.source, field)
        if expected is not None and str(expected) != str(source[keyword].value):
            raise SourceMismatchError(
                f"result {field} {expected} differs from the source's {keyword} "
                f"{source[keyword].value}: refusing to write")
    if result.source.sop_instance_uid is None:
        raise SourceMismatchError("result has no source SOP Instance UID: cannot tie it to the DICOM")
    if (int(source.Rows), int(source.Columns)) != (result.source.rows, result.source.columns):
        raise SourceMismatchError(
            f"result geometry {result.source.columns}x{result.source.rows} differs from the source "
            f"{source.Columns}x{source.Rows} (columns x rows)")
    if int(source.get("NumberOfFrames", 1) or 1) != 1:
        raise SourceAttributeError("source is multi-frame; the writers reference single-frame images")


def evidence_dataset(source: Dataset) -> Dataset:
    """The source header without pixel data, with empty values for missing Type 2 patient/study
    attributes (highdicom copies them into the new instance).

    Values are decoded with the source's character set while copying; the copy declares UTF-8
    (ISO_IR 192), which highdicom gives the new SR/GSPS, so patient names in any repertoire and
    model text with any character are stored faithfully instead of as replacement characters.
    """
    evidence = Dataset()
    for tag in list(source.keys()):
        if tag.group >= 0x7FE0 or tag.group == 0x0002 or tag == 0x00080005:  # pixels, file meta, charset
            continue
        try:
            element = source[tag]  # converts a raw element: an unknown VR or an undecodable value raises
        except Exception as exc:
            if tag in _IDENTIFYING:  # the result must stay tied to its patient: never written without
                raise SourceAttributeError(f"the source's {_IDENTIFYING[tag]} cannot be decoded "
                                           f"({type(exc).__name__}); its value is not shown") from exc
            continue  # not copied: a Type 2 patient/study attribute among them is added empty below
        evidence.add(element)
    evidence.SpecificCharacterSet = "ISO_IR 192"
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in evidence:
            setattr(evidence, keyword, None)
    _blank_unusable_type2(evidence)
    return evidence


_SEX = frozenset({"", "M", "F", "O"})
# attributes that tie a result to its patient and images: undecodable → nothing is written
_IDENTIFYING = {0x00100020: "PatientID", 0x00100021: "IssuerOfPatientID", 0x0020000D: "StudyInstanceUID",
                0x0020000E: "SeriesInstanceUID", 0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID",
                0x00280010: "Rows", 0x00280011: "Columns"}


def _blank_unusable_type2(evidence: Dataset) -> None:
    """A Type 2 attribute whose value cannot be converted (a free-text PatientBirthDate, a StudyTime
    that is no time, a PatientSex outside M/F/O, a name highdicom refuses as a person name) is
    copied empty instead of failing the whole result
    (highdicom converts these values). Which attribute was blanked is not logged with its value."""
    from pydicom.valuerep import DA, TM

    for keyword, convert in (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM)):
        try:
            value = evidence.get(keyword)
            if value not in (None, ""):
                convert(value)
        except Exception:
            setattr(evidence, keyword, None)
    try:
        usable = str(evidence.get("PatientSex") or "").strip().upper() in _SEX
    except Exception:
        usable = False
    if not usable:
        evidence.PatientSex = None
    from highdicom.valuerep import check_person_name

    for keyword in ("PatientName", "ReferringPhysicianName"):
        try:
            value = evidence.get(keyword)
            if value not in (None, ""):
                check_person_name(value)  # what highdicom requires of the copied name
        except Exception:
            setattr(evidence, keyword, None)


def box_polyline(box: Box, columns: int, rows: int) -> np.ndarray:
    """The closed 5-point POLYLINE (column, row) of ``box`` in DICOM image coordinates: (0, 0) is
    the top-left corner of the top-left pixel (design §3). Clockwise from the top-left corner."""
    c1, r1, c2, r2 = box.to_pixels(columns, rows)
    return np.array([[c1, r1], [c2, r1], [c2, r2], [c1, r2], [c1, r1]], dtype=np.float64)


def polyline_box(points: np.ndarray, columns: int, rows: int) -> tuple[float, float, float, float]:
    """Normalised (x1, y1, x2, y2) of the bounding rectangle of a pixel polyline."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return (float(pts[:, 0].min()) / columns, float(pts[:, 1].min()) / rows,
            float(pts[:, 0].max()) / columns, float(pts[:, 1].max()) / rows)


@dataclass(frozen=True)
class RegionBox:
    """One box of one region, with its stable position ``(region_index, box_index)``."""

    region_index: int
    box_index: int
    region: Region
    box: Box

    @property
    def purpose(self) -> str:
        return f"tracking-{self.region_index}-{self.box_index}"

    @property
    def tracking_identifier(self) -> str:
        """A readable identifier valid as LO (GSPS Tracking ID) and as a TEXT item: one line, no
        control characters or backslashes, at most 64 characters, cut at a word boundary."""
        what = self.region.label or self.region.query
        return dicom_text(f"RadVLM {self.region.task} {self.region_index + 1}.{self.box_index + 1}: {what}",
                          "LO").text


def region_boxes(result: StudyResult) -> list[RegionBox]:
    """Every box of every region in result order."""
    return [RegionBox(i, j, region, box)
            for i, region in enumerate(result.regions) for j, box in enumerate(region.boxes)]


def study_datetime(source: Dataset) -> datetime | None:
    """Study Date/Time of the source as a datetime (naive times read as UTC), or None."""
    raw_date = str(source.get("StudyDate", "") or "")
    if len(raw_date) != 8 or not raw_date.isdigit():
        return None
    raw_time = str(source.get("StudyTime", "") or "").split(".")[0]
    try:
        d = date(int(raw_date[:4]), int(raw_date[4:6]), int(raw_date[6:8]))
        t = time(0, 0)
        if raw_time[:2].isdigit():
            t = time(int(raw_time[:2]), int(raw_time[2:4] or 0), int(raw_time[4:6] or 0))
    except ValueError:
        return None
    return datetime.combine(d, t, tzinfo=timezone.utc)
