"""Classification F1 against scikit-learn, ROUGE-L against rouge_score, model-backed metrics never silently 0."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rouge_score import rouge_scorer
from sklearn.metrics import f1_score

from inference.labels import ABNORMALITY_LABELS, LABELS
from training.evaluation.classification import classification_metrics, reference_vector
from training.evaluation.report import ReportModels, report_metrics, rouge_l

RECORDS = [
    {"output": "Yes, there is one abnormality identified: cardiomegaly.", "labels": ["Cardiomegaly"]},
    {"output": "The following abnormalities are identified: pleural effusion, edema and support devices.",
     "labels": ["pleural effusion", "edema"]},
    {"output": "No abnormalities or lesions are detected on this Chest X-ray.", "labels": ["no finding"]},
    {"output": "No pleural effusion. The heart is mildly enlarged.", "labels": ["cardiomegaly"]},
    {"output": "The following abnormalities are identified: lung opacity and pneumonia.",
     "labels": ["lung opacity", "atelectasis"]},
]


def test_macro_f1_averages_the_13_pathologies_by_hand():
    metrics = classification_metrics(RECORDS)
    # upstream rule, per pathology: cardiomegaly 2/3 (TP1 FN1), edema 1, lung opacity 1, pleural
    # effusion 2/3 (TP1 FP1); atelectasis (FN), pneumonia (FP), support devices (FP) and the six
    # never true nor predicted 0 → macro = (2/3 + 1 + 1 + 2/3) / 13 = 10/39.
    assert metrics["labels"] == list(ABNORMALITY_LABELS) and "no finding" not in metrics["upstream"]["f1_per_label"]
    assert metrics["upstream"]["f1_macro"] == pytest.approx(10 / 39)
    # micro: TP 4, FP 3 (support devices, pleural effusion, pneumonia), FN 2 → 8 / 13
    assert metrics["upstream"]["f1_micro"] == pytest.approx(8 / 13)
    # the 14-label extra row adds "no finding" (TP 0, FN 1) → 10/42
    assert metrics["all_14"]["upstream"]["f1_macro"] == pytest.approx(10 / 42)
    # parser: 10/13 pathologies right where they occur: cardiomegaly 1, edema 1, lung opacity 1,
    # pleural effusion 1, atelectasis 0, pneumonia 0, support devices 0 → 4/13; + no finding 1 → 5/14
    assert metrics["parser"]["f1_macro"] == pytest.approx(4 / 13)
    assert metrics["all_14"]["parser"]["f1_macro"] == pytest.approx(5 / 14)


def test_macro_and_micro_f1_match_scikit_learn_for_both_rules():
    metrics = classification_metrics(RECORDS, labels=LABELS)
    truth = np.array([reference_vector(r["labels"])[0] for r in RECORDS])
    upstream = np.array([[1 if label in r["output"].lower() else 0 for label in LABELS] for r in RECORDS])
    assert metrics["upstream"]["f1_macro"] == pytest.approx(f1_score(truth, upstream, average="macro", zero_division=0))
    assert metrics["upstream"]["f1_micro"] == pytest.approx(f1_score(truth, upstream, average="micro", zero_division=0))
    per_label = f1_score(truth, upstream, average=None, zero_division=0)
    assert list(metrics["upstream"]["f1_per_label"].values()) == pytest.approx(list(per_label))
    assert metrics["n_samples"] == 5


def test_the_two_rules_differ_on_negations_and_synonyms_by_hand():
    metrics = classification_metrics(RECORDS, labels=LABELS)
    # upstream: "No pleural effusion" predicts pleural effusion (FP), "heart is enlarged" is missed;
    # "no finding" is never a substring of the normal answer.
    assert metrics["upstream"]["f1_per_label"]["cardiomegaly"] == pytest.approx(2 / 3)   # TP 1, FN 1
    assert metrics["upstream"]["f1_per_label"]["pleural effusion"] == pytest.approx(2 / 3)  # TP 1, FP 1
    assert metrics["upstream"]["f1_per_label"]["no finding"] == 0.0
    assert metrics["parser"]["f1_per_label"]["cardiomegaly"] == pytest.approx(1.0)
    assert metrics["parser"]["f1_per_label"]["pleural effusion"] == pytest.approx(1.0)
    assert metrics["parser"]["f1_per_label"]["no finding"] == pytest.approx(1.0)
    assert metrics["parser"]["f1_macro"] > metrics["upstream"]["f1_macro"]


def test_unknown_reference_names_are_reported():
    metrics = classification_metrics([{"output": "cardiomegaly", "labels": ["Cardiomegaly", "Emphysema"]}])
    assert metrics["unknown_reference_labels"] == ["emphysema"]
    with pytest.raises(KeyError):
        classification_metrics([{"output": "x"}])


REFS = ["The heart size is normal. No pleural effusion or pneumothorax.",
        "Moderate cardiomegaly with small bilateral pleural effusions.",
        "Lines and tubes are unchanged."]
HYPS = ["Heart size normal. There is no effusion.",
        "Cardiomegaly. Small left pleural effusion is seen.",
        "No acute cardiopulmonary process."]


def test_rouge_l_matches_rouge_score_with_stemmer():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = np.mean([scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(REFS, HYPS)])
    assert rouge_l(REFS, HYPS) == pytest.approx(expected)
    # by hand: "effusions" stems to "effusion"; LCS of [a b c] and [a c] is 2 → P 1, R 2/3, F 0.8
    assert rouge_l(["small pleural effusions"], ["small effusion"]) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        rouge_l(["a"], [])


def test_model_backed_metrics_say_why_they_are_missing():
    metrics = report_metrics(REFS, HYPS, ReportModels())
    assert isinstance(metrics["rouge_l"], float) and metrics["n_samples"] == 3
    for key in ("bertscore", "radgraph_simple", "radgraph_partial", "radgraph_complete", "green"):
        assert isinstance(metrics[key], str) and metrics[key].startswith("not computed: ")
    assert "distilbert-base-uncased not configured" in metrics["bertscore"]
    assert "radgraph-xl not configured" in metrics["radgraph_partial"]
    assert "GREEN-radllama2-7b not configured" in metrics["green"]
    json.dumps(metrics)
