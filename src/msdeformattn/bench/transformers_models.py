"""End to end: transformers models with and without :func:`swap_into_transformers`.

One row per model family whose deformable attention the swap covers: the
family's default config with seeded random weights (no download), one image
at its image processor's default size, CPU inference timed before and after
the swap in the same process, outputs checked equal first.

    python -m msdeformattn.bench.transformers_models [--threads 2] [--rounds 3] [--only D-FINE ...]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import benchmark

from ..deploy import swap_into_transformers


def _swin_tiny(out_indices: list[int]) -> Any:
    """transformers' Swin-T (OmDet-Turbo's default is the same network from timm)."""
    from transformers import SwinConfig

    return SwinConfig(out_indices=out_indices)


def _resnet50() -> Any:
    """transformers' ResNet-50 (Deformable DETR's default is the same network from timm)."""
    from transformers import ResNetConfig

    return ResNetConfig(
        depths=[3, 4, 6, 3],
        hidden_sizes=[256, 512, 1024, 2048],
        layer_type="bottleneck",
        out_features=["stage2", "stage3", "stage4"],
    )


def _text_ids(length: int, vocab: int = 1000) -> torch.Tensor:
    return torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(2))


def _grounding_inputs(config: Any) -> dict[str, torch.Tensor]:
    return {"input_ids": _text_ids(8)}


def _omdet_inputs(config: Any) -> dict[str, torch.Tensor]:
    classes, length = 4, 6
    ids = torch.randint(1, 1000, (classes, length), generator=torch.Generator().manual_seed(2))
    return {
        "classes_input_ids": ids,
        "classes_attention_mask": torch.ones_like(ids),
        "tasks_input_ids": _text_ids(length),
        "tasks_attention_mask": torch.ones(1, length, dtype=torch.long),
        "classes_structure": torch.tensor([classes]),
    }


def _oneformer_inputs(config: Any) -> dict[str, torch.Tensor]:
    return {"task_inputs": _text_ids(config.task_seq_len)}


@dataclass(frozen=True)
class Family:
    """How to build one transformers family's model and call it."""

    name: str  # as in the table
    config: str  # transformers config class
    model: str  # transformers model class
    size: tuple[int, int]  # (H, W) of the image at the processor's default size
    outputs: tuple[str, ...]  # output fields compared before/after the swap
    config_defaults: dict[str, Any] = field(default_factory=dict)
    backbone: Callable[[], Any] | None = None  # backbone config replacing the default
    inputs: Callable[[Any], dict[str, torch.Tensor]] | None = None  # beside pixel_values


_DETECTION = ("logits", "pred_boxes")
_SEGMENTATION = ("class_queries_logits", "masks_queries_logits")
_RT = (640, 640)  # RT-DETR's processor: 640x640
_DETR = (800, 1066)  # shortest edge 800 of a 4:3 image

FAMILIES = {
    f.name: f
    for f in (
        Family(
            "Deformable DETR",
            "DeformableDetrConfig",
            "DeformableDetrForObjectDetection",
            _DETR,
            _DETECTION,
            config_defaults={"use_timm_backbone": False, "backbone": None},
            backbone=_resnet50,
        ),
        Family("RT-DETR", "RTDetrConfig", "RTDetrForObjectDetection", _RT, _DETECTION),
        Family("RT-DETRv2", "RTDetrV2Config", "RTDetrV2ForObjectDetection", _RT, _DETECTION),
        Family("D-FINE", "DFineConfig", "DFineForObjectDetection", _RT, _DETECTION),
        Family("DEIMv2", "Deimv2Config", "Deimv2ForObjectDetection", _RT, _DETECTION),
        # RF-DETR's ViT (patch 14, 4x4 windows) needs a multiple of 56: its default 560.
        Family("RF-DETR", "RfDetrConfig", "RfDetrForObjectDetection", (560, 560), _DETECTION),
        Family(
            "LW-DETR",
            "LwDetrConfig",
            "LwDetrForObjectDetection",
            _RT,
            _DETECTION,
            # The default has no feature level at all; one at stride 16 as LW-DETR-S.
            config_defaults={"projector_scale_factors": [1.0]},
        ),
        Family(
            "OmDet-Turbo",
            "OmDetTurboConfig",
            "OmDetTurboForObjectDetection",
            _RT,
            ("decoder_class_logits", "decoder_coord_logits"),
            # transformers' Swin returns (N, C, H, W), timm's (N, H, W, C) to be normalised.
            config_defaults={"apply_layernorm_after_vision_backbone": False},
            backbone=lambda: _swin_tiny([2, 3, 4]),
            inputs=_omdet_inputs,
        ),
        *(
            Family(
                f"PP-DocLayout{v}",
                f"PPDocLayout{v}Config",
                f"PPDocLayout{v}ForObjectDetection",
                (800, 800),
                _DETECTION,
                # V2's forward ranks its detections by class: one threshold per label.
                config_defaults={"class_thresholds": [0.5, 0.5], "class_order": [0, 1]}
                if v == "V2"
                else {},
            )
            for v in ("V2", "V3", "V4")
        ),
        Family(
            "Grounding DINO",
            "GroundingDinoConfig",
            "GroundingDinoForObjectDetection",
            _DETR,
            _DETECTION,
            inputs=_grounding_inputs,
        ),
        Family(
            "MM Grounding DINO",
            "MMGroundingDinoConfig",
            "MMGroundingDinoForObjectDetection",
            _DETR,
            _DETECTION,
            inputs=_grounding_inputs,
        ),
        Family(
            "Mask2Former",
            "Mask2FormerConfig",
            "Mask2FormerForUniversalSegmentation",
            _DETR,
            _SEGMENTATION,
        ),
        Family(
            "OneFormer",
            "OneFormerConfig",
            "OneFormerForUniversalSegmentation",
            _DETR,
            _SEGMENTATION,
            inputs=_oneformer_inputs,
        ),
    )
}


