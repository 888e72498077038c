"""Pick the one frontal chest radiograph of a study to send to the model (design §3).

Each instance is classified from its header alone (no pixel decoding):

1. not an image (no Pixel Data) / multi-frame → rejected;
2. chest? BodyPartExamined, then AnatomicRegionSequence, then description keywords → else skipped;
3. view, first rule that decides wins: ViewPosition → ViewCodeSequence (SNOMED CT) →
   PatientOrientation (row/column directions) → SeriesDescription/ProtocolName keywords
   (StudyDescription only when unambiguous).

Among frontal candidates the best is chosen by: rule strength, PA before AP, for-presentation
before for-processing, ORIGINAL before DERIVED, most pixels, earliest received. Every instance
gets a decision and a reason naming the rule that fired.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.jobstore import InstanceDecision

FRONTAL, LATERAL = "frontal", "lateral"
RULES = ("ViewPosition", "ViewCodeSequence", "PatientOrientation", "keywords")

CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS", "TORAX", "THORAX_CHEST", "CHEST_LAT", "CHESTPA"})
CHEST_REGION_CODES = frozenset({"43799004", "51185008", "302551006", "39607008", "T-D3000", "T-D3050"})
CHEST_WORDS = re.compile(r"\b(chest|thorax|thoracic|thorx|torax|thorace?|cxr|lungs?|poumons?|rx\s*thorax|tórax)\b", re.I)

VIEW_POSITIONS = {"PA": ("frontal", "PA"), "AP": ("frontal", "AP"), "LL": ("lateral", "LL"),
                  "RL": ("lateral", "RL"), "LAT": ("lateral", "LAT"), "LATERAL": ("lateral", "LAT"),
                  "LLD": ("decubitus", "LLD"), "RLD": ("decubitus", "RLD")}
VIEW_CODES = {
    "272479007": ("frontal", "PA"), "399182001": ("frontal", "PA"), "R-10214": ("frontal", "PA"),
    "399348003": ("frontal", "AP"), "R-10206": ("frontal", "AP"),
    "399067008": ("lateral", "LAT"), "R-102CD": ("lateral", "LAT"),
    "399173006": ("lateral", "LL"), "R-10236": ("lateral", "LL"),
    "399198007": ("lateral", "RL"), "R-10232": ("lateral", "RL"),
    "102535000": ("decubitus", "RLD"), "102536004": ("decubitus", "LLD"),
}
_FRONTAL_WORDS = re.compile(r"\b(pa|p\.a\.|ap|a\.p\.|frontal|postero-?anterior|antero-?posterior|face)\b", re.I)
_LATERAL_WORDS = re.compile(r"\b(lat|lateral|ll|rl|profil|seitlich)\b", re.I)
_AP_WORDS = re.compile(r"\b(ap|a\.p\.|antero-?posterior)\b", re.I)


@dataclass(frozen=True)
class Candidate:
    """One instance as the selector sees it (header only)."""

    sop_instance_uid: str
    header: Dataset | None
    error: str | None = None
    received_order: int = 0


@dataclass(frozen=True)
class Classification:
    sop_instance_uid: str
    decision: str  # frontal | lateral | decubitus | unknown-view | non-chest | not-an-image | multi-frame | unreadable
    rule: str
    reason: str
    projection: str | None = None  # PA / AP when known
    rank: tuple = ()


@dataclass(frozen=True)
class Selection:
    chosen: str | None
    rule: str
    reason: str
    decisions: tuple[InstanceDecision, ...]


def read_header(path: Path) -> Dataset:
    """Header only; Pixel Data is left unread (deferred) but its presence stays visible."""
    return dcmread(path, defer_size="1 KB")


class HeaderValueError(ValueError):
    """An attribute the selector reads has a value that cannot be converted (e.g. NumberOfFrames "ab").
    The message names the attribute only: the value may carry patient data."""

    def __init__(self, keyword: str, cause: BaseException) -> None:
        super().__init__(f"{keyword} cannot be read ({type(cause).__name__}): invalid value")
        self.keyword = keyword


_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")
_CODE_VALUE = re.compile(r"[A-Za-z0-9.:\-]{1,16}")


def _shown(value: str, pattern: re.Pattern[str] = _CODE_STRING) -> str:
    """A coded value (CS, code) is shown in a reason; anything else may be free text: not shown."""
    return value if pattern.fullmatch(value) else "(a value that is not a code string)"


def _get(ds: Dataset, keyword: str, default: object = None) -> object:
    try:
        return ds.get(keyword, default)
    except Exception as exc:
        raise HeaderValueError(keyword, exc) from exc


def _text(ds: Dataset, keyword: str) -> str:
    value = _get(ds, keyword)
    if value is None:
        return ""
    try:
        return str(value).strip()
    except Exception as exc:
        raise HeaderValueError(keyword, exc) from exc


def _int(ds: Dataset, keyword: str, default: int) -> int:
    value = _get(ds, keyword, default)
    try:
        return int(value or default)
    except Exception as exc:
        raise HeaderValueError(keyword, exc) from exc


def _items(ds: Dataset, keyword: str) -> list[Dataset]:
    value = _get(ds, keyword, [])
    try:
        return list(value or [])
    except Exception as exc:
        raise HeaderValueError(keyword, exc) from exc


def _is_chest(ds: Dataset) -> tuple[bool | None, str]:
    body = _text(ds, "BodyPartExamined").upper()
    if body:
        return body in CHEST_BODY_PARTS, f"BodyPartExamined={_shown(body)}"
    for item in _items(ds, "AnatomicRegionSequence"):
        code = _text(item, "CodeValue")
        return code in CHEST_REGION_CODES, f"AnatomicRegionSequence={_shown(code, _CODE_VALUE)}"
    for keyword in ("SeriesDescription", "ProtocolName", "StudyDescription", "RequestedProcedureDescription"):
        value = _text(ds, keyword)
        if value and CHEST_WORDS.search(value):
            return True, f"{keyword} mentions the chest"
    return None, "no BodyPartExamined, AnatomicRegionSequence or chest keyword"


def _view(ds: Dataset) -> tuple[str, str, str | None, str]:
    """(view kind, rule, projection, reason)."""
    vp = _text(ds, "ViewPosition").upper()
    if vp in VIEW_POSITIONS:
        kind, projection = VIEW_POSITIONS[vp]
        return kind, "ViewPosition", projection, f"ViewPosition={vp}"
    for item in _items(ds, "ViewCodeSequence"):
        code = _text(item, "CodeValue")
        if code in VIEW_CODES:
            kind, projection = VIEW_CODES[code]
            return kind, "ViewCodeSequence", projection, f"ViewCodeSequence={code}"
    orientation = _get(ds, "PatientOrientation")
    try:
        pair = [str(v).upper() for v in orientation] if orientation is not None and len(orientation) == 2 else None
    except Exception as exc:
        raise HeaderValueError("PatientOrientation", exc) from exc
    if pair is not None:
        row, col = pair
        shown = f"{_shown(row)}\\{_shown(col)}"
        if row[:1] in ("L", "R") and col[:1] in ("F", "H"):
            return FRONTAL, "PatientOrientation", None, f"PatientOrientation={shown} (frontal)"
        if row[:1] in ("A", "P") and col[:1] in ("F", "H"):
            return LATERAL, "PatientOrientation", None, f"PatientOrientation={shown} (lateral)"
    for keyword in ("SeriesDescription", "ProtocolName", "AcquisitionDeviceProcessingDescription", "StudyDescription"):
        value = _text(ds, keyword)
        if not value:
            continue
        frontal, lateral = bool(_FRONTAL_WORDS.search(value)), bool(_LATERAL_WORDS.search(value))
        if frontal != lateral:
            projection = ("AP" if _AP_WORDS.search(value) else "PA") if frontal else None
            word = "a frontal" if frontal else "a lateral"
            return (FRONTAL if frontal else LATERAL), "keywords", projection, f"{keyword} has {word} view keyword"
    return "unknown-view", "none", None, "no ViewPosition, ViewCodeSequence, PatientOrientation or view keyword"


def classify(candidate: Candidate) -> Classification:
    """Never raises: an attribute that cannot be read makes this instance "unreadable-header" with the
    attribute named in the reason (never its value); the other instances are decided as usual."""
    uid, ds = candidate.sop_instance_uid, candidate.header
    if ds is None:
        return Classification(uid, "unreadable", "header", f"unreadable: {candidate.error}")
    try:
        return _classify(uid, ds, candidate.received_order)
    except HeaderValueError as exc:
        return Classification(uid, "unreadable-header", exc.keyword, f"header not usable: {exc}")
    except Exception as exc:
        return Classification(uid, "unreadable-header", "header",
                              f"header not usable: {type(exc).__name__} while classifying (value not shown)")


def _classify(uid: str, ds: Dataset, received_order: int) -> Classification:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return Classification(uid, "not-an-image", "PixelData", "not an image: no Pixel Data")
    frames = _int(ds, "NumberOfFrames", 1)
    if frames > 1:
        return Classification(uid, "multi-frame", "NumberOfFrames", f"multi-frame ({frames} frames), not a radiograph")
    chest, why = _is_chest(ds)
    if chest is False:
        return Classification(uid, "non-chest", "BodyPart", f"not a chest image: {why}")
    if chest is None:
        return Classification(uid, "non-chest", "BodyPart", f"body part unknown: {why}")
    kind, rule, projection, reason = _view(ds)
    if kind != FRONTAL:
        return Classification(uid, kind, rule, f"{kind} view: {reason}" if kind != "unknown-view" else reason)
    processing = _text(ds, "PresentationIntentType").upper() == "FOR PROCESSING"
    try:
        image_type = _get(ds, "ImageType") or []
        derived = "DERIVED" in [str(v).upper() for v in ([image_type] if isinstance(image_type, str) else image_type)]
    except Exception as exc:
        raise HeaderValueError("ImageType", exc) from exc
    pixels = _int(ds, "Rows", 0) * _int(ds, "Columns", 0)
    rank = (RULES.index(rule), 0 if projection == "PA" else 1 if projection is None else 2, int(processing),
            int(derived), -pixels, received_order)
    return Classification(uid, FRONTAL, rule, f"frontal chest: {reason}; {why}", projection, rank)


def select(candidates: Sequence[Candidate]) -> Selection:
    """Decide a study: the chosen instance (or None) and one decision per instance."""
    classified = [classify(c) for c in candidates]
    frontal = sorted((c for c in classified if c.decision == FRONTAL), key=lambda c: c.rank)
    decisions: list[InstanceDecision] = []
    chosen = frontal[0] if frontal else None
    for c in classified:
        if chosen is not None and c.sop_instance_uid == chosen.sop_instance_uid:
            decisions.append(InstanceDecision(c.sop_instance_uid, "selected", c.reason))
        elif c.decision == FRONTAL:
            decisions.append(InstanceDecision(c.sop_instance_uid, "frontal-not-chosen",
                                              f"{c.reason}; another frontal image ranked higher"))
        else:
            decisions.append(InstanceDecision(c.sop_instance_uid, c.decision, c.reason))
    counts: dict[str, int] = {}
    for c in classified:
        counts[c.decision] = counts.get(c.decision, 0) + 1
    summary = ", ".join(f"{n} {d}" for d, n in sorted(counts.items()))
    if chosen is None:
        reasons = "; ".join(sorted({c.reason for c in classified}))
        return Selection(None, "no-frontal-chest", f"no frontal chest radiograph ({summary}): {reasons}",
                         tuple(decisions))
    return Selection(chosen.sop_instance_uid, chosen.rule, f"{chosen.reason} ({summary})", tuple(decisions))
