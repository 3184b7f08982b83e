"""The ``msdeformattn`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch

from .train.config import PRESETS
from .util.errors import UsageError

__all__ = ["main"]


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _fraction(text: str) -> float:
    """A float strictly between 0 and 1 (an EMA decay)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a float, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """Flag mistakes in one line (the usage is one ``--help`` away), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: CUDA when available)")


def _task_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task",
        choices=["detection", "segmentation"],
        default="detection",
        help="detection (COCO boxes, the default) or semantic segmentation (images/ and "
        "annotations/ folders of class-index PNGs)",
    )


def _export(args: argparse.Namespace) -> None:
    from .deploy import export_onnx, export_program, min_image_size

    model, _, _ = _load_model(args.checkpoint)
    low = min_image_size(model)
    if min(args.image_size) < low:
        raise UsageError(f"--image-size: each side must be at least {low} for this model")
    export = export_onnx if args.onnx else export_program
    export(model, args.output, tuple(args.image_size))
    print(f"wrote {args.output} (images of any size from {low} to 4096 px, batch up to 64)")


def _train_config(args: argparse.Namespace, base):
    from .train.config import TrainConfig, load_json_config

    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(TrainConfig)}
    return load_json_config(TrainConfig, args.config, base, **flags)


def _model_config(args: argparse.Namespace, base):
    from .models import DeformableDETRConfig
    from .train.config import load_json_config

    flags = {
        # The reference's two-stage model always refines its boxes.
        "with_box_refine": args.with_box_refine or args.two_stage or None,
        "two_stage": args.two_stage or None,
        "backbone_norm": args.backbone_norm,
    }
    return load_json_config(DeformableDETRConfig, args.model_config, base, **flags)


def _train(args: argparse.Namespace) -> None:
    from .models import DeformableDETR
    from .models.convert import load_backbone_weights
    from .train.config import PRESETS
    from .train.loop import checked_dataset, train

    data = Path(args.data)
    if args.overwrite and args.resume:
        raise UsageError("--resume continues a run, --overwrite replaces it: pass one")
    checked = checked_dataset(data)
    num_classes = len(checked.cleaned["val"]["categories"])
    model = None
    if args.resume:
        model_config, cfg = None, _resumed_config(args)
    else:
        # An initialisation from published weights fine-tunes with the paper's recipe.
        preset = PRESETS[args.model or ("deformable-detr" if args.init else "tiny")]
        cfg = _train_config(args, preset.train)
        if args.init:
            try:
                model, report = DeformableDETR.from_pretrained(
                    args.init, num_classes=num_classes, output_loading_info=True
                )
            except ValueError as e:
                raise UsageError(f"--init: {e}") from None
            print(f"initialised from {args.init}: {report}")
            model_config = _model_config(args, model.config)
            if model_config != model.config:
                raise UsageError(
                    "--init: the model comes from SOURCE; --model-config and model "
                    "flags cannot change it"
                )
        else:
            model_config = _model_config(args, preset.model(num_classes))
        if args.backbone_weights:
            if model is None:
                from .models import build_model

                model = build_model(model_config)
            try:
                report = load_backbone_weights(model, args.backbone_weights)
            except ValueError as e:
                raise UsageError(f"--backbone-weights: {e}") from None
            print(f"backbone from {args.backbone_weights}: {report}")
    metrics = train(
        data,
        args.output,
        model_config,
        cfg,
        resume=args.resume,
        device=args.device,
        model=model,
        overwrite=args.overwrite,
        data_report=checked,
    )
    print(json.dumps(metrics, indent=1))


#: Flags that would change a run; --resume continues it as it was configured.
_RUN_FLAGS = {
    "model": "--model", "model_config": "--model-config", "config": "--config",
    "init": "--init", "backbone_weights": "--backbone-weights", "amp": "--amp",
    "batch_size": "--batch-size", "lr": "--lr", "schedule": "--schedule",
    "ema_decay": "--ema-decay", "eval_every": "--eval-every", "image_size": "--image-size",
    "num_workers": "--workers", "seed": "--seed", "with_box_refine": "--with-box-refine",
    "two_stage": "--two-stage", "backbone_norm": "--backbone-norm", "flip": "--no-flip",
}  # fmt: skip


def _resumed_config(args: argparse.Namespace):
    """The saved run's TrainConfig with the new --epochs/--minutes (both totals)."""
    from .models.config import config_from_dict
    from .train.config import TrainConfig
    from .train.run_folder import read_last

    given = [flag for name, flag in _RUN_FLAGS.items() if getattr(args, name) not in (None, False)]
    if given:
        raise UsageError(
            f"--resume continues the run as configured: drop {', '.join(given)} "
            "(only --epochs, --minutes and --device may change)"
        )
    path = Path(args.output) / "last.pt"
    if not path.exists():
        raise UsageError(f"--resume: {path} does not exist, nothing to resume")
    # Memory-mapped: train() reads the whole checkpoint again; here only a few entries count.
    saved = read_last(Path(args.output), args.task, mmap=True)
    base = config_from_dict(saved["train_config"], TrainConfig)
    cfg = dataclasses.replace(
        base,
        epochs=args.epochs or base.epochs,
        minutes=args.minutes if args.minutes is not None else base.minutes,
    )
    if cfg.minutes is not None and saved["elapsed"] >= cfg.minutes * 60:
        raise UsageError(
            f"--resume: the run used its budget ({saved['elapsed'] / 60:.1f} of {cfg.minutes:g} "
            "min); pass a larger --minutes (the total)"
        )
    if saved["epoch"] + 1 >= cfg.epochs:
        raise UsageError(
            f"--resume: the run finished its {cfg.epochs} epochs; "
            "pass a larger --epochs (the total)"
        )
    return cfg


