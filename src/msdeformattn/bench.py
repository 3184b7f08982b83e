"""Benchmark: every available backend beside the peers, on detector-shaped inputs.

    python -m msdeformattn.bench                    # default cases, float32
    python -m msdeformattn.bench --cases decoder-N2 --dtype bfloat16

Peers: the grid_sample formulation (always), and whichever of transformers,
torch-ms-deform-attn and deformops (Python >= 3.12) are installed. Each
contender's float32 output is checked against the float64 formula before it
is timed; one that disagrees (or raises) is left out of the table with a
message.

Times forward (no grad) and forward+backward with ``torch.utils.benchmark``
(medians), prints speed-ups over the grid_sample formulation that the
reference implementation and Hugging Face transformers use, and the peak
extra memory of one forward+backward (on the CPU: the growth of the peak RSS
of a fresh process; on CUDA: ``max_memory_allocated``).

Inputs are shaped like a trained model's: encoder queries sample around
their own pixel, decoder queries around random points, offsets of a few
pixels, attention weights a softmax over each head's L*P points.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import msdeformattn

COCO_LEVELS = ((100, 150), (50, 75), (25, 38), (13, 19))


@dataclass(frozen=True)
class Case:
    name: str
    N: int
    levels: tuple[tuple[int, int], ...]
    #: None: one query per pixel of every level (the encoder).
    Lq: int | None
    M: int = 8
    D: int = 32
    P: int = 4


CASES = {
    c.name: c
    for c in (
        Case("encoder-N1", 1, COCO_LEVELS, None),
        Case("encoder-N2", 2, COCO_LEVELS, None),
        Case("encoder-N8", 8, COCO_LEVELS, None),
        Case("decoder-N2", 2, COCO_LEVELS, 300),
        Case("decoder-N8", 8, COCO_LEVELS, 300),
        Case("small", 2, ((16, 16), (8, 8), (4, 4), (2, 2)), 100),
    )
}
DEFAULT_CASES = {
    "cpu": ("encoder-N1", "encoder-N2", "decoder-N2", "small"),
    "cuda": ("encoder-N2", "encoder-N8", "decoder-N2", "decoder-N8"),
}


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int = 0):
    """(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(case.levels, dtype=torch.int64)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S = int(areas.sum())
    L = len(case.levels)
    if case.Lq is None:
        centres = []
        for h, w in case.levels:
            ys, xs = torch.meshgrid(
                (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij"
            )
            centres.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))
        ref = torch.cat(centres).expand(case.N, S, 2)
    else:
        ref = torch.rand(case.N, case.Lq, 2, generator=g)
    Lq = ref.shape[1]
    wh = shapes.flip(-1).to(torch.float32)  # (L, 2) as (W, H)
    offsets = 2.0 * torch.randn(case.N, Lq, case.M, L, case.P, 2, generator=g)
    loc = ref[:, :, None, None, None, :] + offsets / wh[None, None, None, :, None, :]
    logits = torch.randn(case.N, Lq, case.M, L * case.P, generator=g)
    attn = logits.softmax(-1).view(case.N, Lq, case.M, L, case.P)
    value = torch.randn(case.N, S, case.M, case.D, generator=g)
    return tuple(
        t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        for t in (value, shapes, starts, loc, attn)
    )


def grid_sample_formulation(value, spatial_shapes, level_start_index, loc, attn):
    """The pure-PyTorch path of the reference implementation and of transformers, restated."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    sizes = [h * w for h, w in spatial_shapes.tolist()]
    grids = 2 * loc - 1
    sampled = []
    for l, (v, (h, w)) in enumerate(
        zip(value.split(sizes, dim=1), spatial_shapes.tolist(), strict=True)
    ):
        v = v.flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        grid = grids[:, :, :, l].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    weights = attn.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()


def _transformers_fn() -> Callable | None:
    """transformers' MultiScaleDeformableAttention (its pure-PyTorch path on the CPU)."""
    try:
        from transformers.models.deformable_detr.modeling_deformable_detr import (
            MultiScaleDeformableAttention,
        )
    except ImportError:
        return None
    module = MultiScaleDeformableAttention()

    def run(value, spatial_shapes, level_start_index, loc, attn):
        shapes_list = [tuple(s) for s in spatial_shapes.tolist()]
        return module(value, spatial_shapes, shapes_list, level_start_index, loc, attn, 64)

    return run


