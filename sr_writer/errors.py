"""Specific exceptions of the result writers (SR, GSPS, FHIR)."""

from __future__ import annotations

from inference.errors import RadVLMError


class WriterError(RadVLMError):
    """A result could not be turned into an SR, GSPS or FHIR bundle."""


class SourceMismatchError(WriterError):
    """The result does not belong to the source DICOM it is written against (patient safety:
    identifiers, study or geometry differ), so nothing is written."""


class SourceAttributeError(WriterError):
    """The source DICOM lacks an attribute the writers need (e.g. SOP Instance UID)."""


class SRReadError(WriterError):
    """A dataset is not a RadVLM TID 1500 SR that the reader understands."""
