"""The ``msdeformattn`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

__all__ = ["main"]


def _export(args: argparse.Namespace) -> None:
    from .models.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(args.checkpoint)
    H, W = args.image_size
    images = torch.zeros(2, 3, H, W)
    mask = torch.zeros(2, H, W, dtype=torch.bool)
    # Batch, height and width stay dynamic (sizes in steps of the backbone's stride 32).
    n = torch.export.Dim("batch", min=1, max=1024)
    h = torch.export.Dim("h", min=3, max=1024)
    w = torch.export.Dim("w", min=3, max=1024)
    dynamic = ({0: n, 2: 32 * h, 3: 32 * w}, {0: n, 1: 32 * h, 2: 32 * w})
    if args.onnx:
        torch.onnx.export(
            model,
            (images, mask),
            args.output,
            input_names=["images", "mask"],
            output_names=["pred_logits", "pred_boxes"],
            dynamic_shapes=dynamic,
        )
    else:
        program = torch.export.export(model, (images, mask), dynamic_shapes=dynamic)
        torch.export.save(program, args.output)
    print(f"wrote {args.output}")


def _train_config(args: argparse.Namespace):
    import dataclasses
    import json

    from .train.loop import TrainConfig

    values = json.loads(Path(args.config).read_text()) if args.config else {}
    for field in dataclasses.fields(TrainConfig):
        flag = getattr(args, field.name, None)
        if flag is not None:
            values[field.name] = flag
    return TrainConfig(**values)


def _model_config(args: argparse.Namespace, num_classes: int):
    from .models import DeformableDETRConfig

    return DeformableDETRConfig.tiny(
        num_classes=num_classes,
        with_box_refine=args.with_box_refine,
        two_stage=args.two_stage,
        backbone_norm=args.backbone_norm,
    )


def _train(args: argparse.Namespace) -> None:
    import json

    from .train.data import CocoDetection
    from .train.loop import train

    data = Path(args.data)
    names = CocoDetection(data / "val", data / "annotations/instances_val.json")
    metrics = train(
        data,
        args.output,
        _model_config(args, names.num_classes),
        _train_config(args),
        resume=args.resume,
    )
    print(json.dumps(metrics, indent=1))


def _evaluate(args: argparse.Namespace) -> None:
    import json

    from .models.checkpoint import load_checkpoint
    from .train.evaluate import evaluate
    from .train.loop import TrainConfig, build_loaders

    model, _, _ = load_checkpoint(args.checkpoint)
    cfg = TrainConfig(image_size=args.image_size, batch_size=args.batch_size)
    _, val_set, _, val_loader = build_loaders(Path(args.data), cfg)
    print(json.dumps(evaluate(model, val_loader, val_set), indent=1))


def _pictures(model, data: Path, output: Path, image_size: int) -> list[Path]:
    from .train.loop import TrainConfig, build_loaders
    from .train.visualize import draw_detections, draw_sampling_points

    _, val_set, _, loader = build_loaders(data, TrainConfig(image_size=image_size, batch_size=4))
    images, mask, _ = next(iter(loader))
    names = [val_set.coco.cats[c]["name"] for c in val_set.category_ids]
    detections, sampling = output / "detections.png", output / "sampling_points.png"
    draw_detections(model, images, mask, detections, names)
    draw_sampling_points(model, images[0], sampling)
    return [detections, sampling]


def _visualize(args: argparse.Namespace) -> None:
    from .models.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(args.checkpoint)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for path in _pictures(model, Path(args.data), output, args.image_size):
        print(f"wrote {path}")


def _predict(args: argparse.Namespace) -> None:
    import numpy as np
    from PIL import Image

    from .models.checkpoint import load_checkpoint
    from .train.data import Normalize, Resize, collate
    from .train.visualize import draw_detections

    model, _, _ = load_checkpoint(args.checkpoint)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    resize, normalize = Resize([args.image_size]), Normalize()
    for name in args.images:
        pixels = np.asarray(Image.open(name).convert("RGB"), dtype=np.float32) / 255
        image = torch.from_numpy(pixels).permute(2, 0, 1)
        image, _ = normalize(*resize(image, {"boxes": torch.zeros(0, 4)}))
        images, mask, _ = collate([(image, {})])
        path = output / (Path(name).stem + "_detections.png")
        draw_detections(model, images, mask, path, threshold=args.threshold)
        print(f"wrote {path}")


def _demo(args: argparse.Namespace) -> None:
    import time

    from .models import DeformableDETRConfig
    from .models.checkpoint import load_checkpoint
    from .train.loop import TrainConfig, train
    from .train.synthetic import CLASSES, generate

    output = Path(args.output)
    data = output / "data"
    t0 = time.perf_counter()
    if not (data / "annotations/instances_val.json").exists():
        print(f"generating the synthetic dataset in {data} ...", flush=True)
        generate(data, num_train=args.train_images, num_val=args.val_images, seed=args.seed)
    cfg = TrainConfig(minutes=args.minutes, seed=args.seed, eval_every_epochs=2)
    metrics = train(data, output, DeformableDETRConfig.tiny(num_classes=len(CLASSES)), cfg)
    model, _, _ = load_checkpoint(output / "checkpoint.pt")
    pictures = _pictures(model, data, output, cfg.image_size)
    print(
        f"\ntrained the tiny Deformable DETR for {args.minutes} min on the CPU "
        f"({time.perf_counter() - t0:.0f} s in all)"
    )
    print("COCO metrics on the synthetic validation split:")
    print("  " + "  ".join(f"{k} {metrics[k]:.3f}" for k in ("AP", "AP50", "AP75")))
    print(
        f"wrote {output / 'metrics.json'}, {output / 'log.jsonl'}, "
        + ", ".join(str(p) for p in pictures)
    )


def _compare(args: argparse.Namespace) -> None:
    import json

    from .train.compare import compare

    results = compare(args.output, args.minutes, args.seed)
    print(json.dumps({k: {m: round(v[m], 3) for m in ("AP", "AP50")} for k, v in results.items()}))
    print(f"wrote {Path(args.output) / 'deformable_vs_dense.png'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="msdeformattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "bench", help="benchmark the operator (python -m msdeformattn.bench --help)", add_help=False
    )
    export = sub.add_parser("export", help="export a checkpoint to ONNX or torch.export")
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
        help="example size to trace with (multiples of 64); other sizes work too",
    )
    train_p = sub.add_parser("train", help="train on a COCO-format dataset")
    train_p.add_argument("--data", required=True, help="folder with train/, val/, annotations/")
    train_p.add_argument("--output", "-o", required=True)
    train_p.add_argument("--config", help="JSON file of TrainConfig fields (flags override)")
    train_p.add_argument("--minutes", type=float, help="wall-clock training budget")
    train_p.add_argument("--epochs", type=int)
    train_p.add_argument("--batch-size", dest="batch_size", type=int)
    train_p.add_argument("--lr", type=float)
    train_p.add_argument("--image-size", dest="image_size", type=int)
    train_p.add_argument("--seed", type=int)
    train_p.add_argument("--with-box-refine", action="store_true")
    train_p.add_argument("--two-stage", action="store_true")
    train_p.add_argument(
        "--backbone-norm",
        choices=["batch", "frozen"],
        default="batch",
        help="trainable BatchNorm (from scratch) or frozen",
    )
    train_p.add_argument(
        "--no-flip",
        dest="flip",
        action="store_const",
        const=False,
        help="no random horizontal flips",
    )
    train_p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    eval_p = sub.add_parser("evaluate", help="COCO metrics of a checkpoint")
    eval_p.add_argument("checkpoint")
    eval_p.add_argument("--data", required=True)
    eval_p.add_argument("--image-size", type=int, default=160)
    eval_p.add_argument("--batch-size", type=int, default=8)
    vis_p = sub.add_parser("visualize", help="detections and sampling-point pictures")
    vis_p.add_argument("checkpoint")
    vis_p.add_argument("--data", required=True)
    vis_p.add_argument("--output", "-o", required=True)
    vis_p.add_argument("--image-size", type=int, default=160)
    pred_p = sub.add_parser("predict", help="draw a checkpoint's detections on images")
    pred_p.add_argument("checkpoint")
    pred_p.add_argument("images", nargs="+")
    pred_p.add_argument("--output", "-o", required=True)
    pred_p.add_argument("--image-size", type=int, default=160)
    pred_p.add_argument("--threshold", type=float, default=0.3)
    demo_p = sub.add_parser(
        "demo", help="synthetic data -> train (tiny) -> COCO metrics -> pictures"
    )
    demo_p.add_argument("--output", "-o", required=True)
    demo_p.add_argument("--minutes", type=float, default=10.0)
    demo_p.add_argument("--seed", type=int, default=0)
    demo_p.add_argument("--train-images", type=int, default=2000)
    demo_p.add_argument("--val-images", type=int, default=200)
    cmp_p = sub.add_parser("compare", help="deformable vs dense attention, same budget, one plot")
    cmp_p.add_argument("--output", "-o", required=True)
    cmp_p.add_argument("--minutes", type=float, default=10.0, help="per model")
    cmp_p.add_argument("--seed", type=int, default=0)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from . import bench

        bench.main(argv[1:])
        return
    args = parser.parse_args(argv)
    commands = {
        "export": _export,
        "train": _train,
        "evaluate": _evaluate,
        "visualize": _visualize,
        "predict": _predict,
        "demo": _demo,
        "compare": _compare,
    }
    commands[args.command](args)


if __name__ == "__main__":
    main()
