"""ONNX export of exported programs that hold our operator.

``torch.onnx.export(model, ...)`` traces the model itself, and
:func:`msdeformattn.ms_deform_attn` then takes the standard-op formulation
(:func:`msdeformattn.ops.traceable.traceable_forward`). An exported program
(``torch.export.export`` first, as transformers' exporter does) holds the
registered operator ``msdeformattn::ms_deform_attn`` instead, for which ONNX
has no function. Before translating, the exporter decomposes every operator it
has no function for with the decompositions in torch's decomposition table;
importing the package registers the same standard-op formulation there, so
``torch.onnx.export(torch.export.export(model, args))`` and
``torch.onnx.export(model, args)`` give graphs of the same standard operators,
and the user passes nothing extra.

torch.export users keep the fused kernel: ``ExportedProgram.run_decompositions()``
with its default table decomposes core ATen and CompositeImplicitAutograd
operators only, so the operator stays one opaque node.
"""

from __future__ import annotations

import warnings

import torch

from .op import _fake_forward
from .traceable import traceable_forward

__all__: list[str] = []


def _standard_ops(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """The operator's decomposition: (N, Lq, M*D) from standard ops, ``backend`` unused."""
    if _only_shapes_wanted(value):
        return _fake_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend
        )
    return traceable_forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def _only_shapes_wanted(value: torch.Tensor) -> bool:
    """True when FakeTensorMode calls the decomposition just to propagate shapes.

    Under dynamic shapes FakeTensorMode prefers a registered decomposition to
    the operator's fake kernel, which would trace the whole standard-op
    formulation on fake tensors at every call of a dynamic ``torch.compile``
    or ``torch.export`` (slower, same shapes). No proxy mode is active then;
    while a graph is being decomposed (the ONNX exporter) one is. Private
    modules: if they move, this answers False (same shapes, slower tracing).
    """
    try:
        from torch._subclasses.fake_tensor import FakeTensor
        from torch.fx.experimental.proxy_tensor import get_proxy_mode
    except ImportError:
        return False
    return isinstance(value, FakeTensor) and get_proxy_mode() is None


def _register() -> None:
    """Add :func:`_standard_ops` to the table the ONNX exporter decomposes with.

    ``torch._decomp`` is private, but there is no public hook: the exporter
    builds its translation registry afresh on every call and reads custom
    translations only from its ``custom_translation_table`` argument, while its
    decomposition table is ``torch.export.default_decompositions()`` plus
    ``torch._decomp.decomposition_table``. If a later torch moves that table,
    this warns and the plain ``torch.onnx.export(model, ...)`` route keeps
    working; only exporting an exported program fails, as it did before.
    """
    op = torch.ops.msdeformattn.ms_deform_attn.default
    try:
        from torch._decomp import decomposition_table, register_decomposition

        if op not in decomposition_table:
            register_decomposition(op)(_standard_ops)
    except Exception as error:  # any failure: exported programs fail as before, nothing else
        warnings.warn(
            "msdeformattn: could not register the standard-op decomposition of "
            f"{op} ({error!r}); torch.onnx.export of a torch.export program holding it "
            "will fail (export the model itself instead)",
            stacklevel=2,
        )


_register()