def _require(path: Path, flag: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{flag}: {path} does not exist")


def _load_model(path: str):
    """(model, config, checkpoint extras) of a checkpoint; a bad file is a usage error."""
    from .models.checkpoint import load_checkpoint

    _require(Path(path), "checkpoint")
    try:
        model, extra = load_checkpoint(path, output_extra=True)
        return model, model.config, extra
    except ValueError as e:
        raise UsageError(f"checkpoint: {e}") from None


def _load(args: argparse.Namespace):
    """(model on the device, config, checkpoint extras, device) of ``args.checkpoint``."""
    from .train.devices import resolve_device

    device = resolve_device(args.device)
    model, config, extra = _load_model(args.checkpoint)
    return model.to(device), config, extra, device


def _eval_config(extra: dict, args: argparse.Namespace):
    """The evaluation sizes the checkpoint was trained for, unless a flag overrides them."""
    from .train.config import TrainConfig

    return TrainConfig(
        image_size=args.image_size or extra.get("image_size", 160),
        max_size=extra.get("max_size", 1333),
        augmentation=extra.get("augmentation", "simple"),
        batch_size=getattr(args, "batch_size", 4),
        num_workers=0,
    )


def _category_ids(config, extra: dict, dataset) -> list[int]:
    """The COCO category of each of the model's classes, checked against the dataset."""
    saved = extra.get("dataset", {}).get("category_ids")
    if saved is None:
        if config.num_classes != dataset.num_classes:
            raise UsageError(
                f"the checkpoint has {config.num_classes} classes, the dataset "
                f"{dataset.num_classes} categories"
            )
        return list(dataset.category_ids)
    unknown = sorted(set(dataset.category_ids) - set(saved))
    if unknown:
        raise UsageError(f"--data: categories {unknown} are not among the checkpoint's {saved}")
    return list(saved)


def _val_set(data: Path, cfg):
    """The checked validation split: what training repairs, evaluation scores repaired."""
    from .train.loop import checked_dataset, val_dataset

    report = checked_dataset(data, ("val",))
    return val_dataset(data, cfg, report.cleaned["val"])


def _check_data(args: argparse.Namespace) -> None:
    from .train.check import check_dataset

    report = check_dataset(args.data, workers=args.workers)
    print(report.table())
    if report.fatal:
        sys.exit(1)


def _evaluate(args: argparse.Namespace) -> None:
    from .models.postprocess import PostProcess
    from .train.data import collate
    from .train.engine import evaluate

    model, config, extra, device = _load(args)
    cfg = _eval_config(extra, args)
    val_set = _val_set(Path(args.data), cfg)
    ids = _category_ids(config, extra, val_set)
    loader = torch.utils.data.DataLoader(val_set, batch_size=cfg.batch_size, collate_fn=collate)
    print(json.dumps(evaluate(model, PostProcess(), loader, val_set, device, ids), indent=1))


def _class_names(config, extra: dict) -> list[str]:
    names = extra.get("dataset", {}).get("category_names")
    return list(names) if names else [str(k) for k in range(config.num_classes)]


def _pictures(model, config, extra, data: Path, output: Path, cfg, threshold: float) -> list[Path]:
    from .train.data import collate
    from .train.visualize import draw_detections, draw_sampling_points

    val_set = _val_set(data, cfg)
    images, mask, _ = collate([val_set[i] for i in range(min(4, len(val_set)))])
    detections, sampling = output / "detections.png", output / "sampling_points.png"
    draw_detections(model, images, mask, detections, _class_names(config, extra), threshold)
    draw_sampling_points(model, images[0], sampling)
    return [detections, sampling]


def _visualize(args: argparse.Namespace) -> None:
    model, config, extra, _ = _load(args)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    cfg = _eval_config(extra, args)
    for path in _pictures(model, config, extra, Path(args.data), output, cfg, args.threshold):
        print(f"wrote {path}")


def _predict(args: argparse.Namespace) -> None:
    import numpy as np
    from PIL import Image

    from .models.deformable_detr import post_process
    from .train.data import collate
    from .train.loop import eval_transforms
    from .train.visualize import draw_boxes

    model, config, extra, device = _load(args)
    transform = eval_transforms(_eval_config(extra, args))
    names = _class_names(config, extra)
    ids = extra.get("dataset", {}).get("category_ids") or list(range(config.num_classes))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    found, written = [], set()
    for position, name in enumerate(args.images, 1):
        _require(Path(name), "images")
        try:
            rgb = np.asarray(Image.open(name).convert("RGB"))
        except (OSError, Image.DecompressionBombError) as e:
            raise UsageError(f"images: {name} is not a readable image ({e})") from None
        image = torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)
        image, _ = transform(image, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)})
        images, mask, _ = collate([(image, {})])
        with torch.no_grad():
            out = model(images.to(device), mask.to(device))
        # Boxes in the original image's pixels.
        (result,) = post_process(out, torch.tensor([rgb.shape[:2]], device=device))
        result = {k: v.cpu() for k, v in result.items()}
        # Inside the picture, as torchvision's detectors report them (evaluation, as the
        # reference, scores the boxes unclipped).
        H, W = rgb.shape[:2]
        result["boxes"] = result["boxes"].clamp(min=0)
        result["boxes"][:, 0::2] = result["boxes"][:, 0::2].clamp(max=W)
        result["boxes"][:, 1::2] = result["boxes"][:, 1::2].clamp(max=H)
        # Two inputs with the same name (from different folders) get two pictures.
        path, k = output / f"{Path(name).stem}_detections.png", 1
        while path in written:
            k += 1
            path = output / f"{Path(name).stem}-{k}_detections.png"
        written.add(path)
        draw_boxes(rgb, result, path, names, args.threshold)
        for score, label, (x0, y0, x1, y1) in zip(
            result["scores"].tolist(),
            result["labels"].tolist(),
            result["boxes"].tolist(),
            strict=True,
        ):
            if score >= args.threshold:
                found.append(
                    {
                        "image_id": _image_id(name, position),
                        "file_name": str(name),
                        "category_id": ids[label],
                        "category_name": names[label],
                        "score": round(score, 4),
                        "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                    }
                )
        print(f"wrote {path}")
    (output / "detections.json").write_text(json.dumps(found, indent=1))
    print(f"wrote {output / 'detections.json'} ({len(found)} boxes above {args.threshold})")


def _image_id(name: str, position: int) -> int:
    """COCO's image id of a file named like COCO's own (``000000397133.jpg``), else its
    position on the command line."""
    stem = Path(name).stem
    return int(stem) if stem.isdigit() else position


def _demo(args: argparse.Namespace) -> None:
    import time

    from .models.checkpoint import load_checkpoint
    from .train.config import PRESETS
    from .train.devices import resolve_device
    from .train.loop import train
    from .train.run_folder import next_free_run
    from .train.synthetic import CLASSES, generate

    output = Path(args.output)
    data = output / "data"
    t0 = time.perf_counter()
    if not (data / "annotations/instances_val.json").exists():
        print(f"generating the synthetic dataset in {data} ...", flush=True)
        generate(data, num_train=args.train_images, num_val=args.val_images, seed=args.seed)
    run = next_free_run(output)
    preset = PRESETS["tiny"]
    cfg = dataclasses.replace(preset.train, minutes=args.minutes, seed=args.seed, eval_every=2)
    metrics = train(data, run, preset.model(len(CLASSES)), cfg, device=args.device)
    model, extra = load_checkpoint(run / "last.pt", output_extra=True)
    config = model.config
    model.to(resolve_device(args.device))
    pictures = _pictures(model, config, extra, data, run, cfg, 0.3)
    print(
        f"\ntrained the tiny Deformable DETR for {args.minutes} min "
        f"({time.perf_counter() - t0:.0f} s in all)"
    )
    print("COCO metrics on the synthetic validation split:")
    print("  " + "  ".join(f"{k} {metrics[k]:.3f}" for k in ("AP", "AP50", "AP75")))
    print(
        f"wrote {run / 'metrics.json'}, checkpoints, log.jsonl, curves.png, "
        + ", ".join(str(p.name) for p in pictures)
    )


#: Train flags that only detection reads.
_DETECTION_FLAGS = {
    "model": "--model", "init": "--init", "backbone_weights": "--backbone-weights",
    "with_box_refine": "--with-box-refine", "two_stage": "--two-stage",
}  # fmt: skip


def _segmentation_data(path: str) -> Path:
    data = Path(path)
    if not data.is_dir():
        raise UsageError(f"--data: {data} does not exist")
    return data


def _train_segmentation(args: argparse.Namespace) -> None:
    from .models import SegmenterConfig
    from .train.config import SEGMENTATION_PRESETS, load_json_config
    from .train.segmentation_data import segmentation_classes
    from .train.segmentation_loop import train_segmenter

    given = [flag for name, flag in _DETECTION_FLAGS.items() if getattr(args, name)]
    if given:
        raise UsageError(f"--task segmentation does not take {', '.join(given)} (detection only)")
    data = _segmentation_data(args.data)
    if args.overwrite and args.resume:
        raise UsageError("--resume continues a run, --overwrite replaces it: pass one")
    preset = SEGMENTATION_PRESETS["tiny"]
    config = None  # the preset's model with the dataset's classes; a resumed run's own
    if args.resume:
        cfg = _resumed_config(args)
    else:
        cfg = _train_config(args, preset.train)
        if args.model_config or args.backbone_norm:
            base = preset.model(len(segmentation_classes(data)))
            config = load_json_config(
                SegmenterConfig, args.model_config, base, backbone_norm=args.backbone_norm
            )
    metrics = train_segmenter(
        data,
        args.output,
        config,
        cfg,
        device=args.device,
        overwrite=args.overwrite,
        resume=args.resume,
    )
    print(json.dumps(metrics, indent=1))


def _load_segmenter(args: argparse.Namespace):
    """(model on the device, checkpoint extras, evaluation TrainConfig, device)."""
    from .train.devices import resolve_device
    from .train.segmentation_loop import load_segmenter

    device = resolve_device(args.device)
    _require(Path(args.checkpoint), "checkpoint")
    try:
        model, extra = load_segmenter(args.checkpoint, output_extra=True)
    except ValueError as e:
        raise UsageError(f"checkpoint: {e}") from None
    return model.to(device), extra, _eval_config(extra, args), device


def _evaluate_segmentation(args: argparse.Namespace) -> None:
    from .train.segmentation_data import segmentation_classes
    from .train.segmentation_loop import evaluate_segmenter, segmentation_val_loader

    model, extra, cfg, device = _load_segmenter(args)
    data = _segmentation_data(args.data)
    names = extra["class_names"]
    found = segmentation_classes(data)
    if len(found) != len(names):
        raise UsageError(
            f"the checkpoint has {len(names)} classes, the dataset {len(found)} ({data})"
        )
    loader = segmentation_val_loader(data, cfg, names)
    print(json.dumps(evaluate_segmenter(model, loader, len(names), device, names), indent=1))


def _visualize_segmentation(args: argparse.Namespace) -> None:
    from .train.segmentation_loop import draw_validation

    model, extra, cfg, device = _load_segmenter(args)
    data = _segmentation_data(args.data)
    path = Path(args.output) / "predictions.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_validation(model, data, path, extra["class_names"], cfg, device, args.count)
    print(f"wrote {path}")


def _predict_segmentation(args: argparse.Namespace) -> None:
    import numpy as np
    from PIL import Image

    from .train.segmentation_loop import segment_image, segmentation_eval_transform
    from .train.segmentation_visualize import overlay

    model, _, cfg, device = _load_segmenter(args)
    transform = segmentation_eval_transform(cfg)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    written = set()
    for name in args.images:
        _require(Path(name), "images")
        try:
            rgb = np.asarray(Image.open(name).convert("RGB"))
        except (OSError, Image.DecompressionBombError) as e:
            raise UsageError(f"images: {name} is not a readable image ({e})") from None
        image = torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)
        labels = segment_image(model, image, transform, device).numpy()
        # Two inputs with the same name (from different folders) get two pictures.
        stem, k = Path(name).stem, 1
        while stem in written:
            k += 1
            stem = f"{Path(name).stem}-{k}"
        written.add(stem)
        picture, index = output / f"{stem}_segmentation.png", output / f"{stem}_labels.png"
        Image.fromarray(overlay(rgb, labels)).save(picture)
        Image.fromarray(labels.astype(np.uint8)).save(index)
        print(f"wrote {picture} and {index.name} (class indices)")


