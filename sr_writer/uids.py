"""Deterministic UIDs and identifiers for everything the writers create (design §1).

Every output UID is derived from the source SOP Instance UID, the model version and a
*purpose* (``"sr"``, ``"gsps"``, ``"sr-series"``, ``"tracking-0-1"``, ...), so writing the same
result again yields the same UIDs and a receiving PACS/EHR replaces instead of duplicating.

Without an organisational root the UIDs are ``2.25.<decimal UUID>`` (PS3.5 B.2), the UUID being
a name-based UUIDv5 of the inputs; with a root (``SRSettings.uid_root``) pydicom hashes the same
inputs below that root.
"""

from __future__ import annotations

import uuid

from pydicom.uid import UID, generate_uid

# A fixed namespace for the project's name-based UUIDs (itself uuid5(URL, project URL)).
RADVLM_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:radvlm-pacs:derived-identifiers")


def _check(value: str, what: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")


def derived_uuid(source_sop_instance_uid: str, model_version: str, purpose: str) -> uuid.UUID:
    """A name-based (v5) UUID for ``purpose`` of one source instance and model version."""
    _check(source_sop_instance_uid, "source_sop_instance_uid")
    _check(model_version, "model_version")
    _check(purpose, "purpose")
    name = "\x1f".join((source_sop_instance_uid.strip(), model_version, purpose))
    return uuid.uuid5(RADVLM_NAMESPACE, name)


def derived_uid(source_sop_instance_uid: str, model_version: str, purpose: str,
                *, root: str | None = None) -> str:
    """A deterministic DICOM UID (≤ 64 characters) for ``purpose``.

    ``root`` (e.g. ``"1.2.826.0.1.3680043.10.999."``) puts the UID below an organisation's
    root; by default the UID is ``2.25.`` + the decimal form of :func:`derived_uuid`.
    """
    if root is None:
        value = f"2.25.{derived_uuid(source_sop_instance_uid, model_version, purpose).int}"
    else:
        if not root.endswith("."):
            raise ValueError(f"UID root {root!r} must end with '.'")
        _check(source_sop_instance_uid, "source_sop_instance_uid")
        value = generate_uid(prefix=root, entropy_srcs=[source_sop_instance_uid.strip(),
                                                         model_version, purpose])
    uid = UID(value)
    if not uid.is_valid:
        raise ValueError(f"derived UID {value!r} is not a valid DICOM UID")
    return str(uid)


def fhir_id(source_sop_instance_uid: str, model_version: str, purpose: str) -> str:
    """A deterministic FHIR logical id (``[A-Za-z0-9\\-.]{1,64}``) for ``purpose``."""
    return str(derived_uuid(source_sop_instance_uid, model_version, purpose))


def model_uuid(model_id: str, model_version: str, weights_sha256: str) -> uuid.UUID:
    """A name-based UUID for one model build (the FHIR Device, the SR device observer)."""
    _check(model_id, "model_id")
    _check(model_version, "model_version")
    return uuid.uuid5(RADVLM_NAMESPACE, "\x1f".join(("model", model_id, model_version,
                                                     weights_sha256 or "")))


def model_uid(model_id: str, model_version: str, weights_sha256: str) -> str:
    """Device Observer UID of one model build (``2.25.`` form)."""
    return f"2.25.{model_uuid(model_id, model_version, weights_sha256).int}"
