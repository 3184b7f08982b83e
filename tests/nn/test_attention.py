"""MSDeformAttn: the reference layout, initialisation, both reference formats, the mask."""

from __future__ import annotations

import math

import pytest
import torch

import msdeformattn
from msdeformattn import MSDeformAttn

from ..conftest import DEVICES, level_table, naive_samples
from .conftest import layer_inputs, randomized


def test_parameter_names_and_shapes_match_the_reference_layout():
    layer = MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {
        "sampling_offsets.weight": (256, 256),
        "sampling_offsets.bias": (256,),
        "attention_weights.weight": (128, 256),
        "attention_weights.bias": (128,),
        "value_proj.weight": (256, 256),
        "value_proj.bias": (256,),
        "output_proj.weight": (256, 256),
        "output_proj.bias": (256,),
    }


def test_initialisation():
    M, L, P = 8, 3, 4
    layer = MSDeformAttn(d_model=64, n_levels=L, n_heads=M, n_points=P)
    assert (layer.sampling_offsets.weight == 0).all()
    bias = layer.sampling_offsets.bias.view(M, L, P, 2)
    for h in range(M):
        angle = 2 * math.pi * h / M
        ray = torch.tensor([math.cos(angle), math.sin(angle)])
        ray = ray / ray.abs().max()
        for k in range(P):
            for lvl in range(L):
                torch.testing.assert_close(bias[h, lvl, k], ray * (k + 1))
    assert (layer.attention_weights.weight == 0).all() and (layer.attention_weights.bias == 0).all()
    for proj in (layer.value_proj, layer.output_proj):
        bound = math.sqrt(6 / (64 + 64))
        assert proj.weight.abs().max() <= bound and proj.weight.std() > bound / 3
        assert (proj.bias == 0).all()


def test_d_model_must_divide_into_heads():
    with pytest.raises(ValueError, match=r"d_model must be divisible by n_heads.*30.*n_heads=8"):
        MSDeformAttn(d_model=30)


def manual_forward(layer, query, ref, flat, shapes, starts, mask=None):
    """The layer's formula written out with the reference backend."""
    N, Lq, C = query.shape
    M, L, P = layer.n_heads, layer.n_levels, layer.n_points
    value = flat @ layer.value_proj.weight.T + layer.value_proj.bias
    if mask is not None:
        value = value * (~mask)[..., None]
    value = value.view(N, -1, M, C // M)
    off = query @ layer.sampling_offsets.weight.T + layer.sampling_offsets.bias
    off = off.view(N, Lq, M, L, P, 2)
    logits = query @ layer.attention_weights.weight.T + layer.attention_weights.bias
    attn = logits.view(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P)
    if ref.shape[-1] == 2:
        W = shapes[:, 1].to(ref.dtype)
        H = shapes[:, 0].to(ref.dtype)
        loc_x = ref[:, :, None, :, None, 0] + off[..., 0] / W[:, None]
        loc_y = ref[:, :, None, :, None, 1] + off[..., 1] / H[:, None]
    else:
        loc_x = ref[:, :, None, :, None, 0] + off[..., 0] / P * ref[:, :, None, :, None, 2] * 0.5
        loc_y = ref[:, :, None, :, None, 1] + off[..., 1] / P * ref[:, :, None, :, None, 3] * 0.5
    loc = torch.stack([loc_x, loc_y], -1)
    out = msdeformattn.ms_deform_attn(value, shapes, starts, loc, attn, backend="reference")
    return out @ layer.output_proj.weight.T + layer.output_proj.bias


@pytest.mark.parametrize("ref_dim", [2, 4])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_forward_matches_the_formula(ref_dim, backend):
    layer = randomized(MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=3, backend=backend))
    inputs = layer_inputs(ref_dim=ref_dim)
    torch.testing.assert_close(layer(*inputs), manual_forward(layer, *inputs), atol=1e-5, rtol=1e-4)


