"""Grounding metrics: upstream RadVLM's mAP (reproduced exactly), COCO-style AP, IoU.

Boxes are ``[x1, y1, x2, y2]`` floats relative to the image size (design §3). A grounding record
carries the model's answer under ``output`` and the reference boxes under ``boxes``.

Upstream definition (``radvlm/evaluation/compute_metrics_tasks.py``: ``evaluate_boxes``,
``compute_iou``, ``compute_average_precision``, ``extract_bounding_boxes``), reproduced by
``upstream_grounding_map``; the two places where upstream would crash instead of scoring are
noted on the functions (``box_iou``: zero union; ``extract_boxes_upstream``: "1.2.3").
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from inference.parsing import parse_boxes

UPSTREAM_BOX_PATTERN = re.compile(r"\[([\d\.]+),\s*([\d\.]+),\s*([\d\.]+),\s*([\d\.]+)\]")
"""Upstream's box regex: four unsigned decimals in brackets, comma-separated."""

BoxList = Sequence[Sequence[float]]


def extract_boxes_upstream(text: str) -> list[list[float]]:
    """Boxes in ``text`` read with upstream's regex, in generated order, duplicates kept.

    Exactly ``[list(map(float, m)) for m in re.findall(UPSTREAM_BOX_PATTERN, text)]`` except that a
    match that is not a number (e.g. ``[1.2.3, …]``, which upstream's ``float`` would raise on) is
    skipped instead of aborting the whole evaluation."""
    boxes = []
    for match in UPSTREAM_BOX_PATTERN.findall(text):
        try:
            boxes.append([float(value) for value in match])
        except ValueError:
            continue
    return boxes


