"""Factory of small synthetic DICOM datasets for tests (image loader, selector, SR writer, node).

Everything here is built in memory with pydicom, deterministic apart from the generated UIDs,
and small enough (default 64 × 48 pixels) that a test stays fast. The datasets carry the
modules a chest-radiograph pipeline looks at: Patient, General Study, General Series (+ CR/DX
Series), General Equipment, General Image, Image Pixel and SOP Common, with a proper File Meta
Information group so they can be written as Part 10 files or sent over DIMSE.

Typical use::

    from tests.dicom_samples import make_cr_dataset, write
    ds = make_cr_dataset(rows=32, columns=40, bits_stored=12, photometric="MONOCHROME1",
                         WindowCenter=2048, WindowWidth=4096)
    ds.compress(pydicom.uid.RLELossless)          # any encoder pydicom has
    path = write(ds, tmp_path / "cr.dcm")

Keyword arguments that are not parameters of a factory are DICOM keywords set on the dataset
last (``**overrides``), so any attribute can be added, replaced, or removed (value ``None``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

#: SOP Class used by `make_cr_dataset` for each supported modality.
SOP_CLASS_BY_MODALITY: Mapping[str, UID] = {
    "CR": ComputedRadiographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
}

#: Patient identifiers used when a test does not pass its own; tests that check that
#: identifiers never leak can search outputs for these strings.
DEFAULT_PATIENT_NAME = "Testpatient^Radvlm"
DEFAULT_PATIENT_ID = "RADVLM-TEST-0001"

_COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL")

Layout = Literal["part10", "no_preamble", "dataset_only"]


def ramp(rows: int, columns: int, low: int, high: int, dtype: Any = np.uint16) -> np.ndarray:
    """A deterministic (rows, columns) ramp: values rise row-major from `low` to `high` inclusive.

    Every pixel is distinct when rows × columns ≤ high − low + 1, which makes windowing and LUT
    expectations checkable pixel by pixel. ``ramp(...)[0, 0] == low`` and
    ``ramp(...)[-1, -1] == high`` always hold.
    """
    count = rows * columns
    values = np.linspace(low, high, num=count) if count > 1 else np.array([low])
    return np.rint(values).astype(dtype).reshape(rows, columns)


def chest_phantom(rows: int, columns: int, bits_stored: int = 12) -> np.ndarray:
    """A crude chest radiograph in MONOCHROME2 sense (uint16 or uint8 by `bits_stored`).

    Two dark ellipses (lungs) on a brighter body and a bright mediastinum between them; lungs
    are the darkest anatomy, so "lungs darker than mediastinum" holds in display sense.
    """
    top = (1 << bits_stored) - 1
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float64)
    y /= max(rows - 1, 1)
    x /= max(columns - 1, 1)
    img = np.full((rows, columns), 0.55)
    for cx in (0.3, 0.7):
        img[((x - cx) / 0.16) ** 2 + ((y - 0.5) / 0.32) ** 2 <= 1.0] = 0.15
    img[(np.abs(x - 0.5) < 0.06) & (y > 0.15)] = 0.9
    img[:, : max(columns // 20, 1)] = 0.02  # air at the border
    return np.rint(img * top).astype(np.uint8 if bits_stored <= 8 else np.uint16)


def make_cr_dataset(
    *,
    rows: int = 64,
    columns: int = 48,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    pixel_array: np.ndarray | None = None,
    view_position: str | None = "PA",
    patient_id: str = DEFAULT_PATIENT_ID,
    patient_name: str = DEFAULT_PATIENT_NAME,
    modality: str = "CR",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **overrides: Any,
) -> Dataset:
    """A single-frame CR (or DX) chest image with file meta, ready to write or send.

    Guarantees:
      * Pixel Data matches `pixel_array` (or a ramp over the full unsigned `bits_stored` range,
        0 at the top-left, 2**bits_stored − 1 at the bottom-right) and the Image Pixel module
        agrees with it: a signed dtype (int8/int16) gives PixelRepresentation 1, a (rows,
        columns, 3) uint8 array with photometric "RGB"/"YBR_FULL" gives a colour image, a
        (frames, rows, columns) array gives a multi-frame object with NumberOfFrames.
      * Rows/Columns come from the array when one is given (`rows`/`columns` are ignored then).
      * Fresh UIDs from `generate_uid()` unless given; SOP Class from `SOP_CLASS_BY_MODALITY`;
        BodyPartExamined CHEST, ViewPosition `view_position` (omitted when None).
      * `overrides` (DICOM keywords) are applied last; a value of None deletes the element.
    """
    if modality not in SOP_CLASS_BY_MODALITY:
        raise ValueError(f"modality must be one of {sorted(SOP_CLASS_BY_MODALITY)}, got {modality!r}")
    if pixel_array is None:
        pixel_array = _default_pixels(rows, columns, bits_stored, photometric)
    ds = _base_dataset(SOP_CLASS_BY_MODALITY[modality], modality, transfer_syntax,
                       patient_id, patient_name, study_instance_uid, series_instance_uid)
    _add_image_modules(ds, modality, view_position)
    ds.set_pixel_data(np.ascontiguousarray(pixel_array), photometric, bits_stored,
                      generate_instance_uid=False)
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    apply_overrides(ds, overrides)
    return ds


def make_sr_dataset(
    *,
    text: str = "No acute cardiopulmonary abnormality.",
    patient_id: str = DEFAULT_PATIENT_ID,
    patient_name: str = DEFAULT_PATIENT_NAME,
    study_instance_uid: str | None = None,
    **overrides: Any,
) -> Dataset:
    """A minimal Basic Text SR (a container with one TEXT item): a DICOM object without pixels.

    It is structurally valid enough for readers and selectors (SOP Class, Modality SR, content
    tree); it is not meant to pass dciodvfy — use highdicom for real SR output.
    """
    ds = _base_dataset(BasicTextSRStorage, "SR", ExplicitVRLittleEndian,
                       patient_id, patient_name, study_instance_uid, None)
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic imaging report")]
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = [_code("121071", "DCM", "Finding")]
    item.TextValue = text
    ds.ContentSequence = [item]
    apply_overrides(ds, overrides)
    return ds


def make_multiframe_dataset(frames: int = 3, **kwargs: Any) -> Dataset:
    """A `make_cr_dataset` image with `frames` identical ramp frames (NumberOfFrames = frames)."""
    rows = kwargs.pop("rows", 16)
    columns = kwargs.pop("columns", 12)
    bits_stored = kwargs.get("bits_stored", 12)
    one = ramp(rows, columns, 0, (1 << bits_stored) - 1)
    return make_cr_dataset(pixel_array=np.stack([one] * frames), **kwargs)


def encapsulate_jpeg_baseline(ds: Dataset, quality: int = 95) -> Dataset:
    """Re-encode an 8-bit MONOCHROME2 single-frame `ds` in place as JPEG Baseline (Process 1).

    pydicom has no JPEG baseline encoder, so the frame is compressed with Pillow and
    encapsulated; decoding it then goes through pydicom's JPEG handlers (pylibjpeg-libjpeg).
    Returns `ds` for chaining.
    """
    from PIL import Image  # local: only this helper needs Pillow

    if ds.BitsAllocated != 8 or ds.SamplesPerPixel != 1:
        raise ValueError("encapsulate_jpeg_baseline needs an 8-bit single-sample image")
    buffer = io.BytesIO()
    Image.fromarray(ds.pixel_array.astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    return ds


def write(ds: Dataset, path: str | Path, *, layout: Layout = "part10") -> Path:
    """Write `ds` to `path` and return the path.

    layout:
      * "part10" — 128-byte preamble, "DICM", file meta, dataset (a conforming Part 10 file);
      * "no_preamble" — file meta and dataset without the preamble/"DICM" prefix;
      * "dataset_only" — the bare dataset in Implicit VR Little Endian, no file meta at all
        (how some legacy archives store objects).
    """
    path = Path(path)
    if layout == "dataset_only":
        bare = Dataset()
        bare.update(ds)
        buffer = io.BytesIO()
        dcmwrite(buffer, bare, implicit_vr=True, little_endian=True)
        path.write_bytes(buffer.getvalue())
        return path
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    data = buffer.getvalue()
    if layout == "no_preamble":
        if data[128:132] != b"DICM":
            raise AssertionError("pydicom did not write a preamble")
        data = data[132:]
    elif layout != "part10":
        raise ValueError(f"unknown layout {layout!r}")
    path.write_bytes(data)
    return path


def apply_overrides(ds: Dataset, overrides: Mapping[str, Any]) -> None:
    """Set each DICOM keyword in `overrides` on `ds`; a None value deletes the element."""
    for keyword, value in overrides.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)


def _default_pixels(rows: int, columns: int, bits_stored: int, photometric: str) -> np.ndarray:
    """A full-range ramp (grayscale) or a ramp per channel (colour) for the given geometry."""
    top = (1 << bits_stored) - 1
    dtype = np.uint8 if bits_stored <= 8 else np.uint16
    if photometric in _COLOUR_PHOTOMETRICS:
        grey = ramp(rows, columns, 0, 255, np.uint8)
        return np.stack([grey, 255 - grey, np.full_like(grey, 128)], axis=-1)
    return ramp(rows, columns, 0, top, dtype)


def _base_dataset(sop_class_uid: str, modality: str, transfer_syntax: str, patient_id: str,
                  patient_name: str, study_instance_uid: str | None,
                  series_instance_uid: str | None) -> Dataset:
    """Patient, study, series, equipment and SOP Common modules plus file meta."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260115"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = "ACC0001"
    ds.Modality = modality
    ds.Manufacturer = "RadVLM test factory"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CHEST PA"
    ds.SeriesDescription = "Chest" if modality != "SR" else "Report"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_instance_uid or generate_uid()
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def _add_image_modules(ds: Dataset, modality: str, view_position: str | None) -> None:
    """CR/DX series + General Image attributes of a chest radiograph."""
    ds.BodyPartExamined = "CHEST"
    if view_position is not None:
        ds.ViewPosition = view_position
    if view_position in ("PA", "AP"):
        ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageLaterality = "U"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


__all__ = [
    "DEFAULT_PATIENT_ID", "DEFAULT_PATIENT_NAME", "SOP_CLASS_BY_MODALITY", "apply_overrides",
    "chest_phantom", "encapsulate_jpeg_baseline", "make_cr_dataset", "make_multiframe_dataset",
    "make_sr_dataset", "ramp", "write",
]