def _demo_segmentation(args: argparse.Namespace) -> None:
    import time

    from .train.config import SEGMENTATION_PRESETS
    from .train.devices import resolve_device
    from .train.run_folder import next_free_run
    from .train.segmentation_data import generate_segmentation
    from .train.segmentation_loop import draw_validation, load_segmenter, train_segmenter

    output = Path(args.output)
    data = output / "data"
    t0 = time.perf_counter()
    if not (data / "classes.json").exists():
        print(f"generating the synthetic dataset in {data} ...", flush=True)
        generate_segmentation(
            data, num_train=args.train_images, num_val=args.val_images, seed=args.seed
        )
    run = next_free_run(output)
    cfg = dataclasses.replace(
        SEGMENTATION_PRESETS["tiny"].train, minutes=args.minutes, seed=args.seed
    )
    metrics = train_segmenter(data, run, None, cfg, device=args.device)
    # The place for the demo's result: the latest run's metrics.
    (output / "metrics.json").write_text(json.dumps(metrics, indent=1))
    model, extra = load_segmenter(run / "last.pt", output_extra=True)
    device = resolve_device(args.device)
    draw_validation(
        model.to(device), data, run / "predictions.png", extra["class_names"], cfg, device
    )
    print(
        f"\ntrained the tiny segmenter for {args.minutes} min "
        f"({time.perf_counter() - t0:.0f} s in all)"
    )
    print("on the synthetic validation split:")
    print(f"  mIoU {metrics['mIoU']:.3f}  pixel accuracy {metrics['pixel_accuracy']:.3f}")
    print(
        f"wrote {run / 'metrics.json'} (and {output / 'metrics.json'}), checkpoints, "
        "log.jsonl, curves.png, predictions.png"
    )


