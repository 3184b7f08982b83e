"""COCO metrics with pycocotools' COCOeval."""

from __future__ import annotations

import contextlib
import io

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..models.deformable_detr import post_process

__all__ = ["METRIC_NAMES", "coco_metrics", "evaluate"]

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


@torch.no_grad()
def evaluate(
    model, loader, dataset, device: str | torch.device = "cpu", top_k: int = 100
) -> dict[str, float]:
    """Run the detector over ``loader`` (yielding images, mask, targets) and score it."""
    model.eval()
    detections = []
    for images, mask, targets in loader:
        outputs = model(images.to(device), mask.to(device))
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        for result, target in zip(post_process(outputs, sizes, top_k), targets, strict=True):
            for score, label, box in zip(
                result["scores"].tolist(),
                result["labels"].tolist(),
                result["boxes"].tolist(),
                strict=True,
            ):
                x0, y0, x1, y1 = box
                detections.append(
                    {
                        "image_id": target["image_id"],
                        "category_id": dataset.category_ids[label],
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": score,
                    }
                )
    return coco_metrics(dataset.coco, detections)
