"""Plain torch.onnx.export of the layer: standard ONNX ops, other sizes at run time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import msdeformattn

from ..nn.conftest import layer_inputs, randomized

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def test_msdeformattn_exports_and_runs_in_onnxruntime_at_other_sizes(tmp_path):
    layer = randomized(msdeformattn.MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=3))
    layer.eval()
    path = tmp_path / "msdeformattn.onnx"
    names = ["query", "reference_points", "input_flatten", "spatial_shapes", "level_start_index"]
    torch.onnx.export(
        layer,
        layer_inputs(),
        str(path),
        input_names=names,
        output_names=["output"],
        dynamic_shapes=({0: "N", 1: "Lq"}, {0: "N", 1: "Lq"}, {0: "N", 1: "S"}, None, None),
    )
    session = ort.InferenceSession(str(path))
    # Only standard operators: nothing of ours reaches the graph.
    ops = {node.op_type for node in __import__("onnx").load(str(path)).graph.node}
    assert not any("msdeformattn" in op for op in ops)
    for seed, levels, N, Lq in [
        (1, ((6, 9), (3, 5), (2, 2), (1, 1)), 3, 11),
        (2, ((10, 7), (5, 4), (3, 2), (2, 1)), 1, 40),
    ]:
        inputs = layer_inputs(N=N, Lq=Lq, levels=levels, seed=seed)
        got = session.run(None, dict(zip(names, (t.numpy() for t in inputs), strict=True)))[0]
        with torch.no_grad():
            expected = layer(*inputs).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)