def _torch_ms_deform_attn_fn() -> Callable | None:
    """torch-ms-deform-attn's C++/OpenMP (CPU) and CUDA kernels."""
    try:
        import torch_ms_deform_attn
    except ImportError:
        return None

    def run(value, spatial_shapes, level_start_index, loc, attn):
        return torch_ms_deform_attn.ms_deform_attn(
            value, spatial_shapes, level_start_index, loc, attn, 64
        )

    return run


def _deformops_fn() -> Callable | None:
    """deformops' ``msda``, on the backend its own dispatch picks (Triton on CUDA)."""
    try:
        from deformops.registry import msda
    except (ImportError, SyntaxError):  # SyntaxError: it needs Python >= 3.12
        return None

    def run(value, spatial_shapes, level_start_index, loc, attn):
        return msda(value, spatial_shapes, level_start_index, loc, attn)

    return run


def contenders(device: str) -> dict[str, Callable]:
    """Name -> function with the operator's signature, ours first, then the peers."""
    fns: dict[str, Callable] = {}
    for name in msdeformattn.available_backends():

        def ours(*args, _name=name):
            return msdeformattn.ms_deform_attn(*args, backend=_name)

        probe = make_inputs(CASES["small"], torch.float32, device)
        backend = msdeformattn.ops.get_backend(name)
        args = (probe[0], probe[3], probe[4])
        # Only what backend=None could pick: not Triton's interpreter on the CPU.
        if backend.supports(*args) and not backend.dispatch_reasons(*args):
            fns[f"msdeformattn:{name}"] = ours
    fns["peer:grid_sample"] = grid_sample_formulation
    for name, make in (
        ("peer:transformers", _transformers_fn),
        ("peer:torch-ms-deform-attn", _torch_ms_deform_attn_fn),
        ("peer:deformops", _deformops_fn),
    ):
        fn = make()
        if fn is not None:
            fns[name] = fn
    return fns


#: How far a contender's output may be from the float64 formula, relative to
#: the output's largest magnitude: summation order only.
_AGREEMENT = {torch.float32: 1e-4, torch.float64: 1e-9}


def agreement_check(inputs) -> tuple[tuple, torch.Tensor]:
    """Inputs for :func:`disagreement` and the formula's output on them.

    float32 copies of the inputs (float64 for a float64 run), and our reference
    backend run on them in float64. The check is for layout and formula errors
    (x and y swapped, a transposed output), not for the precision of a
    low-precision run, which the half-precision tests cover.
    """
    wide = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
    check = tuple(t.to(wide) if t.is_floating_point() else t for t in inputs)
    exact = tuple(t.double() if t.is_floating_point() else t for t in check)
    with torch.no_grad():
        return check, msdeformattn.ms_deform_attn(*exact, backend="reference")


def disagreement(fn: Callable, check, expected: torch.Tensor) -> str | None:
    """Why ``fn``'s output on ``check`` is not ``expected`` (None if it is), or its error."""
    try:
        with torch.no_grad():
            out = fn(*check)
        # A CUDA kernel's fault surfaces at the next synchronisation: here, not later.
        _sync(out.device.type)
    except Exception as e:  # a peer's own refusal: report it, time the rest
        return f"raised {type(e).__name__}: {e}"
    if out.shape != expected.shape:
        return f"output shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
    tol = _AGREEMENT[check[0].dtype]
    err = (out.double() - expected).abs().max().item() if out.numel() else 0.0
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    if not err <= tol * scale:  # also catches NaN
        return f"max abs difference {err:.3g} from the formula (allowed {tol * scale:.3g})"
    return None


def _fwd(fn, inputs):
    with torch.no_grad():
        fn(*inputs)


def _fwd_bwd(fn, inputs, grad):
    # autograd.grad, not backward(): accumulating into .grad would time an extra add.
    value, _, _, loc, attn = inputs
    torch.autograd.grad(fn(*inputs), (value, loc, attn), grad)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _with_grad(inputs):
    value, shapes, starts, loc, attn = inputs
    return (
        value.clone().requires_grad_(),
        shapes,
        starts,
        loc.clone().requires_grad_(),
        attn.clone().requires_grad_(),
    )