def test_x_and_y_are_not_swapped_on_non_square_levels():
    """A point at a known pixel of a 2x5 map reads exactly that pixel."""
    layer = MSDeformAttn(d_model=4, n_levels=1, n_heads=1, n_points=1)
    with torch.no_grad():
        layer.sampling_offsets.bias.zero_()
        for proj in (layer.value_proj, layer.output_proj):
            proj.weight.copy_(torch.eye(4))
            proj.bias.zero_()
    shapes, starts, S = level_table(((2, 5),))
    flat = torch.arange(S, dtype=torch.float32)[None, :, None].repeat(1, 1, 4)  # pixel index
    for y, x in [(0, 3), (1, 0), (1, 4)]:
        ref = torch.tensor([[[[(x + 0.5) / 5, (y + 0.5) / 2]]]])
        out = layer(torch.zeros(1, 1, 4), ref, flat, shapes, starts)
        assert out[0, 0, 0].item() == pytest.approx(y * 5 + x)


def test_padding_mask_true_means_padding():
    layer = randomized(MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=3))
    query, ref, flat, shapes, starts = layer_inputs()
    mask = torch.zeros(flat.shape[:2], dtype=torch.bool)
    mask[0, 10:30] = True
    mask[1, -5:] = True
    out = layer(query, ref, flat, shapes, starts, mask)
    # What sits under the padding must not matter...
    changed = flat.clone()
    changed[mask] = 1000.0
    torch.testing.assert_close(layer(query, ref, changed, shapes, starts, mask), out)
    # ...and it is what the formula gives with those pixels zeroed.
    torch.testing.assert_close(
        out, manual_forward(layer, query, ref, flat, shapes, starts, mask), atol=1e-5, rtol=1e-4
    )
    assert not torch.allclose(out, layer(query, ref, flat, shapes, starts))


def test_backward_reaches_every_parameter_and_input():
    layer = randomized(MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=3))
    query, ref, flat, shapes, starts = layer_inputs()
    for t in (query, ref, flat):
        t.requires_grad_()
    layer(query, ref, flat, shapes, starts).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for t in (query, ref, flat):
        assert t.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("arg", "bad", "match"),
    [
        (0, lambda t: t[..., :16], r"query must have shape \(N, Lq, 32\)"),
        (
            1,
            lambda t: t[..., :1],
            r"reference_points must have shape \(2, 7, 4, 2\) or \(2, 7, 4, 4\)",
        ),
        (1, lambda t: t[:, :, :2], r"reference_points must have shape"),
        (2, lambda t: t[:1], r"input_flatten must have shape \(2, S, 32\)"),
        (3, lambda t: t[:3], r"input_spatial_shapes must have shape \(4, 2\) for n_levels=4"),
    ],
)
def test_bad_inputs_are_named(arg, bad, match):
    layer = MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=3)
    inputs = list(layer_inputs())
    inputs[arg] = bad(inputs[arg])
    with pytest.raises(ValueError, match=match):
        layer(*inputs)


def test_padding_mask_must_be_bool():
    layer = MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=3)
    query, ref, flat, shapes, starts = layer_inputs()
    with pytest.raises(
        ValueError, match=r"input_padding_mask must be a bool tensor of shape \(2, "
    ):
        layer(query, ref, flat, shapes, starts, torch.zeros(flat.shape[:2]))


# CPU autocast (bfloat16) here; on a GPU machine also CUDA float16 and bfloat16.
AUTOCAST = [("cpu", torch.bfloat16)] + [
    ("cuda", dt) for dt in (torch.float16, torch.bfloat16) if "cuda" in DEVICES
]


@pytest.mark.parametrize(("device", "dtype"), AUTOCAST)
def test_autocast_within_twice_the_reference_error(device, dtype):
    """Under autocast the op gets a low-precision value and float32 locations."""
    layer = randomized(MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=3)).double()
    inputs64 = layer_inputs(dtype=torch.float64)
    exact = layer(*inputs64)
    layer = layer.float().to(device)
    inputs = [(t.float() if t.is_floating_point() else t).to(device) for t in inputs64]
    errors = {}
    for backend in (None, "reference"):
        layer.backend = backend
        with torch.autocast(device, dtype=dtype):
            out = layer(*inputs)
        out.float().sum().backward()
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
        layer.zero_grad()
        errors[backend] = (out.double().cpu() - exact).abs().max()
    assert errors[None] <= 2 * errors["reference"], errors


