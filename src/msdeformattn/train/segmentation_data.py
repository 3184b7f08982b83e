"""A semantic-segmentation dataset, its transforms, padded batching and a synthetic generator.

The layout is the common one (ADE20K, Cityscapes converted, mmsegmentation)::

    DIR/images/{train,val}/NAME.jpg|jpeg|png      the images
    DIR/annotations/{train,val}/NAME.png          one class index per pixel, 255 = ignore
    DIR/classes.json                              optional: a JSON list of class names

An annotation is a single-channel (``L``, ``I``, ``I;16``) or palette (``P``) PNG
whose pixel values are the class indices. Without ``classes.json`` the classes
are named ``"0"`` .. ``"K-1"`` with K the largest index found in any split's
annotations plus one, which reads every annotation once (see
:func:`segmentation_classes`).

Transforms follow :mod:`.data`: ``(image (3, H, W) float, target, generator) ->
(image, target)``, here with ``target`` the (H, W) int64 class map, and the
dataset seeds one generator per sample from ``(seed, epoch, index)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..util.errors import UsageError
from .data import (
    Compose,
    Normalize,
    RandomResize,
    SeededDataset,
    _check_probability,
    collate,
)
from .synthetic import CLASSES, _paint, check_size

__all__ = [
    "IGNORE_INDEX",
    "SegmentationDataset",
    "SegmentationHorizontalFlip",
    "SegmentationResize",
    "collate_segmentation",
    "generate_segmentation",
    "segmentation_classes",
    "segmentation_eval_transforms",
    "segmentation_train_transforms",
]

IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# PIL modes that hold one integer per pixel; "P" gives the palette index, which is the class.
_INDEX_MODES = ("L", "P", "I", "I;16")

_NO_BOXES = {"boxes": torch.zeros(0, 4)}

SegmentationTransform = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _read_mask(path: Path) -> np.ndarray:
    """(H, W) int64 class indices of an annotation PNG; errors name the file."""
    try:
        with Image.open(path) as mask:
            if mask.mode not in _INDEX_MODES:
                raise UsageError(
                    f"{path}: expected one class index per pixel (a single-channel or "
                    f"palette PNG), got a {mask.mode} image"
                )
            return np.asarray(mask).astype(np.int64)
    except (OSError, Image.DecompressionBombError) as e:
        raise UsageError(f"{path}: not a readable annotation PNG ({e})") from None


def segmentation_classes(root: str | Path) -> list[str]:
    """The class names of a segmentation folder.

    ``root/classes.json`` (a JSON list of strings) if present; otherwise
    ``"0"`` .. ``"K-1"`` with K the largest index other than 255 in the
    annotations of every split under ``root/annotations`` plus one, so that train
    and val agree. That fallback reads every annotation: call this once and pass
    the names to each :class:`SegmentationDataset`.
    """
    root = Path(root)
    path = root / "classes.json"
    if path.exists():
        try:
            names = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"{path}: not readable JSON ({e})") from None
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
            raise UsageError(f"{path}: expected a non-empty JSON list of class names")
        return names
    folder = root / "annotations"
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder (expected annotations/{{train,val}}/*.png)")
    largest = -1
    for mask_path in sorted(folder.glob("*/*.png")):
        mask = _read_mask(mask_path)
        labelled = mask[mask != IGNORE_INDEX]
        if labelled.size:
            largest = max(largest, int(labelled.max()))
    if largest < 0:
        raise UsageError(
            f"{folder}: no annotation holds a class index other than {IGNORE_INDEX}; "
            f"write the class names to {path}"
        )
    return [str(k) for k in range(largest + 1)]


def _files_by_stem(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in suffixes:
            continue
        if path.stem in files:
            raise UsageError(f"{path}: two files share the name {path.stem} ({files[path.stem]})")
        files[path.stem] = path
    return files


class SegmentationDataset(SeededDataset):
    """``dataset[i] -> (image (3, H, W) float, target (H, W) int64)`` from a segmentation folder.

    Without transforms the image is in [0, 1] and ``target`` holds class indices
    in 0..K-1 and 255 (ignore). Samples are sorted by file name. ``class_names``
    defaults to :func:`segmentation_classes` of ``root``.

    The transforms of sample ``i`` get a generator seeded from ``(seed, epoch, i)``;
    call ``set_epoch`` before each epoch for a fresh draw. The epoch lives in
    shared memory, so the call also reaches persistent DataLoader workers.

    Pairing is checked here: an image without its annotation, or the reverse,
    raises :class:`UsageError` naming the file. Each sample's size and class
    indices are checked when it is read, with errors naming its annotation.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transforms: SegmentationTransform | None = None,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        image_folder = self.root / "images" / split
        mask_folder = self.root / "annotations" / split
        images = _files_by_stem(image_folder, IMAGE_SUFFIXES)
        masks = _files_by_stem(mask_folder, (".png",))
        for stem, path in images.items():
            if stem not in masks:
                raise UsageError(f"{path}: no annotation {mask_folder / (stem + '.png')}")
        for stem, path in masks.items():
            if stem not in images:
                raise UsageError(f"{path}: no image {stem}.jpg, .jpeg or .png in {image_folder}")
        if not images:
            raise UsageError(f"{image_folder}: no images (.jpg, .jpeg or .png)")
        self.samples = [(images[stem], masks[stem]) for stem in sorted(images)]
        self.class_names = list(
            segmentation_classes(self.root) if class_names is None else class_names
        )
        self.transforms = transforms
        super().__init__(seed)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.samples[index]
        try:
            image = Image.open(image_path).convert("RGB")
        except (OSError, Image.DecompressionBombError) as e:
            # Named, since a DataLoader worker's traceback does not show which file it was.
            raise UsageError(f"{image_path}: not a readable image ({e})") from None
        mask = _read_mask(mask_path)
        if mask.shape != (image.height, image.width):
            raise UsageError(
                f"{mask_path}: annotation is {mask.shape[1]}x{mask.shape[0]} (WxH), "
                f"its image {image_path.name} is {image.width}x{image.height}"
            )
        bad = np.unique(mask[((mask < 0) | (mask >= self.num_classes)) & (mask != IGNORE_INDEX)])
        if bad.size:
            raise UsageError(
                f"{mask_path}: class indices {bad[:8].tolist()} outside 0..{self.num_classes - 1} "
                f"(and {IGNORE_INDEX} = ignore) for {self.num_classes} classes"
            )
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        target = torch.from_numpy(mask)
        if self.transforms is not None:
            generator = self.generator(index)
            tensor, target = self.transforms(tensor, target, generator)
        return tensor, target


