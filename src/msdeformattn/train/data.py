"""A COCO-format detection dataset, the usual transforms, and padded batching with masks.

Any dataset laid out as images plus a COCO instances JSON works
(``pycocotools`` reads the annotations). Targets carry normalised
(cx, cy, w, h) boxes and contiguous labels 0..K-1 for the model, plus what
evaluation needs to map back (image id, original size, category ids).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO

__all__ = ["CocoDetection", "Compose", "Normalize", "RandomHorizontalFlip", "Resize", "collate"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CocoDetection(torch.utils.data.Dataset):
    """``dataset[i] -> (image (3, H, W) float, target dict)`` from a COCO-format folder.

    target: ``boxes`` (T, 4) normalised cxcywh, ``labels`` (T,) in 0..K-1,
    ``image_id``, ``orig_size`` (H, W) and ``size`` after transforms.
    """

    def __init__(self, images: str | Path, annotations: str | Path, transforms=None) -> None:
        self.images = Path(images)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            self.coco = COCO(str(annotations))
        self.ids = sorted(self.coco.imgs)
        self.category_ids = sorted(self.coco.cats)
        self.label_of = {c: i for i, c in enumerate(self.category_ids)}
        self.transforms = transforms

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = Image.open(self.images / info["file_name"]).convert("RGB")
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
            tensor, target = self.transforms(tensor, target)
        h, w = tensor.shape[-2:]
        xyxy = target["boxes"]
        cxcywh = torch.stack(
            [
                (xyxy[:, 0] + xyxy[:, 2]) / 2,
                (xyxy[:, 1] + xyxy[:, 3]) / 2,
                xyxy[:, 2] - xyxy[:, 0],
                xyxy[:, 3] - xyxy[:, 1],
            ],
            -1,
        )
        target["boxes"] = cxcywh / torch.tensor([w, h, w, h], dtype=torch.float32)
        target["size"] = torch.tensor([h, w])
        return tensor, target


class Compose:
    def __init__(self, transforms) -> None:
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        self.p = p
        self.generator = generator

    def __call__(self, image, target):
        if torch.rand((), generator=self.generator) < self.p:
            W = image.shape[-1]
            image = image.flip(-1)
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = W - target["boxes"][:, [2, 0]]
            target = {**target, "boxes": boxes}
        return image, target


class Resize:
    """Resize keeping the aspect ratio: shorter side to one of ``sizes``, longer <= ``max_size``."""

    def __init__(
        self, sizes, max_size: int | None = None, generator: torch.Generator | None = None
    ) -> None:
        self.sizes = list(sizes) if not isinstance(sizes, int) else [sizes]
        self.max_size = max_size
        self.generator = generator

    def __call__(self, image, target):
        size = self.sizes[int(torch.randint(len(self.sizes), (), generator=self.generator))]
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
        boxes = target["boxes"] * torch.tensor([w / W, h / H, w / W, h / H])
        return image, {**target, "boxes": boxes}


class Normalize:
    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image, target):
        return (image - self.mean) / self.std, target


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
