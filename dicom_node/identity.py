"""Pseudonymous patient identifiers for the audit log and job store.

Patient IDs are short and guessable, so a plain hash would be reversible by enumeration: we use
HMAC-SHA256 with a per-installation secret kept in ``data_dir/audit.key`` (mode 0600). The same
patient therefore gets the same pseudonym on one node, and nobody without the key can test a
guess. Names are never stored or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from pathlib import Path

from pydicom.dataset import Dataset

from inference.durable import durable_write


def is_valid_uid(value: object) -> bool:
    """A DICOM UID (PS3.5 §9.1): digits and dots, at most 64 characters.

    Leading zeros in components are tolerated (common in the wild); what matters for the node is
    that the UID is safe as a file name."""
    return isinstance(value, str) and 0 < len(value) <= 64 and re.fullmatch(r"[0-9]+(\.[0-9]+)*", value) is not None


def load_or_create_key(path: Path) -> bytes:
    """The installation secret; created once, atomically, readable by the owner only."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    try:
        durable_write(path, key, mode=0o600, replace=False)
    except FileExistsError:
        pass  # another process won the race: use theirs
    return path.read_bytes()


class Pseudonymizer:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def patient(self, ds: Dataset) -> str | None:
        """Pseudonym of (IssuerOfPatientID, PatientID); None when the object has no PatientID."""
        patient_id = str(ds.get("PatientID", "") or "").strip()
        if not patient_id:
            return None
        issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
        digest = hmac.new(self._key, f"{issuer}\\{patient_id}".encode("utf-8"), hashlib.sha256)
        return "p-" + digest.hexdigest()[:24]
