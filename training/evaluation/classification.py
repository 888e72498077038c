"""Classification metrics over the 13 pathologies (``inference.labels.ABNORMALITY_LABELS``),
as upstream ``evaluate_classification`` averages them, plus the same over all 14 labels
(``LABELS``, i.e. with "no finding") as an extra, labelled result (``all_14``).

A classification record carries the model's answer under ``output`` and the reference label
names under ``labels`` (as upstream writes them). Two prediction rules are scored side by side
(docs/label-parsing.md §1):

- ``upstream``: a label is predicted iff its lowercase name is a substring of the lowercase
  answer (``inference.parsing.upstream_substring_labels``) — upstream ``evaluate_classification``;
- ``parser``: our negation- and synonym-aware ``inference.parsing.parse_labels``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from inference.labels import ABNORMALITY_LABELS, LABELS
from inference.parsing import parse_labels, upstream_substring_labels

RULES: dict[str, Callable[[str], dict[str, bool]]] = {
    "upstream": upstream_substring_labels,
    "parser": parse_labels,
}


def reference_vector(names: Sequence[str], labels: Sequence[str] = LABELS) -> tuple[list[int], list[str]]:
    """Binary vector over ``labels`` of the reference names (lower-cased, as upstream), and the
    names that are not one of ``labels`` (upstream ignores them silently; we report them)."""
    lowered = {name.lower().strip() for name in names}
    return [1 if label in lowered else 0 for label in labels], sorted(lowered - set(labels))


def prediction_vector(text: str, rule: str, labels: Sequence[str] = LABELS) -> list[int]:
    """Binary vector over ``labels`` of what ``RULES[rule]`` reads in the answer ``text``."""
    present = RULES[rule](text)
    return [1 if present[label] else 0 for label in labels]


def f1_scores(truth: np.ndarray, predicted: np.ndarray, labels: Sequence[str] = ABNORMALITY_LABELS) -> dict:
    """scikit-learn ``precision_recall_fscore_support`` on (n_samples × n_labels) indicator
    matrices, as upstream: ``average="macro"`` (unweighted mean of the per-label values, every
    label counted, a label never true and never predicted scoring 0), ``"micro"`` (pooled TP/FP/FN
    over all labels) and per label (``average=None``); ``zero_division=0`` (upstream's default
    "warn" gives the same 0 with a warning)."""
    from sklearn.metrics import precision_recall_fscore_support

    p_macro, r_macro, f_macro, _ = precision_recall_fscore_support(truth, predicted, average="macro", zero_division=0)
    p_micro, r_micro, f_micro, _ = precision_recall_fscore_support(truth, predicted, average="micro", zero_division=0)
    _, _, per_label, support = precision_recall_fscore_support(truth, predicted, average=None, zero_division=0)
    return {
        "f1_macro": float(f_macro), "f1_micro": float(f_micro),
        "precision_macro": float(p_macro), "recall_macro": float(r_macro),
        "precision_micro": float(p_micro), "recall_micro": float(r_micro),
        "f1_per_label": {label: float(value) for label, value in zip(labels, per_label)},
        "support_per_label": {label: int(value) for label, value in zip(labels, support)},
    }


def _rule_scores(records: list[Mapping], labels: Sequence[str]) -> dict:
    truth = np.array([reference_vector(record["labels"], labels)[0] for record in records])
    return {rule: f1_scores(truth, np.array([prediction_vector(record["output"], rule, labels) for record in records]),
                            labels) for rule in RULES}


def classification_metrics(records: Iterable[Mapping], labels: Sequence[str] = ABNORMALITY_LABELS) -> dict:
    """Per-label, macro and micro F1 of the answers under both rules (``upstream`` and
    ``parser``) over ``labels`` — by default the 13 pathologies, as upstream, so that
    ``upstream.f1_macro`` is the number the paper's 45.8 compares with — and the same over all
    14 labels under ``all_14`` (an extra row, not upstream's), plus the sample count and any
    reference names outside the 14 labels."""
    records = list(records)
    if not records:
        raise ValueError("no classification records to score")
    unknown: set[str] = set()
    for record in records:
        if "output" not in record or "labels" not in record:
            raise KeyError("both 'output' and 'labels' must be in every classification record")
        unknown.update(reference_vector(record["labels"], LABELS)[1])
    result: dict = {"n_samples": len(records), "labels": list(labels), "unknown_reference_labels": sorted(unknown)}
    result.update(_rule_scores(records, labels))
    if tuple(labels) != tuple(LABELS):
        result["all_14"] = _rule_scores(records, LABELS)
    return result
