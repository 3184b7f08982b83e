"""The pixel-decoder benchmark: the two decoders it times compute the same thing, its check
catches one that does not, and its tables and memory probes hold what they claim."""

from __future__ import annotations

import pytest
import torch

from msdeformattn import bench
from msdeformattn.bench import pixel_decoder

pytest.importorskip("transformers")

SIZE = (32, 32)  # levels 8x8 (FPN), 4x4, 2x2, 1x1 (encoder): the full widths, in seconds


@pytest.fixture(scope="module")
def models():
    return pixel_decoder.decoders(torch.float32, "cpu")


def features():
    return pixel_decoder.backbone_maps(*SIZE, batch=2, dtype=torch.float32, device="cpu")


def test_the_decoders_are_the_issues_size(models):
    hf, ours = models["transformers"], models["msdeformattn"]
    assert ours.in_channels == [256, 512, 1024, 2048] and ours.d_model == ours.mask_dim == 256
    assert ours.num_fpn_levels == 1 and ours.n_levels == 3
    attn = ours.transformer.encoder.layers[0].self_attn
    assert (attn.n_heads, attn.n_points) == (8, 4)
    assert len(ours.transformer.encoder.layers) == len(hf.encoder.layers) == 6
    coco = pixel_decoder.backbone_maps(1024, 1024, 1, torch.float32, "cpu")
    assert [tuple(f.shape[-2:]) for f in coco] == [(256, 256), (128, 128), (64, 64), (32, 32)]
    # Every parameter random: the level embedding is not left uninitialised, the attention
    # weights not zero (which would sample at whole pixels with uniform weights).
    assert hf.level_embed.abs().max() < 1
    assert hf.encoder.layers[0].self_attn.attention_weights.weight.abs().min() > 0


def test_the_two_agree_on_outputs_and_gradients(models):
    diff = pixel_decoder.agreement(models, features())
    assert set(diff) == {"outputs", "backbone-map gradients"}
    for err, scale in diff.values():
        assert 0 <= err < 1e-6 * scale and scale > 0.1


@pytest.mark.parametrize(
    ("weight", "perturb"),
    [
        # every sample of one encoder layer half a pixel off
        ("transformer.encoder.layers.2.self_attn.sampling_offsets.bias", lambda w: w.add_(0.5)),
        # one NaN channel of the mask features: NaN is not <= any tolerance
        ("mask_features.bias", lambda w: w[0].fill_(float("nan"))),
    ],
    ids=["half-pixel", "nan"],
)
def test_a_perturbed_weight_fails_the_check(models, weight, perturb):
    w = models["msdeformattn"].get_parameter(weight)
    saved = w.detach().clone()
    with torch.no_grad():
        perturb(w)
    try:
        with pytest.raises(RuntimeError, match="differ: max abs difference of the outputs"):
            pixel_decoder.agreement(models, features())
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_the_training_step_fills_every_gradient(models):
    feats = features()
    for model in models.values():
        outs = pixel_decoder.steps(model, feats)["train"]()
        assert [tuple(o.shape) for o in outs] == [
            (2, 256, 8, 8),
            (2, 256, 1, 1),
            (2, 256, 2, 2),
            (2, 256, 4, 4),
        ]
        assert all(p.grad is not None for p in model.parameters())
        assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_the_command_prints_both_tables(capsys):
    bench.main(["--pixel-decoder", "--image-size", *map(str, SIZE), "--min-run-time", "0.01"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("device=cpu dtype=float32 torch=")
    assert out[0].endswith(" image=32x32 batch=1")
    assert out[1].startswith("max abs difference, ours vs transformers (of the largest ")
    assert " outputs " in out[1] and " gradients " in out[1]
    peaks = {}
    for label in ("forward", "train step"):
        header = f"| pixel decoder {label} (32x32, batch 1) | s | speed-up | peak extra MiB |"
        i = out.index(header)
        ours, hf = out[i + 2].split(" | "), out[i + 3].split(" | ")
        assert ours[0] == "| msdeformattn" and hf[0] == "| transformers"
        assert float(ours[1]) > 0 and float(ours[2].rstrip("x")) > 0 and hf[2] == "1.00x"
        peaks[label] = [int(row.rstrip(" |").split(" | ")[-1]) for row in out[i + 2 : i + 4]]
    # The fresh-process probes see the 23 MiB of gradients a training step allocates
    # (zero_grad(set_to_none) frees them), which no forward does.
    grads = sum(p.numel() * 4 for p in pixel_decoder.transformers_decoder().parameters())
    assert min(peaks["train step"]) >= grads // 2**20 > max(peaks["forward"])


def test_other_dtypes_are_refused():
    with pytest.raises(ValueError, match="runs float32 or float64"):
        pixel_decoder.benchmark(*SIZE, 0.01, dtype="bfloat16")
