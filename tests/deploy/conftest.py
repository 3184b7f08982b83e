"""Helpers of the export and transformers-swap tests."""

from __future__ import annotations

import importlib

import pytest
import torch

# The transformers modules whose module-level function the swap replaces.
_PATCHED_MODULES = {
    "transformers.models.mask2former.modeling_mask2former": "multi_scale_deformable_attention",
    "transformers.models.oneformer.modeling_oneformer": "multi_scale_deformable_attention",
    "transformers.models.rt_detr_v2.modeling_rt_detr_v2": "multi_scale_deformable_attention_v2",
}


def op_types(program: torch.onnx.ONNXProgram) -> set[str]:
    """Every node's operator, ``domain::type`` outside the standard domain."""
    nodes = list(program.model_proto.graph.node)
    for function in program.model_proto.functions:
        nodes += function.node
    return {f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in nodes}


@pytest.fixture
def restore_transformers_functions(monkeypatch):
    """Put back the module-level functions a swap replaces (for every model in the process)."""
    pytest.importorskip("transformers")
    for module_name, function_name in _PATCHED_MODULES.items():
        module = importlib.import_module(module_name)
        monkeypatch.setattr(module, function_name, getattr(module, function_name))


def outputs(model: torch.nn.Module, inputs: dict, fields) -> tuple[torch.Tensor, ...]:
    """``model``'s ``fields`` outputs on ``inputs``, without gradients."""
    with torch.no_grad():
        out = model(**inputs)
    return tuple(getattr(out, f) for f in fields)


def profiled_outputs(model: torch.nn.Module, inputs: dict, fields):
    """:func:`outputs`, and the names of the operators that ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = outputs(model, inputs, fields)
    return result, {event.key for event in prof.key_averages()}


def assert_outputs_close(after, before) -> None:
    """Equal to float32 rounding, the absolute tolerance scaled by each tensor's magnitude
    (mask logits reach tens); -inf logits of padded text positions in both."""
    for a, b in zip(after, before, strict=True):
        scale = max(1.0, b[b.isfinite()].abs().max().item())
        torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=1e-4)
