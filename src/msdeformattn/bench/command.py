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

With --detector, --train-step or --encoder: the full-size detector's inference,
its training step, or one encoder layer's training step against transformers.
With --pixel-decoder: Mask2Former's pixel decoder (forward and training step) against
transformers' on a 1024x1024 image's backbone maps (--image-size), on --device.
"""

from __future__ import annotations

import argparse
import json

import torch

from .cases import CASES, DEFAULT_CASES
from .memory import peak_memory_probe, peak_rss_growth
from .operator_bench import run
from .tables import format_table
from .timing import copy_bandwidth


def _parser() -> argparse.ArgumentParser:
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
    p.add_argument(
        "--image-size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="default: 1024 1024 with --pixel-decoder, 640 960 otherwise",
    )
    p.add_argument(
        "--encoder",
        action="store_true",
        help="time a COCO-size encoder layer's training step against transformers",
    )
    p.add_argument(
        "--rtdetr",
        action="store_true",
        help="time the RT-DETRv2 forms (per-level points, discrete) against plain PyTorch",
    )
    p.add_argument(
        "--train-step",
        action="store_true",
        help="time one training step of the full detector (at --image-size) against transformers",
    )
    p.add_argument(
        "--pixel-decoder",
        action="store_true",
        help="time Mask2Former's pixel decoder (forward, training step) against transformers",
    )
    p.add_argument("--batch", type=int, default=1, help="with --pixel-decoder: images per batch")
    # What memory.probe_in_fresh_process runs: one measurement, its bytes printed last.
    p.add_argument("--encoder-memory-probe", help=argparse.SUPPRESS)
    p.add_argument("--train-step-memory-probe", help=argparse.SUPPRESS)
    p.add_argument("--memory-probe", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--pixel-decoder-memory-probe", nargs=2, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    """``python -m msdeformattn.bench`` with ``argv`` (None: ``sys.argv[1:]``)."""
    args = _parser().parse_args(argv)
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        _main(args)
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _cpu_header() -> str:
    return f"device=cpu torch={torch.__version__} threads={torch.get_num_threads()}"


def _main(args: argparse.Namespace) -> None:
    if args.image_size is None:
        pixel_decoder = args.pixel_decoder or args.pixel_decoder_memory_probe
        args.image_size = (1024, 1024) if pixel_decoder else (640, 960)
    # The end-to-end modules import the models, training and transformers: only when asked.
    if args.memory_probe:
        print(peak_memory_probe(*args.memory_probe))
    elif args.encoder_memory_probe:
        from .encoder_layer import encoder_layer_step

        step = encoder_layer_step(args.encoder_memory_probe)
        step()  # warm-up: kernels loaded, autograd buffers allocated once
        print(peak_rss_growth(step))
    elif args.train_step_memory_probe:
        from .detector import train_step

        step = train_step(args.train_step_memory_probe, *args.image_size)
        step()
        print(peak_rss_growth(step))
    elif args.pixel_decoder_memory_probe:
        from .pixel_decoder import memory_probe

        which, mode = args.pixel_decoder_memory_probe
        print(memory_probe(which, mode, *args.image_size, args.batch, args.dtype, args.device))
    elif args.pixel_decoder:
        from .pixel_decoder import benchmark

        height, width = args.image_size
        print(f"{_header(args)} image={height}x{width} batch={args.batch}", flush=True)
        memory = not args.no_memory
        print(
            benchmark(height, width, args.min_run_time, args.batch, args.dtype, args.device, memory)
        )
    elif args.train_step:
        from .detector import train_step_benchmark

        print(_cpu_header(), flush=True)
        print(train_step_benchmark(*args.image_size, args.min_run_time))
    elif args.rtdetr:
        from .rtdetr import benchmark

        print(_cpu_header(), flush=True)
        print(benchmark(args.min_run_time))
    elif args.encoder:
        from .encoder_layer import encoder_benchmark

        print(_cpu_header(), flush=True)
        print(encoder_benchmark(args.min_run_time))
    elif args.detector:
        from .detector import inference_benchmark

        print(f"{_cpu_header()} image={args.image_size[0]}x{args.image_size[1]}", flush=True)
        print(inference_benchmark(*args.image_size, args.min_run_time, args.onnx))
    else:
        _operator(args)


def _header(args: argparse.Namespace) -> str:
    """device, dtype, torch, threads (and deterministic, the GPU's name)."""
    header = (
        f"device={args.device} dtype={args.dtype} torch={torch.__version__} "
        f"threads={torch.get_num_threads()}" + (" deterministic" if args.deterministic else "")
    )
    if args.device == "cuda":
        header += f" gpu={torch.cuda.get_device_name()}"
    return header


def _operator(args: argparse.Namespace) -> None:
    header = _header(args)
    if args.device == "cuda":
        header += f" copy_bandwidth={copy_bandwidth(args.device) / 1e9:.0f}GB/s"
    print(header, flush=True)
    cases = args.cases or DEFAULT_CASES[torch.device(args.device).type]
    rows = run(cases, args.dtype, args.device, args.min_run_time, not args.no_memory)
    print(format_table(rows, bandwidth=args.device == "cuda"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)
