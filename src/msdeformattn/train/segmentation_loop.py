"""The segmentation run: data, AdamW with warm-up and the schedule, a wall-clock budget,
mIoU evaluation, checkpoints (``last.pt``, ``best.pt`` by mIoU) and the checkpoint loader.

The run folder follows detection's :mod:`.loop`: ``last.pt``, ``best.pt``, ``log.jsonl``,
``metrics.json`` and ``curves.png``; a folder holding a run is refused unless
``overwrite``. Training continues no run (there is no ``resume`` here).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..models.config import config_from_dict
from ..models.convert import read_weights_file
from ..models.segmenter import DeformableSegmenter, SegmenterConfig
from ..util.errors import UsageError
from .config import SEGMENTATION_PRESETS, TrainConfig
from .loop import atomic_save, batch_for, check_output, clear_run, resolve_device, seed_everything
from .plots import read_log
from .schedule import build_scheduler
from .segmentation_data import (
    SegmentationDataset,
    collate_segmentation,
    segmentation_classes,
    segmentation_eval_transforms,
    segmentation_train_transforms,
)
from .segmentation_metrics import ConfusionMatrix

__all__ = [
    "PALETTE",
    "colorize",
    "draw_segmentations",
    "evaluate_segmenter",
    "load_segmenter",
    "overlay",
    "plot_segmentation_curves",
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
        val_set,
        batch_size=cfg.batch_size,
        collate_fn=collate_segmentation,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
    )


def _param_groups(model: DeformableSegmenter, cfg: TrainConfig) -> list[dict]:
    """Detection's learning rates: the trunk at ``lr_backbone_factor``, the sampling offsets
    at ``lr_linear_proj_factor``, the rest at ``lr``."""
    groups: dict[str, list] = {"rest": [], "backbone": [], "linear_proj": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            groups["backbone"].append(p)
        elif "sampling_offsets" in name:
            groups["linear_proj"].append(p)
        else:
            groups["rest"].append(p)
    factors = {
        "rest": 1.0,
        "backbone": cfg.lr_backbone_factor,
        "linear_proj": cfg.lr_linear_proj_factor,
    }
    return [{"params": ps, "lr": cfg.lr * factors[k]} for k, ps in groups.items() if ps]


def train_one_epoch_segmenter(
    model: DeformableSegmenter,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    clip_max_norm: float = 0.0,
    should_stop: Callable[[], bool] | None = None,
    progress: str | None = None,
) -> dict[str, float]:
    """Train over ``loader`` once (or until ``should_stop()`` says so) with ``model.loss``.

    loader yields (images (N, 3, H, W), mask (N, H, W) True on padding, targets (N, H, W)
    int64 with 255 on padding). Returns ``loss`` (mean over steps), ``steps``, ``images``
    and ``seconds``; ``progress``: a tqdm bar with this description, or None.
    """
    model.train()
    total = None
    steps = seen = 0
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=progress, leave=False, disable=progress is None)
    for images, mask, targets in bar:
        images, mask, targets = images.to(device), mask.to(device), targets.to(device)
        loss = model.loss(model(images, mask), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_max_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        # Summed where the loss lives: one host sync per epoch instead of one per step.
        total = loss.detach() if total is None else total + loss.detach()
        steps += 1
        seen += len(images)
        if progress is not None and steps % 10 == 0:
            bar.set_postfix(img_s=f"{seen / (time.perf_counter() - t0):.1f}")
        if should_stop is not None and should_stop():
            break
    return {
        "loss": 0.0 if total is None else total.item() / steps,
        "steps": steps,
        "images": seen,
        "seconds": time.perf_counter() - t0,
    }


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
    was trained with (e.g. :func:`segmentation_eval_transform`). The logits of the
    transformed image are upsampled bilinearly to (H, W) before the argmax, so the labels
    follow the original pixels rather than a resized label map.

    Returns (H, W) int64 on the CPU.
    """
    H, W = image.shape[-2:]
    resized, _ = transform(image, torch.zeros(H, W, dtype=torch.int64))
    model.eval()
    logits = model(resized[None].to(device))
    return (
        F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)[0].argmax(0).cpu()
    )


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


