"""DICOM (or research PNG/JPEG) → the 8-bit grayscale image the model looks at (design §3 "Pixels").

Pipeline for a grayscale DICOM image:

1. decode Pixel Data through pydicom's decoders (native, deflated, RLE, JPEG baseline/extended/
   lossless, JPEG-LS, JPEG 2000 via the pylibjpeg/pyjpegls plugins);
2. Modality LUT: the Modality LUT Sequence, else Rescale Slope/Intercept, else identity;
3. VOI: the first item of the VOI LUT Sequence, else the FIRST Window Center/Width with its
   VOI LUT Function (LINEAR, LINEAR_EXACT, SIGMOID), else the min..max of the actual values;
4. MONOCHROME1 is inverted after the VOI step, so 0 is always black (MONOCHROME2 sense);
5. the VOI output range is mapped exactly onto 0..255.

The original Rows/Columns are kept: the model's boxes are relative to them. Colour images are
refused unless the caller allows them (then converted to luminance, ITU-R BT.601 weights).
Errors are `inference.errors.InputImageError` subclasses whose messages name the file or SOP
Instance UID, never the patient's name or ID.
"""

from __future__ import annotations

import copy
import logging
import math
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_windowing
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from inference.errors import (
    ColourImageError,
    InputImageError,
    MultiFrameError,
    NoPixelDataError,
    NotAnImageError,
    UndecodablePixelDataError,
)
from inference.result import SourceImage

logger = logging.getLogger(__name__)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: ITU-R BT.601 luma weights, the ones Pillow's convert("L") uses.
_LUMA = np.array([0.299, 0.587, 0.114])
#: Default largest Rows × Columns decoded (radiography detectors are ≤ ~20 MP); the node passes
#: ``[inference] max_image_pixels``.
MAX_PIXELS = 64_000_000


@dataclass(frozen=True, eq=False)
class ModelImage:
    """The image handed to the model.

    Guarantees: `pixels` is a read-only uint8 array of shape (source.rows, source.columns) in
    display sense (0 = black, as MONOCHROME2 after all LUTs); `source` carries UIDs and the
    original geometry, never patient identifiers.
    """

    pixels: np.ndarray
    source: SourceImage

    def __post_init__(self) -> None:
        pixels = self.pixels
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2:
            raise TypeError("ModelImage.pixels must be a 2-D uint8 numpy array")
        if pixels.shape != (self.source.rows, self.source.columns):
            raise ValueError(f"ModelImage.pixels has shape {pixels.shape} but the source is "
                             f"{self.source.rows} rows × {self.source.columns} columns")
        if pixels.flags.writeable:
            pixels = pixels.copy()
            pixels.flags.writeable = False
            object.__setattr__(self, "pixels", pixels)

    @property
    def rows(self) -> int:
        return self.source.rows

    @property
    def columns(self) -> int:
        return self.source.columns

    def to_pil_rgb(self) -> Image.Image:
        """The pixels as an RGB Pillow image (gray replicated to R, G, B), columns × rows."""
        return Image.fromarray(np.ascontiguousarray(self.pixels)).convert("RGB")


