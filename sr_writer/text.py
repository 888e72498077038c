"""Making model text safe for the VR or datatype that carries it (SR, GSPS and FHIR).

Model answers are untrusted text: a random-weight model emits control characters, a real one can
emit anything. Every string that comes from a model passes through :func:`dicom_text` (for a
DICOM VR, in the UTF-8 ``ISO_IR 192`` repertoire the writers declare) or :func:`fhir_string`
(FHIR ``string``/``markdown``) before it is written. The readable text is kept: forbidden
characters are replaced by a space (control characters) or U+FFFD (unencodable surrogates,
non-characters), runs of the spaces this creates are folded, and over-long values are cut at a
word boundary with a visible marker. ``CleanText.altered`` says whether anything changed, so
that the writers can record it in the result (:data:`ALTERED_NOTICE`).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

ALTERED_NOTICE = ("Some model text was altered to fit the DICOM/FHIR character rules "
                  "(control characters removed or long text shortened).")
TRUNCATION_MARK = " [...]"

# Character limits per VR (PS3.5 table 6.2-1). UT is limited in bytes (2^32-2); we cap model text
# far lower so that one runaway answer cannot make a multi-megabyte SR.
VR_MAX_CHARACTERS: dict[str, int] = {"SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "UT": 65536,
                                     "PN": 64, "UC": 65536}
# Control characters each VR may hold (PS3.5 6.1.3 / 6.2): text VRs allow CR, LF, FF (and ESC,
# which only a code extension uses and which UTF-8 does not need, so we drop it too). Single-line
# VRs allow none. The backslash is the value delimiter of the multi-valued string VRs.
_MULTILINE_VRS = frozenset({"ST", "LT", "UT"})
_BACKSLASH_FORBIDDEN_VRS = frozenset({"SH", "LO", "UC", "PN"})
FHIR_STRING_MAX_CHARACTERS = 1_000_000   # FHIR: "strings SHALL NOT exceed 1 MB"; leave headroom
FHIR_DEFAULT_MAX_CHARACTERS = 65536


@dataclass(frozen=True)
class CleanText:
    """Text after cleaning and whether cleaning changed it."""

    text: str
    altered: bool


def _replace_unencodable(value: str) -> str:
    """Lone surrogates (which UTF-8 cannot encode) and Unicode non-characters become U+FFFD."""
    out = []
    for character in value:
        code = ord(character)
        if 0xD800 <= code <= 0xDFFF or (code & 0xFFFE) == 0xFFFE or 0xFDD0 <= code <= 0xFDEF:
            out.append("\ufffd")
        else:
            out.append(character)
    return "".join(out)


# Bidirectional embedding/override/isolate controls reorder how the text around them is displayed
# ("Trojan Source"): in a report they could make "left" read as "tfel". Line/paragraph separators
# are line breaks that DICOM text VRs do not know.
_DISPLAY_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029")


def _strip_controls(value: str, keep: str) -> str:
    """Every control character (C0, DEL, C1), bidirectional override and Unicode line/paragraph
    separator not in ``keep`` becomes a space; tabs become spaces."""
    out = []
    for character in value:
        if character in keep:
            out.append(character)
            continue
        if unicodedata.category(character) == "Cc" or character in _DISPLAY_CONTROLS:
            out.append(" ")
        else:
            out.append(character)
    return "".join(out)


_LAYOUT_WHITESPACE = re.compile(r"[ \t\n\r\f\v\u00a0]+")


def _was_altered(original: str, cleaned: str) -> bool:
    """Whether cleaning changed more than layout whitespace (runs of spaces, tabs, line ends,
    leading/trailing blanks): only then is the reader told that model text was altered."""
    return _LAYOUT_WHITESPACE.sub(" ", cleaned).strip() != _LAYOUT_WHITESPACE.sub(" ", original).strip()


def _cut(value: str, limit: int) -> str:
    """At most ``limit`` characters, cut at the last word boundary before it, with a marker."""
    if len(value) <= limit:
        return value
    room = max(limit - len(TRUNCATION_MARK), 0)
    head = value[:room]
    boundary = head.rfind(" ")
    if boundary > room // 2:
        head = head[:boundary]
    head = head.rstrip()
    return (head + TRUNCATION_MARK)[:limit] if limit > len(TRUNCATION_MARK) else head[:limit]


def cut_at_word(value: str, limit: int) -> str:
    """``value`` shortened to at most ``limit`` characters at a word boundary, no marker
    (for identifiers and labels, where a marker would read as part of the name)."""
    if len(value) <= limit:
        return value
    head = value[:limit]
    boundary = head.rfind(" ")
    if boundary > limit // 2:
        head = head[:boundary]
    return head.rstrip(" ,;:-")


def _fold_spaces(value: str, multiline: bool) -> str:
    if multiline:
        lines = [re.sub(r"[ \u00a0]{2,}", " ", line).rstrip() for line in value.split("\n")]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return re.sub(r"\s+", " ", value).strip()


def dicom_text(value: object, vr: str = "UT", max_characters: int | None = None) -> CleanText:
    """``value`` made valid for DICOM ``vr`` in the ISO_IR 192 (UTF-8) repertoire.

    Multi-line VRs (ST, LT, UT) keep line breaks as CR LF-free ``\\n``; single-line VRs (SH, LO,
    UC, PN) lose them. ``max_characters`` (default: the VR's limit) caps the length.
    """
    vr = vr.upper()
    original = "" if value is None else str(value)
    multiline = vr in _MULTILINE_VRS
    text = _replace_unencodable(original)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _strip_controls(text, keep="\n" if multiline else "")
    if vr in _BACKSLASH_FORBIDDEN_VRS:
        text = text.replace("\\", "/")
    text = _fold_spaces(text, multiline)
    limit = max_characters or VR_MAX_CHARACTERS.get(vr)
    if limit is not None:
        text = _cut(text, limit) if multiline else cut_at_word(text, limit)
    return CleanText(text=text, altered=_was_altered(original, text))


def fhir_string(value: object, max_characters: int = FHIR_DEFAULT_MAX_CHARACTERS) -> CleanText:
    """``value`` made valid for a FHIR ``string``/``markdown``: no control characters but
    CR, LF and TAB (FHIR's regex ``[ \\r\\n\\t\\S]+``), no surrogates, no leading/trailing
    whitespace, at most ``max_characters``."""
    original = "" if value is None else str(value)
    text = _replace_unencodable(original)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _strip_controls(text, keep="\n\t")
    text = _fold_spaces(text, multiline=True)
    text = _cut(text, min(max_characters, FHIR_STRING_MAX_CHARACTERS))
    return CleanText(text=text, altered=_was_altered(original, text))


class TextCleaner:
    """Cleans every model string one output writes and remembers whether any was altered, so
    that the writer can record :data:`ALTERED_NOTICE` once in that output."""

    def __init__(self) -> None:
        self.altered = False

    def dicom(self, value: object, vr: str = "UT", max_characters: int | None = None) -> str:
        """:func:`dicom_text` of ``value`` ("" for None); notes an alteration."""
        if value is None:
            return ""
        clean = dicom_text(value, vr, max_characters)
        self.altered |= clean.altered
        return clean.text
