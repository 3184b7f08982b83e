"""The set criterion of Deformable DETR: focal classification, L1 and GIoU box losses.

Applied to the final output, to every auxiliary decoder output, and in
two-stage to the encoder's proposals (class-agnostic). Weights default to
the paper's: classification 2, L1 5, GIoU 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .matcher import HungarianMatcher

__all__ = ["SetCriterion", "sigmoid_focal_loss"]


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_boxes: float,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) of (N, Q, K) logits, summed per query over classes,
    averaged over queries, summed over the batch and divided by ``num_boxes``."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_boxes


class SetCriterion(nn.Module):
    """Matches, then sums the weighted losses: a dict of ``loss`` (the total) and each term."""

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        weight_class: float = 2.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        focal_alpha: float = 0.25,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher()
        self.weights = {"loss_ce": weight_class, "loss_bbox": weight_bbox, "loss_giou": weight_giou}
        self.focal_alpha = focal_alpha

    def _losses(self, outputs: dict, targets: list[dict], num_boxes: float) -> dict:
        indices = self.matcher(outputs, targets)
        logits = outputs["pred_logits"]
        batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src = torch.cat([src for src, _ in indices])
        onehot = torch.zeros_like(logits)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices, strict=True)])
        onehot[batch, src, labels] = 1
        loss_ce = sigmoid_focal_loss(logits, onehot, num_boxes, self.focal_alpha) * logits.shape[1]
        pred = outputs["pred_boxes"][batch, src]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices, strict=True)])
        loss_bbox = F.l1_loss(pred, tgt, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt)))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """outputs: the detector's dict; targets: per image ``labels`` (T,), ``boxes`` (T, 4)."""
        num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            total = torch.tensor([num_boxes], device=outputs["pred_logits"].device)
            torch.distributed.all_reduce(total)
            num_boxes = max(total.item() / torch.distributed.get_world_size(), 1.0)
        terms = {}
        for k, v in self._losses(outputs, targets, num_boxes).items():
            terms[k] = v
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            for k, v in self._losses(aux, targets, num_boxes).items():
                terms[f"{k}_{i}"] = v
        if "enc_outputs" in outputs:
            # The encoder proposes class-agnostic boxes: every target is class 0.
            binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            for k, v in self._losses(outputs["enc_outputs"], binary, num_boxes).items():
                terms[f"{k}_enc"] = v
        total = sum(
            self.weights[k.rsplit("_", 1)[0] if k not in self.weights else k] * v
            for k, v in terms.items()
        )
        return {"loss": total, **terms}
