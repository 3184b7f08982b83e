"""End to end: Mask2Former's pixel decoder against transformers' ``Mask2FormerPixelDecoder``.

The COCO-size decoder of issue 18: the backbone maps of a ResNet-50 (256/512/1024/2048
channels at strides 4/8/16/32, i.e. 256x256 to 32x32 for a 1024x1024 image), d_model and
mask features 256, 6 encoder layers over strides 8/16/32 with 8 heads and 4 points, FFN
1024, dropout 0. transformers' module with seeded random weights, ours converted from it
with :meth:`MSDeformAttnPixelDecoder.from_transformers`; outputs (and, after one training
step, the gradients of the backbone maps) checked equal before anything is timed.

Forward: one call under ``torch.no_grad()``. Training step: ``zero_grad``, forward, the sum
of every output (mask features and the three multi-scale maps), backward into the
parameters and the backbone maps (the backbone trains in Mask2Former).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..models import MSDeformAttnPixelDecoder
from .memory import peak_growth, probe_in_fresh_process
from .tables import versus_transformers
from .timing import median_time

#: ResNet-50's stage channels and strides, finest first
CHANNELS = (256, 512, 1024, 2048)
STRIDES = (4, 8, 16, 32)
MODES = ("forward", "train")
#: Largest difference allowed between the two, relative to the largest magnitude of
#: what is compared: float32 rounding through six encoder layers.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}


def transformers_decoder(seed: int = 0) -> torch.nn.Module:
    """transformers' Mask2FormerPixelDecoder at the issue's size, every parameter seeded
    random (standalone it leaves its level embedding uninitialised, and transformers'
    initialisation zeroes the attention weights: uniform attention at whole pixels)."""
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerPixelDecoder

    config = Mask2FormerConfig(
        feature_size=256,
        mask_feature_size=256,
        encoder_layers=6,
        encoder_feedforward_dim=1024,
        num_attention_heads=8,
        feature_strides=list(STRIDES),
        common_stride=STRIDES[0],
        dropout=0.0,
    )
    decoder = Mask2FormerPixelDecoder(config, feature_channels=list(CHANNELS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in decoder.parameters():
            # Matrices: unit-scale activations; vectors (biases, norms' affine): as the tests'.
            std = p[0].numel() ** -0.5 if p.dim() > 1 else 0.2
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return decoder


def backbone_maps(
    height: int, width: int, batch: int, dtype: torch.dtype, device: str, seed: int = 1
) -> list[torch.Tensor]:
    """Random backbone maps of ``batch`` (height, width) images, finest first, requiring grad."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, c, -(-height // s), -(-width // s), generator=g)
        .to(device=device, dtype=dtype)
        .requires_grad_()
        for c, s in zip(CHANNELS, STRIDES, strict=True)
    ]


def _outputs(out) -> list[torch.Tensor]:
    """Mask features, then the encoder's maps coarsest first, from either decoder's output."""
    return [out.mask_features, *out.multi_scale_features]


def decoders(dtype: torch.dtype, device: str) -> dict[str, torch.nn.Module]:
    """{"msdeformattn": ours, "transformers": theirs}, same weights, train mode."""
    hf = transformers_decoder().to(device=device, dtype=dtype)
    ours, report = MSDeformAttnPixelDecoder.from_transformers(hf, output_loading_info=True)
    if not report.exact:
        raise RuntimeError(f"weights did not convert exactly: {report}")
    return {"msdeformattn": ours.train(), "transformers": hf.train()}


def _free_gradients(model: torch.nn.Module, feats: list[torch.Tensor]) -> None:
    """``zero_grad(set_to_none=True)`` of the model and the backbone maps."""
    model.zero_grad(set_to_none=True)
    for f in feats:
        f.grad = None


def steps(
    model: torch.nn.Module, feats: list[torch.Tensor]
) -> dict[str, Callable[[], list[torch.Tensor]]]:
    """{"forward": no-grad call, "train": training step}, each returning the outputs."""

    def forward():
        with torch.no_grad():
            return _outputs(model(feats))

    def train():
        _free_gradients(model, feats)
        outs = _outputs(model(feats))
        sum(o.sum() for o in outs).backward()
        return outs

    return {"forward": forward, "train": train}


