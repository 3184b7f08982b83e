"""Pictures: detections on an image, and where a query's deformable attention samples."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import torch

from ..models.deformable_detr import post_process
from ..nn.attention import MSDeformAttn
from .data import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["draw_boxes", "draw_detections", "draw_sampling_points"]

_LEVEL_COLOURS = ("tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:brown")


def _to_rgb(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _boxes(ax, result: dict, class_names, threshold: float, style: tuple) -> None:
    """Draw ``result``'s boxes above ``threshold``; style: (box colour, label background,
    font size)."""
    edge, label_bg, size = style
    text = "white" if label_bg == "black" else "black"
    for score, label, (x0, y0, x1, y1) in zip(
        result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist(), strict=True
    ):
        if score < threshold:
            continue
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=edge, lw=1.5))
        name = class_names[label] if class_names else str(int(label))
        ax.text(
            x0,
            y0,
            f"{name} {score:.2f}",
            color=text,
            fontsize=size,
            bbox={"facecolor": label_bg, "alpha": 0.6, "pad": 1},
        )


@torch.no_grad()
def draw_detections(
    model,
    images: torch.Tensor,
    mask: torch.Tensor,
    path: str | Path,
    class_names=None,
    threshold: float = 0.3,
    max_images: int = 8,
) -> None:
    """Boxes scoring above ``threshold`` on up to ``max_images`` normalised images."""
    model.eval()
    images, mask = images[:max_images], mask[:max_images]
    device = next(model.parameters()).device
    out = model(images.to(device), mask.to(device))
    # Boxes are relative to each image's own (unpadded) size.
    sizes = torch.stack([(~mask).any(2).sum(1), (~mask).any(1).sum(1)], 1)
    results = post_process(out, sizes.to(device))
    fig, axes = plt.subplots(1, len(images), figsize=(3 * len(images), 3), squeeze=False)
    for ax, image, res in zip(axes[0], images, results, strict=True):
        ax.imshow(_to_rgb(image))
        ax.axis("off")
        _boxes(ax, res, class_names, threshold, ("white", "black", 7))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def draw_sampling_points(
    model, image: torch.Tensor, path: str | Path, num_queries: int = 3
) -> None:
    """For the top-scoring queries of one image: their reference point and the sampling
    points of the last decoder layer's cross-attention on every level, dot size and
    opacity by attention weight (the paper's Figure 6 in spirit)."""
    model.eval()
    attn = model.transformer.decoder.layers[-1].cross_attn
    if not isinstance(attn, MSDeformAttn):
        raise TypeError("the last decoder layer has no MSDeformAttn cross-attention")
    attn.record_sampling = True
    try:
        out = model(image[None].to(next(model.parameters()).device))
    finally:
        attn.record_sampling = False
    # (1, Q, M, L, P, 2) and (1, Q, M, L, P)
    locations, weights = (t.cpu() for t in attn.last_sampling)
    out = {k: out[k].cpu() for k in ("pred_logits", "pred_boxes")}
    scores = out["pred_logits"][0].sigmoid().max(-1).values
    queries = scores.topk(min(num_queries, len(scores))).indices
    H, W = image.shape[-2:]
    fig, axes = plt.subplots(1, len(queries), figsize=(3.2 * len(queries), 3.2), squeeze=False)
    for ax, q in zip(axes[0], queries.tolist(), strict=True):
        ax.imshow(_to_rgb(image))
        ax.set_title(f"query {q} (score {scores[q]:.2f})", fontsize=8)
        ax.axis("off")
        loc = locations[0, q]  # (M, L, P, 2)
        w = weights[0, q]
        for level in range(loc.shape[1]):
            xy = loc[:, level].reshape(-1, 2) * torch.tensor([W, H])
            a = w[:, level].reshape(-1)
            ax.scatter(
                xy[:, 0],
                xy[:, 1],
                s=200 * a / a.max().clamp(min=1e-6) + 2,
                c=_LEVEL_COLOURS[level % len(_LEVEL_COLOURS)],
                alpha=0.7,
                label=f"level {level}",
                edgecolors="none",
            )
        cx, cy = out["pred_boxes"][0, q, :2].tolist()
        ax.scatter([cx * W], [cy * H], marker="+", s=80, c="white", label="box centre")
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
    axes[0][0].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_boxes(
    rgb, result: dict, path: str | Path, class_names=None, threshold: float = 0.3
) -> None:
    """One image (H, W, 3 array, values 0..1 or 0..255) with the boxes of ``result``
    (``scores``, ``labels``, ``boxes`` xyxy in that image's pixels) above ``threshold``."""
    H, W = rgb.shape[:2]
    fig, ax = plt.subplots(figsize=(6, 6 * H / W))
    ax.imshow(rgb)
    ax.axis("off")
    _boxes(ax, result, class_names, threshold, ("yellow", "yellow", 9))
    fig.tight_layout(pad=0)
    fig.savefig(path, dpi=100)
    plt.close(fig)
