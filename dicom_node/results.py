"""Turn one StudyResult into files under ``data_dir/results/<StudyUID>/`` (atomically).

Files: ``sr.dcm`` (TID 1500 Comprehensive 3D SR), ``gsps.dcm`` (when enabled and there is a box),
``bundle.json`` (FHIR R4 transaction Bundle; none when the source has an empty Patient ID and the
site's rule is ``skip``, docs/fhir.md) and ``result.json`` (the typed result). UIDs come
from the writers' deterministic derivation, so a re-run rewrites the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from config.settings import SRSettings
from inference.result import StudyResult
from sr_writer import atomic_write, write_outputs


@dataclass(frozen=True)
class ResultFiles:
    directory: Path
    sr: Path
    gsps: Path | None
    bundle: Path | None
    result: Path
    fhir_skipped: str | None = None
    """Why no FHIR bundle was written (empty Patient ID, ``[sr] fhir_without_patient_id = "skip"``):
    FHIR destinations are then not queued; the SR/GSPS are delivered as usual."""
    gsps_skipped: str | None = None
    """Why no GSPS was written although the result has boxes (a source VOI attribute that cannot be
    copied, named without its value); the SR and FHIR are delivered as usual."""

    @property
    def dicom(self) -> list[Path]:
        return [p for p in (self.sr, self.gsps) if p is not None]


def write_result_files(result: StudyResult, source: Dataset, settings: SRSettings, directory: Path,
                       *, fhir: bool = True) -> ResultFiles:
    with_gsps = settings.gsps_enabled and any(region.boxes for region in result.regions)
    written = write_outputs(result, source, settings, sr_path=directory / "sr.dcm",
                            gsps_path=directory / "gsps.dcm" if with_gsps else None,
                            fhir_path=directory / "bundle.json" if fhir else None)
    if not with_gsps:
        (directory / "gsps.dcm").unlink(missing_ok=True)
    result_path = atomic_write(directory / "result.json",
                               lambda tmp: tmp.write_text(result.model_dump_json(indent=2), encoding="utf-8"))
    return ResultFiles(directory, written.sr_path, written.gsps_path, written.fhir_path, result_path,
                       fhir_skipped=written.fhir_skipped_reason, gsps_skipped=written.gsps_skipped_reason)
