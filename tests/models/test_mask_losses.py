"""Mask2Former's set loss: targets from label maps, the mask matcher and the loss terms."""

from __future__ import annotations

import pytest
import torch

from msdeformattn.models.mask_losses import MaskSetLoss, mask_targets, match_masks, point_coords

K, Q = 4, 5
BIG = 20.0


def label_map():
    """(2, 32, 32) labels constant on 4x4 blocks (so the 8x8 stride-4 grid reads them
    exactly): image 0 holds classes 0, 1 and 3 and an ignored block; image 1 class 2 alone."""
    coarse = torch.zeros(2, 8, 8, dtype=torch.int64)
    coarse[0, :, 4:] = 1
    coarse[0, 6:, :3] = 3
    coarse[0, 0, 0] = 255
    coarse[1] = 2
    return coarse.repeat_interleave(4, 1).repeat_interleave(4, 2), coarse


def perfect_outputs(coarse, swap=False):
    """Outputs that predict ``coarse`` exactly: query q holds the q-th class present (class
    logit and mask), the other queries no object. ``swap``: the first two queries exchange
    their masks."""
    N = coarse.shape[0]
    logits = torch.full((N, Q, K + 1), -BIG)
    masks = torch.full((N, Q, *coarse.shape[-2:]), -BIG)
    for i in range(N):
        present = coarse[i][coarse[i] != 255].unique()
        for q in range(Q):
            if q < len(present):
                logits[i, q, present[q]] = BIG
                masks[i, q] = torch.where(coarse[i] == present[q], BIG, -BIG)
            else:
                logits[i, q, -1] = BIG
        # Under ignored pixels the predictions may be anything.
        masks[i][:, coarse[i] == 255] = BIG
        if swap:
            masks[i, [0, 1]] = masks[i, [1, 0]].clone()
    out = {"pred_logits": logits, "pred_masks": masks}
    return {**out, "aux_outputs": [dict(out), dict(out)]}


def test_targets_are_one_mask_per_class_present_without_ignored_points():
    target, coarse = label_map()
    coords = point_coords(2, (8, 8), None, torch.device("cpu"))
    assert coords.shape == (2, 64, 2)
    first, second = mask_targets(target, coords, 255)
    assert first.classes.tolist() == [0, 1, 3] and second.classes.tolist() == [2]
    assert first.valid.sum() == 63 and not first.valid[0]
    want = torch.stack([coarse[0].flatten()[1:] == c for c in (0, 1, 3)]).float()
    assert torch.equal(first.masks, want)
    assert torch.equal(second.masks, torch.ones(1, 64))


def test_the_matcher_finds_the_optimal_assignment():
    # Targets: two masks over 6 points. Query 2 predicts target 0's mask, query 0 target
    # 1's; query 1 predicts target 1's mask too but believes in another class.
    masks = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.float32)
    classes = torch.tensor([1, 3])
    mask_logits = torch.tensor(
        [[-1, -1, -1, 1, 1, 1], [-1, -1, -1, 1, 1, 1], [1, 1, 1, -1, -1, -1]]
    )
    class_logits = torch.zeros(3, K + 1)
    class_logits[0, 3] = class_logits[2, 1] = 3.0
    class_logits[1, 0] = 3.0
    rows, cols = match_masks(class_logits, 3.0 * mask_logits, classes, masks)
    assert rows.tolist() == [0, 2] and cols.tolist() == [1, 0]
    # With the class cost alone the masks do not count: query 2 still wins target 0, and
    # target 1 goes to query 0 (its class), never to query 1.
    rows, cols = match_masks(class_logits, -mask_logits, classes, masks, weights=(1, 0, 0))
    assert rows.tolist() == [0, 2] and cols.tolist() == [1, 0]
    # No targets: nothing matched.
    rows, cols = match_masks(class_logits, mask_logits, classes[:0], masks[:0])
    assert rows.numel() == cols.numel() == 0


def test_the_matcher_refuses_a_diverged_cost():
    with pytest.raises(FloatingPointError, match="not finite"):
        match_masks(
            torch.full((2, K + 1), float("nan")),
            torch.zeros(2, 3),
            torch.tensor([0]),
            torch.ones(1, 3),
        )


