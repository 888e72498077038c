"""Site adaptation: a hospital's own chest radiographs and final reports → training samples.

Input: one folder (searched recursively) holding DICOM CR/DX images and their final reports,
either as DICOM SR (any SR whose Study Instance UID matches; its TEXT content items are read in
document order) or as text files named ``{StudyInstanceUID}.txt``, ``{AccessionNumber}.txt`` or
like the image file with ``.txt``. Output: report-generation and classification samples (the
same `SourceSample` the public sources give), with

- images exported as 8-bit PNG through ``inference.image.load_image`` (Modality/VOI LUT,
  MONOCHROME1 inverted — the pixels the model sees at inference), named by a keyed hash
  (HMAC-SHA-256 with the site's secret salt) of the SOP Instance UID; a PNG carries no metadata;
- report text reduced to findings (else impression, else last paragraph, as upstream) and
  scrubbed of every identifier found in the image's DICOM header (patient name parts, IDs,
  accession number, birth date, physician and institution names) and of dates and long digit
  runs, which become "___" (MIMIC-CXR's de-identification mark, familiar to the model);
- labels from the report by ``inference.parsing.parse_labels`` (negation-aware);
- only frontal images (ViewPosition PA/AP), images without burned-in annotation, one split
  drawn per study from its keyed hash (``test_fraction``), so a study is never in both.

Pixel data is not inspected for burned-in text beyond the BurnedInAnnotation attribute: a
site must export images without burned-in patient data (document this in the site's data plan).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from inference.errors import InputImageError
from inference.image import load_image
from inference.labels import NO_FINDING
from inference.parsing import parse_labels
from training.sources.errors import MissingSourceFileError
from training.sources.report_text import findings_text
from training.sources.samples import SourceSample, Split

logger = logging.getLogger(__name__)

SOURCE = "site"
FRONTAL_VIEWS = frozenset({"PA", "AP"})
IMAGE_MODALITIES = frozenset({"CR", "DX"})
REDACTED = "___"
_IDENTIFYING_KEYWORDS = (
    "PatientID", "OtherPatientIDs", "AccessionNumber", "IssuerOfPatientID", "StudyID",
    "MedicalRecordLocator", "InstitutionName", "InstitutionAddress", "StationName",
)
_NAME_KEYWORDS = ("PatientName", "ReferringPhysicianName", "PerformingPhysicianName",
                  "NameOfPhysiciansReadingStudy", "OperatorsName", "PatientMotherBirthName",
                  "OtherPatientNames")
_DATE_PATTERNS = (
    re.compile(r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b"),
    re.compile(r"\b\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}\b"),
    re.compile(r"\b\d{6,}\b"),
)


@dataclass
class SiteSamples:
    """What the site folder gave: samples per split and why files were left out."""

    samples: list[SourceSample] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


def pseudonym(salt: str, value: str, length: int = 24) -> str:
    """A keyed, non-reversible name for a UID: HMAC-SHA-256(salt, value), hex, truncated."""
    return hmac.new(salt.encode(), value.encode(), hashlib.sha256).hexdigest()[:length]


def _values(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    items = value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    return [str(item) for item in items if str(item).strip()]


def identifiers(ds: Dataset) -> set[str]:
    """Strings of ``ds`` that identify the patient, staff or site, as they may appear in text."""
    found: set[str] = set()
    for keyword in _IDENTIFYING_KEYWORDS:
        found.update(_values(ds, keyword))
    for keyword in _NAME_KEYWORDS:
        for name in _values(ds, keyword):
            found.add(name)
            found.update(part for part in re.split(r"[\^\s,]+", name) if len(part) >= 2)
    for keyword in ("PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate"):
        for date in _values(ds, keyword):
            if len(date) == 8 and date.isdigit():
                y, m, d = date[:4], date[4:6], date[6:]
                found.update({date, f"{y}-{m}-{d}", f"{d}.{m}.{y}", f"{m}/{d}/{y}", f"{d}/{m}/{y}"})
    return {item.strip() for item in found if len(item.strip()) >= 2}


def scrub(text: str, secret: set[str]) -> str:
    """Replace every identifier (case-insensitive, longest first), dates and long numbers."""
    for item in sorted(secret, key=len, reverse=True):
        text = re.sub(rf"(?<!\w){re.escape(item)}(?!\w)", REDACTED, text, flags=re.IGNORECASE)
    for pattern in _DATE_PATTERNS:
        text = pattern.sub(REDACTED, text)
    return text


def _sr_text(ds: Dataset) -> str:
    parts: list[str] = []

    def walk(items) -> None:
        for item in items or []:
            if item.get("ValueType") == "TEXT" and str(item.get("TextValue", "")).strip():
                parts.append(str(item.TextValue).strip())
            walk(item.get("ContentSequence"))

    walk(ds.get("ContentSequence"))
    return "\n".join(parts)


def _read_header(path: Path) -> Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, TypeError):
        return None


def _report_for(path: Path, ds: Dataset, sr_reports: dict[str, str]) -> str | None:
    study = str(ds.get("StudyInstanceUID", ""))
    if study in sr_reports:
        return sr_reports[study]
    names = [f"{study}.txt", f"{ds.get('AccessionNumber', '')}.txt", path.stem + ".txt"]
    for name in names:
        candidate = path.parent / name
        if name != ".txt" and candidate.is_file():
            return candidate.read_text(encoding="utf-8", errors="replace")
    return None


def read_site(folder: Path, export_dir: Path, salt: str,
              test_fraction: float = 0.0) -> SiteSamples:
    """Scan ``folder`` and export each usable frontal image with its report (module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingSourceFileError(folder, "site folder")
    result = SiteSamples()
    images: list[tuple[Path, Dataset]] = []
    sr_reports: dict[str, str] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() != ".txt"):
        ds = _read_header(path)
        if ds is None:
            result.skipped["not a DICOM file"] += 1
        elif str(ds.get("Modality", "")) == "SR" or "ContentSequence" in ds:
            text = _sr_text(ds)
            if text:
                sr_reports[str(ds.get("StudyInstanceUID", ""))] = text
        elif str(ds.get("Modality", "")) in IMAGE_MODALITIES:
            images.append((path, ds))
        else:
            result.skipped[f"modality {ds.get('Modality', 'missing')}"] += 1
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    for path, ds in images:
        view = str(ds.get("ViewPosition", "")).strip().upper()
        if view not in FRONTAL_VIEWS:
            result.skipped[f"not frontal (ViewPosition {view or 'missing'})"] += 1
            continue
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            result.skipped["burned-in annotation"] += 1
            continue
        report = _report_for(path, ds, sr_reports)
        if report is None:
            result.skipped["no report"] += 1
            continue
        text = " ".join(scrub(findings_text(report), identifiers(ds)).split())
        if not text:
            result.skipped["empty report"] += 1
            continue
        try:
            image = load_image(path)
        except InputImageError as exc:
            result.skipped[f"image not usable ({type(exc).__name__})"] += 1
            continue
        name = pseudonym(salt, str(ds.get("SOPInstanceUID") or path.name))
        png = export_dir / f"{name}.png"
        Image.fromarray(image.pixels).save(png)
        study_hash = pseudonym(salt, str(ds.get("StudyInstanceUID") or name), 8)
        split: Split = "test" if int(study_hash, 16) / 16 ** 8 < test_fraction else "train"
        labels = tuple(label for label, present in parse_labels(text).items()
                       if present and label != NO_FINDING)
        result.samples.append(SourceSample("report", SOURCE, split, str(png), text=text))
        result.samples.append(SourceSample("classification", SOURCE, split, str(png),
                                           labels=labels))
    logger.info("site folder: %d samples, skipped %s", len(result.samples), dict(result.skipped))
    return result
