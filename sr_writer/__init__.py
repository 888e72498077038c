"""Result writers: TID 1500 Comprehensive 3D SR, GSPS overlay and FHIR R4 Bundle (design §3).

``write_outputs`` is what ``radvlm infer --sr/--gsps/--fhir`` calls; the builders live in
``sr_writer.sr``, ``sr_writer.gsps`` and ``sr_writer.fhir``, readers in ``sr_writer.readback``.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset

from config.settings import SRSettings
from inference.durable import durable_write
from inference.result import StudyResult
from sr_writer.errors import WriterError


@dataclass(frozen=True)
class WrittenOutputs:
    """Paths written (None where not requested) and the UIDs of the DICOM objects."""

    sr_path: Path | None = None
    sr_sop_instance_uid: str | None = None
    gsps_path: Path | None = None
    gsps_sop_instance_uid: str | None = None
    fhir_path: Path | None = None
    fhir_skipped_reason: str | None = None
    """Why no FHIR bundle was written although one was asked for (e.g. an empty Patient ID with
    ``SRSettings.fhir_without_patient_id = "skip"``); the SR and GSPS are written regardless."""
    gsps_skipped_reason: str | None = None
    """Why no GSPS was written although one was asked for (a source VOI attribute such as
    WindowWidth that cannot be copied, named without its value); the SR and FHIR are written."""


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write a file so that a crash leaves either the old file or the complete new one:
    ``write(temp_path)`` in the same folder → fsync(file) → rename → fsync(folder), owner-only
    (``inference.durable.durable_write``, the project's one durable-write helper)."""
    return durable_write(path, write, mode=0o600)


@contextmanager
def _as_writer_error() -> Iterator[None]:
    """A malformed source attribute (unknown VR, a value of the wrong type) that the builders or
    pydicom's writer trip on becomes a WriterError naming the step, never the value (patient data);
    OS errors (disk full) pass unchanged, callers retry those."""
    try:
        yield
    except (WriterError, OSError):
        raise
    except Exception as exc:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "sr_writer" in f.filename]
        where = f" in {Path(frames[-1].filename).stem}.{frames[-1].name}" if frames else ""
        raise WriterError(f"the result cannot be written against this source DICOM: an attribute of the source is"
                          f" malformed ({type(exc).__name__}{where}); its value is not shown") from exc


def write_outputs(result: StudyResult, source: Dataset, settings: SRSettings, *,
                  sr_path: str | os.PathLike | None = None,
                  gsps_path: str | os.PathLike | None = None,
                  fhir_path: str | os.PathLike | None = None) -> WrittenOutputs:
    """Build and atomically write whichever of SR / GSPS / FHIR bundle JSON is requested.

    Everything is built before anything is written, so a failure writes nothing. A GSPS path is
    ignored when ``settings.gsps_enabled`` is false. When the FHIR subject cannot be identified
    (empty Patient ID) and the site's rule is ``skip``, the SR/GSPS are still written, no bundle
    is (a stale one at ``fhir_path`` is removed) and ``fhir_skipped_reason`` says why.
    """
    import logging

    from sr_writer.fhir import FhirSubjectError, build_bundle, bundle_json
    from sr_writer.common import evidence_dataset
    from sr_writer.gsps import GspsSkipped, build_gsps
    from sr_writer.sr import build_sr

    with _as_writer_error():
        sr = build_sr(result, source, settings) if sr_path is not None else None
        bundle_text: str | None = None
        written: dict[str, object] = {}
        gsps = None
        if gsps_path is not None and settings.gsps_enabled:
            try:
                gsps = build_gsps(result, source, settings)
            except GspsSkipped as exc:  # the GSPS is optional: the SR and FHIR still go out
                written["gsps_skipped_reason"] = str(exc)
                logging.getLogger(__name__).warning("%s", exc)
        if fhir_path is not None:
            try:
                # the header as the SR copies it: attributes that cannot be decoded (an unknown VR)
                # are left out, unconvertible Type 2 dates/sex empty (sr_writer.common.evidence_dataset)
                bundle_text = bundle_json(build_bundle(result, evidence_dataset(source), settings, sr=sr,
                                                       gsps=gsps))
            except FhirSubjectError as exc:
                written["fhir_skipped_reason"] = str(exc)
                logging.getLogger(__name__).warning("no FHIR bundle written: %s", exc)
        if sr is not None:
            written["sr_path"] = atomic_write(Path(sr_path), lambda p: sr.save_as(p, enforce_file_format=True))
            written["sr_sop_instance_uid"] = str(sr.SOPInstanceUID)
        if gsps is not None:
            written["gsps_path"] = atomic_write(Path(gsps_path),
                                                 lambda p: gsps.save_as(p, enforce_file_format=True))
            written["gsps_sop_instance_uid"] = str(gsps.SOPInstanceUID)
        elif "gsps_skipped_reason" in written:
            Path(gsps_path).unlink(missing_ok=True)  # a GSPS of an earlier run is not this result's
        if bundle_text is not None:
            written["fhir_path"] = atomic_write(Path(fhir_path),
                                                 lambda p: p.write_text(bundle_text, encoding="utf-8"))
        elif fhir_path is not None:
            Path(fhir_path).unlink(missing_ok=True)  # a bundle of an earlier run is not this result's
    return WrittenOutputs(**written)  # type: ignore[arg-type]


__all__ = ["WrittenOutputs", "atomic_write", "write_outputs"]
