"""Report-generation metrics: ROUGE-L, BERTScore, RadGraph F1, GREEN.

Every metric takes the reference reports and the generated reports in the same order and
returns a float in [0, 1] (the report writer shows ×100, as the paper does) — or, for the
metrics that need a model, a ``not computed: …`` string when that model is not supplied
locally or its package is not installed. Nothing is downloaded: set the model folders with
``ReportModels`` (CLI flags ``--bertscore-model``, ``--radgraph-model``, ``--green-model`` or the
environment variables ``RADVLM_BERTSCORE_MODEL`` / ``RADVLM_RADGRAPH_MODEL`` /
``RADVLM_GREEN_MODEL``). Upstream computed them through ViLMedic's scorers (``calcAllMetrics_whole``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MetricValue = float | str
"""A score, or the reason it was not computed ("not computed: …"); never a silent zero."""


@dataclass(frozen=True)
class ReportModels:
    """Local model folders for the model-backed report metrics (None = not configured)."""

    bertscore: Path | None = None
    bertscore_baseline: Path | None = None   # rescale baseline TSV; default: bert-score's own
    radgraph: Path | None = None             # radgraph model cache dir holding radgraph-xl
    green: Path | None = None                # GREEN-radllama2-7b folder

    @classmethod
    def from_env(cls) -> "ReportModels":
        def path(name: str) -> Path | None:
            value = os.environ.get(name)
            return Path(value) if value else None
        return cls(bertscore=path("RADVLM_BERTSCORE_MODEL"), bertscore_baseline=path("RADVLM_BERTSCORE_BASELINE"),
                   radgraph=path("RADVLM_RADGRAPH_MODEL"), green=path("RADVLM_GREEN_MODEL"))


def _check_pairs(references: Sequence[str], hypotheses: Sequence[str]) -> None:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} generated reports")
    if not references:
        raise ValueError("no reports to score")


def rouge_l(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Mean over pairs of the ROUGE-L F-measure from ``rouge_score.rouge_scorer.RougeScorer(
    ["rougeL"], use_stemmer=True).score(reference, hypothesis)`` (Porter stemmer, rouge_score's
    default tokenizer: lower-case, non-alphanumerics to spaces) — ViLMedic's ``Rouge`` as upstream
    used it."""
    from rouge_score import rouge_scorer

    _check_pairs(references, hypotheses)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score(ref, hyp)["rougeL"].fmeasure for ref, hyp in zip(references, hypotheses)]))


def _default_bertscore_baseline() -> Path | None:
    import bert_score

    candidate = Path(bert_score.__file__).parent / "rescale_baseline" / "en" / "distilbert-base-uncased.tsv"
    return candidate if candidate.is_file() else None


def bertscore_f1(references: Sequence[str], hypotheses: Sequence[str], models: ReportModels) -> MetricValue:
    """Mean BERTScore F1 as ViLMedic/upstream: ``bert_score.BERTScorer(model_type=<local
    distilbert-base-uncased folder>, num_layers=5, idf=False, lang="en",
    rescale_with_baseline=True)``, the baseline being bert-score's distilbert-base-uncased TSV
    unless another is configured; ``F.mean()`` of ``scorer.score(hypotheses, references)``."""
    if models.bertscore is None:
        return "not computed: model distilbert-base-uncased not configured (--bertscore-model)"
    try:
        from bert_score import BERTScorer
    except ImportError:
        return "not computed: package bert-score not installed (pip install bert-score)"
    _check_pairs(references, hypotheses)
    baseline = models.bertscore_baseline or _default_bertscore_baseline()
    if baseline is None:
        return "not computed: BERTScore rescale baseline for distilbert-base-uncased not found"
    scorer = BERTScorer(model_type=str(models.bertscore), num_layers=5, idf=False, lang="en",
                        rescale_with_baseline=True, baseline_path=str(baseline))
    _, _, f1 = scorer.score(list(hypotheses), list(references))
    return float(f1.mean())


def radgraph_f1(references: Sequence[str], hypotheses: Sequence[str], models: ReportModels) -> dict[str, MetricValue]:
    """RadGraph-XL F1 as upstream ``calcF1RadGraph(batch=True)``: for each pair,
    ``radgraph.F1RadGraph(reward_level="all", model_type="radgraph-xl")([ref], [hyp])[0]`` gives
    (simple, partial, complete) entity/relation F1; each is averaged over pairs. The model is read
    from the configured cache folder with the Hugging Face hub offline."""
    keys = ("radgraph_simple", "radgraph_partial", "radgraph_complete")
    if models.radgraph is None:
        return dict.fromkeys(keys, "not computed: model radgraph-xl not configured (--radgraph-model)")
    try:
        from radgraph import F1RadGraph
    except ImportError:
        return dict.fromkeys(keys, "not computed: package radgraph not installed (pip install radgraph)")
    _check_pairs(references, hypotheses)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    scorer = F1RadGraph(reward_level="all", model_type="radgraph-xl",
                        model_cache_dir=str(models.radgraph), tokenizer_cache_dir=str(models.radgraph))
    per_pair = [scorer([ref], [hyp])[0] for ref, hyp in zip(references, hypotheses)]
    return {key: float(np.mean([scores[index] for scores in per_pair])) for index, key in enumerate(keys)}


def green_score(references: Sequence[str], hypotheses: Sequence[str], models: ReportModels,
                output_dir: Path | None = None) -> MetricValue:
    """Mean GREEN score (``green_score.GREEN(<local GREEN-radllama2-7b folder>)(references,
    hypotheses)``, first return value): the fraction of matched findings over matched + clinically
    significant errors, judged by the GREEN model, averaged over pairs."""
    if models.green is None:
        return "not computed: model GREEN-radllama2-7b not configured (--green-model)"
    try:
        from green_score import GREEN
    except ImportError:
        return "not computed: package green-score not installed (pip install green-score)"
    _check_pairs(references, hypotheses)
    scorer = GREEN(str(models.green), output_dir=str(output_dir or "."))
    mean = scorer(list(references), list(hypotheses))[0]
    return float(mean)


def report_metrics(references: Sequence[str], hypotheses: Sequence[str], models: ReportModels | None = None,
                   output_dir: Path | None = None) -> dict[str, MetricValue]:
    """ROUGE-L, BERTScore, RadGraph (simple / partial / complete) and GREEN of the reports; the
    model-backed ones as ``not computed: …`` when their model is not configured."""
    _check_pairs(references, hypotheses)
    models = models or ReportModels()
    result: dict[str, MetricValue] = {"n_samples": len(references), "rouge_l": rouge_l(references, hypotheses),
                                      "bertscore": bertscore_f1(references, hypotheses, models)}
    result.update(radgraph_f1(references, hypotheses, models))
    result["green"] = green_score(references, hypotheses, models, output_dir)
    return result
