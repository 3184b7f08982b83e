"""Mask2Former's set loss for semantic segmentation: label maps -> one binary mask per class
present, Hungarian matching of queries to them, then classification, BCE and dice losses.

Masks are compared at points: by default every pixel of the predictions' stride-4 grid
(``num_points=None``), else ``num_points`` uniformly random points per image (Mask2Former
matches on 12544 of them). At the tiny model's resolution the stride-4 grid has fewer
pixels than that (1600 at 160 px): the whole grid is cheaper than Mask2Former's sample,
exact (no interpolation of the predictions) and free of sampling noise. Targets are read at
each point's nearest pixel, so an ignored pixel (``ignore_index``) stays a hard exclusion:
ignored points take part in no term, of the matching or of the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

__all__ = ["MaskSetLoss", "MaskTargets", "mask_targets", "match_masks", "point_coords"]


class MaskTargets(NamedTuple):
    """One image's targets at the loss's points.

    classes: (T,) int64, the classes present; masks: (T, P) float, 1 where a valid point
    holds the class; valid: (K,) bool, the points not ignored (P = valid.sum()).
    """

    classes: torch.Tensor
    masks: torch.Tensor
    valid: torch.Tensor


def point_coords(
    batch: int, size: Sequence[int], num_points: int | None, device: torch.device
) -> torch.Tensor:
    """(batch, K, 2) normalised (x, y) in [0, 1): the pixel centres of a ``size`` (h, w)
    grid, row-major, the same for every image (``num_points=None``; K = h * w), or
    ``num_points`` uniformly random points per image."""
    if num_points is not None:
        return torch.rand(batch, num_points, 2, device=device)
    h, w = size
    ys = (torch.arange(h, device=device) + 0.5) / h
    xs = (torch.arange(w, device=device) + 0.5) / w
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
    return grid.expand(batch, -1, -1)


def mask_targets(
    target: torch.Tensor, coords: torch.Tensor, ignore_index: int
) -> list[MaskTargets]:
    """Per image, the classes present in ``target`` (N, H, W) int64 (all of it, not only at
    the points) and their binary masks at ``coords`` (N, K, 2) (nearest pixel)."""
    H, W = target.shape[-2:]
    cols = (coords[..., 0] * W).long().clamp(0, W - 1)
    rows = (coords[..., 1] * H).long().clamp(0, H - 1)
    labels = target[torch.arange(target.shape[0], device=target.device)[:, None], rows, cols]
    out = []
    for image, at_points in zip(target, labels, strict=True):
        classes = image[image != ignore_index].unique()
        valid = at_points != ignore_index
        masks = (at_points[valid][None] == classes[:, None]).to(coords.dtype)
        out.append(MaskTargets(classes, masks, valid))
    return out


def _pairwise_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean sigmoid BCE of every prediction against every target: (Q, P), (T, P) -> (Q, T)."""
    P = max(logits.shape[1], 1)
    # BCE(x, 1) = softplus(-x), BCE(x, 0) = softplus(x): two matrix products, not Q*T*P.
    return (F.softplus(-logits) @ targets.T + F.softplus(logits) @ (1 - targets).T) / P


def _pairwise_dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss (+1 smoothed, as Mask2Former) of every pair: (Q, P), (T, P) -> (Q, T)."""
    probs = logits.sigmoid()
    overlap = 2 * probs @ targets.T
    total = probs.sum(1)[:, None] + targets.sum(1)[None]
    return 1 - (overlap + 1) / (total + 1)


@torch.no_grad()
def match_masks(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    classes: torch.Tensor,
    masks: torch.Tensor,
    weights: tuple[float, float, float] = (2.0, 5.0, 5.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's optimal one-to-one assignment of queries to target masks.

    Args:
        class_logits (Tensor[Q, K + 1]), mask_logits (Tensor[Q, P]): the predictions, masks
            at the P points compared.
        classes (Tensor[T], int64), masks (Tensor[T, P]): the targets.
        weights: of the costs class (-probability), sigmoid BCE, dice (Mask2Former's 2, 5, 5).

    Returns:
        (query indices, target indices), int64 on the CPU, each min(Q, T) long, ordered by
        query.
    """
    if classes.numel() == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty
    class_logits, mask_logits, masks = class_logits.float(), mask_logits.float(), masks.float()
    cost = (
        -weights[0] * class_logits.softmax(-1)[:, classes]
        + weights[1] * _pairwise_bce(mask_logits, masks)
        + weights[2] * _pairwise_dice(mask_logits, masks)
    ).cpu()
    if not torch.isfinite(cost).all():
        raise FloatingPointError(
            "the matching cost is not finite: training diverged (try a lower --lr)"
        )
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


