"""End to end: the full-size detector against transformers' DeformableDetrForObjectDetection.

Inference (:func:`inference_benchmark`) and one training step (:func:`train_step_benchmark`)
of the paper's preset (ResNet-50, 6+6 layers, 300 queries), both models with the same
seeded random weights (ours converted from transformers') and the same inputs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import torch

from ..deploy import swap_into_transformers
from ..models import DeformableDETR
from ..train.build import build_criterion
from ..train.config import TrainConfig
from .memory import probe_in_fresh_process
from .tables import versus_transformers
from .timing import median_time


def full_size_transformers_model(**config: Any) -> torch.nn.Module:
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


def inference_benchmark(height: int, width: int, min_run_time: float, onnx: bool = False) -> str:
    """Seconds of one inference on a (1, 3, height, width) image: ours, transformers', and
    transformers' with our operator swapped in (and, with ``onnx``, ours in onnxruntime)."""
    hf = full_size_transformers_model().eval()
    ours, report = DeformableDETR.from_transformers(hf, output_loading_info=True)
    if not report.exact:
        raise RuntimeError(f"weights did not convert exactly: {report}")
    image = torch.randn(1, 3, height, width)
    mask = torch.zeros(1, height, width, dtype=torch.bool)

    def run_ours():
        with torch.no_grad():
            return ours(image, mask)

    def run_hf():
        with torch.no_grad():
            return hf(pixel_values=image, pixel_mask=(~mask).long())

    torch.testing.assert_close(run_ours()["pred_boxes"], run_hf().pred_boxes, atol=1e-4, rtol=1e-3)
    seconds = {
        "msdeformattn": median_time(run_ours, min_run_time),
        "transformers": median_time(run_hf, min_run_time),
    }
    swap_into_transformers(hf)
    seconds["transformers + swap_into_transformers"] = median_time(run_hf, min_run_time)
    if onnx:
        import onnxruntime

        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/detector.onnx"
            torch.onnx.export(ours, (image, mask), path, input_names=["images", "mask"])
            session = onnxruntime.InferenceSession(path)
        feed = {"images": image.numpy(), "mask": mask.numpy()}
        seconds["onnxruntime (exported msdeformattn)"] = median_time(
            lambda: session.run(None, feed), min_run_time
        )
    columns = ["model", "inference s", "speed-up over transformers"]
    return versus_transformers(columns, seconds, digits=3)


def train_step(which: str, height: int, width: int) -> Callable[[], torch.Tensor]:
    """One training step (forward, set loss, backward) of ``which`` model ("msdeformattn"
    or "transformers") with auxiliary losses; returns the loss.

    Two images, four boxes each; dropout off in both so the two compute the same loss.
    """
    hf = full_size_transformers_model(auxiliary_loss=True, dropout=0.0, num_labels=91).train()
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
    """Seconds and peak extra bytes of one training step on two (3, height, width) images,
    ours vs transformers; raises if the two disagree on the loss."""
    seconds, peaks, losses = {}, {}, {}
    for name in ("msdeformattn", "transformers"):
        step = train_step(name, height, width)
        losses[name] = step().item()  # also the warm-up
        seconds[name] = median_time(step, min_run_time)
        del step
        peaks[name] = probe_in_fresh_process(
            ["--train-step-memory-probe", name, "--image-size", str(height), str(width)]
        )
    # Same weights, inputs and loss definition: the same loss, or the timing compares nothing.
    if abs(losses["msdeformattn"] - losses["transformers"]) > 1e-3 * abs(losses["transformers"]):
        raise RuntimeError(f"the two models disagree on the loss: {losses}")
    columns = [
        f"detector train step ({height}x{width}, batch 2)",
        "s",
        "speed-up",
        "peak extra MiB",
    ]
    return versus_transformers(columns, seconds, digits=2, peak_bytes=peaks)