def _max_difference(got: list[torch.Tensor], expected: list[torch.Tensor]) -> tuple[float, float]:
    """The largest absolute difference (NaN if any is), and the largest magnitude of
    ``expected``."""
    pairs = zip(got, expected, strict=True)
    err = torch.stack([(g.double() - e.double()).abs().max() for g, e in pairs]).max()
    return err.item(), max(e.abs().max().item() for e in expected)


def agreement(
    models: dict[str, torch.nn.Module], feats: list[torch.Tensor]
) -> dict[str, tuple[float, float]]:
    """(max abs difference, largest magnitude) between ours and transformers' "outputs"
    and "backbone-map gradients" (one training step each, which is also the warm-up);
    raises beyond :data:`TOLERANCE` or on NaN."""
    outs, grads = {}, {}
    for which, model in models.items():
        run = steps(model, feats)
        run["train"]()
        grads[which] = [f.grad.clone() for f in feats]
        outs[which] = run["forward"]()
    tol = TOLERANCE[feats[0].dtype]
    result = {}
    for name, pair in (("outputs", outs), ("backbone-map gradients", grads)):
        err, scale = _max_difference(pair["msdeformattn"], pair["transformers"])
        if not err <= tol * max(scale, 1.0):
            raise RuntimeError(
                f"ours and transformers' pixel decoders differ: max abs difference of the "
                f"{name} {err:.3g} (largest magnitude {scale:.3g})"
            )
        result[name] = err, scale
    return result


def memory_probe(
    which: str,
    mode: str,
    height: int,
    width: int,
    batch: int = 1,
    dtype: str = "float32",
    device: str = "cpu",
) -> int:
    """Peak extra bytes of one ``mode`` call of ``which`` decoder, after one warm-up call:
    the models and inputs already allocated, the gradients not (a training step's peak
    holds them)."""
    dt = getattr(torch, dtype)
    model = decoders(dt, device)[which]
    feats = backbone_maps(height, width, batch, dt, device)
    run = steps(model, feats)[mode]
    run()
    _free_gradients(model, feats)
    return peak_growth(run, device)


def benchmark(
    height: int,
    width: int,
    min_run_time: float,
    batch: int = 1,
    dtype: str = "float32",
    device: str = "cpu",
    memory: bool = True,
) -> str:
    """The agreement line, then one table per mode: seconds, speed-up over transformers'
    and (with ``memory``) peak extra MiB, each measured in a fresh process."""
    dt = getattr(torch, dtype)
    if dt not in TOLERANCE:
        raise ValueError(f"the pixel-decoder benchmark runs float32 or float64, got {dtype}")
    models = decoders(dt, device)
    feats = backbone_maps(height, width, batch, dt, device)
    diff = agreement(models, feats)
    seconds = {mode: {} for mode in MODES}
    for which, model in models.items():
        for mode, run in steps(model, feats).items():
            seconds[mode][which] = median_time(run, min_run_time)
    lines = [
        "max abs difference, ours vs transformers (of the largest magnitude): "
        + ", ".join(f"{name} {err:.2g} (of {scale:.2g})" for name, (err, scale) in diff.items())
    ]
    for mode, label in zip(MODES, ("forward", "train step"), strict=True):
        peaks = None
        if memory:
            args = ["--image-size", str(height), str(width), "--batch", str(batch)]
            args += ["--dtype", dtype, "--device", device]
            peaks = {
                which: probe_in_fresh_process(["--pixel-decoder-memory-probe", which, mode, *args])
                for which in models
            }
        columns = [
            f"pixel decoder {label} ({height}x{width}, batch {batch})",
            "s",
            "speed-up",
            "peak extra MiB",
        ]
        table = versus_transformers(columns[: 4 if memory else 3], seconds[mode], 3, peaks)
        lines += ["", table]
    return "\n".join(lines)
