"""One training epoch (any task) and detection's evaluation pass, on any device (DETR's
``engine.py`` split)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .coco_eval import coco_metrics
from .data import CocoDetection

__all__ = ["AMP_DTYPES", "evaluate", "to_device", "train_epoch", "train_one_epoch"]

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_device(images, mask, targets, device: torch.device):
    """The batch on ``device``: images (N, 3, H, W), mask (N, H, W), and the targets: a
    tensor (segmentation's label maps) or a list of dicts of tensors (detection's)."""
    non_blocking = device.type == "cuda"
    images = images.to(device, non_blocking=non_blocking)
    mask = mask.to(device, non_blocking=non_blocking)
    if torch.is_tensor(targets):
        return images, mask, targets.to(device, non_blocking=non_blocking)
    targets = [
        {
            k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v
            for k, v in t.items()
        }
        for t in targets
    ]
    return images, mask, targets


def train_epoch(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    clip_max_norm: float = 0.0,
    amp: str | None = None,
    scaler: torch.amp.GradScaler | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    ema_source: nn.Module | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: str | None = None,
) -> dict[str, float]:
    """Train ``model`` over ``loader`` once (or until ``should_stop()`` says so), any task.

    loader yields (images (N, 3, H, W), mask (N, H, W) True on padding, targets);
    ``loss_fn(outputs, targets)`` is the scalar loss of ``model(images, mask)``'s outputs.
    ``amp`` runs the forward pass under autocast (the loss in float32); ``scaler`` scales
    fp16 gradients; ``ema`` averages ``ema_source`` (the model without its DDP wrapper)
    after every step. Returns ``loss`` (mean over steps), ``steps``, ``images`` and
    ``seconds``. ``progress``: a tqdm bar with this description, or None.
    """
    model.train()
    amp_dtype = AMP_DTYPES[amp]
    # Summed where the loss lives: one host sync per epoch instead of one per step.
    total = None
    steps = seen = 0
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=progress, leave=False, disable=progress is None)
    for images, mask, targets in bar:
        images, mask, targets = to_device(images, mask, targets, device)
        with _autocast(device, amp_dtype):
            outputs = model(images, mask)
        loss = loss_fn(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if clip_max_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
        stepped = True
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            # The scaler skips steps whose gradients overflowed (and lowers its scale):
            # then neither the schedule nor the average moves either.
            stepped = scaler.get_scale() >= scale
        else:
            optimizer.step()
        if stepped and scheduler is not None:
            scheduler.step()
        if stepped and ema is not None:
            ema.update_parameters(ema_source if ema_source is not None else model)
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


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    **options: Any,
) -> dict[str, float]:
    """Detection's epoch: :func:`train_epoch` with the loss ``criterion.weighted_sum`` of
    ``criterion(outputs, targets)``'s terms; ``options``: :func:`train_epoch`'s keywords."""
    criterion.train()

    def loss_fn(outputs: dict, targets: list[dict]) -> torch.Tensor:
        return criterion.weighted_sum(criterion(outputs, targets))

    return train_epoch(model, loss_fn, loader, optimizer, device, **options)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    postprocessor: nn.Module,
    loader: Iterable,
    dataset: CocoDetection,
    device: torch.device,
    category_ids: list[int] | None = None,
    amp: str | None = None,
) -> dict[str, float]:
    """COCO box metrics of ``model`` over ``loader`` against ``dataset``'s annotations.

    ``category_ids[k]`` is the COCO category of the model's class k (default:
    the dataset's categories in order).
    """
    model.eval()
    category_ids = list(category_ids or dataset.category_ids)
    amp_dtype = AMP_DTYPES[amp]
    detections = []
    for images, mask, targets in loader:
        images, mask, targets = to_device(images, mask, targets, device)
        with _autocast(device, amp_dtype):
            outputs = model(images, mask)
        outputs = {k: outputs[k].float() for k in ("pred_logits", "pred_boxes")}
        sizes = torch.stack([t["orig_size"] for t in targets])
        for result, target in zip(postprocessor(outputs, sizes), targets, strict=True):
            for score, label, box in zip(
                result["scores"].tolist(),
                result["labels"].tolist(),
                result["boxes"].tolist(),
                strict=True,
            ):
                x0, y0, x1, y1 = box
                detections.append(
                    {
                        "image_id": target["image_id"],
                        "category_id": category_ids[label],
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": score,
                    }
                )
    return coco_metrics(dataset.coco, detections)
