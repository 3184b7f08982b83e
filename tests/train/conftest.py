"""A COCO folder of the kind people have, shared by the data-check and command-line tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def _image(path: Path, size: tuple[int, int], mode: str = "RGB") -> None:
    rng = np.random.default_rng(len(path.name))
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).save(path)


def real_like(root: Path) -> Path:
    """JPEGs of several sizes, a grayscale and an RGBA PNG, category ids 1, 3, 7, an image
    without annotations, a crowd box, a zero-width box, boxes partly and wholly outside."""
    (root / "annotations").mkdir(parents=True)
    categories = [{"id": i, "name": n} for i, n in ((1, "cat"), (3, "dog"), (7, "bird"))]
    for split in ("train", "val"):
        (root / split).mkdir()
        files = [("a.jpg", (64, 48), "RGB"), ("b.jpg", (40, 72), "RGB"),
                 ("gray.png", (50, 50), "L"), ("rgba.png", (33, 61), "RGBA"),
                 ("empty.jpg", (32, 32), "RGB")]  # fmt: skip
        images = []
        for k, (name, size, mode) in enumerate(files, 1):
            _image(root / split / name, size, mode)
            images.append({"id": k, "file_name": name, "width": size[0], "height": size[1]})
        boxes = [
            (1, 1, [4, 4, 20, 10], {}),
            (1, 3, [30, 20, 10, 10], {"iscrowd": 1}),
            (2, 7, [5, 5, 0, 12], {}),  # zero width
            (2, 1, [30, 60, 20, 20], {}),  # partly outside (40 x 72)
            (3, 3, [60, 60, 5, 5], {}),  # wholly outside (50 x 50)
            (4, 7, [1, 2, 10, 11], {}),
        ]
        annotations = [
            {"id": 10 + k, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], **x}
            for k, (i, c, b, x) in enumerate(boxes)
        ]
        del annotations[-1]["area"]
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return root


def segmentation_sample(
    root: Path,
    split: str,
    stem: str,
    mask: np.ndarray,
    image: np.ndarray | None = None,
    suffix: str = ".png",
) -> None:
    """Write ``root/images/split/stem+suffix`` and ``root/annotations/split/stem.png``:
    ``mask`` (H, W) uint8 class indices; ``image`` (H, W, 3) uint8, noise by default."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    if image is None:
        rng = np.random.default_rng(len(stem))
        image = rng.integers(0, 255, (*mask.shape, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "images" / split / (stem + suffix))
    Image.fromarray(mask.astype(np.uint8)).save(root / "annotations" / split / (stem + ".png"))