def build(
    family: Family, size: tuple[int, int] | None = None, **config: Any
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """``family``'s model in eval mode (seeded random weights) and its inputs for one image.

    ``config``: fields overriding the family's defaults; ``size``: (H, W) of the image.
    """
    import transformers

    fields = {**family.config_defaults, **config}
    if family.backbone is not None and "backbone_config" not in fields:
        fields["backbone_config"] = family.backbone()
    cfg = getattr(transformers, family.config)(**fields)
    torch.manual_seed(0)
    model = getattr(transformers, family.model)(cfg).eval()
    height, width = size or family.size
    inputs = {
        "pixel_values": torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(1))
    }
    if family.inputs is not None:
        inputs.update(family.inputs(cfg))
    return model, inputs


def run(model: torch.nn.Module, inputs: dict[str, torch.Tensor], fields: tuple[str, ...]):
    """The model's ``fields`` outputs, without gradients."""
    with torch.no_grad():
        out = model(**inputs)
    return tuple(getattr(out, f) for f in fields)


def speed_up(family: Family, rounds: int, tolerance: float = 1e-3) -> tuple[float, float]:
    """Median seconds of one inference before and after the swap, timed in alternation
    (``rounds`` of one run each, after one warm-up run each).

    The unswapped model is a copy kept aside; a module-level function the swap
    replaces is put back for its runs, so each round times both, one after the other.
    """
    model, inputs = build(family)
    original = copy.deepcopy(model)
    namespace = sys.modules[type(model).__module__]
    before_swap = dict(vars(namespace))
    swap_into_transformers(model)
    replaced = {k: v for k, v in vars(namespace).items() if before_swap.get(k) is not v}
    put_back = {k: before_swap[k] for k in replaced}

    def use(functions: dict[str, Any]) -> None:
        for k, v in functions.items():
            setattr(namespace, k, v)

    def once(m: torch.nn.Module) -> float:
        timer = benchmark.Timer(
            "run()",
            globals={"run": lambda: run(m, inputs, family.outputs)},
            num_threads=torch.get_num_threads(),
        )
        return timer.timeit(1).median

    use(put_back)
    before = run(original, inputs, family.outputs)  # warm-up, and the outputs to compare
    use(replaced)
    after = run(model, inputs, family.outputs)
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b, atol=tolerance, rtol=tolerance)
    seconds: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        use(put_back)
        seconds[0].append(once(original))
        use(replaced)
        seconds[1].append(once(model))
    return statistics.median(seconds[0]), statistics.median(seconds[1])


def float64_difference(family: Family) -> float:
    """Largest difference of the swapped model's outputs from the unswapped ones, in float64
    (where rounding cannot hide a real difference)."""
    model, inputs = build(family)
    model = model.double()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    namespace = sys.modules[type(model).__module__]
    saved = dict(vars(namespace))
    before = run(model, inputs, family.outputs)
    swap_into_transformers(model)
    after = run(model, inputs, family.outputs)
    for k, v in saved.items():  # module-level functions the swap replaced
        setattr(namespace, k, v)
    return max(float((a - b).abs().max()) for a, b in zip(after, before, strict=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two")
    parser.add_argument("--only", nargs="*", choices=list(FAMILIES), help="families to run")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="atol and rtol of the outputs check before timing (a large random float32 model "
        "amplifies rounding: OneFormer needs 1e-2; in float64 it agrees to 2e-14)",
    )
    parser.add_argument(
        "--float64-check",
        action="store_true",
        help="instead of timing: the largest output difference of the swap in float64",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.float64_check:
        for name in args.only or FAMILIES:
            print(f"{name}: {float64_difference(FAMILIES[name]):.2e}", flush=True)
        return
    import transformers

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{args.threads} threads, one image, random weights, medians of {args.rounds} "
        "alternating torch.utils.benchmark timings\n"
    )
    print("| family | image (H x W) | transformers s | with swap s | speed-up |")
    print("|---|---|---:|---:|---:|")
    for name in args.only or FAMILIES:
        family = FAMILIES[name]
        start = time.perf_counter()
        before, after = speed_up(family, args.rounds, args.tolerance)
        h, w = family.size
        print(
            f"| {name} | {h} x {w} | {before:.3f} | {after:.3f} | {before / after:.2f}x |",
            flush=True,
        )
        print(f"<!-- {name}: {time.perf_counter() - start:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