def box_iou(box1: Sequence[float], box2: Sequence[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes, as upstream ``compute_iou``:
    intersection ``max(0, min(x2) - max(x1)) * max(0, min(y2) - max(y1))``, areas
    ``(x2 - x1) * (y2 - y1)`` taken as written (no +1, no reordering of swapped corners), IoU =
    intersection / (area1 + area2 - intersection). Where that union is ≤ 0 (two degenerate boxes),
    upstream divides by zero; here the IoU is 0."""
    inter = max(0.0, min(box1[2], box2[2]) - max(box1[0], box2[0])) * \
        max(0.0, min(box1[3], box2[3]) - max(box1[1], box2[1]))
    union = (box1[2] - box1[0]) * (box1[3] - box1[1]) + (box2[2] - box2[0]) * (box2[3] - box2[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def iou_matrix(predicted: BoxList, reference: BoxList) -> np.ndarray:
    """``ious[i, j] = box_iou(predicted[i], reference[j])``."""
    ious = np.zeros((len(predicted), len(reference)))
    for i, pred in enumerate(predicted):
        for j, ref in enumerate(reference):
            ious[i, j] = box_iou(pred, ref)
    return ious


def voc_average_precision(recall: Sequence[float], precision: Sequence[float]) -> float:
    """VOC all-point AP, as upstream ``compute_average_precision``: pad recall to
    ``[0, r…, 1]`` and precision to ``[0, p…, 0]``; make precision non-increasing from the right
    (``p[i-1] = max(p[i-1], p[i])``); sum ``(r[i+1] - r[i]) * p[i+1]`` over the indices where
    recall changes."""
    r = np.concatenate(([0.0], np.asarray(recall, dtype=float), [1.0]))
    p = np.concatenate(([0.0], np.asarray(precision, dtype=float), [0.0]))
    for i in range(len(p) - 1, 0, -1):
        p[i - 1] = max(p[i - 1], p[i])
    changes = np.where(r[1:] != r[:-1])[0]
    return float(np.sum((r[changes + 1] - r[changes]) * p[changes + 1]))


def sample_average_precision(predicted: BoxList, reference: BoxList, iou_threshold: float = 0.5) -> float:
    """AP of one sample, as upstream: 0 when there is no predicted or no reference box. Otherwise
    predictions are taken in generated order; each one's candidate is the reference with the
    highest IoU over ALL references (the first on ties, ``np.argmax``); it is a true positive iff
    that IoU ≥ ``iou_threshold`` and the candidate is still unmatched, else a false positive — no
    fall-back to the second-best reference. recall = cumTP / n_references, precision =
    cumTP / (cumTP + cumFP), AP by ``voc_average_precision``."""
    if len(predicted) == 0 or len(reference) == 0:
        return 0.0
    ious = iou_matrix(predicted, reference)
    matched: set[int] = set()
    tp = np.zeros(len(predicted))
    fp = np.zeros(len(predicted))
    for i in range(len(predicted)):
        best = int(np.argmax(ious[i, :]))
        if ious[i, best] >= iou_threshold and best not in matched:
            tp[i] = 1
            matched.add(best)
        else:
            fp[i] = 1
    tp_cum, fp_cum = np.cumsum(tp), np.cumsum(fp)
    return voc_average_precision(tp_cum / len(reference), tp_cum / (tp_cum + fp_cum))


def upstream_grounding_map(records: Iterable[Mapping], iou_thresholds: Sequence[float] = (0.5,)) -> dict:
    """Upstream ``evaluate_boxes(output_list, avg_iou=True)``.

    For each threshold t: ``mAP_t`` = mean over ALL samples of ``sample_average_precision`` of the
    boxes extracted from ``output`` (``extract_boxes_upstream``) against ``boxes`` (samples with no
    predicted or no reference box count as 0; no samples → 0). ``avg_iou`` = sum of every
    predicted×reference pair's IoU over the samples that have both, divided by the number of such
    pairs (pooled, not a mean of per-sample means); ``None`` where no sample has both (upstream
    leaves the key out)."""
    records = list(records)
    results: dict = {}
    for threshold in iou_thresholds:
        aps = []
        for record in records:
            if "output" not in record or "boxes" not in record:
                raise KeyError("both 'output' and 'boxes' must be in every grounding record")
            aps.append(sample_average_precision(extract_boxes_upstream(record["output"]), record["boxes"], threshold))
        results[f"mAP_{threshold}"] = float(np.mean(aps)) if aps else 0.0
    iou_sum, pairs = 0.0, 0
    for record in records:
        predicted = extract_boxes_upstream(record["output"])
        if predicted and record["boxes"]:
            iou_sum += float(np.sum(iou_matrix(predicted, record["boxes"])))
            pairs += len(predicted) * len(record["boxes"])
    results["avg_iou"] = iou_sum / pairs if pairs else None
    return results


def best_ious_per_reference(predicted: BoxList, reference: BoxList) -> list[float]:
    """For each reference box, the highest IoU any predicted box reaches with it (0 when there
    is no predicted box)."""
    if not predicted:
        return [0.0] * len(reference)
    return [float(v) for v in iou_matrix(predicted, reference).max(axis=0)]


def mean_best_iou(records: Iterable[Mapping]) -> tuple[float | None, list[float]]:
    """Our localisation summary: boxes parsed with ``inference.parsing.parse_boxes`` (tolerant,
    clamped, degenerate boxes dropped); for every reference box of every sample, the best IoU of
    any predicted box (``best_ious_per_reference``); returns (mean of those values, the values).
    ``None`` when there are no reference boxes at all. The values feed the IoU histogram."""
    values: list[float] = []
    for record in records:
        predicted = [box.as_list() for box in parse_boxes(record["output"]).boxes]
        values += best_ious_per_reference(predicted, record["boxes"])
    return (float(np.mean(values)) if values else None), values


@dataclass(frozen=True)
class CocoResult:
    ap: float          # AP averaged over IoU 0.50:0.05:0.95, maxDets 100, all areas
    ap50: float
    ap75: float
    ar100: float


def coco_grounding_ap(records: Iterable[Mapping], canvas: int = 1000) -> CocoResult:
    """COCO-style AP via pycocotools' ``COCOeval`` (iouType "bbox"), class-agnostic.

    Each sample is one COCO image of ``canvas`` × ``canvas`` pixels (boxes are relative, so the
    canvas only fixes the area ranges); its reference boxes are ground truths of one category; its
    predicted boxes (``parse_boxes``) are detections with score 1 / (1 + rank in the answer), since
    the model gives no confidence — ties across samples keep record order (pycocotools sorts
    stably). Metrics: stats[0] AP@[.50:.95], stats[1] AP50, stats[2] AP75, stats[8] AR@100.
    A value of -1 means pycocotools found no reference box."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(box: Sequence[float]) -> list[float]:
        x1, y1, x2, y2 = (float(v) * canvas for v in box)
        return [x1, y1, x2 - x1, y2 - y1]

    images, annotations, detections = [], [], []
    for image_id, record in enumerate(records, start=1):
        images.append({"id": image_id, "width": canvas, "height": canvas})
        for box in record["boxes"]:
            bbox = xywh(box)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
        for rank, box in enumerate(parse_boxes(record["output"]).boxes):
            bbox = xywh(box.as_list())
            detections.append({"image_id": image_id, "category_id": 1, "bbox": bbox,
                               "score": 1.0 / (1 + rank), "area": bbox[2] * bbox[3]})
    if not annotations:
        return CocoResult(-1.0, -1.0, -1.0, -1.0)
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "finding"}]}
        truth.createIndex()
        if detections:
            predicted = truth.loadRes(detections)
        else:  # loadRes refuses an empty list; an empty result set scores 0
            predicted = COCO()
            predicted.dataset = {"images": images, "annotations": [], "categories": truth.dataset["categories"]}
            predicted.createIndex()
        evaluator = COCOeval(truth, predicted, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return CocoResult(ap=float(stats[0]), ap50=float(stats[1]), ap75=float(stats[2]), ar100=float(stats[8]))


def grounding_metrics(records: Iterable[Mapping]) -> dict:
    """All grounding metrics of one set of records: upstream ``mAP_0.5`` and ``avg_iou``,
    COCO ``coco_AP`` / ``coco_AP50`` / ``coco_AP75`` / ``coco_AR100``, our ``mean_iou``, counts of
    samples, of answers without any box, and of boxes our parser dropped (with reasons)."""
    records = list(records)
    upstream = upstream_grounding_map(records)
    mean_iou, _ = mean_best_iou(records)
    coco = coco_grounding_ap(records)
    dropped = [reason for record in records for reason in parse_boxes(record["output"]).dropped]
    return {
        "n_samples": len(records),
        "mAP_0.5": upstream["mAP_0.5"],
        "avg_iou": upstream["avg_iou"],
        "coco_AP": coco.ap, "coco_AP50": coco.ap50, "coco_AP75": coco.ap75, "coco_AR100": coco.ar100,
        "mean_iou": mean_iou,
        "answers_without_box": sum(1 for record in records if not extract_boxes_upstream(record["output"])),
        "boxes_dropped_by_parser": len(dropped),
        "dropped_reasons": dropped[:20],
    }
