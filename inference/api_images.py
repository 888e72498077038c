"""Images named in chat requests: ``data:`` URLs (PNG, JPEG or DICOM bytes, base64) or references
to a study the node received (``dicom:study/<Study Instance UID>`` = the frontal image the node
selected for that study, ``dicom:instance/<SOP Instance UID>`` = one received instance).

Every image goes through ``inference.image.load_image``, so the model sees exactly the pixels
(windowing, MONOCHROME1 inversion) the node's own inference uses. Remote URLs (http/https/file)
are refused: the server never fetches anything on a client's behalf.
"""

from __future__ import annotations

import base64
import binascii
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from inference.errors import InputImageError
from inference.image import ModelImage, load_image

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.ASCII)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
ACCEPTED_MIME = ("image/png", "image/jpeg", "application/dicom", "application/octet-stream")


class ImageRequestError(ValueError):
    """The image part of a request is unusable (400), with a message for the client."""


class UnknownImageReferenceError(LookupError):
    """A ``dicom:`` reference names a study or instance this server does not have (404)."""


class ImageReferenceConflictError(RuntimeError):
    """The referenced study exists but has no usable image (e.g. it was skipped) (409)."""


@dataclass(frozen=True)
class DicomReference:
    kind: Literal["study", "instance"]
    uid: str

    @property
    def url(self) -> str:
        return f"dicom:{self.kind}/{self.uid}"


#: Resolves a reference to an image (the node's job store and spool); raises
#: UnknownImageReferenceError / ImageReferenceConflictError.
ReferenceResolver = Callable[[DicomReference], ModelImage]


def parse_dicom_reference(url: str) -> DicomReference:
    kind, _, uid = url[len("dicom:"):].partition("/")
    if kind not in ("study", "instance") or not _UID.match(uid) or len(uid) > 64:
        raise ImageRequestError(f"bad image reference {url[:100]!r}: use dicom:study/<Study Instance UID> "
                                "or dicom:instance/<SOP Instance UID>")
    return DicomReference(kind, uid)  # type: ignore[arg-type]


def decode_data_url(url: str) -> bytes:
    match = _DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise ImageRequestError("bad data URL: expected data:<mime type>;base64,<data>")
    mime = (match.group("mime") or "").lower()
    if mime not in ACCEPTED_MIME:
        raise ImageRequestError(f"unsupported image type {mime or '(none)'!r}: send one of {', '.join(ACCEPTED_MIME)}")
    try:
        data = base64.b64decode(url[match.end():], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageRequestError(f"bad data URL: the base64 data cannot be decoded ({exc})") from exc
    if not data:
        raise ImageRequestError("bad data URL: no image data")
    return data


def image_from_bytes(data: bytes, *, allow_colour: bool = False) -> ModelImage:
    """PNG/JPEG/DICOM bytes → ModelImage through the same loader as files (content-sniffed)."""
    with tempfile.TemporaryDirectory(prefix="radvlm-upload-") as folder:
        path = Path(folder) / "uploaded-image"
        path.write_bytes(data)
        try:
            return load_image(path, allow_colour=allow_colour)
        except InputImageError as exc:
            raise ImageRequestError(str(exc).replace(str(path), "uploaded image")) from exc
        except Image.DecompressionBombError as exc:
            raise ImageRequestError(f"uploaded image too large: {exc}") from exc


def resolve_image_url(url: str, resolver: ReferenceResolver | None, *, allow_colour: bool = False) -> ModelImage:
    """The ModelImage an ``image_url`` names; ImageRequestError (400), UnknownImageReferenceError
    (404) or ImageReferenceConflictError (409) otherwise."""
    url = url.strip()
    if url.startswith("data:"):
        return image_from_bytes(decode_data_url(url), allow_colour=allow_colour)
    if url.startswith("dicom:"):
        reference = parse_dicom_reference(url)
        if resolver is None:
            raise ImageRequestError("this server holds no received studies (a stand-alone worker): "
                                    "send the image as a data: URL")
        return resolver(reference)
    scheme = url.split(":", 1)[0][:20] if ":" in url else "(none)"
    raise ImageRequestError(f"unsupported image URL scheme {scheme!r}: send a data: URL (base64 PNG, JPEG or "
                            "DICOM) or dicom:study/<uid>; the server does not fetch remote URLs")
