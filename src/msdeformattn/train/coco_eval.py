"""COCO metrics with pycocotools' COCOeval."""

from __future__ import annotations

import contextlib
import io

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["METRIC_NAMES", "coco_metrics"]

# COCOeval.stats, in order, under pycocotools' names.
METRIC_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


def coco_metrics(coco_gt: COCO, detections: list[dict]) -> dict[str, float]:
    """Box AP/AR (fractions) of detections ``{"image_id", "category_id", "bbox" xywh, "score"}``."""
    if not detections:
        return dict.fromkeys(METRIC_NAMES, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # -1 marks "no ground truth in this size range": report it as 0.
    return {k: max(float(v), 0.0) for k, v in zip(METRIC_NAMES, ev.stats, strict=True)}
