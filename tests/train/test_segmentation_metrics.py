"""mIoU, per-class IoU and pixel accuracy from the accumulated confusion matrix."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from msdeformattn.train.segmentation_metrics import ConfusionMatrix


def numpy_metrics(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int = 255):
    """The oracle: a pixel loop into a confusion matrix, then IoU with NaN for 0 / 0."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, t in zip(pred.ravel(), target.ravel(), strict=True):
        if t != ignore:
            matrix[t, p] += 1
    tp = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) - tp
    with np.errstate(invalid="ignore"):
        iou = tp / union
    return float(np.nanmean(iou)), float(tp.sum() / matrix.sum()), iou


def test_hand_computed_case():
    # target / pred over 8 pixels, one ignored (its wrong prediction must not count)
    target = torch.tensor([[0, 0, 1, 1], [1, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 1]])
    cm = ConfusionMatrix(3, class_names=["bg", "a", "b"])
    cm.update(pred[None], target[None])
    # class 0: tp 1, fp 1 (pixel 6), fn 1 (pixel 1) -> 1/3
    # class 1: tp 2, fp 1 (pixel 1), fn 1 (pixel 4) -> 2/4
    # class 2: tp 1, fp 1 (pixel 4), fn 1 (pixel 6) -> 1/3
    out = cm.compute()
    assert out["IoU/bg"] == pytest.approx(1 / 3) and out["IoU/b"] == pytest.approx(1 / 3)
    assert out["IoU/a"] == pytest.approx(0.5)
    assert out["mIoU"] == pytest.approx((1 / 3 + 0.5 + 1 / 3) / 3)
    assert out["pixel_accuracy"] == pytest.approx(4 / 7)
    assert list(out) == ["mIoU", "pixel_accuracy", "IoU/bg", "IoU/a", "IoU/b"]
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]


def test_absent_class_is_none_and_left_out_of_the_mean():
    cm = ConfusionMatrix(4)  # class 3 never appears; class 2 only predicted
    cm.update(torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 1, 1]))
    out = cm.compute()
    assert out["IoU/3"] is None and out["IoU/2"] == 0.0
    assert out["IoU/0"] == 1.0 and out["IoU/1"] == pytest.approx(2 / 3)
    assert out["mIoU"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    json.dumps(out, allow_nan=False)


def test_nothing_counted_gives_none():
    cm = ConfusionMatrix(2)
    cm.update(torch.zeros(0, 5, 5, dtype=torch.int64), torch.zeros(0, 5, 5, dtype=torch.int64))
    cm.update(torch.zeros(1, 2, 2, dtype=torch.int64), torch.full((1, 2, 2), 255))
    assert cm.compute() == {"mIoU": None, "pixel_accuracy": None, "IoU/0": None, "IoU/1": None}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy_on_random_batches(seed):
    rng = np.random.default_rng(seed)
    K = 6
    cm = ConfusionMatrix(K)
    preds, targets = [], []
    for n, h, w in ((2, 7, 9), (1, 13, 5), (3, 4, 4)):  # accumulated over batches
        pred = rng.integers(0, K - 1, (n, h, w))  # K-1 never predicted
        target = rng.integers(0, K - 2, (n, h, w))  # K-2, K-1 never targets
        target[rng.random(target.shape) < 0.2] = 255
        cm.update(torch.from_numpy(pred), torch.from_numpy(target))
        preds.append(pred.ravel())
        targets.append(target.ravel())
    miou, accuracy, iou = numpy_metrics(np.concatenate(preds), np.concatenate(targets), K)
    out = cm.compute()
    assert out["mIoU"] == pytest.approx(miou) and out["pixel_accuracy"] == pytest.approx(accuracy)
    for k in range(K):
        value = out[f"IoU/{k}"]
        assert (value is None) if math.isnan(iou[k]) else value == pytest.approx(iou[k])
    assert out[f"IoU/{K - 1}"] is None and out[f"IoU/{K - 2}"] == 0.0


def test_accumulation_reset_and_input_forms():
    """Batches add up; uint8, (H, W) and non-contiguous inputs count the same; reset empties."""
    rng = np.random.default_rng(3)
    pred = torch.from_numpy(rng.integers(0, 3, (4, 6, 8)))
    target = torch.from_numpy(rng.integers(0, 3, (4, 6, 8)))
    whole = ConfusionMatrix(3)
    whole.update(pred, target)
    parts = ConfusionMatrix(3)
    parts.update(pred[:1].to(torch.uint8), target[:1].to(torch.uint8))
    parts.update(pred[1], target[1])
    parts.update(pred[2:].transpose(1, 2), target[2:].transpose(1, 2))
    assert torch.equal(parts.matrix, whole.matrix)
    assert whole.matrix.sum() == pred.numel()
    parts.reset()
    assert parts.matrix.sum() == 0


def test_custom_ignore_index():
    cm = ConfusionMatrix(2, ignore_index=-1)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, -1, 0]))
    assert cm.matrix.tolist() == [[1, 1], [0, 0]]


def test_bad_inputs_say_what_was_wrong():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"same shape, got \(2, 3\) and \(3, 2\)"):
        cm.update(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"integer class indices, got torch\.float32"):
        cm.update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"target holds class indices outside 0\.\.2: \[3, 7\]"):
        cm.update(torch.tensor([0, 0, 0]), torch.tensor([3, 7, 255]))
    with pytest.raises(ValueError, match=r"pred holds class indices outside 0\.\.2: \[-1\]"):
        cm.update(torch.tensor([-1, 0]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="name each of the 3 classes, got 2"):
        ConfusionMatrix(3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="at least 1, got 0"):
        ConfusionMatrix(0)
    assert cm.matrix.sum() == 0  # nothing counted by the refused updates


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(4)
    pred = torch.from_numpy(rng.integers(0, 5, (2, 33, 17)))
    target = torch.from_numpy(rng.integers(0, 5, (2, 33, 17)))
    cpu, cuda = ConfusionMatrix(5), ConfusionMatrix(5)
    cpu.update(pred, target)
    cuda.update(pred.cuda(), target.cuda())
    assert cuda.matrix.device.type == "cuda"
    assert cuda.compute() == cpu.compute()
