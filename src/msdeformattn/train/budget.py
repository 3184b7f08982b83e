"""The wall-clock budget of a run (``TrainConfig.minutes``): training seconds only, as every
process agrees on them."""

from __future__ import annotations

import time

import torch

__all__ = ["Clock"]


class Clock:
    """Training seconds (evaluation and checkpoints excluded) against a budget.

    ``elapsed`` holds the seconds of the epochs done (a resumed run starts from the
    checkpoint's); the running epoch's time is added while it runs. ``seconds`` is the
    last agreed reading, which the learning-rate schedule follows, so that every rank
    steps with the same learning rate.
    """

    def __init__(
        self,
        minutes: float | None,
        elapsed: float = 0.0,
        device: torch.device | None = None,
        world: int = 1,
    ) -> None:
        self.budget = None if minutes is None else minutes * 60
        self.elapsed = elapsed
        self.seconds = 0.0
        self.device, self.world = device, world
        self._epoch_start = time.perf_counter()

    def start_epoch(self) -> None:
        """Count from now."""
        self._epoch_start = time.perf_counter()

    def end_epoch(self, seconds: float) -> None:
        """Add an epoch's training ``seconds``; what follows (evaluation) is not counted."""
        self.elapsed += seconds
        self._epoch_start = time.perf_counter()

    def out_of_time(self) -> bool:
        """Whether the budget is spent, by the slowest rank's clock (False without one)."""
        if self.budget is None:
            return False
        now = self.elapsed + time.perf_counter() - self._epoch_start
        seconds = torch.tensor([now], dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
        self.seconds = float(seconds.item())
        return self.seconds >= self.budget
