"""Parsers for RadVLM answers: boxes, labels, the assistant turn, report sentences.

The rules are documented with examples in docs/label-parsing.md; the docstrings below state them
briefly. Everything here is pure text processing (no model, no I/O).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from inference.labels import ABNORMALITY_LABELS, LABELS, NO_FINDING
from inference.result import Box

# ==================================================================================== boxes ====

CLAMP_TOLERANCE = 0.05
"""A coordinate in [-0.05, 0) or (1, 1.05] is clamped to 0 or 1; one further out drops its box."""

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_SEPARATOR = r"(?:\s*[,;]\s*|\s+)"   # unambiguous: no catastrophic backtracking on garbage
_NUMERIC_BODY = re.compile(rf"^\s*{_NUMBER}(?:{_SEPARATOR}{_NUMBER})*\s*,?\s*$")
_CLOSED_GROUP = re.compile(r"\[([^\[\]]*)\]")
_UNCLOSED_GROUP = re.compile(r"\[([^\[\]]*)(?=\[|$)")


@dataclass(frozen=True)
class BoxParse:
    """Boxes found in an answer, in the order generated, and why others were dropped."""

    boxes: tuple[Box, ...]
    dropped: tuple[str, ...]


def _numbers(body: str) -> list[float]:
    return [float(n) for n in re.findall(_NUMBER, body)]


def _clamp(value: float) -> float | None:
    """The value clamped into [0, 1], or None when it lies beyond CLAMP_TOLERANCE."""
    if 0.0 <= value <= 1.0:
        return value
    if -CLAMP_TOLERANCE <= value < 0.0:
        return 0.0
    if 1.0 < value <= 1.0 + CLAMP_TOLERANCE:
        return 1.0
    return None


def _box_from_values(raw: str, values: list[float]) -> Box | str:
    """A Box, or the reason (quoting ``raw``) why these four values make none.

    Rule: clamp each value (see CLAMP_TOLERANCE); swap x1/x2 and y1/y2 when given in reverse
    order (the rectangle they span is unambiguous); drop a box whose width or height is zero
    after clamping."""
    clamped = [_clamp(v) for v in values]
    far = [v for v, c in zip(values, clamped) if c is None]
    if far:
        return (f"box {raw!r}: coordinate {far[0]:g} outside [0, 1] by more than "
                f"{CLAMP_TOLERANCE:g}")
    x1, y1, x2, y2 = (c for c in clamped if c is not None)
    x1, x2 = min(x1, x2), max(x1, x2)
    y1, y2 = min(y1, y2), max(y1, y2)
    if x2 - x1 <= 0.0 or y2 - y1 <= 0.0:
        side = "width" if x2 - x1 <= 0.0 else "height"
        return f"degenerate box {raw!r}: zero {side} after clamping"
    return Box(x1=x1, y1=y1, x2=x2, y2=y2)


def _group_at(match: re.Match[str], closed: bool) -> tuple[int, Box | str | None]:
    body = match.group(1)
    if not _NUMERIC_BODY.match(body):
        return match.start(), None                      # "[image]", "[]", "[[": not a box
    raw = match.group(0).strip()
    values = _numbers(body)
    if not closed:
        return match.start(), f"incomplete box {raw!r}: no closing bracket"
    if len(values) == 1:
        return match.start(), None                      # "[1]": a reference, not a box
    if len(values) != 4:
        return match.start(), f"box {raw!r}: {len(values)} numbers, expected 4"
    return match.start(), _box_from_values(raw, values)


def parse_boxes(text: str) -> BoxParse:
    """All ``[x1, y1, x2, y2]`` boxes in ``text``, in order.

    Tolerant of spacing, any number of decimals, integers ("[0, 0.2, 1, 0.9]"), commas or blanks
    between numbers, several boxes ("[a], [b] and [c]") and nesting ("[[a], [b]]"). Dropped, each
    with a reason: numeric groups with 2–3 or 5+ numbers, a group cut off before its "]" (a
    truncated generation), coordinates more than CLAMP_TOLERANCE outside [0, 1] (pixel
    coordinates, for example), and boxes of zero width or height after clamping. Bracketed text
    that is not numeric, and single numbers such as "[1]", are ignored silently."""
    found: list[tuple[int, Box | str | None]] = []
    found += [_group_at(m, closed=True) for m in _CLOSED_GROUP.finditer(text)]
    found += [_group_at(m, closed=False) for m in _UNCLOSED_GROUP.finditer(text)]
    found.sort(key=lambda item: item[0])
    boxes = tuple(item for _, item in found if isinstance(item, Box))
    dropped = tuple(item for _, item in found if isinstance(item, str))
    return BoxParse(boxes=boxes, dropped=dropped)


# =================================================================================== labels ====

_ADVERB = r"(?:(?:mildly|moderately|markedly|severely|slightly|massively|minimally|significantly|" \
          r"substantially|now|again|still|borderline|newly|further)\s+)?"
_COPULA = r"(?:is|are|was|were|appears?|remains?|seems?|looks?|has become|is again)"

# (pattern, labels). Longest match wins where patterns overlap; labels=() blocks a span so that
# a shorter pattern inside it does not fire ("pericardial effusion" is not a pleural effusion).
_MENTION_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # blockers
    (r"pericardial effusions?", ()),
    (r"(?:joint|knee|shoulder|subpulmonic pericardial) effusions?", ()),
    (r"pleural lines?", ()),
    (r"(?:mass|nodular) effect", ()),
    # atelectasis
    (r"atelecta(?:sis|ses|tic)", ("atelectasis",)),
    (r"(?:lobar|lobe|segmental|subsegmental) collapse", ("atelectasis",)),
    # cardiomegaly
    (r"cardiomegaly", ("cardiomegaly",)),
    (r"cardiac enlargement", ("cardiomegaly",)),
    (r"enlarged (?:heart|cardiac silhouette|cardiac contour)", ("cardiomegaly",)),
    (r"enlargement of the (?:heart|cardiac silhouette)", ("cardiomegaly",)),
    (rf"(?:heart|heart size|cardiac size|cardiac silhouette|cardiac contour) {_COPULA} "
     rf"{_ADVERB}enlarged", ("cardiomegaly",)),
    # consolidation
    (r"consolidat(?:ion|ions|ive)", ("consolidation",)),
    # edema
    (r"(?:pulmonary |interstitial |alveolar )?o?edema(?:tous)?", ("edema",)),
    # enlarged cardiomediastinum
    (r"enlarged cardiomediastin(?:um|al (?:silhouette|contours?))",
     ("enlarged cardiomediastinum",)),
    (r"enlargement of the cardiomediastinal (?:silhouette|contours?)",
     ("enlarged cardiomediastinum",)),
    (rf"cardiomediastinal (?:silhouette|contours?) {_COPULA} {_ADVERB}(?:enlarged|widened)",
     ("enlarged cardiomediastinum",)),
    (r"(?:widened|widening of the) (?:superior )?mediastin(?:um|al (?:silhouette|contours?))",
     ("enlarged cardiomediastinum",)),
    (r"mediastinal widening", ("enlarged cardiomediastinum",)),
    (rf"mediastinum {_COPULA} {_ADVERB}(?:enlarged|widened)", ("enlarged cardiomediastinum",)),
    # fracture
    (r"fractur(?:e|es|ed)", ("fracture",)),
    # lung lesion
    (r"(?:lung |pulmonary )?(?:lesions?|nodules?|masses|mass|tumou?rs?|neoplasms?)",
     ("lung lesion",)),
    (r"nodular opacit(?:y|ies)", ("lung lesion",)),
    # lung opacity
    (r"(?:lung |pulmonary |airspace |air space |parenchymal )?opacit(?:y|ies)", ("lung opacity",)),
    (r"opacification|opacified", ("lung opacity",)),
    (r"infiltrat(?:e|es|ion|ions)", ("lung opacity",)),
    (r"air ?space (?:disease|process)", ("lung opacity",)),
    # pleural effusion
    (r"(?:pleural )?effusions?", ("pleural effusion",)),
    (r"hydrothorax|pleural fluid", ("pleural effusion",)),
    # pleural other
    (r"pleural other", ("pleural other",)),
    (r"pleural (?:thickening|plaques?|scarring|calcifications?|abnormalit(?:y|ies))",
     ("pleural other",)),
    (r"fibrothorax", ("pleural other",)),
    # pneumonia
    (r"(?:broncho)?pneumonias?|pneumonic", ("pneumonia",)),
    (r"infection|infectious process", ("pneumonia",)),
    # pneumothorax
    (r"hydropneumothora(?:x|ces|xes)", ("pneumothorax", "pleural effusion")),
    (r"pneumothora(?:x|ces|xes)", ("pneumothorax",)),
    # support devices
    (r"support devices?|medical devices?|monitoring devices?|devices?", ("support devices",)),
    (r"(?:endotracheal|et|tracheostomy|nasogastric|ng|orogastric|og|feeding|enteric|chest|"
     r"dobhoff|nasoenteric|gastric|mediastinal|pleural|drainage) tubes?", ("support devices",)),
    (r"tubes?", ("support devices",)),
    (r"(?:central venous|central|picc|midline catheter|arterial|swan ganz|internal jugular|ij|"
     r"subclavian|venous|dialysis) lines?", ("support devices",)),
    (r"picc|catheters?|cath", ("support devices",)),
    (r"pacemakers?|pacers?|icds?|defibrillators?|aicds?", ("support devices",)),
    (r"(?:pacing|pacer|pacemaker) (?:leads?|wires?)", ("support devices",)),
    (r"(?:sternotomy|sternal) wires", ("support devices",)),
    (r"(?:chest |pleural )?drains?|port ?a ?caths?|portacaths?", ("support devices",)),
)
_MENTIONS = tuple((re.compile(rf"\b(?:{p})\b"), labels) for p, labels in _MENTION_PATTERNS)

# Phrases that contain a negation word but do not negate a finding: change/stability statements
# and "cannot be excluded"-type uncertainty (uncertain counts as present, as in upstream's label
# mapping of CheXpert -1 → 1). They are blanked before negation cues are looked for.
_PSEUDO_NEGATION = re.compile(
    r"\b(?:no|without|not)\s+(?:significant\s+|substantial\s+|appreciable\s+|definite\s+)?"
    r"(?:interval\s+)?(?:change|changes|changed|increase|increased|decrease|decreased|"
    r"progression|worsening)\b"
    r"|\bnot\s+(?:significantly\s+|substantially\s+)?(?:changed|increased|decreased)\b"
    r"|\b(?:cannot|can\s*not|can't|could\s*not|couldn't|not)\s+(?:be\s+)?(?:entirely\s+|"
    r"completely\s+|fully\s+|definitely\s+)?(?:excluded|ruled\s+out)\b"
    r"|\b(?:cannot|can\s*not|can't|could\s*not|couldn't|does\s*not|do\s*not)\s+"
    r"(?:entirely\s+|completely\s+|definitely\s+)?(?:exclude|rule\s+out)\b"
    r"|\bnot\s+only\b|\bno\s+doubt\b")

# Cues whose scope runs forward to the end of the clause.
_PRE_NEGATION = re.compile(
    r"\b(?:no|not|without|negative\s+for|free\s+of|clear\s+of|absence\s+of|"
    r"resolution\s+of|removal\s+of|neither|nor|cannot|can't|can\s+not|couldn't|don't|doesn't|"
    r"didn't|isn't|aren't|wasn't|weren't|none)\b")
# Cues whose scope runs backward to the start of the clause.
_POST_NEGATION = re.compile(
    r"\b(?:(?:not|cannot|can't|no\s+longer)\s+(?:be\s+|been\s+)?(?:seen|identified|visualized|"
    r"visualised|present|appreciated|evident|demonstrated|noted|detected|visible|observed|"
    r"shown|apparent|found|depicted)|absent|resolved|ruled\s+out|excluded|removed|cleared|"
    r"no\s+longer|none)\b")

# Where a negation's scope ends inside a sentence: a semicolon, contrastive and relative words,
# "and there"/"and the", and a comma that opens a new clause (see _is_list_comma). A comma inside
# a list ("no effusion, pneumothorax, or edema") does not end the scope.
_CLAUSE_BOUNDARY = re.compile(
    r";"
    r"|\b(?:but|however|although|though|whereas|while|yet|except|aside\s+from|apart\s+from|"
    r"other\s+than|besides|which|otherwise|in\s+addition|additionally|also)\b"
    r"|\band\s+(?=(?:there|the)\b)"
    r"|,")


def _normalise(text: str) -> str:
    """Lower case; hyphens and slashes between letters become spaces; whitespace collapsed."""
    text = text.lower()
    text = re.sub(r"(?<=[a-z])[-/](?=[a-z])", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def _blank(text: str, pattern: re.Pattern[str]) -> str:
    return pattern.sub(lambda m: " " * len(m.group(0)), text)


def _clauses(sentence: str) -> list[str]:
    """The sentence cut at _CLAUSE_BOUNDARY, except at list commas (see _is_list_comma)."""
    pieces: list[str] = []
    start = 0
    for match in _CLAUSE_BOUNDARY.finditer(sentence):
        if match.group(0) == "," and _is_list_comma(sentence, match.end()):
            continue
        pieces.append(sentence[start:match.start()])
        start = match.end()
    pieces.append(sentence[start:])
    return [p for p in pieces if p.strip()]


_NEW_CLAUSE_AFTER_COMMA = re.compile(
    r"\s*(?:and\s+)?(?:there|the|this|these|it|[a-z]+\s+(?:is|are|was|were|has|have|remains?|"
    r"persists?|appears?|seems?))\b")


def _is_list_comma(sentence: str, after: int) -> bool:
    """A comma keeps the clause going unless what follows opens a new clause."""
    return _NEW_CLAUSE_AFTER_COMMA.match(sentence, after) is None


def _mentions(clause: str) -> list[tuple[int, int, tuple[str, ...]]]:
    """Non-overlapping label mentions (start, end, labels); the longest match wins."""
    candidates = [(m.start(), m.end(), labels)
                  for pattern, labels in _MENTIONS for m in pattern.finditer(clause)]
    chosen: list[tuple[int, int, tuple[str, ...]]] = []
    for start, end, labels in sorted(candidates, key=lambda c: -(c[1] - c[0])):
        if all(end <= s or start >= e for s, e, _ in chosen):
            chosen.append((start, end, labels))
    return sorted(chosen)


def _clause_findings(clause: str) -> list[tuple[str, bool]]:
    """(label, negated) for each mention in one clause: negated when a pre-negation cue ends
    before it or a post-negation cue starts after it, both within the clause."""
    cue_text = _blank(clause, _PSEUDO_NEGATION)
    pre_ends = [m.end() for m in _PRE_NEGATION.finditer(cue_text)]
    post_starts = [m.start() for m in _POST_NEGATION.finditer(cue_text)]
    findings = []
    for start, end, labels in _mentions(clause):
        negated = any(e <= start for e in pre_ends) or any(s >= end for s in post_starts)
        findings += [(label, negated) for label in labels]
    return findings


def label_findings(text: str) -> list[tuple[str, bool]]:
    """Every label mention in ``text`` as (label, negated), in order of sentences and clauses."""
    findings: list[tuple[str, bool]] = []
    for sentence in report_sentences(text):
        for clause in _clauses(_normalise(sentence)):
            findings += _clause_findings(clause)
    return findings


def parse_labels(text: str) -> dict[str, bool]:
    """Label → present, over LABELS (negation- and synonym-aware; docs/label-parsing.md).

    A label is present when at least one mention of it (its name or a synonym, word-bounded,
    plural-tolerant) is not negated. Negation is scoped to the clause: "no", "not", "without",
    "negative for", "free of", "absence of", ... negate every mention after them up to the end of
    the clause; "... is not seen", "absent", "resolved", "ruled out", "removed" negate every
    mention before them from the start of the clause. "no finding" is present iff no other label
    is."""
    present = {label: False for label in LABELS}
    for label, negated in label_findings(text):
        if not negated:
            present[label] = True
    present[NO_FINDING] = not any(present[label] for label in ABNORMALITY_LABELS)
    return present


def upstream_substring_labels(text: str) -> dict[str, bool]:
    """Upstream's rule, exactly: a label is predicted when its lowercase name is a substring of
    the lowercase answer (so "no pleural effusion" predicts pleural effusion). Over LABELS,
    "no finding" included, by the same substring test."""
    lowered = text.lower()
    return {label: label in lowered for label in LABELS}


# ================================================================ chat turns and sentences ====

_ASSISTANT_START = re.compile(r"<\|im_start\|>[ \t]*assistant[ \t]*\n?")
_TURN_END = re.compile(r"<\|im_end\|>|<\|endoftext\|>|<\|im_start\|>")
_SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>|<image>|<video>")


def extract_assistant_answer(decoded_text: str) -> str:
    """The text of the last assistant turn of a decoded Qwen2 chat sequence.

    Rule: take what follows the last ``<|im_start|>assistant`` marker up to the next
    ``<|im_end|>`` / ``<|endoftext|>`` / ``<|im_start|>`` (or the end), remove any other special
    token, strip. Without a marker the whole text is the answer (decode only the new tokens, or
    decode with special tokens kept). The plain words "user" / "assistant" are never used as
    separators (upstream split on them and cut reports that contained them)."""
    starts = list(_ASSISTANT_START.finditer(decoded_text))
    answer = decoded_text[starts[-1].end():] if starts else decoded_text
    end = _TURN_END.search(answer)
    if end is not None:
        answer = answer[:end.start()]
    return _SPECIAL_TOKEN.sub("", answer).strip()


_ABBREVIATIONS = frozenset({
    "e.g", "i.e", "approx", "appr", "vs", "cf", "dr", "mr", "mrs", "st", "fig", "resp", "incl",
    "esp", "ca", "al",
})
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?:\s+|$)")
_WORD_BEFORE = re.compile(r"([A-Za-z](?:\.?[A-Za-z])*)$")


def _is_abbreviation(text_before: str) -> bool:
    """The word ending just before a period is a known abbreviation ("e.g", "approx")."""
    match = _WORD_BEFORE.search(text_before)
    return match is not None and match.group(1).lower() in _ABBREVIATIONS


def _is_list_marker(text_before: str) -> bool:
    """A bare item number ("1", "2") before the period: part of the next sentence."""
    return re.fullmatch(r"\s*\d{1,2}", text_before) is not None


def report_sentences(text: str) -> list[str]:
    """Sentences of a report, whitespace-normalised.

    A sentence ends at ".", "!" or "?" (plus closing quotes/brackets) followed by whitespace or
    the end, and at blank lines. Not at a decimal point ("3.5 cm": no space follows), not after a
    known abbreviation ("e.g.", "i.e.", "approx.", "vs.", "cf." ...) and not after a bare list
    number ("1. Cardiomegaly." is one sentence)."""
    sentences: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        block = re.sub(r"\s+", " ", block).strip()
        start = 0
        for match in _SENTENCE_END.finditer(block):
            before = block[start:match.start()]
            if match.group(0).startswith(".") and (
                    _is_abbreviation(before) or _is_list_marker(before)):
                continue
            sentences.append(block[start:match.end()].strip())
            start = match.end()
        sentences.append(block[start:].strip())
    return [s for s in sentences if s]


def finding_sentences(text: str) -> list[str]:
    """The report sentences that describe a present abnormality (per parse_labels); these are
    the sentences worth phrase-grounding. Negative sentences ("No pneumothorax.") are left out."""
    return [s for s in report_sentences(text)
            if any(present for label, present in parse_labels(s).items() if label != NO_FINDING)]
