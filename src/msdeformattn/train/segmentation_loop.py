"""Semantic-segmentation training: :class:`DeformableSegmenter` on a folder of images and
class-index PNGs, judged by mIoU.

:func:`train_segmenter` is the entry point; :class:`SegmentationTask` is what segmentation
brings to the run of :mod:`.run` (which holds the run folder, checkpoints, ``resume``, the
clock and the schedule for every task): the dataset, the model, its cross-entropy loss and
the mIoU evaluation. Also here: :func:`evaluate_segmenter`, :func:`segment_image` and
:func:`load_segmenter`, the reader of the checkpoints a run writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.config import config_from_dict
from ..models.convert import read_weights_file
from ..models.segmenter import DeformableSegmenter, SegmenterConfig
from ..util.errors import UsageError
from .batches import batch_for, training_loader, worker_options
from .config import SEGMENTATION_PRESETS, TrainConfig
from .engine import train_epoch
from .run import run_training
from .segmentation_data import (
    SegmentationDataset,
    collate_segmentation,
    segmentation_classes,
    segmentation_eval_transforms,
    segmentation_train_transforms,
)
from .segmentation_metrics import ConfusionMatrix
from .segmentation_visualize import draw_segmentations
from .task import Loaders, Task

__all__ = [
    "SegmentationTask",
    "draw_validation",
    "evaluate_segmenter",
    "load_segmenter",
    "segment_image",
    "segmentation_eval_transform",
    "segmentation_val_loader",
    "train_one_epoch_segmenter",
    "train_segmenter",
]

#: ``task`` entry of a segmentation checkpoint (a detector's has none).
TASK = "segmentation"
#: DETR's multi-scale training sizes, for ``augmentation="detr"`` as in detection.
_DETR_SCALES = range(480, 801, 32)


def train_segmenter(
    data: str | Path,
    output: str | Path,
    config: SegmenterConfig | None = None,
    cfg: TrainConfig | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    overwrite: bool = False,
    resume: bool = False,
) -> dict:
    """Train a :class:`DeformableSegmenter` on a segmentation folder (``images/``,
    ``annotations/``, optional ``classes.json``; see :mod:`.segmentation_data`) into
    ``output``.

    config: the model (default: ``SegmenterConfig.tiny`` with the dataset's classes); cfg:
    the recipe (default: ``SEGMENTATION_PRESETS["tiny"]``). AdamW, warm-up and the schedule
    of ``cfg``, gradient clipping, and ``cfg.minutes`` of training at most. Evaluates every
    ``cfg.eval_every`` epochs and at the end; writes ``last.pt`` (resumable, every epoch),
    ``best.pt`` (best mIoU), ``log.jsonl``, ``metrics.json`` (``mIoU``, ``pixel_accuracy``,
    ``IoU/<name>``) and ``curves.png``. Returns the final metrics.

    ``output`` must not hold a run unless ``resume`` (continue it exactly where it
    stopped, with its saved configs; ``cfg``'s ``epochs`` and ``minutes`` are the new
    totals) or ``overwrite`` (replace its files). EMA (``cfg.ema_decay``; evaluation and
    ``best.pt`` use the average) and mixed precision (``cfg.amp``) as in detection.
    """
    return run_training(
        SegmentationTask(Path(data)), output, config, cfg,
        resume=resume, overwrite=overwrite, device=device, progress=progress,
    )  # fmt: skip


class SegmentationTask(Task):
    """:class:`DeformableSegmenter` on an ``images/`` + ``annotations/`` folder, judged by
    mIoU."""

    name = TASK
    headline = "mIoU"
    shown = ("mIoU", "pixel_accuracy")
    config_class = SegmenterConfig
    preset = SEGMENTATION_PRESETS["tiny"]

    def __init__(self, data: Path) -> None:
        self.data = data
        self.class_names: list[str] = []

    def load_data(self, cfg: TrainConfig, rank: int, world: int, verbose: bool) -> Loaders:
        if not self.data.is_dir():
            raise UsageError(f"--data: {self.data} does not exist")
        names = self.class_names = segmentation_classes(self.data)
        train_set = SegmentationDataset(self.data, "train", _train_transform(cfg), cfg.seed, names)
        batch_size = batch_for(len(train_set), cfg.batch_size, world)
        train_loader = training_loader(
            train_set, batch_size, cfg, collate_segmentation, rank, world
        )
        val_loader = segmentation_val_loader(self.data, replace(cfg, batch_size=batch_size), names)
        return Loaders(train_set, train_loader, val_loader, len(names))

    def build_model(
        self,
        model_config: SegmenterConfig,
        cfg: TrainConfig,
        saved: dict | None,
        device: torch.device,
    ) -> DeformableSegmenter:
        return DeformableSegmenter(model_config).to(device)

    def train_epoch(self, net: nn.Module, loader: Iterable, **options: Any) -> dict[str, float]:
        # Looked up in this module when called, so tests can interrupt a run here.
        return train_one_epoch_segmenter(net, loader, **options)

    def evaluate(
        self, model: nn.Module, loader: Iterable, device: torch.device, cfg: TrainConfig
    ) -> dict[str, float | None]:
        names = self.class_names
        return evaluate_segmenter(model, loader, len(names), device, names)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"task": TASK, "class_names": self.class_names}


def train_one_epoch_segmenter(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    **options: Any,
) -> dict[str, float]:
    """Train over ``loader`` once with the segmenter's cross-entropy (``model.loss``).

    loader yields (images (N, 3, H, W), mask (N, H, W) True on padding, targets (N, H, W)
    int64 with 255 on padding); ``model``: a :class:`DeformableSegmenter`, or one wrapped
    for DDP. ``options``: :func:`.engine.train_epoch`'s keywords (``scheduler``,
    ``clip_max_norm``, ``should_stop``, ``progress``, ...). Returns ``loss`` (mean over
    steps), ``steps``, ``images`` and ``seconds``.
    """
    segmenter = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return train_epoch(model, segmenter.loss, loader, optimizer, device, **options)


def segmentation_eval_transform(cfg: TrainConfig):
    """The evaluation transform of ``cfg``: shorter side ``image_size`` (longer at most
    ``max_size`` with DETR's augmentation), normalisation."""
    max_size = cfg.max_size if cfg.augmentation == "detr" else None
    return segmentation_eval_transforms(cfg.image_size, max_size)


def _train_transform(cfg: TrainConfig):
    if cfg.augmentation == "detr":
        return segmentation_train_transforms(_DETR_SCALES, cfg.max_size, cfg.flip)
    return segmentation_train_transforms([cfg.image_size], None, cfg.flip)


def segmentation_val_loader(
    data: str | Path, cfg: TrainConfig, class_names: list[str] | None = None
) -> torch.utils.data.DataLoader:
    """Batches (images, mask, targets) of ``data``'s val split with ``cfg``'s evaluation
    transform, in file-name order."""
    val_set = SegmentationDataset(
        data, "val", segmentation_eval_transform(cfg), cfg.seed, class_names
    )
    return torch.utils.data.DataLoader(
        val_set, batch_size=cfg.batch_size, collate_fn=collate_segmentation, **worker_options(cfg)
    )


@torch.no_grad()
def evaluate_segmenter(
    model: DeformableSegmenter,
    loader: Iterable,
    num_classes: int,
    device: str | torch.device,
    class_names: list[str] | None = None,
) -> dict[str, float | None]:
    """``mIoU``, ``pixel_accuracy`` and ``IoU/<class name>`` of ``model`` over ``loader``
    (see :class:`ConfusionMatrix`), taken at the loader's resolution.

    loader yields (images (N, 3, H, W), mask (N, H, W), targets (N, H, W) int64); pixels
    whose target is the model's ``ignore_index`` (padding included) are not counted.
    class_names: the keys' names (default ``"0"`` .. ``"K-1"``). The model is left in
    eval mode.
    """
    device = torch.device(device)
    model.eval()
    matrix = ConfusionMatrix(num_classes, model.config.ignore_index, class_names)
    for images, mask, targets in loader:
        pred = model.predict(images.to(device), mask.to(device))
        matrix.update(pred, targets.to(device))
    return matrix.compute()


@torch.no_grad()
def segment_image(
    model: DeformableSegmenter,
    image: torch.Tensor,
    transform: Callable,
    device: str | torch.device,
) -> torch.Tensor:
    """Labels of one image at its own resolution.

    image (3, H, W) float in [0, 1], as read; transform: the evaluation transform the model
    was trained with (e.g. :func:`segmentation_eval_transform`). The scores of the
    transformed image are upsampled bilinearly to (H, W) before the argmax
    (:meth:`DeformableSegmenter.semantic_logits`, either head), so the labels follow the
    original pixels rather than a resized label map.

    Returns (H, W) int64 on the CPU.
    """
    H, W = image.shape[-2:]
    resized, _ = transform(image, torch.zeros(H, W, dtype=torch.int64))
    model.eval()
    return model.semantic_logits(resized[None].to(device), size=(H, W))[0].argmax(0).cpu()


def draw_validation(
    model: DeformableSegmenter,
    data: str | Path,
    path: str | Path,
    class_names: list[str],
    cfg: TrainConfig,
    device: str | torch.device,
    count: int = 4,
) -> Path:
    """image | ground truth | prediction for the first ``count`` validation images of
    ``data``, one row each, into the PNG ``path`` (see :func:`draw_segmentations`)."""
    import numpy as np

    val_set = SegmentationDataset(Path(data), "val", class_names=class_names)
    transform = segmentation_eval_transform(cfg)
    samples = [val_set[i] for i in range(min(count, len(val_set)))]
    draw_segmentations(
        [(image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for image, _ in samples],
        [target.numpy() for _, target in samples],
        [segment_image(model, image, transform, device).numpy() for image, _ in samples],
        path,
        class_names,
    )
    return Path(path)


def load_segmenter(
    path: str | Path, *, output_extra: bool = False
) -> DeformableSegmenter | tuple[DeformableSegmenter, dict]:
    """The segmenter of a checkpoint written by :func:`train_segmenter`, in eval mode, with
    its config as ``model.config``; with ``output_extra=True`` also the file's other
    entries (epoch, class names, image size, ...), as ``(model, extra)``.

    A file that is not a segmentation checkpoint (a detector's, another program's, a
    corrupt one) raises ``ValueError`` naming it.
    """
    what = "an msdeformattn segmentation checkpoint"
    data = read_weights_file(Path(path), what)
    if not isinstance(data, dict) or "config" not in data or "model" not in data:
        raise ValueError(f"{path} is not {what} (needs 'config' and 'model')")
    if data.get("task") != TASK:
        raise ValueError(f"{path} is not {what} (a detection checkpoint? it has no task entry)")
    data.pop("task")
    try:
        config = config_from_dict(data.pop("config"), SegmenterConfig)
        model = DeformableSegmenter(config)
        model.load_state_dict(data.pop("model"))
    except (TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: the weights do not fit the checkpoint's config: {first}") from e
    return (model.eval(), data) if output_extra else model.eval()