class SegmentationHorizontalFlip:
    """Mirror the image and its class map left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        _check_probability(p)
        self.p = p

    def __call__(
        self, image: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.rand((), generator=generator) >= self.p:
            return image, target
        return image.flip(-1), target.flip(-1)


def _resize_nearest(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) -> size, each output pixel taking the input pixel under its centre.

    Indexing rather than ``interpolate`` keeps any integer dtype and the exact labels.
    """
    (H, W), (h, w) = target.shape, size
    rows = ((torch.arange(h) + 0.5) * (H / h)).long().clamp_(max=H - 1)
    cols = ((torch.arange(w) + 0.5) * (W / w)).long().clamp_(max=W - 1)
    return target[rows.to(target.device)][:, cols.to(target.device)]


class SegmentationResize:
    """Detection's :class:`~.data.RandomResize` (same draw, same bilinear antialiased
    image) with the class map resized to match by nearest neighbour.

    Shorter side to one of ``sizes`` (drawn uniformly; with one size nothing is
    drawn), longer side <= ``max_size``.
    """

    def __init__(self, sizes: int | Sequence[int], max_size: int | None = None) -> None:
        self.resize = RandomResize(sizes, max_size)

    def __call__(
        self, image: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image, _ = self.resize(image, _NO_BOXES, generator)
        if image.shape[-2:] != target.shape:
            target = _resize_nearest(target, tuple(image.shape[-2:]))
        return image, target


def segmentation_train_transforms(
    sizes: int | Sequence[int], max_size: int | None = None, flip: bool = True
) -> Compose:
    """Training: optional flip, shorter side to one of ``sizes`` (longer <= ``max_size``),
    ImageNet normalisation."""
    return Compose(
        [
            *([SegmentationHorizontalFlip(0.5)] if flip else []),
            SegmentationResize(sizes, max_size),
            Normalize(),
        ]
    )


def segmentation_eval_transforms(size: int, max_size: int | None = None) -> Compose:
    """Evaluation: shorter side to ``size`` (longer <= ``max_size``), normalisation.

    Metrics are then taken at this resolution, on the class map resized with the image.
    """
    return Compose([SegmentationResize([size], max_size), Normalize()])


def collate_segmentation(
    batch: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad to the largest image in the batch: images (N, 3, H, W) padded with 0, the
    padding mask (N, H, W) True on padding, and targets (N, H, W) int64 padded with 255.

    The order (images, mask, targets) is detection's :func:`~.data.collate`.
    """
    images, mask, targets = collate(batch)
    out = torch.full(mask.shape, IGNORE_INDEX, dtype=torch.int64)
    for k, target in enumerate(targets):
        h, w = target.shape
        out[k, :h, :w] = target
    return images, mask, out


def generate_segmentation(
    root: str | Path,
    num_train: int = 2000,
    num_val: int = 200,
    seed: int = 0,
    size: int = 160,
    max_overlap: float = 0.3,
) -> Path:
    """Write ``root/images/{train,val}/*.png``, ``root/annotations/{train,val}/*.png`` and
    ``root/classes.json``: the detection generator's scenes (:mod:`.synthetic`) as class maps.

    Classes: 0 = background, then the shapes of :data:`.synthetic.CLASSES` as 1..4.
    Masks are exact: a pixel is labelled with the shape painted last over its centre,
    which is the colour it shows. Everything depends on the seed alone.
    """
    check_size(size)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps(["background", *CLASSES]))
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("val", num_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels, owner, kinds = _paint(rng, size, max_overlap)
            # indexed by owner + 1: background (owner -1) -> 0, object k -> its class + 1
            classes = np.array([0, *(kind + 1 for kind in kinds)], dtype=np.uint8)
            name = f"{i:06d}.png"
            Image.fromarray(pixels).save(root / "images" / split / name)
            Image.fromarray(classes[owner + 1]).save(root / "annotations" / split / name)
    return root
