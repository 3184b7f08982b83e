"""Box ops, Hungarian matching and the set criterion."""

from __future__ import annotations

import itertools

import pytest
import torch

from msdeformattn.models import DeformableDETRConfig, build_model
from msdeformattn.train.build import build_criterion
from msdeformattn.train.config import TrainConfig
from msdeformattn.train.losses import SetCriterion, sigmoid_focal_loss
from msdeformattn.train.matcher import HungarianMatcher
from msdeformattn.util.box_ops import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
)


def test_giou_known_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0], [3.0, 0.0, 4.0, 1.0]])
    g = generalized_box_iou(a, b)[0]
    torch.testing.assert_close(g[0], torch.tensor(1.0))
    torch.testing.assert_close(g[1], torch.tensor(1 / 7 - (9 - 7) / 9))
    torch.testing.assert_close(g[2], torch.tensor(0 - (8 - 5) / 8))
    boxes = torch.rand(5, 4)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes)
    with pytest.raises(ValueError, match="x1 >= x0"):
        generalized_box_iou(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), a)


def brute_force_assignment(cost):
    Q, T = cost.shape
    best = min(
        itertools.permutations(range(Q), T), key=lambda p: sum(cost[p[j], j] for j in range(T))
    )
    return sorted(zip(best, range(T), strict=True))


def test_matcher_finds_the_optimal_assignment():
    g = torch.Generator().manual_seed(0)
    outputs = {
        "pred_logits": torch.randn(2, 5, 3, generator=g),
        "pred_boxes": torch.rand(2, 5, 4, generator=g) * 0.5 + 0.1,
    }
    targets = [
        {"labels": torch.tensor([0, 2, 1]), "boxes": torch.rand(3, 4, generator=g) * 0.5 + 0.1},
        {"labels": torch.tensor([1]), "boxes": torch.rand(1, 4, generator=g) * 0.5 + 0.1},
    ]
    matcher = HungarianMatcher()
    for i, (rows, cols) in enumerate(matcher(outputs, targets)):
        one = {
            "pred_logits": outputs["pred_logits"][i : i + 1],
            "pred_boxes": outputs["pred_boxes"][i : i + 1],
        }
        # Recompute the cost matrix of this image alone and solve it by brute force.
        prob = one["pred_logits"][0].sigmoid()
        t = targets[i]
        neg = 0.75 * prob**2 * -(1 - prob + 1e-8).log()
        pos = 0.25 * (1 - prob) ** 2 * -(prob + 1e-8).log()
        cost = (
            5 * torch.cdist(one["pred_boxes"][0], t["boxes"], p=1)
            + 2 * (pos[:, t["labels"]] - neg[:, t["labels"]])
            - 2
            * generalized_box_iou(
                box_cxcywh_to_xyxy(one["pred_boxes"][0]), box_cxcywh_to_xyxy(t["boxes"])
            )
        )
        assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == brute_force_assignment(
            cost
        )


def test_matcher_with_no_targets():
    outputs = {"pred_logits": torch.randn(1, 4, 3), "pred_boxes": torch.rand(1, 4, 4)}
    rows, cols = HungarianMatcher()(
        outputs, [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    )[0]
    assert rows.numel() == cols.numel() == 0


def test_focal_loss_matches_its_formula():
    logits = torch.tensor([[[2.0, -1.0]]])
    targets = torch.tensor([[[1.0, 0.0]]])
    p = logits.sigmoid()
    expected = (
        0.25 * (1 - p[..., 0]) ** 2 * -torch.log(p[..., 0])
        + 0.75 * p[..., 1] ** 2 * -torch.log(1 - p[..., 1])
    ).sum()  # summed over classes, averaged over the one query
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, num_boxes=1), expected)


def test_perfect_predictions_have_zero_box_losses():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.2, 0.3, 0.1, 0.1]])
    logits = torch.full((1, 3, 2), -20.0)
    logits[0, 0, 1] = 20.0
    logits[0, 2, 0] = 20.0
    outputs = {
        "pred_logits": logits,
        "pred_boxes": torch.cat([boxes[:1], torch.rand(1, 4) * 0.1 + 0.4, boxes[1:]])[None],
    }
    targets = [{"labels": torch.tensor([1, 0]), "boxes": boxes}]
    losses = SetCriterion(num_classes=2)(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0, abs=1e-6)
    assert losses["loss_ce"].item() < 1e-6


def test_criterion_covers_aux_and_encoder_outputs_and_backpropagates():
    torch.manual_seed(0)
    model = build_model(
        DeformableDETRConfig.tiny(num_classes=3, with_box_refine=True, two_stage=True)
    )
    out = model(torch.randn(2, 3, 64, 64))
    targets = [
        {
            "labels": torch.tensor([0, 2]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]),
        },
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
    ]
    config = DeformableDETRConfig.tiny(num_classes=3, with_box_refine=True, two_stage=True)
    criterion = build_criterion(config, TrainConfig(cls_loss_coef=3.0))
    losses = criterion(out, targets)
    # Final output, one auxiliary output per earlier decoder layer (2 layers: one), and the
    # proposals, each weighted as the final output: classes 3 (as asked), L1 5, GIoU 2.
    weights = {
        "loss_ce": 3.0, "loss_bbox": 5.0, "loss_giou": 2.0,
        "loss_ce_0": 3.0, "loss_bbox_0": 5.0, "loss_giou_0": 2.0,
        "loss_ce_enc": 3.0, "loss_bbox_enc": 5.0, "loss_giou_enc": 2.0,
    }  # fmt: skip
    assert criterion.weight_dict == weights and set(losses) == set(weights)
    expected = sum(weights[k] * v for k, v in losses.items())
    total = criterion.weighted_sum(losses)
    torch.testing.assert_close(total, expected)
    with pytest.raises(ValueError, match="no weight for loss terms"):
        criterion.weighted_sum({**losses, "loss_extra": total})
    total.backward()
    assert model.class_embed[0].weight.grad.abs().sum() > 0
