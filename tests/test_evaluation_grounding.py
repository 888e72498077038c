"""Grounding metrics: upstream evaluate_boxes reproduced on hand-computed cases, pycocotools cross-checks."""

from __future__ import annotations

import pytest

from training.evaluation.grounding import (
    box_iou,
    coco_grounding_ap,
    extract_boxes_upstream,
    grounding_metrics,
    mean_best_iou,
    sample_average_precision,
    upstream_grounding_map,
    voc_average_precision,
)

A = [0.1, 0.1, 0.4, 0.4]
B = [0.6, 0.6, 0.9, 0.9]
FAR = [0.0, 0.8, 0.05, 0.85]


def answer(*boxes) -> str:
    return "The finding is located at the coordinates " + " and ".join(
        "[" + ", ".join(str(v) for v in box) + "]" for box in boxes) + " on the image."


def test_upstream_regex_reads_answers_as_upstream():
    text = "The left lung is at [0.12, 0.3,0.5, 0.78], [0.1,0.2,0.3,0.4] and [1.2.3, 0.1, 0.2, 0.3]."
    assert extract_boxes_upstream(text) == [[0.12, 0.3, 0.5, 0.78], [0.1, 0.2, 0.3, 0.4]]
    assert extract_boxes_upstream("[-0.1, 0.2, 0.3, 0.4] [0.1; 0.2; 0.3; 0.4]") == []   # unsigned, commas only
    assert extract_boxes_upstream("[120, 340, 560, 780]") == [[120.0, 340.0, 560.0, 780.0]]  # no range check


def test_iou_by_hand():
    assert box_iou(A, A) == pytest.approx(1.0)
    assert box_iou(A, B) == 0.0
    assert box_iou([0, 0, 0.2, 0.2], [0.1, 0, 0.3, 0.2]) == pytest.approx(0.02 / 0.06)
    assert box_iou([0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]) == 0.0   # zero union: 0, not a crash


def test_voc_all_point_ap_by_hand():
    assert voc_average_precision([1.0], [1.0]) == pytest.approx(1.0)
    # recall .5 at precision 1, then 1.0 at 2/3 → .5·1 + .5·(2/3)
    assert voc_average_precision([0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3]) == pytest.approx(0.5 + 1 / 3)


def test_hand_computed_sample_aps():
    assert sample_average_precision([A], [A]) == pytest.approx(1.0)
    assert sample_average_precision([], [A]) == 0.0                       # empty prediction → 0
    assert sample_average_precision([A], []) == 0.0                       # no reference → 0
    assert sample_average_precision([A, A], [A]) == pytest.approx(1.0)    # duplicate after the hit: FP at recall 1
    assert sample_average_precision([FAR, A], [A]) == pytest.approx(0.5)  # FP first: precision .5 at recall 1
    assert sample_average_precision([A, FAR, B], [A, B]) == pytest.approx(0.5 + 0.5 * 2 / 3)  # 0.8333
    assert sample_average_precision([A], [A, B]) == pytest.approx(0.5)    # half the references found


# two heavily overlapping references; the second prediction's best IoU is with the already matched
# first reference (0.875) although it overlaps the second one at 0.818 ≥ 0.5
R1, R2 = [0.0, 0.0, 0.6, 0.5], [0.1, 0.0, 0.7, 0.5]
P2 = [0.04, 0.0, 0.64, 0.5]


def test_no_fallback_to_the_second_best_reference():
    assert box_iou(P2, R1) == pytest.approx(0.875)
    assert box_iou(P2, R2) == pytest.approx(0.27 / 0.33)
    assert sample_average_precision([R1, P2], [R1, R2]) == pytest.approx(0.5)   # P2 is a false positive


def test_ties_take_the_first_reference():
    # the prediction sits exactly between two references (IoU equal): argmax picks the first
    left, right, middle = [0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.75, 0.5], [0.125, 0.0, 0.625, 0.5]  # dyadic: exact
    assert box_iou(middle, left) == box_iou(middle, right) == 0.6
    assert sample_average_precision([middle, left], [left, right]) == pytest.approx(0.5)


def test_map_is_the_mean_over_samples_and_avg_iou_pools_pairs():
    records = [{"output": answer(A), "boxes": [A]},                 # AP 1, one pair IoU 1
               {"output": "I can't find it.", "boxes": [B]},       # AP 0, no pair
               {"output": answer(A, FAR), "boxes": [A, B]}]        # AP .5, pairs 1, 0, 0, 0
    result = upstream_grounding_map(records)
    assert result["mAP_0.5"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert result["avg_iou"] == pytest.approx(2 / 5)
    assert upstream_grounding_map([{"output": "", "boxes": [A]}])["avg_iou"] is None
    with pytest.raises(KeyError):
        upstream_grounding_map([{"output": answer(A)}])


def test_pycocotools_agrees_where_the_definitions_coincide():
    records = [{"output": answer(A), "boxes": [A]}, {"output": answer(B), "boxes": [B]}]
    assert upstream_grounding_map(records)["mAP_0.5"] == pytest.approx(1.0)
    coco = coco_grounding_ap(records)
    assert coco.ap50 == pytest.approx(1.0) and coco.ap == pytest.approx(1.0)


def test_pycocotools_differs_on_interpolation_pooling_and_fallback():
    half = [{"output": answer(A), "boxes": [A, B]}]
    assert upstream_grounding_map(half)["mAP_0.5"] == pytest.approx(0.5)       # VOC all-point area
    assert coco_grounding_ap(half).ap50 == pytest.approx(51 / 101)             # 101-point: recalls 0..0.5
    fallback = [{"output": answer(R1, P2), "boxes": [R1, R2]}]
    assert upstream_grounding_map(fallback)["mAP_0.5"] == pytest.approx(0.5)   # no fall-back
    assert coco_grounding_ap(fallback).ap50 == pytest.approx(1.0)              # COCO falls back to R2
    pooled = [{"output": answer(A), "boxes": [A]}, {"output": "nothing", "boxes": [B]}]
    assert upstream_grounding_map(pooled)["mAP_0.5"] == pytest.approx(0.5)     # mean of 1 and 0
    assert coco_grounding_ap(pooled).ap50 == pytest.approx(51 / 101)          # one PR curve, recall ≤ .5


def test_all_metrics_and_our_parser_view():
    records = [{"output": answer(A) + " Also [120, 340, 560, 780].", "boxes": [A]},
               {"output": answer([0.6, 0.6, 0.9, 0.75]), "boxes": [B]}]
    metrics = grounding_metrics(records)
    assert metrics["n_samples"] == 2
    # upstream keeps the pixel box: a false positive after the hit, which leaves AP at 1; IoU 0.5 counts
    assert metrics["mAP_0.5"] == pytest.approx(1.0)
    assert metrics["avg_iou"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert metrics["boxes_dropped_by_parser"] == 1 and "outside" in metrics["dropped_reasons"][0]
    mean, values = mean_best_iou(records)
    assert values == pytest.approx([1.0, 0.5]) and mean == pytest.approx(0.75)
    assert metrics["coco_AP50"] == pytest.approx(1.0)   # our parser dropped the pixel box