def _compare(args: argparse.Namespace) -> None:
    import json

    from .train.compare import FIGURES, compare

    results = compare(args.output, args.minutes, args.seed, task=args.task)
    shown = ("AP", "AP50") if args.task == "detection" else ("mIoU", "pixel_accuracy")
    print(json.dumps({k: {m: round(v[m], 3) for m in shown} for k, v in results.items()}))
    print(f"wrote {Path(args.output) / FIGURES[args.task]} and comparison.json")


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="msdeformattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "bench", help="benchmark the operator (python -m msdeformattn.bench --help)", add_help=False
    )
    export = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX or torch.export",
        description="Export the detector: inputs images (N, 3, H, W) float and mask (N, H, W) "
        "bool (True on padding), outputs pred_logits (N, Q, K) and pred_boxes (N, Q, 4), "
        "normalised cx, cy, w, h. Batch, height and width are dynamic: any H and W from the "
        "model's minimum (65 px for 4 levels) to 4096 px, batch up to 64; the graph pads "
        "to the backbone's stride itself.",
    )
    export.add_argument("checkpoint", help="an msdeformattn checkpoint (.pt)")
    export.add_argument("--output", "-o", required=True)
    kind = export.add_mutually_exclusive_group(required=True)
    kind.add_argument("--onnx", action="store_true", help="ONNX for onnxruntime and friends")
    kind.add_argument("--torch-export", action="store_true", help="a torch.export program (.pt2)")
    export.add_argument(
        "--image-size",
        nargs=2,
        type=int,
        default=(640, 640),
        metavar=("H", "W"),
        help="example size the export traces (default 640 640); any other size runs too",
    )
    train_p = sub.add_parser(
        "train",
        help="train on a COCO-format dataset",
        description="Train Deformable DETR on a COCO-format folder. Settings come from the "
        "--model preset, then --model-config/--config JSON files, then flags. With --task "
        "segmentation: the tiny DeformableSegmenter on an images/{train,val} + "
        "annotations/{train,val} folder of class-index PNGs (255 = ignore), same flags.",
    )
    train_p.add_argument(
        "--data",
        required=True,
        help="folder with train/, val/, annotations/ (segmentation: images/, annotations/)",
    )
    train_p.add_argument("--output", "-o", required=True, help="run folder (must be new)")
    train_p.add_argument(
        "--model",
        choices=list(PRESETS),
        help="preset: model and recipe (default: tiny, or deformable-detr with --init)",
    )
    train_p.add_argument(
        "--model-config",
        help="JSON file of DeformableDETRConfig fields (SegmenterConfig with --task segmentation)",
    )
    train_p.add_argument("--config", help="JSON file of TrainConfig fields (flags override)")
    train_p.add_argument(
        "--init",
        metavar="SOURCE",
        help="start from weights: our checkpoint, the reference .pth, or a transformers "
        "save_pretrained folder; class heads are re-initialised when the class count differs",
    )
    train_p.add_argument(
        "--backbone-weights",
        metavar="FILE",
        help="torchvision-layout ResNet state dict (fc ignored)",
    )
    _device_flag(train_p)
    _task_flag(train_p)
    train_p.add_argument("--amp", choices=["bf16", "fp16"], help="mixed precision (autocast)")
    train_p.add_argument(
        "--minutes", type=_positive(float), help="wall-clock training budget (total, on --resume)"
    )
    train_p.add_argument("--epochs", type=_positive(int), help="total, on --resume")
    train_p.add_argument("--batch-size", dest="batch_size", type=_positive(int), help="global")
    train_p.add_argument("--lr", type=_positive(float))
    train_p.add_argument("--schedule", choices=["step", "cosine", "constant"])
    train_p.add_argument(
        "--ema-decay", type=_fraction, help="EMA of the weights for evaluation, e.g. 0.9997"
    )
    train_p.add_argument("--eval-every", dest="eval_every", type=_positive(int), help="epochs")
    train_p.add_argument("--image-size", dest="image_size", type=_positive(int))
    train_p.add_argument("--workers", dest="num_workers", type=int, help="data-loading processes")
    train_p.add_argument("--seed", type=int)
    train_p.add_argument("--with-box-refine", action="store_true")
    train_p.add_argument("--two-stage", action="store_true")
    train_p.add_argument(
        "--backbone-norm",
        choices=["batch", "frozen"],
        help="trainable BatchNorm (from scratch) or frozen (pretrained)",
    )
    train_p.add_argument(
        "--no-flip",
        dest="flip",
        action="store_const",
        const=False,
        help="no random horizontal flips",
    )
    train_p.add_argument(
        "--resume", action="store_true", help="continue OUTPUT/last.pt exactly where it stopped"
    )
    train_p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in OUTPUT (its checkpoints, log and metrics)",
    )
    eval_p = sub.add_parser(
        "evaluate", help="COCO metrics of a checkpoint (mIoU with --task segmentation)"
    )
    eval_p.add_argument("checkpoint")
    eval_p.add_argument("--data", required=True)
    eval_p.add_argument("--image-size", type=_positive(int), help="default: the training size")
    eval_p.add_argument("--batch-size", type=_positive(int), default=8)
    _device_flag(eval_p)
    _task_flag(eval_p)
    vis_p = sub.add_parser(
        "visualize",
        help="pictures of a checkpoint on the validation split: detections and sampling "
        "points, or (--task segmentation) image | ground truth | prediction",
    )
    _task_flag(vis_p)
    vis_p.add_argument("checkpoint")
    vis_p.add_argument("--data", required=True)
    vis_p.add_argument("--output", "-o", required=True)
    vis_p.add_argument("--image-size", type=_positive(int), help="default: the training size")
    vis_p.add_argument("--threshold", type=float, default=0.3, help="detection only")
    vis_p.add_argument(
        "--count", type=_positive(int), default=4, help="segmentation: validation images drawn"
    )
    _device_flag(vis_p)
    pred_p = sub.add_parser(
        "predict",
        help="detections of a checkpoint on images (PNG pictures and detections.json)",
        description="Detect objects in images. Writes NAME_detections.png (the original image "
        "with boxes and class names) per image and detections.json: COCO results (image_id: "
        "the file name's number for COCO-style names like 000000397133.jpg, else the image's "
        "position among IMAGES, from 1; category_id of the dataset; bbox [x, y, w, h] in the "
        "original image's pixels; score) plus file_name and category_name. With --task "
        "segmentation: NAME_segmentation.png (the image with a colour per class, background "
        "left as is) and NAME_labels.png (the class indices), at the image's resolution.",
    )
    pred_p.add_argument("checkpoint")
    pred_p.add_argument("images", nargs="+")
    pred_p.add_argument("--output", "-o", required=True)
    pred_p.add_argument("--image-size", type=_positive(int), help="default: the training size")
    pred_p.add_argument("--threshold", type=float, default=0.3, help="detection only")
    _device_flag(pred_p)
    _task_flag(pred_p)
    demo_p = sub.add_parser(
        "demo",
        help="synthetic data -> train (tiny) -> COCO metrics (mIoU with --task segmentation) "
        "-> pictures",
    )
    demo_p.add_argument("--output", "-o", required=True)
    demo_p.add_argument("--minutes", type=_positive(float), default=10.0)
    demo_p.add_argument("--seed", type=int, default=0)
    demo_p.add_argument("--train-images", type=_positive(int), default=2000)
    demo_p.add_argument("--val-images", type=_positive(int), default=200)
    _device_flag(demo_p)
    _task_flag(demo_p)
    check_p = sub.add_parser(
        "check-data",
        help="check a COCO-format folder: every annotation file and image (exit 1 on fatal "
        "problems)",
        description="Read annotations/instances_{train,val}.json, open every image and list "
        "what is wrong in one table. FATAL problems stop `train`; repaired ones (boxes "
        "clipped or dropped, missing areas, image sizes) are fixed as train and evaluate read "
        "the data. Exit status 0: usable, 1: fatal problems, 2: the folder is not there.",
    )
    check_p.add_argument("data", help="folder with train/, val/, annotations/")
    check_p.add_argument("--workers", type=_positive(int), help="threads opening images")
    cmp_p = sub.add_parser(
        "compare",
        help="deformable attention vs its baseline (detection: dense attention; segmentation: "
        "a plain FPN), same budget, one plot",
    )
    _task_flag(cmp_p)
    cmp_p.add_argument("--output", "-o", required=True)
    cmp_p.add_argument("--minutes", type=_positive(float), default=10.0, help="per model")
    cmp_p.add_argument("--seed", type=int, default=0)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from . import bench

        bench.main(argv[1:])
        return
    args = parser.parse_args(argv)
    segmentation = {
        "train": _train_segmentation,
        "evaluate": _evaluate_segmentation,
        "predict": _predict_segmentation,
        "visualize": _visualize_segmentation,
        "demo": _demo_segmentation,
    }
    commands = {
        "export": _export,
        "train": _train,
        "evaluate": _evaluate,
        "visualize": _visualize,
        "predict": _predict,
        "demo": _demo,
        "compare": _compare,
        "check-data": _check_data,
    }
    if getattr(args, "task", "detection") == "segmentation":
        commands = {**commands, **segmentation}
    try:
        commands[args.command](args)
    except (UsageError, FileNotFoundError) as e:
        if os.environ.get("MSDEFORMATTN_DEBUG"):
            raise
        # A user's mistake: one line naming what is wrong, exit status 2.
        parser.exit(2, f"msdeformattn {args.command}: error: {_one_line(e)}\n")


def _one_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        # Raised in a DataLoader worker: its message is the worker's traceback, whose
        # last line is "module.ErrorType: message".
        return lines[-1].split(": ", 1)[-1]
    return "; ".join(lines)


if __name__ == "__main__":
    main()
