"""ONNX export of exported programs that hold our operator.

``torch.onnx.export(model, ...)`` traces the model itself, and
:func:`msdeformattn.ms_deform_attn` then takes the standard-op formulation
(:func:`msdeformattn.ops.traceable.traceable_forward`). An exported program
(``torch.export.export`` first, as transformers' exporter does) holds the
registered operator ``msdeformattn::ms_deform_attn`` instead, for which ONNX
has no function. Before translating, the exporter decomposes every operator it
has no function for, with a table it builds on each call; importing the package
adds the same standard-op formulation to that table (and to nothing else), so
``torch.onnx.export(torch.export.export(model, args))`` and
``torch.onnx.export(model, args)`` give graphs of the same standard operators,
and the user passes nothing extra.

Not torch's global decomposition table: Inductor refuses to fall back to a custom
operator that has an entry there (an assertion whenever the ``CI`` environment
variable is set), and fake tensors would trace the formulation instead of the
operator's fake kernel.

torch.export users keep the fused kernel: ``ExportedProgram.run_decompositions()``
with its default table decomposes core ATen and CompositeImplicitAutograd
operators only, so the operator stays one opaque node.
"""

from __future__ import annotations

import functools
import warnings

import torch

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
    return traceable_forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def _register() -> None:
    """Wrap the ONNX exporter's decomposition-table builder to add :func:`_standard_ops`.

    The builder is private (``torch.onnx._internal.exporter._decomp``) and there is
    no public hook: the exporter takes custom translations only from its
    ``custom_translation_table`` argument. If a later torch moves it, this warns and
    the plain ``torch.onnx.export(model, ...)`` route keeps working; only exporting
    an exported program fails, as it did before.
    """
    op = torch.ops.msdeformattn.ms_deform_attn.default
    try:
        from torch.onnx._internal.exporter import _decomp

        build = _decomp.create_onnx_friendly_decomposition_table
        if getattr(build, "_msdeformattn", False):
            return

        @functools.wraps(build)
        def with_ours(onnx_registered_ops):
            table = build(onnx_registered_ops)
            if op not in onnx_registered_ops:
                table[op] = _standard_ops
            return table

        with_ours._msdeformattn = True
        _decomp.create_onnx_friendly_decomposition_table = with_ours
    except Exception as error:  # any failure: exported programs fail as before, nothing else
        warnings.warn(
            "msdeformattn: could not add the standard-op decomposition of "
            f"{op} to the ONNX exporter ({error!r}); torch.onnx.export of a torch.export "
            "program holding it will fail (export the model itself instead)",
            stacklevel=2,
        )


_register()
