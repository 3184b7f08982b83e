"""What a training run needs besides the model: optimisation, schedule, losses, data, and the
presets that pair a model with its recipe."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..models.deformable_detr import DeformableDETRConfig
from ..models.segmenter import SegmenterConfig
from ..util.errors import UsageError

__all__ = ["PRESETS", "SEGMENTATION_PRESETS", "Preset", "TrainConfig", "load_json_config"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule, loss and data settings; defaults are the paper's recipe.

    ``batch_size`` is the global batch (split across processes under ``torchrun``).
    The schedule runs over the whole run: ``epochs``, or ``minutes`` of training
    when that comes first (then the learning rate follows the clock).
    """

    lr: float = 2e-4
    #: the backbone trains at lr * this (the paper, for an ImageNet trunk: 0.1)
    lr_backbone_factor: float = 0.1
    #: sampling offsets and reference points train at lr * this (the paper: 0.1)
    lr_linear_proj_factor: float = 0.1
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    batch_size: int = 32
    epochs: int = 50
    #: stop after this many minutes of training, whatever the epochs
    minutes: float | None = None
    #: "step" (x0.1 at ``lr_drop`` of the run), "cosine" (to ``min_lr_factor``) or "constant"
    schedule: str = "step"
    #: where the step schedule decays, as a fraction of the run (the paper: epoch 40 of 50)
    lr_drop: float = 0.8
    min_lr_factor: float = 0.01
    #: linear warm-up from 0 over this many optimiser steps
    warmup_steps: int = 0
    #: exponential moving average of the weights, used for evaluation; None: off
    ema_decay: float | None = None
    #: the EMA's decay ramps up as 1 - exp(-updates / this), so early weights fade fast
    ema_warmup_steps: int = 2000
    #: evaluate every this many epochs (and at the end)
    eval_every: int = 1
    #: "detr": flips, multi-scale 480..800 and random crops; "simple": flip and one size
    augmentation: str = "detr"
    #: shorter side at evaluation (and in training with the "simple" augmentation)
    image_size: int = 800
    #: longer side at most this
    max_size: int = 1333
    flip: bool = True
    num_workers: int = 2
    seed: int = 0
    #: mixed precision: None, "bf16" or "fp16" (fp16 with a gradient scaler)
    amp: str | None = None
    # Loss weights and matching costs; names and values are the reference implementation's.
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    focal_alpha: float = 0.25

    def __post_init__(self) -> None:
        # field: (check, what it must be)
        checks = {
            "lr": (lambda: self.lr > 0, "> 0"),
            "batch_size": (lambda: self.batch_size >= 1, ">= 1"),
            "epochs": (lambda: self.epochs >= 1, ">= 1"),
            "minutes": (lambda: self.minutes is None or self.minutes > 0, "> 0 or None"),
            "eval_every": (lambda: self.eval_every >= 1, ">= 1"),
            "image_size": (lambda: self.image_size >= 32, ">= 32"),
            "num_workers": (lambda: self.num_workers >= 0, ">= 0"),
            "warmup_steps": (lambda: self.warmup_steps >= 0, ">= 0"),
            "lr_drop": (lambda: 0 < self.lr_drop <= 1, "in (0, 1]"),
            "ema_decay": (
                lambda: self.ema_decay is None or 0 < self.ema_decay < 1,
                "in (0, 1) or None",
            ),
        }
        for name, (check, wanted) in checks.items():
            try:
                ok = check()
            except TypeError:  # e.g. a string in a JSON config where a number belongs
                ok = False
            if not ok:
                raise UsageError(f"{name} must be {wanted}, got {getattr(self, name)!r}")
        choices = {
            "schedule": ("step", "cosine", "constant"),
            "augmentation": ("detr", "simple"),
            "amp": (None, "bf16", "fp16"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UsageError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Preset:
    """A model and the recipe it trains with."""

    model: Callable[[int], DeformableDETRConfig | SegmenterConfig]
    train: TrainConfig
    description: str


_PAPER = TrainConfig()
#: What the tiny presets share: small models trained from scratch on a laptop CPU (so the
#: trunk learns at the full rate), at one size of 160 px, until --minutes ends the run.
_LAPTOP = TrainConfig(
    lr_backbone_factor=1.0, batch_size=8, epochs=1000, augmentation="simple", image_size=160
)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        DeformableDETRConfig.tiny,
        # Constant, then x0.1 for the last 15 % of the run (of the clock, with --minutes).
        replace(_LAPTOP, lr=5e-4, schedule="step", lr_drop=0.85, warmup_steps=100, eval_every=5),
        "d_model 128, 2+2 layers, 30 queries, a small ResNet from scratch; 160 px (laptop CPU)",
    ),
    "deformable-detr": Preset(
        lambda k: DeformableDETRConfig(num_classes=k),
        _PAPER,
        "the paper's model: ResNet-50, 6+6 layers, 300 queries; DETR's augmentation",
    ),
    "deformable-detr-refine": Preset(
        lambda k: DeformableDETRConfig(num_classes=k, with_box_refine=True),
        _PAPER,
        "the paper's model with iterative box refinement",
    ),
    "deformable-detr-two-stage": Preset(
        lambda k: DeformableDETRConfig(num_classes=k, with_box_refine=True, two_stage=True),
        _PAPER,
        "the paper's model with box refinement and two-stage proposals",
    ),
}

#: Semantic segmentation's presets (``train_segmenter``, ``--task segmentation``).
SEGMENTATION_PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        SegmenterConfig.tiny,
        replace(
            _LAPTOP,
            lr=1e-3,
            clip_max_norm=1.0,
            schedule="cosine",
            min_lr_factor=0.05,
            warmup_steps=50,
            eval_every=2,
            num_workers=1,
        ),
        "SegmenterConfig.tiny: d_model 64, 2 deformable layers, a small ResNet from scratch; "
        "160 px (laptop CPU)",
    ),
}


def load_json_config(cls: type, path: str | Path, base: Any, **overrides) -> Any:
    """``base`` (a dataclass instance of ``cls``) updated from a JSON file, then ``overrides``.

    Unknown keys raise ``ValueError`` naming the file and the fields ``cls`` has.
    """
    values: dict = {}
    if path is not None:
        try:
            values = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(values, dict):
            raise UsageError(f"{path}: expected a JSON object of {cls.__name__} fields")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise UsageError(
            f"{path}: unknown {cls.__name__} fields {unknown}; known: {', '.join(sorted(fields))}"
        )
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return replace(base, **values, **{k: v for k, v in overrides.items() if v is not None})