def time_case(fn, inputs, min_run_time: float) -> tuple[float, float]:
    """Median seconds of forward and of forward+backward."""
    inputs = _with_grad(inputs)
    grad = torch.randn_like(fn(*inputs))
    for _ in range(2):  # warm-up: compilation, caches, allocator
        _fwd_bwd(fn, inputs, grad)
    # Timer runs on one thread unless told otherwise.
    threads = torch.get_num_threads()
    fwd = benchmark.Timer(
        "f(fn, x)", globals={"f": _fwd, "fn": fn, "x": inputs}, num_threads=threads
    )
    fb = benchmark.Timer(
        "f(fn, x, g)",
        globals={"f": _fwd_bwd, "fn": fn, "x": inputs, "g": grad},
        num_threads=threads,
    )
    return (
        fwd.blocked_autorange(min_run_time=min_run_time).median,
        fb.blocked_autorange(min_run_time=min_run_time).median,
    )


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_probe(case_name: str, contender: str, dtype: str, device: str) -> int:
    """Peak extra bytes of one forward+backward, after one warm-up on a small case."""
    fn = contenders(device)[contender]
    dt = getattr(torch, dtype)
    small = _with_grad(make_inputs(CASES["small"], dt, device))
    _fwd_bwd(fn, small, torch.ones_like(fn(*small)))  # loads kernels: their code is not counted
    inputs = _with_grad(make_inputs(CASES[case_name], dt, device))
    with torch.no_grad():
        grad = torch.ones_like(fn(*inputs))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _fwd_bwd(fn, inputs, grad)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _peak_of(lambda: _fwd_bwd(fn, inputs, grad))


def peak_memory(case_name: str, contender: str, dtype: str, device: str) -> int:
    """Run :func:`peak_memory_probe` in a fresh process, so earlier peaks don't count."""
    return _probe_subprocess(["--memory-probe", case_name, contender, dtype, device])


def _result_bytes(inputs) -> int:
    """Bytes of what a forward+backward must return: the output and three gradients."""
    value, _, _, loc, attn = inputs
    N, _, M, D = value.shape
    out = N * loc.shape[1] * M * D * value.element_size()
    return out + sum(t.numel() * t.element_size() for t in (value, loc, attn))


def run(cases, dtype: str, device: str, min_run_time: float, memory: bool) -> list[dict]:
    rows = []
    fns = contenders(device)
    for case_name in cases:
        case = CASES[case_name]
        inputs = make_inputs(case, getattr(torch, dtype), device)
        check, expected = agreement_check(inputs)
        base = None
        for name, fn in fns.items():
            why = disagreement(fn, check, expected)
            if why is not None:
                print(f"{case_name}: {name} left out: {why}", file=sys.stderr, flush=True)
                continue
            t_f, t_fb = time_case(fn, inputs, min_run_time)
            if name == "peer:grid_sample":
                base = (t_f, t_fb)
            mem = peak_memory(case_name, name, dtype, device) if memory else None
            rows.append(
                dict(
                    fwd_gbps=_moved_bytes(inputs, False) / t_f / 1e9,
                    fwd_bwd_gbps=_moved_bytes(inputs, True) / t_fb / 1e9,
                    case=case_name,
                    contender=name,
                    fwd_s=t_f,
                    fwd_bwd_s=t_fb,
                    peak_bytes=mem,
                    workspace_bytes=None if mem is None else mem - _result_bytes(inputs),
                )
            )
        for r in rows:
            if r["case"] == case_name and base:
                r["speedup_fwd"] = base[0] / r["fwd_s"]
                r["speedup_fwd_bwd"] = base[1] / r["fwd_bwd_s"]
        _sync(device)
    return rows


def _moved_bytes(inputs, backward: bool) -> int:
    """Bytes a fused kernel must move at least: inputs and output (and the gradients)."""
    value, _, _, loc, attn = inputs
    once = sum(t.numel() * t.element_size() for t in (value, loc, attn))
    out = _result_bytes(inputs) - once
    return 2 * once + 2 * out if backward else once + out


