"""Semantic-segmentation metrics from an accumulated confusion matrix.

>>> cm = ConfusionMatrix(num_classes=3, class_names=["background", "cat", "dog"])
>>> for images, mask, targets in loader:
...     cm.update(model(images, mask).argmax(1), targets)
>>> cm.compute()
{'mIoU': 0.71, 'pixel_accuracy': 0.93, 'IoU/background': 0.95, 'IoU/cat': 0.6, 'IoU/dog': 0.58}

A class absent from both the predictions and the targets has no IoU (0 / 0):
it is reported as ``None`` (JSON's null, where NaN is not valid JSON) and left
out of the mean, as mmsegmentation and torchmetrics leave it out. A class
present in the targets but never predicted, or the reverse, counts with IoU 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ConfusionMatrix"]


class ConfusionMatrix:
    """Pixel counts ``matrix[target, prediction]`` (num_classes, num_classes), int64.

    ``update`` runs on the device of its inputs (one ``bincount``) and the matrix
    moves there on the first call. Pixels whose target is ``ignore_index`` are
    not counted. To combine processes, all-reduce (sum) ``matrix`` before
    :meth:`compute`.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if class_names is None:
            class_names = [str(k) for k in range(num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(
                f"class_names must name each of the {num_classes} classes, "
                f"got {len(class_names)} names"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names)
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.matrix.zero_()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count one batch: ``pred`` and ``target`` (N, H, W) integer class indices.

        Any shape works as long as both match. Targets equal to ``ignore_index``
        are skipped; other values of either must lie in 0..num_classes-1.
        """
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have the same shape, got {tuple(pred.shape)} "
                f"and {tuple(target.shape)}"
            )
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError(
                f"pred and target must hold integer class indices, got {pred.dtype} "
                f"and {target.dtype} (take argmax over the class dimension first)"
            )
        K = self.num_classes
        keep = target != self.ignore_index
        pred, target = pred[keep].long(), target[keep].long()
        for name, values in (("pred", pred), ("target", target)):
            if values.numel() and bool(((values < 0) | (values >= K)).any()):
                raise ValueError(
                    f"{name} holds class indices outside 0..{K - 1}: "
                    f"{values[(values < 0) | (values >= K)].unique()[:8].tolist()}"
                )
        counts = torch.bincount(target * K + pred, minlength=K * K).view(K, K)
        self.matrix = self.matrix.to(counts.device) + counts

    def compute(self) -> dict[str, float | None]:
        """``mIoU``, ``pixel_accuracy`` and ``IoU/<class name>``, fractions in [0, 1].

        IoU of class c = TP / (TP + FP + FN). A class absent from predictions and
        targets gets ``None`` and stays out of the mean; with no pixel counted at
        all, ``mIoU`` and ``pixel_accuracy`` are ``None`` too.
        """
        matrix = self.matrix.cpu().double()
        tp = matrix.diagonal()
        union = matrix.sum(0) + matrix.sum(1) - tp
        ious = [float(t / u) if u > 0 else None for t, u in zip(tp, union, strict=True)]
        present = [iou for iou in ious if iou is not None]
        total = float(matrix.sum())
        return {
            "mIoU": sum(present) / len(present) if present else None,
            "pixel_accuracy": float(tp.sum()) / total if total > 0 else None,
            **{f"IoU/{n}": iou for n, iou in zip(self.class_names, ious, strict=True)},
        }