def test_compiles_without_graph_break():
    layer = randomized(MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=3))
    inputs = layer_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*inputs), layer(*inputs))


def test_repr_shows_only_non_defaults():
    assert MSDeformAttn().extra_repr() == "d_model=256"
    assert MSDeformAttn(n_points=2, backend="cpu").extra_repr() == (
        "d_model=256, n_points=2, backend='cpu'"
    )


def rtdetr_v2_formula(layer, query, ref, flat, shapes, starts, discrete=False):
    """RT-DETRv2's per-level-points layer written out sample by sample (scalar-loop oracle)."""
    N, Lq, C = query.shape
    M, points = layer.n_heads, layer.points_per_level
    K = sum(points)
    value = (flat @ layer.value_proj.weight.T + layer.value_proj.bias).view(N, -1, M, C // M)
    off = query @ layer.sampling_offsets.weight.T + layer.sampling_offsets.bias
    off = off.view(N, Lq, M, K, 2)
    logits = query @ layer.attention_weights.weight.T + layer.attention_weights.bias
    attn = logits.view(N, Lq, M, K).softmax(-1)
    levels = [lv for lv, p in enumerate(points) for _ in range(p)]
    loc = torch.empty(N, Lq, M, K, 2, dtype=query.dtype)
    for k, lv in enumerate(levels):
        H, W = shapes[lv].tolist()
        r = ref[:, :, None, lv]
        if ref.shape[-1] == 2:
            loc[:, :, :, k, 0] = r[..., 0] + off[:, :, :, k, 0] / W
            loc[:, :, :, k, 1] = r[..., 1] + off[:, :, :, k, 1] / H
        else:
            loc[:, :, :, k] = r[..., :2] + off[:, :, :, k] / points[lv] * r[..., 2:] * 0.5
    out = naive_samples(value, shapes, starts, loc, attn, levels, discrete).to(query.dtype)
    return out @ layer.output_proj.weight.T + layer.output_proj.bias


@pytest.mark.parametrize("sampling", ["bilinear", "discrete"])
@pytest.mark.parametrize("ref_dim", [2, 4])
def test_per_level_points_layer_matches_rtdetr_v2_formula(ref_dim, sampling):
    layer = randomized(
        MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=[3, 6, 3], sampling=sampling)
    )
    assert layer.sampling_offsets.out_features == 2 * 12 * 2
    inputs = layer_inputs(N=2, Lq=3, C=16, levels=((5, 7), (3, 4), (2, 2)), ref_dim=ref_dim)
    inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    layer.double()
    with torch.no_grad():
        got = layer(*inputs)
    expected = rtdetr_v2_formula(layer, *inputs, discrete=sampling == "discrete")
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-9)


def test_equal_per_level_counts_are_the_int_layer():
    torch.manual_seed(0)
    as_int = randomized(MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=2))
    as_list = MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=[2, 2, 2, 2])
    as_list.load_state_dict(as_int.state_dict())
    inputs = layer_inputs(ref_dim=4)
    with torch.no_grad():
        torch.testing.assert_close(as_list(*inputs), as_int(*inputs), rtol=0, atol=0)


def test_per_level_initialisation_puts_points_at_distances_1_to_p_of_each_level():
    layer = MSDeformAttn(d_model=16, n_levels=3, n_heads=4, n_points=[1, 3, 2])
    bias = layer.sampling_offsets.bias.view(4, 6, 2)
    # Head 0 points along +x: distances 1 | 1, 2, 3 | 1, 2.
    assert bias[0, :, 0].tolist() == [1, 1, 2, 3, 1, 2] and (bias[0, :, 1] == 0).all()
    with pytest.raises(ValueError, match=r"one count >= 1 per level \(3\)"):
        MSDeformAttn(d_model=16, n_levels=3, n_heads=4, n_points=[1, 3])
    with pytest.raises(ValueError, match="sampling must be"):
        MSDeformAttn(d_model=16, sampling="nearest")