def train_segmenter(
    data: str | Path,
    output: str | Path,
    config: SegmenterConfig | None = None,
    cfg: TrainConfig | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Train a :class:`DeformableSegmenter` on a segmentation folder (``images/``,
    ``annotations/``, optional ``classes.json``; see :mod:`.segmentation_data`) into
    ``output``.

    config: the model (default: ``SegmenterConfig.tiny`` with the dataset's classes); cfg:
    the recipe (default: ``SEGMENTATION_PRESETS["tiny"]``). AdamW, warm-up and the schedule
    of ``cfg``, gradient clipping, and ``cfg.minutes`` of training at most. Evaluates every
    ``cfg.eval_every`` epochs and at the end; writes ``last.pt`` (every epoch), ``best.pt``
    (best mIoU), ``log.jsonl``, ``metrics.json`` (``mIoU``, ``pixel_accuracy``,
    ``IoU/<name>``) and ``curves.png``. Returns the final metrics.

    ``output`` must not hold a run unless ``overwrite`` (then its files are replaced).
    EMA and mixed precision (``cfg.ema_decay``, ``cfg.amp``) are detection's only.
    """
    data, output = Path(data), Path(output)
    device = resolve_device(device)
    check_output(output, False, overwrite)
    preset = SEGMENTATION_PRESETS["tiny"]
    cfg = cfg or preset.train
    for name in ("ema_decay", "amp"):
        if getattr(cfg, name) is not None:
            raise UsageError(
                f"{name}: detection only, not supported for segmentation (got "
                f"{getattr(cfg, name)!r})"
            )
    if not data.is_dir():
        raise UsageError(f"--data: {data} does not exist")
    names = segmentation_classes(data)
    train_set = SegmentationDataset(data, "train", _train_transform(cfg), cfg.seed, names)
    config = config or preset.model(len(names))
    if config.num_classes != len(names):
        raise UsageError(
            f"the model has {config.num_classes} classes, the dataset {len(names)}: "
            f"pass num_classes={len(names)}"
        )
    batch_size = batch_for(len(train_set), cfg.batch_size)
    val_loader = segmentation_val_loader(data, replace(cfg, batch_size=batch_size), names)
    if overwrite:
        clear_run(output)
    output.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    workers = {"num_workers": cfg.num_workers, "persistent_workers": cfg.num_workers > 0}
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=collate_segmentation,
        generator=torch.Generator().manual_seed(cfg.seed),
        **workers,
    )
    model = DeformableSegmenter(config).to(device)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), weight_decay=cfg.weight_decay)
    elapsed = 0.0
    epoch_start = time.perf_counter()
    budget = None if cfg.minutes is None else cfg.minutes * 60

    def training_seconds() -> float:
        return elapsed + time.perf_counter() - epoch_start

    def out_of_time() -> bool:
        return budget is not None and training_seconds() >= budget

    scheduler = build_scheduler(optimizer, cfg, len(train_loader), training_seconds)
    meta = {
        "task": TASK,
        "config": dataclasses.asdict(config),
        "class_names": names,
        "image_size": cfg.image_size,
        "max_size": cfg.max_size,
        "augmentation": cfg.augmentation,
        "train_config": dataclasses.asdict(cfg),
    }
    log_path = output / "log.jsonl"
    best, metrics = -1.0, {}
    for epoch in range(cfg.epochs):
        epoch_start = time.perf_counter()
        if out_of_time():
            break
        train_set.set_epoch(epoch)
        stats = train_one_epoch_segmenter(
            model,
            train_loader,
            optimizer,
            device,
            scheduler=scheduler,
            clip_max_norm=cfg.clip_max_norm,
            should_stop=out_of_time,
            progress=f"epoch {epoch}" if progress else None,
        )
        elapsed += stats["seconds"]
        # The epoch's time is in ``elapsed`` now: evaluation is not training time.
        epoch_start = time.perf_counter()
        done = out_of_time() or epoch + 1 == cfg.epochs
        record = {
            "epoch": epoch,
            "loss": stats["loss"],
            "lr": optimizer.param_groups[0]["lr"],
            "images": stats["images"],
            "images_per_s": round(stats["images"] / max(stats["seconds"], 1e-9), 1),
            "elapsed_s": round(elapsed, 1),
        }
        if done or (epoch + 1) % cfg.eval_every == 0:
            metrics = evaluate_segmenter(model, val_loader, len(names), device, names)
            record.update(metrics)
        state = {
            **meta,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "elapsed": elapsed,
        }
        improved = record.get("mIoU") is not None and record["mIoU"] > best
        if improved:
            best = record["mIoU"]
        state["best_miou"] = best
        atomic_save(state, output / "last.pt")
        if improved:
            atomic_save({**meta, "model": state["model"], "epoch": epoch}, output / "best.pt")
        with open(log_path, "a") as log:
            log.write(json.dumps(record) + "\n")
        if progress:
            tqdm.write(_epoch_line(record, cfg.epochs))
        if done:
            break
    if not metrics:
        # The budget ran out before the first epoch: the untrained model's metrics.
        metrics = evaluate_segmenter(model, val_loader, len(names), device, names)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if log_path.exists():
        plot_segmentation_curves(log_path, output / "curves.png")
    return metrics


def _epoch_line(record: dict, epochs: int) -> str:
    parts = [
        f"epoch {record['epoch'] + 1}/{epochs}",
        f"loss {record['loss']:.3f}",
        f"lr {record['lr']:.2e}",
        f"{record['images_per_s']:.1f} img/s",
        f"{record['elapsed_s'] / 60:.1f} min",
    ]
    if record.get("mIoU") is not None:
        parts += [f"mIoU {record['mIoU']:.3f}", f"pixel acc {record['pixel_accuracy']:.3f}"]
    return "  ".join(parts)


# Pictures: a fixed palette, overlays and the figures of a run. plots.py draws detection's
# AP curves; these are segmentation's mIoU ones.

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


def plot_segmentation_curves(log: str | Path, path: str | Path) -> None:
    """Training loss and validation mIoU / pixel accuracy against training minutes, side by
    side, into one PNG."""
    rows = read_log(log)
    fig, (loss_ax, miou_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot([r["elapsed_s"] / 60 for r in rows], [r["loss"] for r in rows], marker=".")
    loss_ax.set_ylabel("training loss (cross-entropy)")
    evaluated = [r for r in rows if r.get("mIoU") is not None]
    for key, style in (("mIoU", "o-"), ("pixel_accuracy", ".--")):
        miou_ax.plot(
            [r["elapsed_s"] / 60 for r in evaluated],
            [r[key] for r in evaluated],
            style,
            label=key,
        )
    miou_ax.set_ylabel("on the validation split")
    miou_ax.set_ylim(0, 1)
    miou_ax.legend()
    for ax in (loss_ax, miou_ax):
        ax.set_xlabel("training time (minutes)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
