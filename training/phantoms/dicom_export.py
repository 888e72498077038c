"""Phantoms as DICOM CR / DX images with realistic headers (and nothing real in them).

* Patient Name "PHANTOM^<index>", Patient ID "PHANTOM-S<seed>-<index>", no birth date; the
  Patient Comments and Image Comments say the object is synthetic.
* Study / Series / SOP Instance UIDs are "2.25." UUID-derived OIDs computed from (seed, index,
  role), so the same seed gives the same UIDs and files byte for byte.
* Pixel data: unsigned, BitsStored 8–16, MONOCHROME2 (stored = v·top) or MONOCHROME1
  (stored = top − v·top), with a full-range window (WC = (top+1)/2, WW = top+1) and an identity
  rescale, so `inference.image.load_image` gives the same 8-bit display image either way.
* The frontal image has ViewPosition PA/AP with the matching SNOMED view code; a study may add a
  lateral (LL/RL) in its own series, which a node must skip.
"""

from __future__ import annotations

import io
import uuid
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)

from training.phantoms.sampler import GENERATOR_VERSION, Phantom

_UID_NAMESPACE = uuid.UUID("6f1c2a52-6c2e-5b8a-9d0e-2f6b5c1a7e31")
IMPLEMENTATION_CLASS_UID = "2.25.189371148218366155207906812520305465183"
IMPLEMENTATION_VERSION = "RADVLM_PHANTOM1"
SOP_CLASSES = {"CR": ComputedRadiographyImageStorage,
               "DX": DigitalXRayImageStorageForPresentation}
VIEW_CODES = {"PA": ("272479007", "postero-anterior"), "AP": ("399348003", "antero-posterior"),
              "LL": ("399173006", "left lateral"), "RL": ("399198007", "right lateral")}
"""SNOMED CT view codes (CID 4010) as pydicom's code dictionary names them."""
PHANTOM_NOTICE = "SYNTHETIC PHANTOM - not a patient image; for testing and demonstration only"


def phantom_uid(seed: int, index: int, role: str) -> str:
    """Deterministic '2.25.<uuid>' UID for (seed, index, role); roles: study, frontal-series,
    frontal, lateral-series, lateral."""
    value = uuid.uuid5(_UID_NAMESPACE, f"radvlm-phantom/{seed}/{index}/{role}")
    return f"2.25.{value.int}"


def patient_name(index: int) -> str:
    return f"PHANTOM^{index:04d}"


def patient_id(seed: int, index: int) -> str:
    return f"PHANTOM-S{seed}-{index:06d}"


def stored_values(intensity: np.ndarray, bits_stored: int, photometric: str) -> np.ndarray:
    """Display intensities (0..1, MONOCHROME2 sense) → unsigned stored values."""
    if not 8 <= bits_stored <= 16:
        raise ValueError("bits_stored must be within 8..16")
    top = (1 << bits_stored) - 1
    values = np.rint(np.clip(intensity, 0.0, 1.0) * top).astype(np.int64)
    if photometric == "MONOCHROME1":
        values = top - values
    elif photometric != "MONOCHROME2":
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    return values.astype(np.uint8 if bits_stored <= 8 else np.uint16)


def frontal_dataset(phantom: Phantom, scale: int = 1) -> Dataset:
    """The frontal (PA/AP) image of a phantom; `scale` enlarges the pixel matrix (nearest)."""
    acq = phantom.acquisition
    return _dataset(phantom, phantom.intensity, acq.view_position, "frontal", scale, 1)


def lateral_dataset(phantom: Phantom, scale: int = 1) -> Dataset | None:
    """The study's lateral image (ViewPosition LL/RL), or None when the study has none."""
    intensity = phantom.lateral_intensity()
    if intensity is None:
        return None
    return _dataset(phantom, intensity, phantom.acquisition.lateral_view, "lateral", scale, 2)


def write_dataset(ds: Dataset, path: str | Path) -> Path:
    """Write a Part 10 file (preamble, file meta, Explicit VR Little Endian)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    path.write_bytes(buffer.getvalue())
    return path


def _dataset(phantom: Phantom, intensity: np.ndarray, view: str, role: str, scale: int,
             series_number: int) -> Dataset:
    if scale < 1:
        raise ValueError("scale must be ≥ 1")
    acq = phantom.acquisition
    seed, index = phantom.seed, phantom.index
    if scale > 1:
        intensity = np.repeat(np.repeat(intensity, scale, axis=0), scale, axis=1)
    sop_class = SOP_CLASSES[acq.modality]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = phantom_uid(seed, index, role)
    study_date = (date(2025, 1, 1) + timedelta(days=index % 365)).strftime("%Y%m%d")
    study_time = f"{8 + index % 10:02d}{index % 60:02d}00"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = study_time
    ds.AccessionNumber = f"PH{seed % 1000:03d}{index:06d}"[:16]
    ds.Modality = acq.modality
    ds.Manufacturer = "RadVLM phantom generator"
    ds.ManufacturerModelName = "training.phantoms"
    ds.SoftwareVersions = GENERATOR_VERSION
    ds.InstitutionName = "Synthetic phantom"
    ds.ReferringPhysicianName = ""
    frontal = role == "frontal"
    ds.StudyDescription = "XR CHEST AP PORTABLE" if acq.view_position == "AP" else "XR CHEST PA"
    ds.SeriesDescription = f"CHEST {view}" if frontal else "CHEST LATERAL"
    ds.ProtocolName = ds.SeriesDescription
    ds.PatientName = patient_name(index)
    ds.PatientID = patient_id(seed, index)
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientComments = PHANTOM_NOTICE
    ds.ImageComments = PHANTOM_NOTICE
    ds.StudyInstanceUID = phantom_uid(seed, index, "study")
    ds.SeriesInstanceUID = phantom_uid(seed, index, f"{role}-series")
    ds.StudyID = f"{index % 100000}"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    code, meaning = VIEW_CODES[view]
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "SCT", meaning
    ds.ViewCodeSequence = [item]
    ds.PatientOrientation = ["L", "F"] if frontal else (["P", "F"] if view == "LL" else ["A", "F"])
    ds.ImageLaterality = "U"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    spacing = phantom.anatomy.pixel_spacing_mm / scale
    ds.ImagerPixelSpacing = [f"{spacing:.6f}", f"{spacing:.6f}"]
    ds.PixelSpacing = [f"{spacing:.6f}", f"{spacing:.6f}"]
    ds.DistanceSourceToDetector = "1800" if acq.view_position == "PA" else "1000"
    if acq.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if acq.photometric == "MONOCHROME2" else -1
    pixels = stored_values(intensity, acq.bits_stored, acq.photometric)
    ds.set_pixel_data(np.ascontiguousarray(pixels), acq.photometric, acq.bits_stored,
                      generate_instance_uid=False)
    top = (1 << acq.bits_stored) - 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.WindowCenter = str((top + 1) // 2)
    ds.WindowWidth = str(top + 1)
    ds.WindowCenterWidthExplanation = "FULL RANGE"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(ExplicitVRLittleEndian)
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds.file_meta = meta
    return ds