class MaskSetLoss:
    """Mask2Former's loss of a masked-attention decoder's outputs
    (:class:`~msdeformattn.models.mask2former_head.MaskedAttentionDecoder`) against label maps.

    For the final and every auxiliary output, queries are matched to the classes present
    (:func:`match_masks`); the loss is ``class_weight`` * cross-entropy over all queries
    (unmatched ones: no object, weighted ``no_object_weight``) + ``mask_weight`` * BCE +
    ``dice_weight`` * dice over the matched masks (each averaged over the targets of the
    batch), summed over the outputs. Defaults are Mask2Former's (2, 5, 5, 0.1).
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        *,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int | None = None,
    ) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.weights = (class_weight, mask_weight, dice_weight)
        self.no_object_weight = no_object_weight
        self.num_points = num_points

    def __call__(self, outputs: dict, target: torch.Tensor) -> torch.Tensor:
        """outputs: ``pred_logits`` (N, Q, K + 1), ``pred_masks`` (N, Q, h, w) and
        ``aux_outputs`` (a list of such dicts); target (N, H, W) int64 with
        ``ignore_index`` on pixels to skip -> the weighted sum, a scalar."""
        terms = self.terms(outputs, target)
        return sum(w * terms[name] for w, name in zip(self.weights, terms, strict=True))

    def terms(self, outputs: dict, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted ``class``, ``mask`` (BCE) and ``dice`` losses, each summed over the
        final and auxiliary outputs."""
        masks = outputs["pred_masks"]
        N = masks.shape[0]
        if target.dtype != torch.int64 or target.dim() != 3 or target.shape[0] != N:
            raise ValueError(
                f"target must be an int64 tensor (N, H, W) with N = {N}, "
                f"got {target.dtype} {tuple(target.shape)}"
            )
        coords = point_coords(N, masks.shape[-2:], self.num_points, masks.device)
        targets = mask_targets(target, coords, self.ignore_index)
        num_masks = max(sum(len(t.classes) for t in targets), 1)
        totals = {"class": 0.0, "mask": 0.0, "dice": 0.0}
        for out in [outputs, *outputs.get("aux_outputs", [])]:
            for name, value in self._output_terms(out, coords, targets, num_masks).items():
                totals[name] = totals[name] + value
        return totals

    def _output_terms(
        self, out: dict, coords: torch.Tensor, targets: list[MaskTargets], num_masks: int
    ) -> dict[str, torch.Tensor]:
        logits, masks = out["pred_logits"], out["pred_masks"]
        N, Q, K1 = logits.shape
        points = self._at_points(masks, coords)  # (N, Q, K)
        classes = torch.full((N, Q), K1 - 1, dtype=torch.int64, device=logits.device)
        bce = dice = points.new_zeros(())
        for i, t in enumerate(targets):
            pred = points[i][:, t.valid]
            rows, cols = match_masks(logits[i], pred, t.classes, t.masks, self.weights)
            rows, cols = rows.to(logits.device), cols.to(logits.device)
            classes[i, rows] = t.classes[cols]
            matched, wanted = pred[rows], t.masks[cols]
            if matched.shape[1] > 0:
                bce = (
                    bce
                    + F.binary_cross_entropy_with_logits(matched, wanted, reduction="none")
                    .mean(1)
                    .sum()
                )
            dice = dice + _dice(matched, wanted).sum()
        weight = torch.ones(K1, device=logits.device, dtype=logits.dtype)
        weight[-1] = self.no_object_weight
        ce = F.cross_entropy(logits.transpose(1, 2), classes, weight=weight)
        return {"class": ce, "mask": bce / num_masks, "dice": dice / num_masks}

    def _at_points(self, masks: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """masks (N, Q, h, w) at coords (N, K, 2) -> (N, Q, K)."""
        if self.num_points is None:
            return masks.flatten(2)  # the points are the grid's pixels, in order
        grid = coords[:, None] * 2 - 1  # (N, 1, K, 2) in grid_sample's [-1, 1]
        return F.grid_sample(masks, grid, mode="bilinear", align_corners=False)[:, :, 0]


def _dice(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss of matched pairs: (M, P), (M, P) -> (M,)."""
    probs = logits.sigmoid()
    return 1 - (2 * (probs * targets).sum(1) + 1) / (probs.sum(1) + targets.sum(1) + 1)
