"""A COCO-format detection dataset, DETR's transforms, and padded batching with masks.

Any dataset laid out as images plus a COCO instances JSON works
(``pycocotools`` reads the annotations). Targets carry normalised
(cx, cy, w, h) boxes and contiguous labels 0..K-1 for the model, plus what
evaluation needs to map back (image id, original size, category ids).

Transforms take ``(image (3, H, W) float, target, generator)`` and return
``(image, target)``; ``target["boxes"]`` is (T, 4) pixel xyxy while they run.
Random transforms draw only from the generator they are called with, and the
dataset makes one per sample from ``(seed, epoch, index)``: augmentation is the
same whatever the number of DataLoader workers, the global RNG state, or a
resume in the middle of training.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO

from ..util.box_ops import box_xyxy_to_cxcywh
from ..util.errors import UsageError

__all__ = [
    "CocoDetection",
    "Compose",
    "Normalize",
    "RandomHorizontalFlip",
    "RandomResize",
    "RandomSelect",
    "RandomSizeCrop",
    "Resize",
    "SeededDataset",
    "collate",
    "detr_eval_transforms",
    "detr_train_transforms",
    "simple_eval_transforms",
    "simple_train_transforms",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Target fields with one entry per box: filtered together with "boxes".
_PER_BOX_FIELDS = ("labels", "area", "iscrowd")

Target = dict[str, Any]
Transform = Callable[..., tuple[torch.Tensor, Target]]


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    """One generator seed per (seed, epoch, index), distinct for epoch and index < 1_000_003."""
    return (seed * 1_000_003**2 + epoch * 1_000_003 + index) % (1 << 63)


class SeededDataset(torch.utils.data.Dataset):
    """A dataset whose augmentation draws from one generator per (seed, epoch, index).

    The epoch lives in shared memory, so ``set_epoch`` also reaches persistent
    DataLoader workers (which keep their own copy of everything else).
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def generator(self, index: int) -> torch.Generator:
        """Sample ``index``'s generator for the current epoch."""
        return torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, index))


