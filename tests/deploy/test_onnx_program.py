"""torch.onnx.export of a torch.export program that holds our operator.

The program reaches the exporter with ``msdeformattn::ms_deform_attn`` opaque;
the decomposition that ``msdeformattn.deploy`` registers turns it into the same
standard operators as exporting the model itself. (The detector's exported
program: tests/deploy/test_export.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import msdeformattn
import msdeformattn.deploy
import msdeformattn.ops.onnx
from msdeformattn.ops.traceable import traceable_forward

from ..nn.conftest import layer_inputs, randomized
from .conftest import op_types

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

OP = torch.ops.msdeformattn.ms_deform_attn.default
LAYER_INPUTS = ["query", "reference_points", "input_flatten", "spatial_shapes", "level_start_index"]


def ops_in(program: torch.export.ExportedProgram) -> set:
    return {node.target for node in program.graph.nodes if node.op == "call_function"}


def run(program: torch.onnx.ONNXProgram, tmp_path, inputs: dict) -> list[np.ndarray]:
    path = tmp_path / "model.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path))
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})


@pytest.fixture(scope="module")
def layer():
    return randomized(
        msdeformattn.MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=3)
    ).eval()


def layer_program(layer) -> torch.export.ExportedProgram:
    n, lq, s = torch.export.Dim("N", max=64), torch.export.Dim("Lq"), torch.export.Dim("S")
    dynamic = ({0: n, 1: lq}, {0: n, 1: lq}, {0: n, 1: s}, None, None)
    return torch.export.export(layer, layer_inputs(), dynamic_shapes=dynamic)


def test_exported_program_keeps_the_operator_opaque(layer, monkeypatch):
    calls = []

    def counted(*args):
        calls.append(args)
        return traceable_forward(*args)

    monkeypatch.setattr(msdeformattn.ops.onnx, "traceable_forward", counted)
    program = layer_program(layer)
    assert OP in ops_in(program)
    # Shapes under dynamic sizes came from the fake kernel, not the decomposition.
    assert not calls
    # The default decompositions (core ATen) and torch's global table leave it: torch.export
    # and Inductor users keep the kernel. Only the ONNX exporter's table decomposes it.
    assert OP in ops_in(program.run_decompositions())
    assert OP not in torch._decomp.decomposition_table
    from torch.onnx._internal.exporter import _decomp

    onnx_table = _decomp.create_onnx_friendly_decomposition_table(set())
    assert OP not in ops_in(program.run_decompositions(onnx_table))
    assert calls


def test_exported_program_of_the_layer_runs_in_onnxruntime_at_other_sizes(layer, tmp_path):
    program = torch.onnx.export(layer_program(layer), input_names=LAYER_INPUTS)
    ops = op_types(program)
    assert not any("::" in op for op in ops), ops
    plain = torch.onnx.export(
        layer,
        layer_inputs(),
        input_names=LAYER_INPUTS,
        dynamic_shapes=({0: "N", 1: "Lq"}, {0: "N", 1: "Lq"}, {0: "N", 1: "S"}, None, None),
    )
    assert op_types(plain) == ops
    for seed, levels, N, Lq in [
        (1, ((6, 9), (3, 5), (2, 2), (1, 1)), 3, 11),
        (2, ((10, 7), (5, 4), (3, 2), (2, 1)), 1, 40),
    ]:
        inputs = layer_inputs(N=N, Lq=Lq, levels=levels, seed=seed)
        (got,) = run(program, tmp_path, dict(zip(LAYER_INPUTS, inputs, strict=True)))
        with torch.no_grad():
            expected = layer(*inputs).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)


class _Encoder(nn.Module):
    """transformers' Deformable DETR encoder with its level sizes fixed (a list of ints)."""

    def __init__(self, encoder: nn.Module, levels: list[tuple[int, int]]) -> None:
        super().__init__()
        self.encoder = encoder
        self.levels = levels

    def forward(self, embeds, valid, pos, shapes, starts, ratios):
        return self.encoder(
            inputs_embeds=embeds,
            attention_mask=valid,
            spatial_position_embeddings=pos,
            spatial_shapes=shapes,
            spatial_shapes_list=self.levels,
            level_start_index=starts,
            valid_ratios=ratios,
        ).last_hidden_state


def encoder_inputs(levels, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in levels)
    shapes = torch.tensor(levels)
    return {
        "embeds": torch.randn(batch, S, 32, generator=g),
        "valid": torch.ones(batch, S, dtype=torch.bool),
        "pos": torch.randn(batch, S, 32, generator=g),
        "shapes": shapes,
        "starts": msdeformattn.level_start_index(shapes),
        "ratios": 0.5 + 0.5 * torch.rand(batch, len(levels), 2, generator=g),
    }


def test_swapped_transformers_encoder_exports_both_ways(tmp_path):
    pytest.importorskip("transformers")
    from transformers import DeformableDetrConfig
    from transformers.models.deformable_detr.modeling_deformable_detr import (
        DeformableDetrEncoder,
    )

    config = DeformableDetrConfig(
        use_timm_backbone=False,
        backbone=None,
        use_pretrained_backbone=False,
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=48,
        num_feature_levels=2,
        encoder_n_points=2,
        dropout=0.0,
    )
    torch.manual_seed(0)
    encoder = randomized(DeformableDetrEncoder(config).eval())
    levels = [(6, 8), (3, 4)]
    model = _Encoder(encoder, levels)
    inputs = encoder_inputs(levels, 3, seed=1)
    with torch.no_grad():
        expected = model(**inputs)
    assert len(msdeformattn.deploy.swap_into_transformers(encoder)) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), expected, atol=1e-5, rtol=1e-4)

    batch = torch.export.Dim("batch", max=64)
    dynamic = {"embeds": {0: batch}, "valid": {0: batch}, "pos": {0: batch}}
    dynamic.update(shapes=None, starts=None, ratios={0: batch})
    example = encoder_inputs(levels, 2)
    program = torch.export.export(model, (), example, dynamic_shapes=dynamic)
    assert OP in ops_in(program)
    routes = {
        "program": torch.onnx.export(program),
        "model": torch.onnx.export(model, (), kwargs=example, dynamic_shapes=dynamic),
    }
    assert op_types(routes["program"]) == op_types(routes["model"])
    assert not any("::" in op for op in op_types(routes["program"]))
    for route, onnx_program in routes.items():
        (got,) = run(onnx_program, tmp_path, inputs)
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=1e-4, err_msg=route)
