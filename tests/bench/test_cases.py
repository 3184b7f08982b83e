"""The cases: inputs shaped and distributed like a trained detector's."""

from __future__ import annotations

import torch

from msdeformattn.bench.cases import CASES, DEFAULT_CASES, make_inputs


def test_encoder_inputs_sample_near_each_query():
    value, _, starts, loc, attn = make_inputs(CASES["encoder-N1"], torch.float32, "cpu")
    S = 100 * 150 + 50 * 75 + 25 * 38 + 13 * 19
    assert value.shape == (1, S, 8, 32)
    assert loc.shape == (1, S, 8, 4, 4, 2)
    assert starts.tolist() == [0, 15000, 18750, 19700]
    torch.testing.assert_close(attn.sum((-1, -2)), torch.ones(1, S, 8))
    # Most samples lie inside the maps, as in a trained encoder.
    inside = ((loc >= 0) & (loc <= 1)).all(-1).float().mean()
    assert inside > 0.9
    # Query 16 is level 0's pixel (row 0, column 16): its samples there centre on it,
    # within a pixel (offsets of 2 pixels, 32 samples).
    centre = (loc[0, 16, :, 0] * torch.tensor([150, 100])).mean((0, 1))
    torch.testing.assert_close(centre, torch.tensor([16.5, 0.5]), atol=1.0, rtol=0)


def test_decoder_inputs_have_the_case_queries_and_dtype():
    value, shapes, starts, loc, attn = make_inputs(CASES["small"], torch.bfloat16, "cpu")
    assert loc.shape == (2, 100, 8, 4, 4, 2) and attn.shape == (2, 100, 8, 4, 4)
    assert value.dtype == loc.dtype == attn.dtype == torch.bfloat16
    assert shapes.dtype == starts.dtype == torch.int64
    assert starts.tolist() == [0, 256, 320, 336]


def test_same_seed_same_inputs_other_seed_other_inputs():
    a = make_inputs(CASES["small"], torch.float32, "cpu", seed=3)
    b = make_inputs(CASES["small"], torch.float32, "cpu", seed=3)
    c = make_inputs(CASES["small"], torch.float32, "cpu", seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_default_cases_exist():
    for device, names in DEFAULT_CASES.items():
        assert set(names) <= set(CASES), device
    assert {"encoder-N2", "encoder-N8"} <= set(DEFAULT_CASES["cuda"])
