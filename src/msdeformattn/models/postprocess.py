"""The detector's outputs as scored boxes in pixels (DETR's ``PostProcess`` module)."""

from __future__ import annotations

import torch
from torch import nn

from .deformable_detr import post_process

__all__ = ["PostProcess"]


class PostProcess(nn.Module):
    """``postprocessor(outputs, target_sizes)`` -> per image ``scores``, ``labels`` and
    ``boxes`` (xyxy, pixels) of the ``top_k`` best (query, class) pairs.

    target_sizes (N, 2): each image's (H, W) to scale the normalised boxes to.
    """

    def __init__(self, top_k: int = 100) -> None:
        super().__init__()
        self.top_k = top_k

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: torch.Tensor) -> list[dict]:
        return post_process(outputs, target_sizes, self.top_k)
