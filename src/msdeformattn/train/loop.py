"""Detection training: Deformable DETR on a COCO-format folder.

:func:`train` is the entry point; :class:`DetectionTask` is what detection brings to the
run of :mod:`.run` (which holds the run folder, checkpoints, resume, the clock and the
schedule for every task): the checked COCO data, the model with its set criterion, the
per-batch loss and COCO evaluation with AP as the headline. The per-epoch work is in
:mod:`.engine`.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.deformable_detr import DeformableDETR, DeformableDETRConfig
from ..util.errors import UsageError
from .batches import batch_for, training_loader, worker_options
from .build import build
from .check import DataReport, annotation_file, check_dataset
from .config import PRESETS, TrainConfig
from .data import (
    CocoDetection,
    collate,
    detr_eval_transforms,
    detr_train_transforms,
    simple_eval_transforms,
    simple_train_transforms,
)
from .engine import evaluate, train_one_epoch
from .run import run_training
from .task import Loaders, Task

__all__ = [
    "DetectionTask",
    "build_loaders",
    "checked_dataset",
    "eval_transforms",
    "train",
    "val_dataset",
]


def train(
    data: str | Path,
    output: str | Path,
    model_config: DeformableDETRConfig | None = None,
    cfg: TrainConfig | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    model: DeformableDETR | None = None,
    overwrite: bool = False,
    data_report: DataReport | None = None,
) -> dict:
    """Train on a COCO-format folder (``train/``, ``val/``, ``annotations/``) into ``output``.

    model_config: the detector (default: the tiny preset with the dataset's
    classes); ``model``: start from these weights (e.g. ``from_pretrained``)
    instead of a fresh initialisation. Writes ``last.pt`` (resumable, every
    epoch), ``best.pt`` (best AP), ``log.jsonl`` (a line per epoch),
    ``metrics.json`` (the final evaluation, of the EMA weights when EMA is on)
    and ``curves.png``. Returns the final metrics.

    The data is checked first (:func:`check_dataset`): fatal problems stop the run
    before it starts, repairs are reported and trained on. ``output`` must not hold
    a run unless ``resume`` (continue it) or ``overwrite`` (replace its files).
    data_report: a check already made (by the command line), not repeated.
    """
    task = DetectionTask(Path(data), model=model, data_report=data_report)
    return run_training(
        task, output, model_config, cfg,
        resume=resume, overwrite=overwrite, device=device, progress=progress,
    )  # fmt: skip


class DetectionTask(Task):
    """Deformable DETR on a COCO-format folder, judged by COCO box AP."""

    name = "detection"
    headline = "AP"
    shown = ("AP", "AP50")
    config_class = DeformableDETRConfig
    preset = PRESETS["tiny"]

    def __init__(
        self,
        data: Path,
        *,
        model: DeformableDETR | None = None,
        data_report: DataReport | None = None,
    ) -> None:
        self.data = data
        #: Weights to start from instead of a fresh initialisation.
        self.initial_model = model
        self.report = data_report
        self.val_set: CocoDetection | None = None
        self.criterion: nn.Module | None = None
        self.postprocessor: nn.Module | None = None
        self.frozen_stem = False

    def load_data(self, cfg: TrainConfig, rank: int, world: int, verbose: bool) -> Loaders:
        report = self.report or checked_dataset(self.data, verbose=verbose)
        train_set, self.val_set, train_loader, val_loader = build_loaders(
            self.data, cfg, rank, world, report.cleaned
        )
        return Loaders(train_set, train_loader, val_loader, train_set.num_classes)

    def build_model(
        self,
        model_config: DeformableDETRConfig,
        cfg: TrainConfig,
        saved: dict | None,
        device: torch.device,
    ) -> DeformableDETR:
        # As the reference, a pretrained trunk keeps its stem and layer1 fixed; a resumed
        # run keeps what it started with.
        if saved is not None:
            self.frozen_stem = saved.get("frozen_stem", False)
        else:
            self.frozen_stem = (
                self.initial_model is not None and model_config.backbone_norm == "frozen"
            )
        if self.initial_model is None and model_config.backbone_norm == "frozen" and saved is None:
            warnings.warn(
                "training a randomly initialised backbone with frozen BatchNorm: pass --init "
                "or --backbone-weights (an ImageNet ResNet), or --backbone-norm batch",
                stacklevel=2,
            )
        model, self.criterion, self.postprocessor = build(model_config, cfg, self.initial_model)
        if self.frozen_stem:
            _freeze_pretrained_stem(model)
        self.criterion.to(device)
        return model.to(device)

    def train_epoch(self, net: nn.Module, loader: Iterable, **options: Any) -> dict[str, float]:
        # Looked up in this module when called, so tests can interrupt a run here.
        return train_one_epoch(net, self.criterion, loader, **options)

    def evaluate(
        self, model: nn.Module, loader: Iterable, device: torch.device, cfg: TrainConfig
    ) -> dict[str, float]:
        return evaluate(model, self.postprocessor, loader, self.val_set, device, amp=cfg.amp)

    def checkpoint_meta(self) -> dict[str, Any]:
        ids = list(self.val_set.category_ids)
        names = [self.val_set.coco.cats[c]["name"] for c in ids]
        return {"dataset": {"category_ids": ids, "category_names": names}}

    def checkpoint_state(self) -> dict[str, Any]:
        return {"frozen_stem": self.frozen_stem}


def _freeze_pretrained_stem(model: DeformableDETR) -> None:
    """As the reference does for a pretrained (frozen-BN) trunk: the stem and layer1 stay fixed."""
    body = model.backbone[0].body
    for module in (body.conv1, body.bn1, body.layer1):
        for p in module.parameters():
            p.requires_grad_(False)


def eval_transforms(cfg: TrainConfig):
    """The evaluation transforms of ``cfg``'s augmentation (DETR's sizes or one size)."""
    if cfg.augmentation == "detr":
        return detr_eval_transforms(cfg.image_size, cfg.max_size)
    return simple_eval_transforms(cfg.image_size)


def val_dataset(
    data: Path, cfg: TrainConfig | None = None, annotations: dict | None = None
) -> CocoDetection:
    """The validation split of a COCO-format folder, with ``cfg``'s evaluation transforms
    (none without ``cfg``: for its categories only). annotations: the cleaned COCO dict
    of :func:`check_dataset` (default: the JSON file as it is)."""
    transforms = None if cfg is None else eval_transforms(cfg)
    return CocoDetection(data / "val", annotations or annotation_file(data, "val"), transforms)


def checked_dataset(
    data: Path, splits: tuple[str, ...] = ("train", "val"), *, verbose: bool = True
) -> DataReport:
    """:func:`check_dataset`, refusing fatal problems and saying what it repaired."""
    report = check_dataset(data, splits)
    report.raise_if_fatal()
    if report.repaired and verbose:
        # On stderr: stdout carries results (evaluate's JSON) that users pipe elsewhere.
        print(f"repaired in {data}: {report.summary()}", file=sys.stderr, flush=True)
    return report


def build_loaders(
    data: Path,
    cfg: TrainConfig,
    rank: int = 0,
    world: int = 1,
    annotations: dict[str, dict] | None = None,
):
    """(train set, val set, train loader, val loader) of a COCO-format folder.

    annotations: ``{"train": ..., "val": ...}`` COCO dicts, e.g. :func:`check_dataset`'s
    cleaned ones (default: the JSON files as they are).
    """
    annotations = annotations or {}
    if cfg.augmentation == "detr":
        train_tf = detr_train_transforms(max_size=cfg.max_size, flip=cfg.flip)
    else:
        train_tf = simple_train_transforms(cfg.image_size, flip=cfg.flip)
    train_set = CocoDetection(
        data / "train",
        annotations.get("train") or annotation_file(data, "train"),
        train_tf,
        seed=cfg.seed,
    )
    val_set = val_dataset(data, cfg, annotations.get("val"))
    if train_set.category_ids != val_set.category_ids:
        raise UsageError(
            f"--data: train categories {train_set.category_ids} differ from val categories "
            f"{val_set.category_ids}"
        )
    batch_size = batch_for(len(train_set), cfg.batch_size, world)
    train_loader = training_loader(train_set, batch_size, cfg, collate, rank, world)
    val_loader = torch.utils.data.DataLoader(
        val_set,
        batch_size=max(1, batch_size // world),
        collate_fn=collate,
        generator=torch.Generator().manual_seed(cfg.seed),
        **worker_options(cfg),
    )
    return train_set, val_set, train_loader, val_loader
