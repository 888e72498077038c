"""Specific exceptions of the inference core.

Messages are written for a PACS administrator: they say what is wrong with which file or
folder and what to do, never a bare library traceback.
"""

from __future__ import annotations


class RadVLMError(Exception):
    """Base class of every error raised on purpose by this project."""


class InputImageError(RadVLMError):
    """The input file cannot be turned into a model image (CLI exit code 2)."""


class NotAnImageError(InputImageError):
    """The file is neither a DICOM image nor a PNG/JPEG file."""


class NoPixelDataError(InputImageError):
    """A DICOM object without Pixel Data (e.g. an SR, a presentation state, a KOS)."""


class MultiFrameError(InputImageError):
    """A multi-frame object: the model takes exactly one 2-D projection radiograph."""


class ColourImageError(InputImageError):
    """A colour image where a grayscale radiograph was expected."""


class UndecodablePixelDataError(InputImageError):
    """Pixel Data present but cannot be decoded (corrupt, truncated or unsupported syntax)."""


class ReservedTokenError(RadVLMError, ValueError):
    """A question or answer text contains a chat-template control token (``<image>``,
    ``<|im_start|>``...): it would be tokenised as that token, not as text (HTTP 400)."""


class ModelError(RadVLMError):
    """The model cannot be loaded or run (CLI exit code 3)."""


class ModelFolderError(ModelError):
    """The weights folder is missing or incomplete."""


class ProcessorLoadError(ModelError):
    """The image/text processor shipped with the weights cannot be built."""
