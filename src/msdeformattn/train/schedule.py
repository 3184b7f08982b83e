"""The optimiser (AdamW with the reference's three learning rates), the learning-rate schedule
(warm-up, then step decay or cosine) and the EMA of the weights."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel

from .config import TrainConfig

__all__ = ["build_optimizer", "build_scheduler", "ema_model", "lr_factor", "param_groups"]


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """The reference's three learning rates: the trunk (``backbone.*``) at
    ``lr * lr_backbone_factor``, the sampling offsets and reference points (the linear
    projections that place the samples) at ``lr * lr_linear_proj_factor``, the rest at
    ``lr``. Frozen parameters are left out."""
    groups: dict[str, list] = {"rest": [], "backbone": [], "linear_proj": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            groups["backbone"].append(p)
        elif "sampling_offsets" in name or "reference_points" in name:
            groups["linear_proj"].append(p)
        else:
            groups["rest"].append(p)
    factors = {
        "rest": 1.0,
        "backbone": cfg.lr_backbone_factor,
        "linear_proj": cfg.lr_linear_proj_factor,
    }
    return [{"params": ps, "lr": cfg.lr * factors[k]} for k, ps in groups.items() if ps]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with ``cfg.weight_decay``."""
    return torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.weight_decay)


def lr_factor(step: int, progress: float, cfg: TrainConfig) -> float:
    """The multiplier of every group's base learning rate.

    step: optimiser steps taken; progress: the fraction of the run done (0..1).
    """
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.schedule == "step":
        main = 0.1 if progress >= cfg.lr_drop else 1.0
    elif cfg.schedule == "cosine":
        p = min(max(progress, 0.0), 1.0)
        main = cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * p))
    else:
        main = 1.0
    return warm * main


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    steps_per_epoch: int,
    elapsed: Callable[[], float],
) -> LambdaLR:
    """A scheduler stepped once per optimiser step.

    Progress is the larger of steps done / (epochs * steps_per_epoch) and, with a
    wall-clock budget, training seconds / budget, so a run cut short by
    ``minutes`` still finishes its schedule.
    """
    total = cfg.epochs * steps_per_epoch
    budget = None if cfg.minutes is None else cfg.minutes * 60

    def factor(step: int) -> float:
        progress = step / total
        if budget is not None:
            progress = max(progress, elapsed() / budget)
        return lr_factor(step, progress, cfg)

    return LambdaLR(optimizer, factor)


def ema_model(model: nn.Module, decay: float, warmup_steps: int) -> AveragedModel:
    """An exponential moving average of ``model``'s parameters and buffers.

    The decay ramps up as ``decay * (1 - exp(-updates / warmup_steps))``, so the
    random initialisation is forgotten within the first few hundred steps.
    Integer buffers (BatchNorm's step count) are copied, not averaged.
    """

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor):
        if not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)
            return
        d = decay * (1 - math.exp(-float(n) / warmup_steps)) if warmup_steps else decay
        torch._foreach_lerp_(averaged, current, 1 - d)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)
