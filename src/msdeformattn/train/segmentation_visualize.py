"""Pictures of segmentations: a fixed palette, colour overlays and image | truth | prediction
sheets (matplotlib, written as PNG). Detection's pictures are in :mod:`.visualize`."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["PALETTE", "colorize", "draw_segmentations", "overlay"]

#: Class k's colour is ``PALETTE[k % len(PALETTE)]`` (RGB); class 0, usually the background,
#: is black. The ignore index (255) is drawn white.
PALETTE = np.array(
    [
        (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
        (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60),
        (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40), (128, 0, 0),
        (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
    ],
    dtype=np.uint8,
)  # fmt: skip


def colorize(labels: np.ndarray | torch.Tensor, ignore_index: int = 255) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 colours of :data:`PALETTE`."""
    labels = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels).astype(np.int64)
    out = PALETTE[labels % len(PALETTE)]
    out[labels == ignore_index] = 255
    return out


def overlay(rgb: np.ndarray, labels: np.ndarray | torch.Tensor, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 image blended with the colours of (H, W) labels; class 0 (the
    background) is left as it is."""
    labels = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)
    colours = colorize(labels).astype(np.float32)
    blended = (1 - alpha) * rgb.astype(np.float32) + alpha * colours
    out = np.where((labels == 0)[..., None], rgb.astype(np.float32), blended)
    return out.round().astype(np.uint8)


def draw_segmentations(
    images: list[np.ndarray],
    targets: list[np.ndarray],
    predictions: list[np.ndarray],
    path: str | Path,
    class_names: list[str],
) -> None:
    """One row per image: image | ground truth | prediction, with a legend of the classes,
    into one PNG. images (H, W, 3) uint8, targets and predictions (H, W) class indices."""
    rows = len(images)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows), squeeze=False)
    for row, (image, target, pred) in enumerate(zip(images, targets, predictions, strict=True)):
        for ax, picture, title in zip(
            axes[row],
            (image, colorize(target), colorize(pred)),
            ("image", "ground truth", "prediction"),
            strict=True,
        ):
            ax.imshow(picture, interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title)
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=colorize(np.array([[k]]))[0, 0] / 255)
        for k in range(len(class_names))
    ]
    fig.legend(handles, class_names, loc="lower center", ncol=min(len(class_names), 6))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
