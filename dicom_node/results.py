"""Turn one StudyResult into files under ``data_dir/results/<StudyUID>/`` (atomically).

Files: ``sr.dcm`` (TID 1500 Comprehensive 3D SR), ``gsps.dcm`` (when enabled and there is a box),
``bundle.json`` (FHIR R4 transaction Bundle) and ``result.json`` (the typed result). UIDs come
from the writers' deterministic derivation, so a re-run rewrites the same objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import dcmwrite
from pydicom.dataset import Dataset

from config.settings import SRSettings
from inference.result import StudyResult


@dataclass(frozen=True)
class ResultFiles:
    directory: Path
    sr: Path
    gsps: Path | None
    bundle: Path | None
    result: Path

    @property
    def dicom(self) -> list[Path]:
        return [p for p in (self.sr, self.gsps) if p is not None]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _dicom_bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def write_result_files(result: StudyResult, source: Dataset, settings: SRSettings, directory: Path,
                       *, fhir: bool = True) -> ResultFiles:
    from sr_writer.gsps import build_gsps
    from sr_writer.sr import build_sr

    directory.mkdir(parents=True, exist_ok=True)
    sr_path = directory / "sr.dcm"
    _atomic_write(sr_path, _dicom_bytes(build_sr(result, source, settings)))
    gsps_path: Path | None = None
    if settings.gsps_enabled and any(region.boxes for region in result.regions):
        gsps_path = directory / "gsps.dcm"
        _atomic_write(gsps_path, _dicom_bytes(build_gsps(result, source, settings)))
    else:
        (directory / "gsps.dcm").unlink(missing_ok=True)
    bundle_path: Path | None = None
    if fhir:
        from sr_writer.fhir import build_bundle, bundle_json

        bundle_path = directory / "bundle.json"
        _atomic_write(bundle_path, bundle_json(build_bundle(result, source, settings)).encode("utf-8"))
    result_path = directory / "result.json"
    _atomic_write(result_path, result.model_dump_json(indent=2).encode("utf-8"))
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return ResultFiles(directory, sr_path, gsps_path, bundle_path, result_path)
