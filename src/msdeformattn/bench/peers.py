"""The contenders: our available backends, and the peers' implementations of the operator.

Peers: the grid_sample formulation (always), and whichever of transformers,
torch-ms-deform-attn and deformops (Python >= 3.12) are installed. Every contender
has the operator's signature ``(value, spatial_shapes, level_start_index,
sampling_locations, attention_weights) -> (N, Lq, M*D)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..ops import available_backends, get_backend, ms_deform_attn
from .cases import CASES, make_inputs


def grid_sample_formulation(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    loc: torch.Tensor,
    attn: torch.Tensor,
) -> torch.Tensor:
    """The pure-PyTorch path of the reference implementation and of transformers, restated.

    value (N, S, M, D), loc (N, Lq, M, L, P, 2), attn (N, Lq, M, L, P) -> (N, Lq, M*D).
    """
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    sizes = [h * w for h, w in spatial_shapes.tolist()]
    grids = 2 * loc - 1
    sampled = []
    for l, (v, (h, w)) in enumerate(
        zip(value.split(sizes, dim=1), spatial_shapes.tolist(), strict=True)
    ):
        v = v.flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        grid = grids[:, :, :, l].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    weights = attn.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()


def _transformers_fn() -> Callable | None:
    """transformers' MultiScaleDeformableAttention (its pure-PyTorch path on the CPU)."""
    try:
        from transformers.models.deformable_detr.modeling_deformable_detr import (
            MultiScaleDeformableAttention,
        )
    except ImportError:
        return None
    module = MultiScaleDeformableAttention()

    def run(value, spatial_shapes, level_start_index, loc, attn):
        shapes_list = [tuple(s) for s in spatial_shapes.tolist()]
        return module(value, spatial_shapes, shapes_list, level_start_index, loc, attn, 64)

    return run


def _torch_ms_deform_attn_fn() -> Callable | None:
    """torch-ms-deform-attn's C++/OpenMP (CPU) and CUDA kernels."""
    try:
        import torch_ms_deform_attn
    except ImportError:
        return None

    def run(value, spatial_shapes, level_start_index, loc, attn):
        return torch_ms_deform_attn.ms_deform_attn(
            value, spatial_shapes, level_start_index, loc, attn, 64
        )

    return run


def _deformops_fn() -> Callable | None:
    """deformops' ``msda``, on the backend its own dispatch picks (Triton on CUDA)."""
    try:
        from deformops.registry import msda
    except (ImportError, SyntaxError):  # SyntaxError: it needs Python >= 3.12
        return None

    def run(value, spatial_shapes, level_start_index, loc, attn):
        return msda(value, spatial_shapes, level_start_index, loc, attn)

    return run


#: The installable peers: table name -> factory (None when the package is missing).
_OPTIONAL_PEERS = (
    ("peer:transformers", _transformers_fn),
    ("peer:torch-ms-deform-attn", _torch_ms_deform_attn_fn),
    ("peer:deformops", _deformops_fn),
)


def contenders(device: str) -> dict[str, Callable]:
    """Name -> function with the operator's signature, ours first, then the peers."""
    fns: dict[str, Callable] = {}
    probe = make_inputs(CASES["small"], torch.float32, device)
    args = (probe[0], probe[3], probe[4])
    for name in available_backends():
        backend = get_backend(name)
        # Only what backend=None could pick: not Triton's interpreter on the CPU.
        if backend.supports(*args) and not backend.dispatch_reasons(*args):

            def ours(*inputs, _name=name):
                return ms_deform_attn(*inputs, backend=_name)

            fns[f"msdeformattn:{name}"] = ours
    fns["peer:grid_sample"] = grid_sample_formulation
    for name, make in _OPTIONAL_PEERS:
        fn = make()
        if fn is not None:
            fns[name] = fn
    return fns
