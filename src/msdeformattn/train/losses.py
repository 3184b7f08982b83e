"""The set criterion of Deformable DETR: focal classification, L1 and GIoU box losses.

Applied to the final output, to every auxiliary decoder output, and in
two-stage to the encoder's proposals (class-agnostic). Weights default to
the paper's: classification 2, L1 5, GIoU 2.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .matcher import HungarianMatcher

__all__ = ["PAPER_WEIGHTS", "SetCriterion", "aux_weights", "sigmoid_focal_loss"]


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
    """Deformable DETR's set loss: Hungarian matching, then one method per loss.

    ``forward`` returns the unweighted terms (``loss_ce``, ``loss_bbox``,
    ``loss_giou``, the same with ``_0``, ``_1``, ... for the auxiliary decoder
    outputs and ``_enc`` for two-stage proposals); ``weight_dict`` holds the
    weight of every term, and :meth:`weighted_sum` combines them.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        weight_dict: dict[str, float] | None = None,
        focal_alpha: float = 0.25,
        losses: tuple[str, ...] = ("labels", "boxes"),
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher()
        self.weight_dict = dict(weight_dict or aux_weights(PAPER_WEIGHTS, 5, two_stage=True))
        self.focal_alpha = focal_alpha
        unknown = set(losses) - set(self.loss_map)
        if unknown:
            raise ValueError(f"losses must be among {sorted(self.loss_map)}, got {sorted(unknown)}")
        self.losses = losses

    def loss_labels(self, outputs, targets, indices, num_boxes) -> dict[str, torch.Tensor]:
        """Sigmoid focal loss of every query against its matched class (no match: all zero)."""
        logits = outputs["pred_logits"].float()
        batch, src = _matched(indices)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices, strict=True)])
        onehot = torch.zeros_like(logits)
        onehot[batch, src, labels] = 1
        loss = sigmoid_focal_loss(logits, onehot, num_boxes, self.focal_alpha) * logits.shape[1]
        return {"loss_ce": loss}

    def loss_boxes(self, outputs, targets, indices, num_boxes) -> dict[str, torch.Tensor]:
        """L1 and GIoU losses of matched boxes (normalised cxcywh)."""
        batch, src = _matched(indices)
        pred = outputs["pred_boxes"].float()[batch, src]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices, strict=True)])
        loss_bbox = F.l1_loss(pred, tgt, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt)))
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    loss_map: ClassVar[dict] = {"labels": loss_labels, "boxes": loss_boxes}

    def _all_losses(self, outputs, targets, num_boxes, suffix: str) -> dict[str, torch.Tensor]:
        indices = self.matcher(outputs, targets)
        terms = {}
        for name in self.losses:
            for k, v in self.loss_map[name](self, outputs, targets, indices, num_boxes).items():
                terms[k + suffix] = v
        return terms

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """outputs: the detector's dict; targets: per image ``labels`` (T,), ``boxes`` (T, 4)
        normalised cxcywh. Returns the unweighted loss terms."""
        num_boxes = float(sum(len(t["labels"]) for t in targets))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            total = torch.tensor([num_boxes], device=outputs["pred_logits"].device)
            torch.distributed.all_reduce(total)
            num_boxes = total.item() / torch.distributed.get_world_size()
        num_boxes = max(num_boxes, 1.0)
        terms = self._all_losses(outputs, targets, num_boxes, "")
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            terms.update(self._all_losses(aux, targets, num_boxes, f"_{i}"))
        if "enc_outputs" in outputs:
            # The encoder proposes class-agnostic boxes: every target is class 0.
            binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            terms.update(self._all_losses(outputs["enc_outputs"], binary, num_boxes, "_enc"))
        return terms

    def weighted_sum(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss: each term times its weight."""
        missing = sorted(set(terms) - set(self.weight_dict))
        if missing:
            raise ValueError(f"no weight for loss terms {missing}: add them to weight_dict")
        return sum(w * terms[k] for k, w in self.weight_dict.items() if k in terms)


def _matched(indices) -> tuple[torch.Tensor, torch.Tensor]:
    """(image index, query index) of every matched prediction, concatenated."""
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch, torch.cat([src for src, _ in indices])


#: The reference implementation's loss weights.
PAPER_WEIGHTS = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def aux_weights(base: dict[str, float], num_aux: int, two_stage: bool) -> dict[str, float]:
    """``base`` repeated for each auxiliary output (``_0``..) and the proposals (``_enc``)."""
    out = dict(base)
    for suffix in [f"_{i}" for i in range(num_aux)] + (["_enc"] if two_stage else []):
        out.update({k + suffix: v for k, v in base.items()})
    return out