def load_image(path: str | Path, *, allow_colour: bool = False, max_pixels: int = MAX_PIXELS) -> ModelImage:
    """Read a DICOM file (Part 10, or without preamble) or a PNG/JPEG file into a ModelImage.

    The format is recognised from the content, not the extension. PNG/JPEG are for research
    use: they are converted to grayscale (colour check does not apply to them).
    Raises an `InputImageError` subclass for anything that is not a usable single-frame image.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError as exc:
        raise NotAnImageError(f"{path}: cannot be read ({exc.strerror or exc}).") from exc
    if head.startswith(_PNG_SIGNATURE) or head.startswith(_JPEG_SIGNATURE):
        return _image_from_bitmap(path)
    ds = _read_dicom(path, head)
    return image_from_dataset(ds, allow_colour=allow_colour, file_name=path.name, max_pixels=max_pixels)


def image_from_dataset(ds: Dataset, *, allow_colour: bool = False,
                       file_name: str | None = None, max_pixels: int = MAX_PIXELS) -> ModelImage:
    """Turn a DICOM dataset into a ModelImage (the pipeline in the module docstring).

    `ds` is not modified. Raises NoPixelDataError (no Pixel Data: SR, KOS, PR…),
    NotAnImageError (Pixel Data without an Image Pixel module), MultiFrameError,
    ColourImageError (unless `allow_colour`) or UndecodablePixelDataError — also for a malformed
    attribute that makes the pipeline itself fail (an unknown VR, a value of the wrong type): the
    message names the step, never the attribute's value (it may carry patient data).
    """
    try:
        return _image_from_dataset(ds, allow_colour=allow_colour, file_name=file_name, max_pixels=max_pixels)
    except InputImageError:
        raise
    except Exception as exc:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == __file__]
        step = frames[-1].name.strip("_<>") if frames else "reading"
        raise UndecodablePixelDataError(
            f"{file_name or 'the DICOM object'}: an image attribute is malformed ({type(exc).__name__} in "
            f"{step}); the file cannot be turned into an image. Send the original from the modality.") from exc


def _image_from_dataset(ds: Dataset, *, allow_colour: bool, file_name: str | None, max_pixels: int) -> ModelImage:
    where = _describe(ds, file_name)
    _check_has_pixels(ds, where)
    _check_single_frame(ds, where)
    _check_size(ds, where, max_pixels)
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    colour = int(ds.get("SamplesPerPixel") or 1) != 1 or photometric not in _GREYSCALE
    if colour and not allow_colour:
        raise ColourImageError(
            f"{where}: a colour image (Photometric Interpretation {photometric or 'missing'}, "
            f"{ds.get('SamplesPerPixel', 1)} samples per pixel) where a grayscale radiograph "
            "was expected; send the original grayscale X-ray instead.")
    stored = _decode(ds, where)
    if colour:
        pixels = _colour_to_uint8(stored, ds, photometric)
    else:
        pixels = _grey_to_uint8(stored, ds, where)
    pixels.flags.writeable = False
    return ModelImage(pixels=pixels, source=_source(ds, file_name))


# ----------------------------------------------------------------------------- reading files


def _read_dicom(path: Path, head: bytes) -> Dataset:
    """Parse `path` as DICOM: Part 10 first (force=False), else a file without preamble.

    Raises NotAnImageError when the content is not DICOM, UndecodablePixelDataError when the
    file is DICOM but truncated so badly that no data set survives.
    """
    try:
        ds = pydicom.dcmread(path, force=False)
    except InvalidDicomError:  # no "DICM" at byte 128: maybe a bare data set
        if not _looks_like_bare_dicom(head):
            raise NotAnImageError(
                f"{path}: not a DICOM, PNG or JPEG file (no 'DICM' marker at byte 128, no "
                "DICOM element at the start, no PNG/JPEG signature).") from None
        ds = _read_forced(path)
    except Exception as exc:  # pydicom raises many types on a damaged header
        raise NotAnImageError(f"{path}: has a DICOM header but cannot be parsed "
                              f"({type(exc).__name__}: {exc}).") from exc
    _check_data_set_read(ds, path)
    return ds


def _read_forced(path: Path) -> Dataset:
    """dcmread(force=True) for a file without preamble; parse failures → NotAnImageError."""
    try:
        return pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise NotAnImageError(f"{path}: looks like a DICOM file without preamble but cannot be "
                              f"parsed ({type(exc).__name__}: {exc}).") from exc


def _check_data_set_read(ds: Dataset, path: Path) -> None:
    """Raise unless `ds` holds a DICOM object (SOP Class UID, Rows or Pixel Data).

    pydicom 3.0.2 returns an EMPTY data set, with only a warning, when a file ends inside an
    undefined-length element such as encapsulated Pixel Data: with file meta present that is
    a truncated file, not a non-DICOM one.
    """
    if any(keyword in ds for keyword in ("SOPClassUID", "Rows", *_PIXEL_DATA_KEYWORDS)):
        return
    if len(ds) == 0 and _transfer_syntax(ds):
        raise UndecodablePixelDataError(
            f"{path}: has DICOM file meta but no readable data set; the file is truncated or "
            "corrupt (e.g. cut inside compressed Pixel Data). Re-send the image.")
    raise NotAnImageError(f"{path}: not a DICOM image object (no SOP Class UID, no image).")


def _looks_like_bare_dicom(head: bytes) -> bool:
    """True if `head` starts with a little-endian tag of group 0002 (file meta) or 0008."""
    if len(head) < 8:
        return False
    group = int.from_bytes(head[0:2], "little")
    element = int.from_bytes(head[2:4], "little")
    return group in (0x0002, 0x0008) and element < 0x1000


def _image_from_bitmap(path: Path) -> ModelImage:
    """A PNG/JPEG file as a grayscale ModelImage (EXIF orientation applied; 16-bit min..max)."""
    try:
        with Image.open(path) as opened:
            if opened.format not in ("PNG", "JPEG"):
                raise NotAnImageError(f"{path}: a {opened.format} image; only DICOM, PNG and "
                                      "JPEG are accepted.")
            opened.load()
            img = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, SyntaxError) as exc:
        raise NotAnImageError(f"{path}: not a readable PNG/JPEG file ({exc}).") from exc
    except OSError as exc:  # truncated or corrupt image data
        raise UndecodablePixelDataError(f"{path}: the PNG/JPEG image data cannot be decoded "
                                        f"({exc}); the file may be truncated.") from exc
    wide = img.mode in ("I", "I;16", "I;16B", "I;16L")
    if wide:
        pixels = _scale_min_max(np.asarray(img, dtype=np.float64))
    else:
        pixels = np.asarray(img.convert("L"), dtype=np.uint8).copy()
    source = SourceImage(rows=pixels.shape[0], columns=pixels.shape[1],
                         bits_stored=16 if wide else 8, file_name=path.name)
    return ModelImage(pixels=pixels, source=source)


# ----------------------------------------------------------------------------- checks


def _describe(ds: Dataset, file_name: str | None) -> str:
    """How error messages name the object: file name and/or SOP Instance UID, never the patient."""
    uid = ds.get("SOPInstanceUID")
    if file_name and uid:
        return f"{file_name} (SOP Instance UID {uid})"
    if file_name:
        return file_name
    return f"SOP Instance UID {uid}" if uid else "DICOM object without SOP Instance UID"


def _sop_class_name(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID")
    if not uid:
        return "an object without SOP Class UID"
    name = pydicom.uid.UID(str(uid)).name
    return f"a {name} object" if name != str(uid) else f"an object of SOP Class {uid}"


def _check_has_pixels(ds: Dataset, where: str) -> None:
    """Raise unless `ds` has Pixel Data and an Image Pixel module (Rows, Columns)."""
    has_pixels = any(ds.get(keyword) is not None for keyword in _PIXEL_DATA_KEYWORDS)
    has_geometry = bool(ds.get("Rows")) and bool(ds.get("Columns"))
    if not has_pixels and has_geometry:
        raise UndecodablePixelDataError(
            f"{where}: {_sop_class_name(ds)} with Rows/Columns but no Pixel Data; the file is "
            "probably truncated (encapsulated Pixel Data cut short). Re-send the image.")
    if not has_pixels:
        raise NoPixelDataError(f"{where}: {_sop_class_name(ds)} without Pixel Data (not an image; "
                               "e.g. a report, key-object selection or presentation state).")
    if not has_geometry:
        raise NotAnImageError(f"{where}: {_sop_class_name(ds)} with Pixel Data but no Rows/"
                              "Columns (no Image Pixel module); not a usable image.")
    if "PixelData" not in ds:
        raise UndecodablePixelDataError(f"{where}: float pixel data (parametric map); a "
                                        "radiograph with integer Pixel Data is expected.")


def _check_single_frame(ds: Dataset, where: str) -> None:
    """Raise MultiFrameError when NumberOfFrames > 1."""
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        raise MultiFrameError(f"{where}: a multi-frame object with {frames} frames; the model "
                              "takes one single-frame projection radiograph (CR/DX).")


def _check_size(ds: Dataset, where: str, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse images larger than ``max_pixels`` before decoding: a few kB of compressed Pixel Data
    can declare gigabytes (a decompression bomb); the largest radiography detectors are ~20 MP."""
    try:
        pixels = int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0)
    except (TypeError, ValueError):
        return
    if pixels > max_pixels:
        raise UndecodablePixelDataError(
            f"{where}: {ds.get('Rows')} rows × {ds.get('Columns')} columns exceeds the "
            f"{max_pixels / 1_000_000:g} megapixel limit for a projection radiograph ([inference] max_image_pixels).")


