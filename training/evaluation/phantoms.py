"""Held-out evaluation of a model on synthetic phantoms, scored by the evaluation pipeline.

Questions per phantom (canonical phrasings, exactly what inference asks):

- report: ``prompts.REPORT_PROMPT`` → ROUGE-L (``training.evaluation.report.rouge_l``) against the
  phantom's templated truth report;
- classification: ``prompts.CLASSIFICATION_PROMPT`` → macro-F1 over the labels the generator
  produces (``PHANTOM_LABELS``: its seven finding families and "no finding"); the six CheXpert
  labels it never draws would each add an F1 of 0 (never true, never predicted) and are left out;
- abnormality grounding: "Where is the {name} located …" for each boxed finding → upstream mAP@0.5;
- anatomical grounding: "Where is the {region} located …" for each region in ``regions`` →
  upstream mAP@0.5.

Images go through the DICOM path (``dicom_export.frontal_dataset`` → ``inference.image``), as a
node receives them. Greedy decoding on CPU in fp32 is deterministic, so a fixed (seed, indices)
reproduces the same metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from inference import prompts
from inference.image import ModelImage, image_from_dataset
from inference.labels import LABELS, NO_FINDING
from inference.model import RadVLMModel, Turn
from training.evaluation.classification import classification_metrics
from training.evaluation.grounding import mean_best_iou, upstream_grounding_map
from training.evaluation.report import rouge_l
from training.phantoms.dicom_export import frontal_dataset
from training.phantoms.records import phantom_id
from training.phantoms.sampler import DEFAULT_RATES, Phantom, PhantomConfig, PhantomSampler

PHANTOM_LABELS: tuple[str, ...] = tuple(label for label in LABELS if label in DEFAULT_RATES) + (NO_FINDING,)
DEMO_REGIONS: tuple[str, ...] = ("right lung", "left lung", "cardiac silhouette", "mediastinum", "trachea",
                                 "spine", "right hemidiaphragm", "left hemidiaphragm")
"""The anatomical regions the phantom demo model was taught (config/train-phantom-demo.toml)."""


@dataclass
class PhantomPredictions:
    """Prediction records in the evaluation pipeline's shapes (``output`` + the reference)."""

    report: list[dict] = field(default_factory=list)          # output, txt
    classification: list[dict] = field(default_factory=list)  # output, labels
    grounding: list[dict] = field(default_factory=list)       # output, boxes, task, query

    def extend(self, other: "PhantomPredictions") -> None:
        self.report += other.report
        self.classification += other.classification
        self.grounding += other.grounding


def phantom_image(phantom: Phantom) -> ModelImage:
    """The phantom as a node sees it: its frontal DICOM through the inference pixel pipeline."""
    return image_from_dataset(frontal_dataset(phantom))


def predict_phantom(model: RadVLMModel, phantom: Phantom, regions: Sequence[str] = DEMO_REGIONS,
                    image: ModelImage | None = None) -> PhantomPredictions:
    """Ask the held-out questions about one phantom (image prefix encoded once)."""
    prefix = model.encode_image(image or phantom_image(phantom))
    pid = phantom_id(phantom)

    def ask(question: str) -> str:
        return model.answer(prefix, [Turn("user", question)]).text

    out = PhantomPredictions()
    out.report.append({"id": f"{pid}-report", "phantom": pid, "output": ask(prompts.REPORT_PROMPT), "txt": phantom.report})
    out.classification.append({"id": f"{pid}-classification", "phantom": pid, "output": ask(prompts.CLASSIFICATION_PROMPT),
                               "labels": [label for label in phantom.positive_labels]})
    for k, truth in enumerate(t for t in phantom.truths if t.boxes):
        out.grounding.append({"id": f"{pid}-abnormality-{k}", "phantom": pid, "task": "abnormality_grounding", "query": truth.name,
                              "output": ask(prompts.abnormality_grounding_prompt(truth.name)),
                              "boxes": [list(b) for b in truth.boxes]})
    for name in regions:
        if name in phantom.regions:
            out.grounding.append({"id": f"{pid}-anatomy-{name}", "phantom": pid, "task": "anatomical_grounding", "query": name,
                                  "output": ask(prompts.anatomical_grounding_prompt(name)),
                                  "boxes": [list(phantom.regions[name])]})
    return out


def predict_phantoms(model: RadVLMModel, seed: int, indices: Iterable[int], size: int = 128,
                     regions: Sequence[str] = DEMO_REGIONS) -> PhantomPredictions:
    sampler = PhantomSampler(seed, PhantomConfig(size=size))
    predictions = PhantomPredictions()
    for index in indices:
        predictions.extend(predict_phantom(model, sampler.sample(index), regions))
    return predictions


def score_phantom_predictions(predictions: PhantomPredictions) -> dict:
    """The headline metrics (and the details behind them) of one set of phantom predictions."""
    classification = classification_metrics(predictions.classification, labels=PHANTOM_LABELS)
    metrics: dict = {
        "n_phantoms": len(predictions.report),
        "report_rouge_l": rouge_l([r["txt"] for r in predictions.report], [r["output"] for r in predictions.report]),
        "classification_macro_f1": classification["parser"]["f1_macro"],
        "classification_macro_f1_upstream_rule": classification["upstream"]["f1_macro"],
        "classification_f1_per_label": classification["parser"]["f1_per_label"],
        "classification_labels": list(PHANTOM_LABELS),
    }
    for task, key in (("abnormality_grounding", "abnormality"), ("anatomical_grounding", "anatomy")):
        records = [r for r in predictions.grounding if r["task"] == task]
        if not records:
            continue
        upstream = upstream_grounding_map(records)
        mean_iou, _ = mean_best_iou(records)
        metrics[f"grounding_{key}_map_0.5"] = upstream["mAP_0.5"]
        metrics[f"grounding_{key}_mean_iou"] = mean_iou
        metrics[f"grounding_{key}_n"] = len(records)
        by_query: dict[str, list[Mapping]] = {}
        for record in records:
            by_query.setdefault(record["query"], []).append(record)
        metrics[f"grounding_{key}_map_0.5_by_query"] = {
            query: upstream_grounding_map(items)["mAP_0.5"] for query, items in sorted(by_query.items())}
    return metrics


TARGETS: dict[str, float] = {"classification_macro_f1": 0.9, "grounding_abnormality_map_0.5": 0.6,
                             "grounding_anatomy_map_0.5": 0.8, "report_rouge_l": 0.6}
"""Issue 8's held-out targets."""


def evaluate_phantoms(model: RadVLMModel, seed: int, indices: Iterable[int], size: int = 128,
                      regions: Sequence[str] = DEMO_REGIONS) -> tuple[dict, PhantomPredictions]:
    """Predict and score; returns (metrics, predictions)."""
    predictions = predict_phantoms(model, seed, indices, size, regions)
    return score_phantom_predictions(predictions), predictions
