"""End to end: one COCO-size encoder layer's training step against transformers'.

One image, Lq = S = 20,197 (:data:`COCO_LEVELS`), d_model 256, 8 heads, 4 levels,
4 points; the same weights in both, dropout off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..models.convert import hf_to_reference
from ..nn import DeformableTransformerEncoder, DeformableTransformerEncoderLayer
from ..ops import level_start_index
from .cases import COCO_LEVELS
from .memory import probe_in_fresh_process
from .tables import versus_transformers
from .timing import median_time


def _copy_weights(hf: torch.nn.Module, ours: torch.nn.Module) -> None:
    """Load transformers' encoder layer into ours through the checkpoint converter's names."""
    # hf_to_reference renames whole detectors: present the layer as the first encoder layer.
    hf_prefix, our_prefix = "model.encoder.layers.0.", "transformer.encoder.layers.0."
    state, unknown = hf_to_reference({hf_prefix + k: v for k, v in hf.state_dict().items()})
    if unknown:
        raise RuntimeError(f"transformers' encoder layer has keys the converter lacks: {unknown}")
    ours.load_state_dict({k.removeprefix(our_prefix): v for k, v in state.items()})


def encoder_layer_step(
    which: str, levels: Sequence[tuple[int, int]] = COCO_LEVELS
) -> Callable[[], None]:
    """One training step (forward + backward) of ``which`` encoder layer ("msdeformattn" or
    "transformers") on one image with ``levels`` (H, W); raises if the two outputs differ."""
    from transformers import DeformableDetrConfig
    from transformers.models.deformable_detr.modeling_deformable_detr import (
        DeformableDetrEncoderLayer,
    )

    torch.manual_seed(0)
    hf = DeformableDetrEncoderLayer(DeformableDetrConfig(dropout=0.0)).train()
    ours = DeformableTransformerEncoderLayer(dropout=0.0).train()
    _copy_weights(hf, ours)
    levels = [tuple(hw) for hw in levels]
    shapes = torch.tensor(levels)
    starts = level_start_index(shapes)
    S = int(shapes.prod(1).sum())
    g = torch.Generator().manual_seed(1)
    src = torch.randn(1, S, 256, generator=g, requires_grad=True)
    pos = torch.randn(1, S, 256, generator=g)
    ref = DeformableTransformerEncoder.get_reference_points(
        levels, torch.ones(1, len(levels), 2), "cpu"
    )
    valid = torch.ones(1, S, dtype=torch.bool)

    def step_ours():
        ours(src, pos, ref, shapes, starts).sum().backward()

    def run_hf():
        out = hf(
            src,
            valid,
            spatial_position_embeddings=pos,
            reference_points=ref,
            spatial_shapes=shapes,
            spatial_shapes_list=levels,
            level_start_index=starts,
        )
        return out[0] if isinstance(out, tuple) else out

    def step_hf():
        run_hf().sum().backward()

    with torch.no_grad():
        got = ours(src, pos, ref, shapes, starts)
        expected = run_hf()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    return {"msdeformattn": step_ours, "transformers": step_hf}[which]


def encoder_benchmark(min_run_time: float) -> str:
    """Seconds and peak extra bytes of a COCO-size encoder layer's training step, ours vs
    transformers'."""
    seconds, peaks = {}, {}
    for name in ("msdeformattn", "transformers"):
        step = encoder_layer_step(name)
        step()  # warm-up
        seconds[name] = median_time(step, min_run_time)
        peaks[name] = probe_in_fresh_process(["--encoder-memory-probe", name])
    columns = ["encoder layer (train step)", "fwd+bwd s", "speed-up", "peak extra MiB"]
    return versus_transformers(columns, seconds, digits=3, peak_bytes=peaks)
