"""Hostile DICOM files for the reliability tests, written to disk in a streaming way so that the
test process itself never holds the hundreds of megabytes they declare or inflate to:

* ``write_deflate_bomb`` — Deflated Explicit VR Little Endian whose Pixel Data is zeros: ~1 kB of
  deflate per MB inflated (a 1 GiB data set is a ~1 MB file);
* ``write_oversize_instance`` — an uncompressed instance of the requested size on disk.

Both are real CR objects (valid UIDs, header before Pixel Data) that only their size makes hostile.
"""

from __future__ import annotations

import struct
import zlib
from io import BytesIO
from pathlib import Path

from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from tests.dicom_samples import make_cr_dataset

_CHUNK = 4 * 2**20


def _header(rows: int, columns: int, **overrides: object) -> tuple[bytes, object]:
    """(explicit-VR-LE data set bytes without Pixel Data, the dataset)."""
    ds = make_cr_dataset(rows=8, columns=8, **overrides)
    del ds.PixelData
    ds.Rows, ds.Columns = rows, columns
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue(), ds


def _meta(ds: object, transfer_syntax: str) -> bytes:
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    fp = BytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
    return fp.getvalue()


def _pixel_element(length: int) -> bytes:
    # (7FE0,0010) OW, explicit VR little endian long form: tag, VR, 2 reserved bytes, 32-bit length
    return struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length)


def _shape(pixel_bytes: int) -> tuple[int, int, int]:
    """rows, columns and an even pixel byte count near ``pixel_bytes`` for 16-bit pixels."""
    columns = 32768  # US fields: rows and columns each ≤ 65535
    rows = min(max(pixel_bytes // (2 * columns), 1), 65535)
    return rows, columns, rows * columns * 2


def write_deflate_bomb(path: Path, inflated_bytes: int = 2**30, **overrides: object) -> tuple[Path, object]:
    """A Deflated Explicit VR LE CR instance inflating to ~``inflated_bytes``; returns (path, header dataset)."""
    rows, columns, length = _shape(inflated_bytes)
    header, ds = _header(rows, columns, **overrides)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(_CHUNK)
    with open(path, "wb") as out:
        out.write(_meta(ds, DeflatedExplicitVRLittleEndian))
        out.write(compressor.compress(header + _pixel_element(length)))
        left = length
        while left:
            n = min(left, _CHUNK)
            out.write(compressor.compress(zeros[:n]))
            left -= n
        out.write(compressor.flush())
    return path, ds


def write_oversize_instance(path: Path, size_bytes: int = 256 * 2**20, **overrides: object) -> tuple[Path, object]:
    """An uncompressed Explicit VR LE CR instance of about ``size_bytes``; returns (path, header dataset)."""
    rows, columns, length = _shape(size_bytes)
    header, ds = _header(rows, columns, **overrides)
    zeros = bytes(_CHUNK)
    with open(path, "wb") as out:
        out.write(_meta(ds, ExplicitVRLittleEndian))
        out.write(header + _pixel_element(length))
        left = length
        while left:
            n = min(left, _CHUNK)
            out.write(zeros[:n])
            left -= n
    return path, ds
