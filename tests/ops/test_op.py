"""The registered operator: opcheck, torch.compile, dispatch and its explanations."""

from __future__ import annotations

import pytest
import torch

import msdeformattn
from msdeformattn.ops import BackendNotSupportedError, registry

from ..conftest import TOL, grads, make_inputs
from .conftest import BACKENDS, EDGE_CASES, edge_inputs, split, supports


def on(target, tensors):
    return [t.to(split(target)[1]) for t in tensors]


@pytest.mark.parametrize(
    ("target", "dtype"),
    [(b, d) for b in BACKENDS for d in (torch.float32, torch.float64) if supports(b, d)],
)
def test_opcheck(target, dtype):
    value, shapes, starts, loc, attn = on(target, make_inputs(dtype=dtype))
    for t in (value, loc, attn):
        t.requires_grad_()
    torch.library.opcheck(
        torch.ops.msdeformattn.ms_deform_attn.default,
        (value, shapes, starts, loc, attn, split(target)[0]),
    )


@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("target", BACKENDS)
def test_opcheck_on_edge_inputs(target, case):
    inputs = on(target, edge_inputs(case))
    for t in (inputs[0], inputs[3], inputs[4]):
        t.requires_grad_()
    torch.library.opcheck(
        torch.ops.msdeformattn.ms_deform_attn.default, (*inputs, split(target)[0])
    )


@pytest.mark.parametrize("target", BACKENDS)
def test_opcheck_backward_op(target):
    value, shapes, starts, loc, attn = make_inputs(dtype=torch.float32)
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
    torch.library.opcheck(
        torch.ops.msdeformattn.ms_deform_attn_backward.default,
        (*on(target, (grad, value, shapes, starts, loc, attn)), split(target)[0]),
    )


@pytest.mark.parametrize("target", [*BACKENDS, None])
def test_compile_fullgraph_matches_eager(target):
    backend, device = split(target) if target else (None, "cpu")

    def fn(value, shapes, starts, loc, attn):
        # Something around the op, so the graph has more than one node.
        value, shapes, starts, loc, attn = (
            t.to(device) for t in (value, shapes, starts, loc, attn)
        )
        return (
            msdeformattn.ms_deform_attn(
                value * 2, shapes, starts, loc, attn.softmax(-1), backend=backend
            )
            .relu()
            .cpu()
        )

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    inputs = make_inputs(dtype=torch.float32)
    for e, g in zip(grads(fn, inputs), grads(compiled, inputs), strict=True):
        torch.testing.assert_close(g, e, **TOL[torch.float32])


def test_compile_inductor_without_graph_break():
    def fn(value, shapes, starts, loc, attn):
        return msdeformattn.ms_deform_attn(value, shapes, starts, loc, attn).sum(-1)

    torch._dynamo.reset()
    inputs = make_inputs(dtype=torch.float32)
    explanation = torch._dynamo.explain(fn)(*inputs)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(fn, fullgraph=True)
    for e, g in zip(grads(fn, inputs), grads(compiled, inputs), strict=True):
        torch.testing.assert_close(g, e, **TOL[torch.float32])


def test_available_backends_lists_reference_last():
    names = msdeformattn.available_backends()
    assert names[-1] == "reference" and "cpu" in names


def test_resolve_picks_cpu_for_cpu_tensors_and_explains():
    res = msdeformattn.resolve(*make_inputs(dtype=torch.float32))
    assert res.backend == "cpu"
    assert "priority" in res.reason
    assert "cpu" in str(res)


def test_resolve_falls_back_to_reference_and_says_why():
    inputs = [t.to("meta") for t in make_inputs(dtype=torch.float32)]
    res = msdeformattn.resolve(*inputs)
    assert res.backend == "reference"
    assert any("not meta" in r for r in res.rejected["cpu"])
    out = msdeformattn.ms_deform_attn(*inputs)
    assert out.device.type == "meta" and out.shape == (2, 5, 6)


def test_explicit_backend_that_cannot_run_names_why():
    inputs = [t.to("meta") for t in make_inputs(dtype=torch.float32)]
    with pytest.raises(BackendNotSupportedError, match=r"backend 'cpu' cannot run.*not meta"):
        msdeformattn.ms_deform_attn(*inputs, backend="cpu")


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(
        ValueError, match=r"backend must be one of .*'cpu'.*'reference'.*got 'cuda'"
    ):
        msdeformattn.ms_deform_attn(*make_inputs(), backend="cuda")


def test_deterministic_mode_skips_non_deterministic_backends(monkeypatch):
    class Racy(registry.Backend):
        NAME = "racy"
        PRIORITY = 100
        IS_DETERMINISTIC = False

    monkeypatch.setattr(registry, "_REGISTRY", {"racy": Racy(), **registry._REGISTRY})
    inputs = make_inputs(dtype=torch.float32)
    assert msdeformattn.resolve(*inputs).backend == "racy"
    torch.use_deterministic_algorithms(True)
    try:
        res = msdeformattn.resolve(*inputs)
    finally:
        torch.use_deterministic_algorithms(False)
    assert res.backend == "cpu"
    assert "deterministic" in res.rejected["racy"][0]


def test_no_backend_at_all_lists_every_reason(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {"cpu": registry._REGISTRY["cpu"]})
    inputs = [t.to("meta") for t in make_inputs(dtype=torch.float32)]
    with pytest.raises(BackendNotSupportedError, match=r"no backend can run this call \(cpu: "):
        msdeformattn.resolve(*inputs)


def test_missing_dependency_makes_a_backend_unavailable_not_an_error(monkeypatch):
    class NeedsMissing(registry.Backend):
        NAME = "needs-missing"
        REQUIRES = ("a_package_that_is_not_installed_anywhere",)

    monkeypatch.setattr(
        registry, "_REGISTRY", {"needs-missing": NeedsMissing(), **registry._REGISTRY}
    )
    assert "needs-missing" not in msdeformattn.available_backends()
    assert msdeformattn.resolve(*make_inputs()).rejected["needs-missing"][0].startswith("needs")