# ----------------------------------------------------------------------------- decoding


def _decode(ds: Dataset, where: str) -> np.ndarray:
    """Decode the single frame of Pixel Data, colour converted to RGB; wraps pydicom's errors."""
    try:
        arr = pydicom.pixels.pixel_array(_with_transfer_syntax(ds))
    except MemoryError:
        raise
    except Exception as exc:  # decoders raise ValueError, RuntimeError, NotImplementedError…
        ts = _transfer_syntax(ds)
        ts_name = f"{ts.name} ({ts})" if ts else "unknown transfer syntax"
        raise UndecodablePixelDataError(
            f"{where}: Pixel Data cannot be decoded ({ts_name}): {exc}. The file may be "
            "truncated or corrupt, or no decoder for this transfer syntax is installed.") from exc
    expected = (int(ds.Rows), int(ds.Columns))
    if arr.shape[:2] != expected:
        raise UndecodablePixelDataError(f"{where}: decoded {arr.shape[:2]} pixels but Rows/"
                                        f"Columns say {expected}.")
    return arr


def _transfer_syntax(ds: Dataset) -> pydicom.uid.UID | None:
    meta = getattr(ds, "file_meta", None)
    return meta.get("TransferSyntaxUID") if meta is not None else None


def _with_transfer_syntax(ds: Dataset) -> Dataset:
    """`ds`, or a shallow copy with a Transfer Syntax UID inferred from how it was read.

    A bare dataset (no file meta) read with force=True knows its encoding; pixel decoding
    needs it as a Transfer Syntax UID. Datasets built in memory default to Explicit VR LE.
    """
    if _transfer_syntax(ds):
        return ds
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if little is False:
        ts = ExplicitVRBigEndian
    elif implicit:
        ts = ImplicitVRLittleEndian
    else:
        ts = ExplicitVRLittleEndian
    view = copy.copy(ds)
    meta = FileMetaDataset()
    meta.update(getattr(ds, "file_meta", None) or Dataset())
    meta.TransferSyntaxUID = ts
    view.file_meta = meta
    return view


