"""Specific exceptions of the DICOM node, worded for a PACS administrator."""

from __future__ import annotations

from inference.errors import RadVLMError


class NodeError(RadVLMError):
    """Base class of the node's own errors."""


class DataDirLockedError(NodeError):
    """Another node process already uses this data directory."""


class SpoolError(NodeError):
    """An instance could not be written durably to the spool."""


class OutOfSpaceError(SpoolError):
    """The data directory is below its configured free-space floor."""


class InvalidInstanceError(NodeError):
    """A received object lacks identifiers the node needs (UIDs) or has malformed ones."""


class DeliveryError(NodeError):
    """A destination refused or did not acknowledge a result; the outbox retries it."""


class DestinationNotConfiguredError(DeliveryError):
    """A stored delivery names a destination that is no longer in the configuration."""


class PortInUseError(NodeError):
    """The DICOM or HTTP port of the node cannot be opened (in use, or not permitted)."""