def test_the_loss_is_about_zero_for_perfect_predictions_and_not_for_swapped_ones():
    target, coarse = label_map()
    criterion = MaskSetLoss(K)
    perfect = criterion.terms(perfect_outputs(coarse), target)
    assert all(value.item() < 1e-4 for value in perfect.values()), perfect
    assert criterion(perfect_outputs(coarse), target).item() < 1e-3
    swapped = criterion.terms(perfect_outputs(coarse, swap=True), target)
    # Matched on masks, then the classes disagree; matched on classes, the masks do.
    assert criterion(perfect_outputs(coarse, swap=True), target).item() > 1.0
    assert swapped["class"] + swapped["mask"] + swapped["dice"] > 1.0


def test_the_loss_sums_the_final_and_auxiliary_outputs():
    target, coarse = label_map()
    criterion = MaskSetLoss(K)
    swapped = perfect_outputs(coarse, swap=True)
    once = {k: v for k, v in swapped.items() if k != "aux_outputs"}
    torch.testing.assert_close(criterion(swapped, target), 3 * criterion(once, target))


def test_ignored_pixels_take_no_part():
    target, coarse = label_map()
    criterion = MaskSetLoss(K)
    outputs = perfect_outputs(coarse, swap=True)
    before = criterion(outputs, target)
    for out in [outputs, *outputs["aux_outputs"]]:
        out["pred_masks"] = out["pred_masks"].clone()
        out["pred_masks"][0, :, 0, 0] = torch.randn(Q) * 50  # image 0's ignored block
    torch.testing.assert_close(criterion(outputs, target), before)
    # An image with nothing but ignored pixels: every query is "no object".
    empty = torch.full_like(target, 255)
    loss = criterion(perfect_outputs(coarse), empty)
    assert torch.isfinite(loss) and loss.item() > 1.0


def test_the_no_object_class_weighs_one_tenth():
    # One image, no target: the class loss of a query saying "class 0" instead of "no
    # object" is weighted 0.1, as is the normaliser: unchanged weight ratios.
    target = torch.full((1, 8, 8), 255, dtype=torch.int64)
    logits = torch.zeros(1, 2, K + 1)
    out = {"pred_logits": logits, "pred_masks": torch.zeros(1, 2, 2, 2)}
    terms = MaskSetLoss(K).terms(out, target)
    torch.testing.assert_close(terms["class"], torch.log(torch.tensor(K + 1.0)))
    # A matched target (weight 1) next to an unmatched query (weight 0.1).
    target = torch.zeros(1, 8, 8, dtype=torch.int64)
    logits = torch.zeros(1, 2, K + 1)
    logits[0, 1, -1] = 5.0
    out = {"pred_logits": logits, "pred_masks": torch.full((1, 2, 2, 2), 5.0)}
    terms = MaskSetLoss(K).terms(out, target)
    ce = -logits[0].log_softmax(-1)
    # Query 0 is matched to class 0 (its probability is higher), query 1 is no object.
    want = (1.0 * ce[0, 0] + 0.1 * ce[1, -1]) / 1.1
    torch.testing.assert_close(terms["class"], want)


def test_random_points_and_gradients():
    target, coarse = label_map()
    criterion = MaskSetLoss(K, num_points=300)
    outputs = perfect_outputs(coarse, swap=True)
    leaves = []
    for out in [outputs, *outputs["aux_outputs"]]:
        for key in ("pred_logits", "pred_masks"):
            out[key] = (out[key] / BIG).requires_grad_()
            leaves.append(out[key])
    torch.manual_seed(0)
    loss = criterion(outputs, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(leaf.grad is not None and leaf.grad.abs().sum() > 0 for leaf in leaves)
    # Uniform points: constant targets and predictions give the grid's value.
    flat = torch.zeros(1, 32, 32, dtype=torch.int64)
    logits = torch.full((1, 1, K + 1), -BIG)
    logits[0, 0, 0] = BIG
    out = {"pred_logits": logits, "pred_masks": torch.full((1, 1, 8, 8), BIG)}
    assert criterion(out, flat).item() < 1e-4
