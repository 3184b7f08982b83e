"""What a training run trains: the part that differs between detection and segmentation.

:func:`.run.run_training` owns everything the tasks share (the run folder and its rules,
checkpoints, resume, the clock, optimiser, schedule, EMA, logging, the curves). A
:class:`Task` supplies the rest; the run calls it in this order:

1. :meth:`Task.check`: refuse settings the task cannot train with, before anything is
   written;
2. :meth:`Task.load_data`: datasets and loaders (a data problem stops the run here);
3. :meth:`Task.build_model`: the model, and whatever computes its loss, on the device;
4. each epoch :meth:`Task.train_epoch`, every ``eval_every`` epochs :meth:`Task.evaluate`;
5. with each checkpoint :meth:`Task.checkpoint_meta` and :meth:`Task.checkpoint_state`.

A task object serves one run: what :meth:`load_data` and :meth:`build_model` make (class
names, the criterion) it keeps for the later calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .config import Preset, TrainConfig
from .data import SeededDataset

__all__ = ["Loaders", "Task"]


@dataclass
class Loaders:
    """A run's data: the training set and loader (batches from a :class:`GlobalBatchSampler`)
    and the validation loader."""

    train_set: SeededDataset
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    num_classes: int

    def set_epoch(self, epoch: int) -> None:
        """Shuffle and augment for ``epoch``: both are drawn from the seed and the epoch
        alone, so a resumed run sees the batches the interrupted one would have seen."""
        self.train_loader.batch_sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)


class Task(ABC):
    """The task-specific half of a training run (see the module's docstring)."""

    #: The ``task`` entry of its checkpoints (detection's have none, from before there
    #: were two tasks); ``--resume`` refuses a run of another task.
    name: ClassVar[str]
    #: The evaluation metric that picks ``best.pt`` and that ``curves.png`` draws (the log
    #: names it on every evaluated line). Higher is better.
    headline: ClassVar[str]
    #: The metrics printed after the loss on each epoch's line.
    shown: ClassVar[tuple[str, ...]]
    #: The model's config dataclass, to read a checkpoint's ``config`` on resume.
    config_class: ClassVar[type]
    #: The recipe and model of a run given neither.
    preset: ClassVar[Preset]

    def check(self, cfg: TrainConfig) -> None:  # noqa: B027 (optional: most tasks take all)
        """Raise ``UsageError`` for settings of ``cfg`` the task cannot train with."""

    @abstractmethod
    def load_data(self, cfg: TrainConfig, rank: int, world: int, verbose: bool) -> Loaders:
        """The datasets and loaders of this rank; ``verbose``: may report on the data."""

    @abstractmethod
    def build_model(
        self, model_config: Any, cfg: TrainConfig, saved: dict | None, device: torch.device
    ) -> nn.Module:
        """The model of ``model_config`` on ``device``, in its initial state; the run loads
        the weights of ``saved`` (the checkpoint of a resumed run, else None) after."""

    @abstractmethod
    def train_epoch(self, net: nn.Module, loader: Iterable, **options: Any) -> dict[str, float]:
        """One epoch of :func:`.engine.train_epoch` over ``loader``; ``options``: its
        keywords (``optimizer``, ``device``, ``scheduler``, ...); ``net``: the model,
        wrapped for DDP under ``torchrun``."""

    @abstractmethod
    def evaluate(
        self, model: nn.Module, loader: Iterable, device: torch.device, cfg: TrainConfig
    ) -> dict[str, Any]:
        """The metrics of ``model`` on the validation loader, :attr:`headline` among them."""

    @abstractmethod
    def checkpoint_meta(self) -> dict[str, Any]:
        """Entries every checkpoint carries besides the configs: what prediction needs to
        name the classes (and ``task``, where the task is not detection)."""

    def checkpoint_state(self) -> dict[str, Any]:
        """Entries of ``last.pt`` only that a resume of this task reads back (default none)."""
        return {}
