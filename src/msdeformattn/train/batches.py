"""How a training set becomes batches: global batches split across processes, in an order
that depends on the seed and the epoch alone (so a resumed run sees what it would have)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..util.errors import UsageError
from .config import TrainConfig

__all__ = ["GlobalBatchSampler", "batch_for", "training_loader", "worker_options"]


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Shuffled global batches, each split across ranks (rank r takes items r, r+W, ...).

    With one process it yields the global batches themselves, so 2 processes with
    half the batch each see exactly the images 1 process sees, step by step. The
    order is drawn from ``seed + epoch``: call ``set_epoch`` before each epoch.
    """

    def __init__(
        self, size: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0
    ) -> None:
        if batch_size % world:
            raise UsageError(
                f"--batch-size {batch_size} must be divisible by the number of processes ({world})"
            )
        self.size, self.batch_size, self.rank, self.world, self.seed = (
            size,
            batch_size,
            rank,
            world,
            seed,
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start : start + self.batch_size][self.rank :: self.world].tolist()


def batch_for(size: int, batch_size: int, world: int = 1) -> int:
    """The global batch for a training set of ``size`` images: ``batch_size``, clipped
    (with a warning) to the set when the set is smaller, in multiples of ``world``."""
    if size >= batch_size:
        return batch_size
    clipped = size - size % world
    if clipped == 0:
        raise UsageError(
            f"the training set has {size} images, fewer than the {world} processes: "
            "an epoch would take no step"
        )
    warnings.warn(
        f"the training set has {size} images, fewer than --batch-size {batch_size}: "
        f"batches of {clipped}",
        stacklevel=2,
    )
    return clipped


def worker_options(cfg: TrainConfig) -> dict[str, Any]:
    """The DataLoader's worker settings of ``cfg``."""
    return {"num_workers": cfg.num_workers, "persistent_workers": cfg.num_workers > 0}


def training_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    cfg: TrainConfig,
    collate_fn: Callable,
    rank: int = 0,
    world: int = 1,
) -> torch.utils.data.DataLoader:
    """This rank's share of shuffled global batches of ``batch_size`` (the last incomplete
    one dropped); the batch sampler is a :class:`GlobalBatchSampler`."""
    sampler = GlobalBatchSampler(len(dataset), batch_size, rank, world, cfg.seed)
    # Its own generator: creating an iterator then never draws from the global RNG,
    # which a resumed run must find as the interrupted one left it.
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(cfg.seed),
        **worker_options(cfg),
    )