def copy_bandwidth(device: str) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a 1 GiB tensor)."""
    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = benchmark.Timer("d.copy_(s)", globals={"d": dst, "s": src}).blocked_autorange(
        min_run_time=0.5
    )
    return 2 * src.numel() * src.element_size() / t.median


def format_table(rows: list[dict], bandwidth: bool = False) -> str:
    """Markdown table; with ``bandwidth``, the achieved GB/s of the minimal traffic."""
    cols = [
        "case",
        "contender",
        "forward ms",
        "x grid_sample",
        "fwd+bwd ms",
        "x grid_sample",
        "peak extra MiB",
        "workspace MiB",
    ]
    if bandwidth:
        cols += ["fwd GB/s", "fwd+bwd GB/s"]

    def mib(b):
        # A workspace a few pages below zero is the RSS's granularity: show 0.
        return "-" if b is None else f"{max(b, 0) / 2**20:.0f}"

    def speedup(r, key):  # "-" when the baseline itself was left out
        return f"{r[key]:.1f}x" if key in r else "-"

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [
            r["case"],
            r["contender"],
            f"{r['fwd_s'] * 1e3:.2f}",
            speedup(r, "speedup_fwd"),
            f"{r['fwd_bwd_s'] * 1e3:.2f}",
            speedup(r, "speedup_fwd_bwd"),
            mib(r["peak_bytes"]),
            mib(r["workspace_bytes"]),
        ]
        if bandwidth:
            cells += [f"{r['fwd_gbps']:.0f}", f"{r['fwd_bwd_gbps']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _full_size_transformers_model(**config):
    """transformers' DeformableDetrForObjectDetection with the paper's sizes and its own
    ResNet-50 (no timm, no download), seeded random weights; ``config``: more fields."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    backbone = ResNetConfig(
        depths=[3, 4, 6, 3],
        hidden_sizes=[256, 512, 1024, 2048],
        layer_type="bottleneck",
        out_features=["stage2", "stage3", "stage4"],
    )
    torch.manual_seed(0)
    return DeformableDetrForObjectDetection(
        DeformableDetrConfig(
            use_timm_backbone=False,
            backbone_config=backbone,
            backbone=None,
            use_pretrained_backbone=False,
            **config,
        )
    )


def detector_benchmark(height: int, width: int, min_run_time: float, onnx: bool = False) -> str:
    """Full-size Deformable DETR inference (ResNet-50, 6+6 layers, 300 queries), ours vs
    transformers' DeformableDetrForObjectDetection with the same (random) weights."""
    from .models import DeformableDETR

    hf = _full_size_transformers_model().eval()
    ours, report = DeformableDETR.from_transformers(hf, output_loading_info=True)
    if not report.exact:
        raise RuntimeError(f"weights did not convert exactly: {report}")
    image = torch.randn(1, 3, height, width)
    mask = torch.zeros(1, height, width, dtype=torch.bool)
    threads = torch.get_num_threads()

    def run_ours():
        with torch.no_grad():
            return ours(image, mask)

    def run_hf():
        with torch.no_grad():
            return hf(pixel_values=image, pixel_mask=(~mask).long())

    torch.testing.assert_close(run_ours()["pred_boxes"], run_hf().pred_boxes, atol=1e-4, rtol=1e-3)
    contenders = {"msdeformattn": run_ours, "transformers": run_hf}
    times = {}

    def measure(name, fn):
        timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=threads)
        times[name] = timer.blocked_autorange(min_run_time=min_run_time).median

    for name, fn in contenders.items():
        measure(name, fn)
    # The same transformers model with our operator swapped in.
    from .deploy import swap_into_transformers

    swap_into_transformers(hf)
    measure("transformers + swap_into_transformers", run_hf)
    if onnx:
        import tempfile

        import onnxruntime

        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/detector.onnx"
            torch.onnx.export(ours, (image, mask), path, input_names=["images", "mask"])
            session = onnxruntime.InferenceSession(path)
        feed = {"images": image.numpy(), "mask": mask.numpy()}
        measure("onnxruntime (exported msdeformattn)", lambda: session.run(None, feed))
    lines = ["| model | inference s | speed-up over transformers |", "|---|---|---|"]
    for name, t in times.items():
        lines.append(f"| {name} | {t:.3f} | {times['transformers'] / t:.2f}x |")
    return "\n".join(lines)


def _detector_train_step(which: str, height: int, width: int):
    """One training step (forward, set loss, backward) of the full preset (ResNet-50, 6+6
    layers, 300 queries, auxiliary losses), ours or transformers', same weights and inputs.

    Two images, four boxes each; dropout off in both so the two compute the same loss.
    """
    from .models import DeformableDETR
    from .train.build import build_criterion
    from .train.config import TrainConfig

    hf = _full_size_transformers_model(auxiliary_loss=True, dropout=0.0, num_labels=91).train()
    ours = DeformableDETR.from_transformers(hf).train()
    # transformers weighs the class loss and cost 1 where the reference uses 2: use its values.
    criterion = build_criterion(ours.config, TrainConfig(cls_loss_coef=1.0, set_cost_class=1.0))
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, height, width, generator=g)
    mask = torch.zeros(2, height, width, dtype=torch.bool)
    targets = [
        {
            "labels": torch.randint(0, 91, (4,), generator=g),
            "boxes": torch.rand(4, 2, generator=g) * 0.5 + 0.25,
        }
        for _ in range(2)
    ]
    for t in targets:
        t["boxes"] = torch.cat([t["boxes"], torch.full((4, 2), 0.2)], 1)
    hf_labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]

    def step_ours():
        loss = criterion.weighted_sum(criterion(ours(images, mask), targets))
        loss.backward()
        return loss

    def step_hf():
        loss = hf(pixel_values=images, pixel_mask=(~mask).long(), labels=hf_labels).loss
        loss.backward()
        return loss

    return {"msdeformattn": step_ours, "transformers": step_hf}[which]


