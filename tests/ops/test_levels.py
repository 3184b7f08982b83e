"""The level table: first row of each level."""

from __future__ import annotations

import torch

import msdeformattn


def test_level_start_index_is_the_running_sum_of_areas():
    shapes = torch.tensor([[7, 5], [4, 3], [1, 1], [2, 9]])
    starts = msdeformattn.level_start_index(shapes)
    assert starts.dtype == torch.int64 and starts.tolist() == [0, 35, 47, 48]
    assert msdeformattn.level_start_index(shapes[:1]).tolist() == [0]
