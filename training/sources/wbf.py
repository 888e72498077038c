"""Weighted box fusion of the radiologists' boxes, exactly as upstream fuses VinDr-CXR.

Upstream uzh-dqbm-cmi/RadVLM ``radvlm/data/utils.py`` ``apply_wbf``: boxes of one image and one
class from all radiologists are divided by the original width (x) and height (y), given score 1
and label 1 as ONE model's list, fused with ``ensemble_boxes.weighted_boxes_fusion(iou_thr=0.1,
skip_box_thr=0.0)`` and rounded to 3 decimals. With equal scores a fused box is the mean of the
boxes of its cluster.
"""

from __future__ import annotations

from collections.abc import Sequence

from training.sources.errors import SourceError
from training.sources.samples import BoxTuple, clamp_box

UPSTREAM_IOU_THR = 0.1


def fuse_boxes(pixel_boxes: Sequence[Sequence[float]], columns: int, rows: int,
               iou_thr: float = UPSTREAM_IOU_THR) -> tuple[BoxTuple, ...]:
    """Pixel boxes [x_min, y_min, x_max, y_max] → fused boxes normalised to columns × rows."""
    if not pixel_boxes:
        return ()
    try:  # imported here: the rest of the CLI must work without the `dataset` extra
        from ensemble_boxes import weighted_boxes_fusion
    except ImportError as exc:
        raise SourceError("VinDr-CXR box fusion needs the ensemble-boxes package: "
                          "pip install 'radvlm-pacs[dataset]'") from exc
    scaled = [[min(max(float(b[0]) / columns, 0.0), 1.0), min(max(float(b[1]) / rows, 0.0), 1.0),
               min(max(float(b[2]) / columns, 0.0), 1.0), min(max(float(b[3]) / rows, 0.0), 1.0)]
              for b in pixel_boxes]
    fused, _, _ = weighted_boxes_fusion([scaled], [[1.0] * len(scaled)], [[1] * len(scaled)],
                                        iou_thr=iou_thr, skip_box_thr=0.0)
    boxes = []
    for box in fused:
        rounded = clamp_box(*(round(float(v), 3) for v in box))
        if rounded is not None:
            boxes.append(rounded)
    return tuple(boxes)