def train_step_benchmark(height: int, width: int, min_run_time: float) -> str:
    """Time and peak memory of one training step of the full preset, ours vs transformers."""
    threads = torch.get_num_threads()
    rows = [
        f"| detector train step ({height}x{width}, batch 2) | s | speed-up | peak extra MiB |",
        "|---|---|---|---|",
    ]
    times, mems = {}, {}
    losses = {}
    for name in ("msdeformattn", "transformers"):
        step = _detector_train_step(name, height, width)
        losses[name] = step().item()
        timer = benchmark.Timer("f()", globals={"f": step}, num_threads=threads)
        times[name] = timer.blocked_autorange(min_run_time=min_run_time).median
        del step
        mems[name] = _probe_subprocess(
            ["--train-step-memory-probe", name, "--image-size", str(height), str(width)]
        )
    # Same weights, inputs and loss definition: the same loss, or the timing compares nothing.
    if abs(losses["msdeformattn"] - losses["transformers"]) > 1e-3 * abs(losses["transformers"]):
        raise RuntimeError(f"the two models disagree on the loss: {losses}")
    for name in times:
        rows.append(
            f"| {name} | {times[name]:.2f} | {times['transformers'] / times[name]:.2f}x "
            f"| {mems[name] / 2**20:.0f} |"
        )
    return "\n".join(rows)


def _encoder_layer_step(which: str):
    """One training step (forward + backward) of a COCO-size encoder layer, ours or transformers'.

    Same weights in both (transformers' layer, copied into ours by name);
    one image, Lq = S = 20,197, d_model 256, 8 heads, 4 levels, 4 points.
    """
    from transformers import DeformableDetrConfig
    from transformers.models.deformable_detr.modeling_deformable_detr import (
        DeformableDetrEncoderLayer,
    )

    from .nn import DeformableTransformerEncoder, DeformableTransformerEncoderLayer

    torch.manual_seed(0)
    hf = DeformableDetrEncoderLayer(DeformableDetrConfig(dropout=0.0)).train()
    ours = DeformableTransformerEncoderLayer(dropout=0.0).train()
    rename = {
        "self_attn_layer_norm": "norm1",
        "mlp.fc1": "linear1",
        "mlp.fc2": "linear2",
        "final_layer_norm": "norm2",
    }
    state = {}
    for k, v in hf.state_dict().items():
        for a, b in rename.items():
            k = k.replace(a, b)
        state[k] = v
    ours.load_state_dict(state)
    shapes = torch.tensor(COCO_LEVELS)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S = int(areas.sum())
    g = torch.Generator().manual_seed(1)
    src = torch.randn(1, S, 256, generator=g, requires_grad=True)
    pos = torch.randn(1, S, 256, generator=g)
    ref = DeformableTransformerEncoder.get_reference_points(COCO_LEVELS, torch.ones(1, 4, 2), "cpu")
    valid = torch.ones(1, S, dtype=torch.bool)

    def step_ours():
        ours(src, pos, ref, shapes, starts).sum().backward()

    def run_hf():
        out = hf(
            src,
            valid,
            spatial_position_embeddings=pos,
            reference_points=ref,
            spatial_shapes=shapes,
            spatial_shapes_list=list(COCO_LEVELS),
            level_start_index=starts,
        )
        return out[0] if isinstance(out, tuple) else out

    def step_hf():
        run_hf().sum().backward()

    with torch.no_grad():
        got = ours(src, pos, ref, shapes, starts)
        expected = run_hf()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    return {"msdeformattn": step_ours, "transformers": step_hf}[which]


