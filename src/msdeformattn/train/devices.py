"""Where a run computes: the device it asked for, and the process group under ``torchrun``."""

from __future__ import annotations

import datetime
import os

import torch

from ..util.errors import UsageError

__all__ = ["resolve_device", "setup_distributed"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or CUDA when available else the CPU; a clear error for one that is absent."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {device!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def setup_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device); joins ``torchrun``'s process group if any.

    Under torchrun each rank takes ``cuda:LOCAL_RANK`` with NCCL, or the CPU with gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        # Rank 0 evaluates alone while the others wait: allow a COCO-size evaluation.
        torch.distributed.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2)
        )
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device
