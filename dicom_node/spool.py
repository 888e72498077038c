"""The durable spool: every acknowledged instance is a complete file on disk.

Write protocol: temp file in the same file system → write → fsync(file) → rename to the final
name → fsync(directory). A crash at any point leaves either no file or a complete one; temp files
from a crash are removed at start-up. The final name is ``spool/<StudyUID>/<SOPInstanceUID>.dcm``.
A second copy of a known instance is idempotent when it is byte-identical; a *different* object
with the same SOP Instance UID never replaces the first: it is kept under ``spool/conflicts/``
for the administrator and reported.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dicom_node.errors import InvalidInstanceError, OutOfSpaceError, SpoolError
from dicom_node.identity import is_valid_uid
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self._place_lock = threading.Lock()  # one node process per data dir (flock), so a thread lock suffices
        (self.root / TMP_DIR).mkdir(parents=True, exist_ok=True)

    def clean_incomplete(self) -> int:
        """Remove temp files left by a crash (never acknowledged, so the sender still has them)."""
        removed = 0
        for leftover in (self.root / TMP_DIR).iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

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
                raise InvalidInstanceError(f"{name} {uid!r} is not a valid DICOM UID")
        return self.root / study_uid / f"{sop_instance_uid}.dcm"

    def _write_temp(self, data: bytes) -> Path:
        fd_path = self.root / TMP_DIR / f"{os.getpid()}-{os.urandom(8).hex()}.part"
        fd = os.open(fd_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            fd_path.unlink(missing_ok=True)
            raise
        os.close(fd)
        return fd_path

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
                with self._place_lock:  # two associations sending one UID at once: the second never replaces
                    placed = not final.exists()
                    if placed:
                        os.replace(tmp, final)
                if placed:
                    _fsync_dir(final.parent)
                    if new_dir:
                        _fsync_dir(self.root)
                    return SpooledFile(final, sha, len(data), "new")
                tmp.unlink(missing_ok=True)
            if files_sha256([final]) == sha:
                return SpooledFile(final, sha, len(data), "duplicate")
            conflict = self.root / CONFLICT_DIR / f"{sop_instance_uid}.{sha[:16]}.dcm"
            conflict.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._write_temp(data)
            os.replace(tmp, conflict)
            _fsync_dir(conflict.parent)
            return SpooledFile(conflict, sha, len(data), "conflict")
        except OSError as exc:
            if exc.errno == 28:  # ENOSPC
                raise OutOfSpaceError(f"no space left in {self.root} while writing an instance") from exc
            raise SpoolError(f"cannot write instance to spool {self.root}: {exc}") from exc