# ----------------------------------------------------------------------------- grayscale


def _grey_to_uint8(stored: np.ndarray, ds: Dataset, where: str) -> np.ndarray:
    """Modality LUT → VOI (→ fraction 0..1) → 8-bit → MONOCHROME1 inverted (after VOI)."""
    values = _apply_modality(stored, ds)
    fraction = _apply_voi(values, ds, where)
    pixels = np.rint(np.clip(fraction, 0.0, 1.0) * 255.0).astype(np.uint8)
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        pixels = 255 - pixels
    return pixels


def _lut_view(ds: Dataset) -> Dataset:
    """A fresh dataset holding only what pydicom's modality/windowing functions read.

    pydicom's apply_windowing re-assigns attributes of the dataset it is given; passing this
    view keeps the caller's dataset untouched and drops empty (zero-length) values.
    """
    view = Dataset()
    for keyword in ("PhotometricInterpretation", "BitsStored", "PixelRepresentation",
                    "ModalityLUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction"):
        value = ds.get(keyword)
        if value is not None and value != "":
            setattr(view, keyword, value)
    if _has_rescale(ds):
        view.RescaleSlope = ds.RescaleSlope
        view.RescaleIntercept = ds.RescaleIntercept
    return view


def _has_rescale(ds: Dataset) -> bool:
    return ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None


