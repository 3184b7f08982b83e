"""A seeded synthetic detection dataset, written to disk in COCO format.

Honest rather than easy: 160x160 images on textured, noisy backgrounds, 1-5
objects per image from four shape classes (filled rectangle, ellipse,
triangle, ring) in random colours, 12-70 px, overlapping each other by at
most ~30% (IoU). Everything depends on the seed alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["CLASSES", "MIN_SIZE", "check_size", "generate"]

CLASSES = ("rectangle", "ellipse", "triangle", "ring")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-frequency colour waves plus pixel noise, (size, size, 3) in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.empty((size, size, 3))
    for c in range(3):
        waves = sum(
            rng.uniform(0.05, 0.2)
            * np.sin(
                2
                * np.pi
                * (rng.uniform(0.5, 4) * xx * np.cos(t) + rng.uniform(0.5, 4) * yy * np.sin(t))
                + rng.uniform(0, 2 * np.pi)
            )
            for t in rng.uniform(0, np.pi, size=3)
        )
        img[..., c] = rng.uniform(0.3, 0.7) + waves
    img += rng.normal(0, 0.06, size=img.shape)
    return img


def _shape_mask(
    kind: int, size: int, box: tuple[float, float, float, float], rng: np.random.Generator
) -> np.ndarray:
    x0, y0, w, h = box
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    u = (xx - x0) / w  # 0..1 across the box
    v = (yy - y0) / h
    inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if kind == 0:  # rectangle
        return inside
    r = (u - 0.5) ** 2 + (v - 0.5) ** 2
    if kind == 1:  # ellipse
        return r <= 0.25
    if kind == 2:  # triangle, apex at the top or the bottom
        if rng.random() < 0.5:
            v = 1 - v
        return inside & (np.abs(u - 0.5) <= v / 2)
    thickness = rng.uniform(0.25, 0.4)  # ring
    return (r <= 0.25) & (r >= (0.5 - 0.5 * thickness) ** 2)


def _iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


#: The smallest image the generators paint: objects are at least 12 px wide.
MIN_SIZE = 32


def check_size(size: int) -> None:
    """Refuse an image size the generators cannot paint objects into."""
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE} (pixels), got {size!r}")


def _paint(
    rng: np.random.Generator, size: int, max_overlap: float
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One image: pixels (size, size, 3) uint8, the object each pixel shows (size, size)
    with -1 for background, and each object's class index.

    Shared by the detection and segmentation generators, so both draw the same scenes.
    """
    img = _background(rng, size)
    owner = np.full((size, size), -1)  # which object each pixel shows
    placed = []  # (kind, box drawn in)
    for _ in range(rng.integers(1, 6)):
        for _attempt in range(20):
            # Up to 70 px, or the whole image when it is smaller.
            w, h = rng.uniform(12, min(70, size), size=2)
            box = (rng.uniform(0, size - w), rng.uniform(0, size - h), w, h)
            if all(_iou(box, other) <= max_overlap for _, other in placed):
                break
        else:
            continue
        kind = int(rng.integers(len(CLASSES)))
        mask = _shape_mask(kind, size, box, rng)
        colour = rng.uniform(0, 1, size=3)
        img[mask] = colour + rng.normal(0, 0.03, size=(int(mask.sum()), 3))
        owner[mask] = len(placed)
        placed.append((kind, box))
    kinds = [kind for kind, _ in placed]
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), owner, kinds


def _image(rng: np.random.Generator, size: int, max_overlap: float):
    pixels, owner, kinds = _paint(rng, size, max_overlap)
    objects = []
    for index, kind in enumerate(kinds):
        ys, xs = np.nonzero(owner == index)
        if len(xs) < 16:  # (almost) hidden by later objects
            continue
        visible = (
            float(xs.min()),
            float(ys.min()),
            float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1),
        )
        objects.append((kind, visible, len(xs)))
    return pixels, objects


def generate(
    root: str | Path,
    num_train: int = 2000,
    num_val: int = 200,
    seed: int = 0,
    size: int = 160,
    max_overlap: float = 0.3,
) -> Path:
    """Write ``root/{train,val}/*.png`` and ``root/annotations/instances_{train,val}.json``.

    Objects painted later cover earlier ones; boxes are the visible pixels'
    extent, so an object partly hidden keeps a box around what shows.
    """
    check_size(size)
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)]
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("val", num_val)):
        (root / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            pixels, objects = _image(rng, size, max_overlap)
            name = f"{i:06d}.png"
            Image.fromarray(pixels).save(root / split / name)
            images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
            for kind, bbox, area in objects:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": kind + 1,
                        "bbox": list(bbox),
                        "area": float(area),
                        "iscrowd": 0,
                    }
                )
        with open(root / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return root
