"""Shared by the training tests: a COCO folder of the kind people have (data checks, the
command line), a segmentation sample writer, and the comparison of two run folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
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


#: Log entries that time the run rather than describe its training.
CLOCK_ENTRIES = ("images_per_s", "elapsed_s")


def assert_same_training(a: Path, b: Path) -> None:
    """Two run folders trained identically, to the bit: every entry of ``last.pt`` (weights,
    optimiser and schedule states, RNG states, best metric) but the clock, and every log
    line but its timings."""
    first, second = (torch.load(run / "last.pt", weights_only=True) for run in (a, b))
    _assert_equal(
        {k: v for k, v in first.items() if k != "elapsed"},
        {k: v for k, v in second.items() if k != "elapsed"},
        "last.pt",
    )
    logs = [
        [
            {k: v for k, v in json.loads(line).items() if k not in CLOCK_ENTRIES}
            for line in (run / "log.jsonl").read_text().splitlines()
        ]
        for run in (a, b)
    ]
    assert logs[0] == logs[1]


def _assert_equal(x, y, where: str) -> None:
    """``x == y`` through nested dicts, lists and tuples, tensors equal in dtype and value."""
    if torch.is_tensor(x):
        assert torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert isinstance(y, dict) and x.keys() == y.keys(), where
        for key in x:
            _assert_equal(x[key], y[key], f"{where}[{key!r}]")
    elif isinstance(x, list | tuple):
        assert isinstance(y, list | tuple) and len(x) == len(y), where
        for k, (u, v) in enumerate(zip(x, y, strict=True)):
            _assert_equal(u, v, f"{where}[{k}]")
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"