def _apply_modality(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT Sequence (first item), else Rescale Slope/Intercept, else unchanged."""
    if ds.get("ModalityLUTSequence"):
        values, _ = _apply_lut_item(stored, ds.ModalityLUTSequence[0], ds)
        return values
    if _has_rescale(ds):
        return apply_modality_lut(stored, _lut_view(ds))  # float64: x·slope + intercept
    return stored


def _apply_voi(values: np.ndarray, ds: Dataset, where: str) -> np.ndarray:
    """Map modality values to display fractions in [0, 1] (VOI LUT, first window, or min..max)."""
    voi_items = ds.get("VOILUTSequence")
    if voi_items and "LUTDescriptor" in voi_items[0] and "LUTData" in voi_items[0]:
        out, top = _apply_lut_item(values, voi_items[0], ds)
        return out / top
    if _has_window(ds):
        try:
            return _window_fraction(values, _lut_view(ds))
        except (ValueError, TypeError, ZeroDivisionError) as exc:
            logger.warning("%s: window not usable (%s; its value is not shown); scaling min..max instead",
                           where, type(exc).__name__)
    return _scale_fraction_min_max(values)


def _has_window(ds: Dataset) -> bool:
    return ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, "")


def _window_fraction(values: np.ndarray, view: Dataset) -> np.ndarray:
    """The first window through pydicom's apply_windowing, its output range mapped to 0..1.

    apply_windowing returns y_min below the window and y_max above it, where (y_min, y_max) is
    the range of the *stored* values (from BitsStored/PixelRepresentation, or the Modality LUT
    bit depth) passed through the rescale — not the range of the actual pixels, and with a
    negative slope y_min > y_max. Windowing the probe [-inf, +inf] yields exactly that pair for
    every VOI LUT Function, so the mapping to 0..1 is exact without re-deriving pydicom's rules.
    """
    low, high = apply_windowing(np.array([-np.inf, np.inf]), view, index=0)
    if not (math.isfinite(low) and math.isfinite(high)) or low == high:
        raise ValueError(f"degenerate windowing output range {low}..{high}")
    windowed = apply_windowing(values, view, index=0)
    return (windowed - low) / (high - low)


def _scale_fraction_min_max(values: np.ndarray) -> np.ndarray:
    """(v − min) / (max − min) over the actual values; all zeros for a constant image."""
    values = values.astype(np.float64, copy=False)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape)
    return (values - low) / (high - low)


def _scale_min_max(values: np.ndarray) -> np.ndarray:
    """min..max of `values` onto uint8 0..255."""
    return np.rint(_scale_fraction_min_max(values) * 255.0).astype(np.uint8)


def _apply_lut_item(values: np.ndarray, item: Dataset, ds: Dataset) -> tuple[np.ndarray, int]:
    """Apply one Modality/VOI LUT item; return (output values, top of the output range).

    Per PS3.3 C.11.1.1/C.11.2.1.1: inputs below the first mapped value take the first entry,
    inputs past the end take the last. Non-integer inputs (after a rescale) are rounded.
    The output range is 0..2**bits−1 from the descriptor, widened only when the data exceed it.

    pydicom's apply_voi is not used: it computes indices in the LUT's own dtype, so an 8-bit
    LUT with more than 256 entries wraps (pydicom 3.0.2: index 256 maps to entry 0).
    """
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = (entries & 0xFFFF) or 65536  # 0 means 2**16; undo an SS reading of e.g. 40000
    lut = _lut_data(item, entries, bits, ds)
    if first >= 0x8000 and (int(ds.get("PixelRepresentation") or 0) == 1 or values.min() < 0):
        first -= 0x10000  # second descriptor value stored as US but meant as signed
    index = np.rint(values).astype(np.int64) - first
    np.clip(index, 0, len(lut) - 1, out=index)
    top = max((1 << bits) - 1, int(lut.max()))
    return lut[index], top


def _lut_data(item: Dataset, entries: int, bits: int, ds: Dataset) -> np.ndarray:
    """LUT Data as int64, whether read as US (list of ints) or OW (bytes; 16-bit words, or
    8-bit entries packed one per byte when the byte count equals the entry count)."""
    raw: Any = item.LUTData
    if isinstance(raw, (bytes, bytearray)):
        if bits <= 8 and len(raw) == entries:
            return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
        little = _transfer_syntax(ds) != ExplicitVRBigEndian
        word = np.dtype("<u2" if little else ">u2")
        return np.frombuffer(raw, dtype=word, count=min(entries, len(raw) // 2)).astype(np.int64)
    return np.atleast_1d(np.asarray(raw, dtype=np.int64))


# ----------------------------------------------------------------------------- colour


def _colour_to_uint8(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """RGB (pydicom already converted YBR to RGB) or PALETTE COLOR → luminance uint8."""
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        top = float(np.iinfo(arr.dtype).max) if arr.dtype.kind in "ui" else float(arr.max() or 1)
    else:
        top = float((1 << int(ds.BitsStored)) - 1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        return _scale_min_max(arr)
    luminance = arr.astype(np.float64) @ _LUMA
    return np.rint(np.clip(luminance / top, 0.0, 1.0) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------- source


def _source(ds: Dataset, file_name: str | None) -> SourceImage:
    """UIDs and original geometry of `ds` (no patient identifiers)."""

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        if value is None:
            return None
        return str(value).strip() or None

    bits = ds.get("BitsStored")
    return SourceImage(
        sop_instance_uid=text("SOPInstanceUID"),
        sop_class_uid=text("SOPClassUID"),
        series_instance_uid=text("SeriesInstanceUID"),
        study_instance_uid=text("StudyInstanceUID"),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        photometric_interpretation=text("PhotometricInterpretation"),
        bits_stored=int(bits) if bits is not None else None,
        view_position=text("ViewPosition"),
        file_name=file_name,
    )


__all__ = ["ModelImage", "image_from_dataset", "load_image"]
