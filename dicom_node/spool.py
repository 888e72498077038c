"""The durable spool: every acknowledged instance is a complete file on disk.

Write protocol (``inference.durable``): temp file in the same file system → write → fsync(file) →
link to the final name (never replacing an existing file) → fsync(directory). A crash at any
point leaves either no file or a complete one; temp files from a crash are removed at start-up,
and so are complete files the job store never recorded (never acknowledged). The final name is ``spool/<StudyUID>/<SOPInstanceUID>.dcm``.
A second copy of a known instance is idempotent when it is byte-identical; a *different* object
with the same SOP Instance UID never replaces the first: it is kept under ``spool/conflicts/``
for the administrator and reported.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dicom_node.errors import InvalidInstanceError, OutOfSpaceError, SpoolError
from dicom_node.identity import is_valid_uid
from inference.durable import fsync_dir, place, write_temp
from inference.model_folder import files_sha256

log = logging.getLogger(__name__)

TMP_DIR = ".incoming"
CONFLICT_DIR = "conflicts"


@dataclass(frozen=True)
class SpooledFile:
    path: Path
    sha256: str
    size: int
    outcome: Literal["new", "duplicate", "conflict"]


class Spool:
    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        (self.root / TMP_DIR).mkdir(parents=True, exist_ok=True)

    def clean_incomplete(self) -> int:
        """Remove temp files left by a crash (never acknowledged, so the sender still has them)."""
        removed = 0
        for leftover in (self.root / TMP_DIR).iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def spooled_files(self) -> list[Path]:
        """Every instance file under ``spool/<StudyUID>/`` (temp and conflict folders excluded)."""
        return [f for d in self.root.iterdir() if d.is_dir() and d.name not in (TMP_DIR, CONFLICT_DIR)
                for f in d.glob("*.dcm")]

    def remove_orphans(self, is_recorded: Callable[[Path], bool]) -> int:
        """Start-up sweep: remove instance files the job store does not know (the node died between
        the spool rename and the job-store commit, so the instance was never acknowledged and the
        sender still has it). Returns how many were removed."""
        removed = 0
        for path in self.spooled_files():
            if not is_recorded(path):
                self.discard(path)
                removed += 1
        return removed

    def discard(self, path: Path) -> None:
        """Remove a spooled file that was not acknowledged (job store failed or the instance was refused)."""
        try:
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)
            if path.parent != self.root and not any(path.parent.iterdir()):
                path.parent.rmdir()
        except OSError as exc:
            log.error("could not remove an unacknowledged spool file %s: %s", path, exc.strerror)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_room(self, incoming_bytes: int) -> None:
        free = self.free_bytes()
        if free - incoming_bytes < self.min_free_bytes:
            raise OutOfSpaceError(
                f"data directory {self.root} has {free // 2**20} MiB free, below the configured floor of "
                f"{self.min_free_bytes // 2**20} MiB (node.min_free_space_mb): refusing new instances")

    def path_for(self, study_uid: str, sop_instance_uid: str) -> Path:
        for name, uid in (("Study Instance UID", study_uid), ("SOP Instance UID", sop_instance_uid)):
            if not is_valid_uid(uid):
                raise InvalidInstanceError(f"the {name} is not a valid DICOM UID")
        return self.root / study_uid / f"{sop_instance_uid}.dcm"

    def _write_temp(self, data: bytes) -> Path:
        return write_temp(self.root / TMP_DIR, data, mode=0o640)

    def store(self, study_uid: str, sop_instance_uid: str, data: bytes) -> SpooledFile:
        """Write ``data`` durably; returns where it is and whether it was new."""
        final = self.path_for(study_uid, sop_instance_uid)
        self.check_room(len(data))
        sha = hashlib.sha256(data).hexdigest()
        try:
            if not final.exists():
                new_dir = not final.parent.exists()
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp = self._write_temp(data)
                # two associations sending one UID at once: link never replaces, the second copy is compared
                if place(tmp, final, replace=False, sync_parent_of_folder=new_dir):
                    return SpooledFile(final, sha, len(data), "new")
            if files_sha256([final]) == sha:
                return SpooledFile(final, sha, len(data), "duplicate")
            conflict = self.root / CONFLICT_DIR / f"{sop_instance_uid}.{sha[:16]}.dcm"
            new_dir = not conflict.parent.exists()
            conflict.parent.mkdir(parents=True, exist_ok=True)
            place(self._write_temp(data), conflict, replace=True, sync_parent_of_folder=new_dir)
            return SpooledFile(conflict, sha, len(data), "conflict")
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfSpaceError(f"no space left in {self.root} while writing an instance") from exc
            raise SpoolError(f"cannot write an instance to the spool {self.root}: {exc.strerror or exc}") from exc