class CocoDetection(SeededDataset):
    """``dataset[i] -> (image (3, H, W) float, target dict)`` from a COCO-format folder.

    target: ``boxes`` (T, 4) normalised cxcywh, ``labels`` (T,) in 0..K-1,
    ``image_id``, ``orig_size`` (H, W) and ``size`` after transforms.

    The transforms of sample ``i`` get a generator seeded from ``(seed, epoch, i)``;
    call ``set_epoch`` before each epoch for a fresh draw. The epoch lives in
    shared memory, so the call also reaches persistent DataLoader workers.
    """

    def __init__(
        self,
        images: str | Path,
        annotations: str | Path | dict[str, Any],
        transforms: Transform | None = None,
        seed: int = 0,
    ) -> None:
        self.images = Path(images)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            if isinstance(annotations, dict):  # e.g. check_dataset's cleaned annotations
                self.coco = COCO()
                self.coco.dataset = annotations
                self.coco.createIndex()
            else:
                self.coco = COCO(str(annotations))
        self.ids = sorted(self.coco.imgs)
        self.category_ids = sorted(self.coco.cats)
        self.label_of = {c: i for i, c in enumerate(self.category_ids)}
        self.transforms = transforms
        super().__init__(seed)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = self.images / info["file_name"]
        try:
            image = Image.open(path).convert("RGB")
        except (OSError, Image.DecompressionBombError) as e:
            # Named, since a DataLoader worker's traceback does not show which file it was.
            raise UsageError(f"{path}: not a readable image ({e})") from None
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        W, H = image.size
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).view(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy, in pixels
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {
            "boxes": boxes[keep],
            "labels": labels[keep],
            "image_id": image_id,
            "orig_size": torch.tensor([H, W]),
        }
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if self.transforms is not None:
            generator = self.generator(index)
            tensor, target = self.transforms(tensor, target, generator)
        h, w = tensor.shape[-2:]
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        target["boxes"] = box_xyxy_to_cxcywh(target["boxes"]) / scale
        target["size"] = torch.tensor([h, w])
        return tensor, target


class Compose:
    """Apply transforms in order, each with the same generator."""

    def __init__(self, transforms: Iterable[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(
        self, image: torch.Tensor, target: Target, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target, generator)
        return image, target


def _check_probability(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p}")


class RandomHorizontalFlip:
    """Mirror the image left-right with probability ``p``; boxes follow."""

    def __init__(self, p: float = 0.5) -> None:
        _check_probability(p)
        self.p = p

    def __call__(
        self, image: torch.Tensor, target: Target, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Target]:
        if torch.rand((), generator=generator) >= self.p:
            return image, target
        W = image.shape[-1]
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = W - target["boxes"][:, [2, 0]]
        return image.flip(-1), {**target, "boxes": boxes}


class RandomResize:
    """Resize keeping the aspect ratio: shorter side to one of ``sizes``, longer <= ``max_size``.

    The size is drawn uniformly from ``sizes``; with a single size nothing is drawn.
    Boxes (and ``area`` if present) are scaled with the image.
    """

    def __init__(self, sizes: int | Sequence[int], max_size: int | None = None) -> None:
        self.sizes = [sizes] if isinstance(sizes, int) else list(sizes)
        if not self.sizes:
            raise ValueError("sizes must hold at least one size, got an empty sequence")
        self.max_size = max_size

    def __call__(
        self, image: torch.Tensor, target: Target, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Target]:
        if len(self.sizes) == 1:
            size = self.sizes[0]
        else:
            size = self.sizes[int(torch.randint(len(self.sizes), (), generator=generator))]
        H, W = image.shape[-2:]
        scale = size / min(H, W)
        if self.max_size is not None:
            scale = min(scale, self.max_size / max(H, W))
        h, w = round(H * scale), round(W * scale)
        if (h, w) == (H, W):
            return image, target
        image = torch.nn.functional.interpolate(
            image[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True
        )[0]
        target = {**target, "boxes": target["boxes"] * torch.tensor([w / W, h / H, w / W, h / H])}
        if "area" in target:
            target["area"] = target["area"] * (w * h / (W * H))
        return image, target


Resize = RandomResize


class RandomSizeCrop:
    """Crop a random window: width in [min_size, min(W, max_size)], height likewise.

    An image narrower (shorter) than ``min_size`` keeps its full width (height).
    Boxes are clipped to the window; those left with no area are dropped together
    with their ``labels``, ``area`` and ``iscrowd``, and ``area`` becomes the
    clipped box area.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        if not 0 < min_size <= max_size:
            raise ValueError(
                f"need 0 < min_size <= max_size, got min_size={min_size}, max_size={max_size}"
            )
        self.min_size = min_size
        self.max_size = max_size

    def _draw(self, extent: int, generator: torch.Generator | None) -> int:
        high = min(extent, self.max_size)
        low = min(self.min_size, high)
        return int(torch.randint(low, high + 1, (), generator=generator))

    def __call__(
        self, image: torch.Tensor, target: Target, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Target]:
        H, W = image.shape[-2:]
        w = self._draw(W, generator)
        h = self._draw(H, generator)
        top = int(torch.randint(H - h + 1, (), generator=generator))
        left = int(torch.randint(W - w + 1, (), generator=generator))
        image = image[..., top : top + h, left : left + w]
        boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
        boxes = torch.min(boxes.view(-1, 2, 2), torch.tensor([w, h], dtype=torch.float32))
        boxes = boxes.clamp(min=0)
        keep = (boxes[:, 1] > boxes[:, 0]).all(-1)
        target = {**target, "boxes": boxes.view(-1, 4)[keep]}
        if "area" in target:
            target["area"] = (boxes[:, 1] - boxes[:, 0]).prod(-1)
        for field in _PER_BOX_FIELDS:
            if field in target:
                target[field] = target[field][keep]
        return image, target


class RandomSelect:
    """Apply ``first`` with probability ``p``, otherwise ``second``."""

    def __init__(self, first: Transform, second: Transform, p: float = 0.5) -> None:
        _check_probability(p)
        self.first = first
        self.second = second
        self.p = p

    def __call__(
        self, image: torch.Tensor, target: Target, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Target]:
        chosen = self.first if torch.rand((), generator=generator) < self.p else self.second
        return chosen(image, target, generator)


class Normalize:
    """Subtract the channel mean and divide by the standard deviation (ImageNet's by default)."""

    def __init__(
        self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(
        self, image: torch.Tensor, target: Target, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Target]:
        return (image - self.mean) / self.std, target


def detr_train_transforms(
    scales: Iterable[int] = range(480, 801, 32), max_size: int = 1333, flip: bool = True
) -> Compose:
    """DETR's COCO training augmentation: flip (unless ``flip=False``), then either a
    multi-scale resize or a resize, random crop and multi-scale resize, then normalisation."""
    scales = list(scales)
    return Compose(
        [
            *([RandomHorizontalFlip(0.5)] if flip else []),
            RandomSelect(
                RandomResize(scales, max_size),
                Compose(
                    [
                        RandomResize([400, 500, 600]),
                        RandomSizeCrop(384, 600),
                        RandomResize(scales, max_size),
                    ]
                ),
            ),
            Normalize(),
        ]
    )


def detr_eval_transforms(size: int = 800, max_size: int = 1333) -> Compose:
    """DETR's COCO evaluation transform: shorter side ``size``, longer <= ``max_size``."""
    return Compose([RandomResize([size], max_size), Normalize()])


def simple_train_transforms(size: int, flip: bool = True) -> Compose:
    """Small-image training: optional flip, shorter side to ``size``, normalisation."""
    return Compose([*([RandomHorizontalFlip(0.5)] if flip else []), Resize([size]), Normalize()])


def simple_eval_transforms(size: int) -> Compose:
    """Small-image evaluation: shorter side to ``size``, normalisation."""
    return Compose([Resize([size]), Normalize()])


def collate(batch):
    """Pad images to the largest in the batch: (images (N, 3, H, W), mask (N, H, W) True on
    padding, list of targets)."""
    images, targets = zip(*batch, strict=True)
    H = max(i.shape[1] for i in images)
    W = max(i.shape[2] for i in images)
    out = images[0].new_zeros(len(images), 3, H, W)
    mask = torch.ones(len(images), H, W, dtype=torch.bool)
    for k, image in enumerate(images):
        h, w = image.shape[1:]
        out[k, :, :h, :w] = image
        mask[k, :h, :w] = False
    return out, mask, list(targets)
