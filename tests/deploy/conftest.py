"""Helpers of the export tests."""

from __future__ import annotations

import torch


def op_types(program: torch.onnx.ONNXProgram) -> set[str]:
    """Every node's operator, ``domain::type`` outside the standard domain."""
    nodes = list(program.model_proto.graph.node)
    for function in program.model_proto.functions:
        nodes += function.node
    return {f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in nodes}