def encoder_benchmark(min_run_time: float) -> str:
    threads = torch.get_num_threads()
    rows = [
        "| encoder layer (train step) | fwd+bwd s | speed-up | peak extra MiB |",
        "|---|---|---|---|",
    ]
    times, mems = {}, {}
    for name in ("msdeformattn", "transformers"):
        step = _encoder_layer_step(name)
        step()
        timer = benchmark.Timer("f()", globals={"f": step}, num_threads=threads)
        times[name] = timer.blocked_autorange(min_run_time=min_run_time).median
        mems[name] = _probe_subprocess(["--encoder-memory-probe", name])
    for name in times:
        rows.append(
            f"| {name} | {times[name]:.3f} | {times['transformers'] / times[name]:.2f}x "
            f"| {mems[name] / 2**20:.0f} |"
        )
    return "\n".join(rows)


def _peak_of(fn) -> int:
    """Peak RSS growth while fn runs (Linux): clear_refs "5" resets VmHWM to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - base


def _probe_subprocess(args: list[str]) -> int:
    cmd = [sys.executable, "-m", "msdeformattn.bench", *args]
    if torch.are_deterministic_algorithms_enabled():
        cmd.append("--deterministic")
    # A fixed mmap threshold makes glibc return every large block to the
    # system when freed, so RSS follows the live allocations.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return int(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m msdeformattn.bench", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--cases",
        nargs="+",
        choices=sorted(CASES),
        help="default: " + "; ".join(f"{d}: {' '.join(c)}" for d, c in DEFAULT_CASES.items()),
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"]
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="under torch.use_deterministic_algorithms (warn_only: grid_sample's CUDA "
        "backward has no deterministic path); our triton backend then sorts instead of "
        "using atomics. Timings include the NaN fill torch then gives every empty tensor.",
    )
    p.add_argument(
        "--detector",
        action="store_true",
        help="time full-size detector inference against transformers instead",
    )
    p.add_argument(
        "--onnx",
        action="store_true",
        help="with --detector: also time the model exported to onnxruntime",
    )
    p.add_argument("--image-size", nargs=2, type=int, default=(640, 960), metavar=("H", "W"))
    p.add_argument(
        "--encoder",
        action="store_true",
        help="time a COCO-size encoder layer's training step against transformers",
    )
    p.add_argument(
        "--train-step",
        action="store_true",
        help="time one training step of the full detector (at --image-size) against transformers",
    )
    p.add_argument("--encoder-memory-probe", help=argparse.SUPPRESS)
    p.add_argument("--train-step-memory-probe", help=argparse.SUPPRESS)
    p.add_argument("--memory-probe", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        _main(args)
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _main(args: argparse.Namespace) -> None:
    if args.memory_probe:
        print(peak_memory_probe(*args.memory_probe))
        return
    if args.encoder_memory_probe:
        step = _encoder_layer_step(args.encoder_memory_probe)
        step()  # warm-up: kernels loaded, autograd buffers allocated once
        print(_peak_of(step))
        return
    if args.train_step_memory_probe:
        step = _detector_train_step(args.train_step_memory_probe, *args.image_size)
        step()
        print(_peak_of(step))
        return
    if args.train_step:
        print(f"device=cpu torch={torch.__version__} threads={torch.get_num_threads()}", flush=True)
        print(train_step_benchmark(*args.image_size, args.min_run_time))
        return
    if args.encoder:
        print(f"device=cpu torch={torch.__version__} threads={torch.get_num_threads()}", flush=True)
        print(encoder_benchmark(args.min_run_time))
        return
    if args.detector:
        print(
            f"device=cpu torch={torch.__version__} threads={torch.get_num_threads()} "
            f"image={args.image_size[0]}x{args.image_size[1]}",
            flush=True,
        )
        print(detector_benchmark(*args.image_size, args.min_run_time, args.onnx))
        return
    header = (
        f"device={args.device} dtype={args.dtype} torch={torch.__version__} "
        f"threads={torch.get_num_threads()}" + (" deterministic" if args.deterministic else "")
    )
    if args.device == "cuda":
        header += (
            f" gpu={torch.cuda.get_device_name()} "
            f"copy_bandwidth={copy_bandwidth(args.device) / 1e9:.0f}GB/s"
        )
    print(header, flush=True)
    cases = args.cases or DEFAULT_CASES[torch.device(args.device).type]
    rows = run(cases, args.dtype, args.device, args.min_run_time, not args.no_memory)
    print(format_table(rows, bandwidth=args.device == "cuda"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
