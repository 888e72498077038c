"""Grounded-report evaluation beyond the paper: RadFact-style logical and spatial precision/recall.

A grounded report is a list of sentences, each with zero or more boxes ``[x1, y1, x2, y2]``
normalised to the image. Following RadFact (Bannur et al., 2024, "MAIRA-2: Grounded Radiology
Report Generation", §4), an LLM decides entailment sentence by sentence, through any
OpenAI-compatible endpoint (the judge client of ``radvlm evaluate``) and a replaceable prompt
(``training/prompts/radfact_entailment.txt``, our own wording):

- each GENERATED sentence is checked against the REFERENCE sentences (premise): entailed or not,
  and which reference sentences are the evidence; each REFERENCE sentence likewise against the
  generated ones.
- logical precision = entailed generated sentences / generated sentences;
  logical recall = entailed reference sentences / reference sentences.
- a grounded generated sentence (one with boxes) is spatially entailed when it is logically
  entailed AND its box precision against the union of the boxes of its evidence sentences is
  above 0.5: area(∪ own boxes ∩ ∪ evidence boxes) / area(∪ own boxes) (exact areas of box
  unions; evidence without boxes → not spatially entailed). Reference sentences symmetrically,
  against the boxes of their generated evidence.
- grounding precision = spatially entailed / logically entailed, among grounded generated
  sentences; grounding recall likewise among grounded reference sentences;
  spatial precision = spatially entailed / all grounded generated sentences; spatial recall =
  spatially entailed / all grounded reference sentences.

Each metric is computed per report and averaged over the reports where its denominator is not 0
(RadFact averages per-sample values). An answer of the judge that cannot be read counts as "not
entailed" and is counted in ``n_invalid_judgements``; a report whose requests failed is left out
and counted in ``n_failed``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from training.prompts import PromptText, load_prompt

Box = tuple[float, float, float, float]
SPATIAL_THRESHOLD = 0.5
METRICS = ("logical_precision", "logical_recall", "grounding_precision", "grounding_recall",
           "spatial_precision", "spatial_recall")

_BOX = re.compile(r"\[\s*([\d.]+)\s*,\s*([\d.]+)\s*,\s*([\d.]+)\s*,\s*([\d.]+)\s*\]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\[])")
_VERDICT = re.compile(r"verdict\s*[:=]?\s*\**\s*(not\s+entailed|entailed)", re.IGNORECASE)
_EVIDENCE = re.compile(r"evidence\s*[:=]\s*(.*)", re.IGNORECASE)


class GroundedReportError(ValueError):
    """A grounded report record cannot be read."""


@dataclass(frozen=True)
class GroundedSentence:
    text: str
    boxes: tuple[Box, ...] = ()


@dataclass(frozen=True)
class Judgement:
    entailed: bool
    evidence: tuple[int, ...]   # 0-based indices into the premise sentences
    valid: bool = True


class Entailment(Protocol):
    def __call__(self, premise: Sequence[str], hypothesis: str) -> Judgement: ...


# ------------------------------------------------------------------------------------- reading
def _box(values: Sequence[float]) -> Box:
    if len(values) != 4:
        raise GroundedReportError(f"box {list(values)} is not [x1, y1, x2, y2]")
    x1, y1, x2, y2 = (float(v) for v in values)
    if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
        raise GroundedReportError(f"box {list(values)} is not normalised with x1 < x2, y1 < y2")
    return (x1, y1, x2, y2)


def parse_grounded_report(value: str | Sequence) -> list[GroundedSentence]:
    """A grounded report from a list of ``{"sentence"|"text": str, "boxes": [[x1, y1, x2, y2], …]}``
    (or ``(sentence, boxes)`` pairs), or from text whose sentences carry their coordinates inline
    ("Left effusion [0.6, 0.7, 0.9, 0.95]."): the boxes are taken out of the sentence text."""
    if isinstance(value, str):
        sentences = []
        for part in _SENTENCE_END.split(value.strip()):
            boxes = tuple(_box([float(v) for v in match]) for match in _BOX.findall(part))
            text = " ".join(_BOX.sub("", part).split()).replace(" .", ".").replace(" ,", ",")
            if text.strip(" .,;"):
                sentences.append(GroundedSentence(text, boxes))
            elif boxes and sentences:
                last = sentences[-1]
                sentences[-1] = GroundedSentence(last.text, last.boxes + boxes)
        return sentences
    result = []
    for item in value:
        if isinstance(item, Mapping):
            text = item.get("sentence", item.get("text"))
            boxes = item.get("boxes") or []
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            text, boxes = item
        else:
            raise GroundedReportError(f"expected {{'sentence', 'boxes'}} or (sentence, boxes), got {item!r}")
        if not isinstance(text, str) or not text.strip():
            raise GroundedReportError(f"sentence without text: {item!r}")
        result.append(GroundedSentence(text.strip(), tuple(_box(b) for b in (boxes or []))))
    return result


# ------------------------------------------------------------------------------------ geometry
def union_area(boxes: Sequence[Box], clip: Sequence[Box] | None = None) -> float:
    """Exact area of the union of ``boxes`` (intersected with the union of ``clip`` when given),
    by coordinate compression over the box edges."""
    if not boxes or (clip is not None and not clip):
        return 0.0
    every = list(boxes) + list(clip or [])
    xs = np.unique([v for b in every for v in (b[0], b[2])])
    ys = np.unique([v for b in every for v in (b[1], b[3])])
    cx, cy = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2

    def covered(group: Sequence[Box]) -> np.ndarray:
        mask = np.zeros((len(cy), len(cx)), dtype=bool)
        for x1, y1, x2, y2 in group:
            mask |= ((cx > x1) & (cx < x2))[None, :] & ((cy > y1) & (cy < y2))[:, None]
        return mask

    mask = covered(boxes)
    if clip is not None:
        mask &= covered(clip)
    cell = np.outer(np.diff(ys), np.diff(xs))
    return float((cell * mask).sum())


def box_precision(boxes: Sequence[Box], against: Sequence[Box]) -> float:
    """area(∪ boxes ∩ ∪ against) / area(∪ boxes); 0 when either is empty."""
    own = union_area(boxes)
    return union_area(boxes, against) / own if own > 0 and against else 0.0


# ---------------------------------------------------------------------------------- entailment
def parse_judgement(answer: str, n_premise: int) -> Judgement:
    """The verdict (the LAST "Verdict: entailed / not entailed") and the evidence numbers (1-based
    in the answer, kept when within the premise). No readable verdict → not entailed, invalid."""
    verdicts = _VERDICT.findall(answer)
    if not verdicts:
        return Judgement(False, (), valid=False)
    entailed = not verdicts[-1].lower().startswith("not")
    evidence: list[int] = []
    found = _EVIDENCE.findall(answer)
    if entailed and found:
        for number in re.findall(r"\d+", found[-1]):
            index = int(number) - 1
            if 0 <= index < n_premise and index not in evidence:
                evidence.append(index)
    return Judgement(entailed, tuple(evidence))


class LLMEntailment:
    """Entailment through an OpenAI-compatible chat endpoint (``JudgeClient``) and the prompt
    file; answers are memoised per (premise, hypothesis)."""

    def __init__(self, client, prompt: PromptText | None = None) -> None:
        self.client = client
        self.prompt = prompt or entailment_prompt()
        self._memo: dict[tuple[tuple[str, ...], str], Judgement] = {}

    def __call__(self, premise: Sequence[str], hypothesis: str) -> Judgement:
        key = (tuple(premise), hypothesis)
        if key not in self._memo:
            numbered = "\n".join(f"{i}. {sentence}" for i, sentence in enumerate(premise, 1)) or "(none)"
            answer = self.client.complete(self.prompt.fill(PREMISE=numbered, HYPOTHESIS=hypothesis))
            self._memo[key] = parse_judgement(answer, len(premise))
        return self._memo[key]


def entailment_prompt(path: Path | str | None = None) -> PromptText:
    return load_prompt("radfact_entailment", path, required=("PREMISE", "HYPOTHESIS"))


# ------------------------------------------------------------------------------------- scoring
def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _direction(hypotheses: list[GroundedSentence], premises: list[GroundedSentence], entails: Entailment,
               threshold: float) -> tuple[dict, int]:
    texts = [s.text for s in premises]
    judgements = [entails(texts, s.text) if texts else Judgement(False, ()) for s in hypotheses]
    grounded = [(s, j) for s, j in zip(hypotheses, judgements) if s.boxes]
    spatial = [j.entailed and box_precision(s.boxes, [b for i in j.evidence for b in premises[i].boxes]) > threshold
               for s, j in grounded]
    entailed_grounded = sum(1 for _, j in grounded if j.entailed)
    return {"logical": _ratio(sum(j.entailed for j in judgements), len(hypotheses)),
            "grounding": _ratio(sum(spatial), entailed_grounded),
            "spatial": _ratio(sum(spatial), len(grounded)),
            "judgements": [{"sentence": s.text, "entailed": j.entailed, "evidence": list(j.evidence),
                            "grounded": bool(s.boxes)} for s, j in zip(hypotheses, judgements)]}, \
        sum(1 for j in judgements if not j.valid)


def score_grounded_report(generated: list[GroundedSentence], reference: list[GroundedSentence],
                          entails: Entailment, threshold: float = SPATIAL_THRESHOLD) -> dict:
    """The six RadFact metrics of one report (None where the denominator is 0)."""
    forward, invalid_f = _direction(generated, reference, entails, threshold)
    backward, invalid_b = _direction(reference, generated, entails, threshold)
    return {"logical_precision": forward["logical"], "logical_recall": backward["logical"],
            "grounding_precision": forward["grounding"], "grounding_recall": backward["grounding"],
            "spatial_precision": forward["spatial"], "spatial_recall": backward["spatial"],
            "n_invalid_judgements": invalid_f + invalid_b,
            "generated": forward["judgements"], "reference": backward["judgements"]}


def grounded_report_metrics(records: Iterable[Mapping], entails: Entailment | None,
                            threshold: float = SPATIAL_THRESHOLD) -> dict:
    """Mean of each metric over the reports (records with ``output`` = generated grounded report
    and ``reference`` = reference grounded report, each as `parse_grounded_report` reads them)."""
    from training.evaluation.judge import JudgeError

    records = list(records)
    if not records:
        raise ValueError("no grounded-report records to score")
    if entails is None:
        return {"n_samples": len(records),
                **dict.fromkeys(METRICS, "not computed: entailment endpoint not configured (--judge-url, "
                                         "--judge-model)")}
    per_report, failed, invalid = [], 0, 0
    for record in records:
        if "output" not in record or "reference" not in record:
            raise KeyError("both 'output' and 'reference' must be in every grounded-report record")
        try:
            scores = score_grounded_report(parse_grounded_report(record["output"]),
                                           parse_grounded_report(record["reference"]), entails, threshold)
        except JudgeError:
            failed += 1
            continue
        invalid += scores["n_invalid_judgements"]
        per_report.append({"id": record.get("id"), **scores})
    result: dict = {"n_samples": len(records), "n_scored": len(per_report), "n_failed": failed,
                    "n_invalid_judgements": invalid, "spatial_threshold": threshold}
    for metric in METRICS:
        values = [r[metric] for r in per_report if r[metric] is not None]
        result[metric] = float(np.mean(values)) if values else f"not computed: no report with a {metric} denominator"
        result[f"n_{metric}"] = len(values)
    result["per_report"] = per_report
    prompt = getattr(entails, "prompt", None)
    if isinstance(prompt, PromptText):
        result.update(prompt.record)
    return result
