"""The ``msdeformattn`` command line."""

from __future__ import annotations

import argparse
import sys

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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from . import bench

        bench.main(argv[1:])
        return
    args = parser.parse_args(argv)
    if args.command == "export":
        _export(args)


if __name__ == "__main__":
    main()
