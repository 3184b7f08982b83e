"""Compile the Triton kernels for GPUs this machine does not have: sm_80, sm_90, sm_100.

Triton's compiler needs no GPU. A stand-in CUDA driver reports a compute
capability; the project's own launchers then run on CPU tensors, and Triton
specialises every kernel they launch (argument types, pointer alignment,
constexprs, ``num_warps``) as it would on that GPU. A JIT hook records each
compile request and launches nothing. Each request is then compiled with
``triton.compile`` for that target, and ptxas's report (registers, spills) is
read back with the shared memory and the seconds it took.

    python -m tests.ops._triton_compile            # the subset the test suite compiles
    python -m tests.ops._triton_compile --all      # everything (``make gpu-compile``)

Needs ``TRITON_INTERPRET`` off when the kernels are first imported, so it runs
as its own process (``tests/ops/test_triton_compile.py`` starts one). With
``--cache DIR`` results are kept per request, keyed on the kernel file, the
Triton version, the target and the request itself.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

COCO = ((100, 150), (50, 75), (25, 38), (13, 19))
COCO_S = sum(h * w for h, w in COCO)
TARGETS = (80, 90, 100)
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
SHORT = {F16: "f16", BF16: "bf16", F32: "f32", F64: "f64"}


@dataclass(frozen=True)
class Workload:
    """One call of the operator (forward and both backwards); the launchers decide the rest."""

    value: torch.dtype
    loc: torch.dtype
    attn: torch.dtype
    D: int = 32
    N: int = 2
    Lq: int = 300
    P: int = 4
    #: part of the test suite's subset (everything else only with --all)
    ci: bool = False

    @property
    def M(self) -> int:
        # d_model 256 split into heads.
        return max(1, 256 // self.D)

    @property
    def name(self) -> str:
        dtypes = {SHORT[self.value], SHORT[self.loc], SHORT[self.attn]}
        kind = "/".join(SHORT[t] for t in (self.value, self.loc, self.attn))
        part = "encoder" if self.Lq == COCO_S else "decoder"
        return f"{kind if len(dtypes) > 1 else SHORT[self.value]} D={self.D} {part}"

    def inputs(self):
        g = torch.Generator().manual_seed(0)
        shapes = torch.tensor(COCO, dtype=torch.int64)
        starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
        L, M = len(COCO), self.M
        value = torch.randn(self.N, COCO_S, M, self.D, generator=g).to(self.value)
        loc = torch.rand(self.N, self.Lq, M, L, self.P, 2, generator=g).to(self.loc)
        attn = torch.rand(self.N, self.Lq, M, L, self.P, generator=g).to(self.attn)
        gout = torch.randn(self.N, self.Lq, M * self.D, generator=g).to(self.value)
        return gout, value, shapes, starts, loc, attn


def workloads() -> list[Workload]:
    """What the project runs: the COCO decoder and encoder, every dtype, D from 1 to 256.

    Decoder: 300 queries of 2 images; encoder: one query per pixel of the four
    COCO levels. Autocast's mix (half value and locations, float32 softmax
    weights) and a float64 location with half values are there too.
    """
    out = [Workload(F16, F16, F32, ci=True), Workload(F16, F64, F64, ci=True)]
    for t in (F32, BF16, F16, F64):
        out.append(Workload(t, t, t, ci=True))
        out.append(Workload(t, t, t, N=1, Lq=COCO_S))
    for D in (1, 8, 16, 24, 33, 48, 64, 128, 256):
        for t in (F32, BF16, F16):
            out.append(Workload(t, t, t, D=D, ci=D in (33, 256) and t != F16))
    return out


# --- capturing what the launchers compile -------------------------------------------------


def _stand_in_driver(arch: int):
    """A CUDA driver that reports compute capability ``arch`` and has no device."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StandIn(DriverBase):
        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError

        def get_current_device(self):
            # Its own key in each kernel's per-device cache.
            return f"stand-in sm_{arch}"

        def get_current_stream(self, device):
            return 0

    return StandIn()


@dataclass
class Request:
    """One specialisation of one kernel for one target, as Triton's JIT would compile it."""

    kernel: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    cases: list[str] = field(default_factory=list)

    def params(self) -> dict[str, object]:
        """The constexprs by name, with num_warps."""
        names = _kernel(self.kernel).arg_names
        out = {names[k[0]]: v for k, v in self.constexprs.items() if len(k) == 1}
        out["warps"] = self.options["num_warps"]
        return out

    def key(self) -> str:
        """What the compiled kernel depends on: kernel source, Triton, target, request."""
        import triton

        from msdeformattn.ops import _triton_kernels

        parts = [
            triton.__version__,
            Path(_triton_kernels.__file__).read_text(),
            self.kernel,
            self.arch,
            sorted(self.signature.items()),
            sorted((str(k), str(v)) for k, v in self.constexprs.items()),
            sorted((str(k), str(v)) for k, v in self.attrs.items()),
            sorted((k, str(v)) for k, v in self.options.items()),
        ]
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]

    def pointers(self) -> str:
        """Element types of the float pointers, and which pointers are not 16-byte aligned."""
        types = [
            t[1:] for t in self.signature.values() if t.startswith("*fp") or t.startswith("*bf")
        ]
        out = ",".join(dict.fromkeys(types))
        names = list(self.signature)
        unaligned = [
            names[k[0]].removesuffix("_ptr")
            for k, v in self.attrs.items()
            if self.signature[names[k[0]]].startswith("*") and ["tt.divisibility", 16] not in v
        ]
        return out + (f"; unaligned {','.join(unaligned)}" if unaligned else "")

    def is_float64(self) -> bool:
        return "fp64" in self.signature.values() or any(
            str(v) == "fp64" for v in self.constexprs.values()
        )


def _kernel(name: str):
    from msdeformattn.ops import _triton_kernels

    return getattr(_triton_kernels, name)


def capture(arch: int, cases: list[Workload]) -> list[Request]:
    """Run the launchers on every workload under a stand-in sm_``arch``; return their compiles."""
    from triton import knobs
    from triton.runtime.driver import driver

    from msdeformattn.ops import _triton_kernels as K

    if not hasattr(K.forward_kernel, "device_caches"):
        raise RuntimeError("the kernels were defined under TRITON_INTERPRET=1")
    found: dict[tuple, Request] = {}
    current: list[str] = []

    def hook(*, key, fn, compile, **_):
        spec = json.loads(compile["specialization_data"])
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["options"].items()}
        req = Request(
            fn.name,
            arch,
            dict(compile["signature"]),
            dict(compile["constants"]),
            dict(compile["configs"][0]),
            options,
        )
        req = found.setdefault((fn.name, str(key), str(options)), req)
        if current[0] not in req.cases:
            req.cases.append(current[0])
        return True  # compiled later, launched never

    device = _stand_in_driver(arch)
    kernels = [v for v in vars(K).values() if hasattr(v, "device_caches")]
    old_hook = knobs.runtime.jit_cache_hook
    # Not driver.active: without a GPU, asking for the default driver raises.
    old_driver = driver._active
    driver.set_active(device)
    knobs.runtime.jit_cache_hook = hook
    try:
        for w in cases:
            gout, value, shapes, starts, loc, attn = w.inputs()
            current[:] = [w.name]
            K.forward(value, shapes, starts, loc, attn)
            K.backward(gout, value, shapes, starts, loc, attn, deterministic=False)
            K.backward(gout, value, shapes, starts, loc, attn, deterministic=True)
    finally:
        knobs.runtime.jit_cache_hook = old_hook
        driver.set_active(old_driver)
        for k in kernels:
            k.device_caches.pop(device.get_current_device(), None)
    return list(found.values())


# --- compiling ----------------------------------------------------------------------------

_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def compile_request(req: Request) -> dict:
    """Compile ``req`` with Triton for its target; registers, spills, shared memory, seconds."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(_kernel(req.kernel), req.signature, req.constexprs, req.attrs)
    log = io.StringIO()
    with (
        tempfile.TemporaryDirectory() as cache,
        knobs.cache.scope(),
        knobs.nvidia.scope(),
        contextlib.redirect_stdout(log),
    ):
        knobs.cache.dir = cache  # a fresh compile, timed honestly
        knobs.nvidia.dump_ptxas_log = True
        start = time.perf_counter()
        compiled = triton.compile(src, target=GPUTarget("cuda", req.arch, 32), options=req.options)
        seconds = time.perf_counter() - start
    text = log.getvalue()
    out = {k: max((int(x) for x in r.findall(text)), default=0) for k, r in _PTXAS.items()}
    if not _PTXAS["regs"].search(text):
        raise RuntimeError(f"no ptxas report for {req.kernel}:\n{text}")
    out["smem"] = compiled.metadata.shared
    out["seconds"] = round(seconds, 2)
    out["ptx_lines"] = compiled.asm["ptx"].count("\n")
    return out


def _compile_one(args):
    req, cache = args
    path = Path(cache) / f"{req.key()}.json" if cache else None
    if path is not None and path.exists():
        return {**json.loads(path.read_text()), "cached": True}
    try:
        out = compile_request(req)
    except Exception as e:  # reported, and the run fails
        return {"error": f"{type(e).__name__}: {e}"}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out))
    return out


def compile_all(requests: list[Request], jobs: int = 1, cache: str | None = None) -> list[dict]:
    args = [(r, cache) for r in requests]
    if jobs <= 1:
        return [_compile_one(a) for a in args]
    # Forked workers inherit the imported kernels; TRITON_INTERPRET is already off.
    import multiprocessing

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_one, args))


# --- the table and the verdict ------------------------------------------------------------


def problems(req: Request, res: dict) -> list[str]:
    """Why this specialisation is not acceptable: a compiler error, or spills outside float64."""
    if "error" in res:
        return [res["error"].splitlines()[0]]
    if res["spill_stores"] and not req.is_float64():
        return [f"{res['spill_stores']} bytes of register spills"]
    return []


def table(requests: list[Request], results: list[dict]) -> str:
    rows = [
        "| kernel | pointers | constexprs | target | registers | spill stores B | shared B | compile s | cases |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = sorted(
        range(len(requests)),
        key=lambda i: (requests[i].kernel, str(requests[i].params()), requests[i].arch),
    )
    for i in order:
        req, res = requests[i], results[i]
        params = ", ".join(f"{k}={v}" for k, v in req.params().items())
        cases = "; ".join(req.cases[:3]) + (
            f"; +{len(req.cases) - 3}" if len(req.cases) > 3 else ""
        )
        if "error" in res:
            rows.append(
                f"| {req.kernel} | {req.pointers()} | {params} | sm_{req.arch} | error | | | | {cases} |"
            )
            continue
        rows.append(
            f"| {req.kernel} | {req.pointers()} | {params} | sm_{req.arch} | {res['regs']} | {res['spill_stores']} "
            f"| {res['smem']} | {res['seconds']:.1f} | {cases} |"
        )
    return "\n".join(rows)


def run(
    everything: bool = False, targets=TARGETS, jobs: int = 1, cache: str | None = None
) -> tuple[list[Request], list[dict]]:
    cases = [w for w in workloads() if everything or w.ci]
    requests = []
    for arch in targets:
        if not everything and arch != 90:
            # sm_80 and sm_100 in the suite: the float32 decoder only.
            requests += capture(arch, [w for w in cases if w.value == F32 and w.D == 32])
        else:
            requests += capture(arch, cases)
    return requests, compile_all(requests, jobs, cache)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every workload, every target")
    parser.add_argument("--targets", type=int, nargs="+", default=list(TARGETS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", help="keep results here, keyed on kernel source and request")
    parser.add_argument("--json", help="write the requests and results here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the kernels would not be compiled")
    start = time.perf_counter()
    requests, results = run(args.all, args.targets, args.jobs, args.cache)
    print(table(requests, results))
    pairs = list(zip(requests, results, strict=True))
    bad = [(r, why) for r, res in pairs for why in problems(r, res)]
    seconds = sum(res.get("seconds", 0) for res in results)
    print(
        f"\n{len(requests)} specialisations, {seconds:.0f} s of compiling, "
        f"{time.perf_counter() - start:.0f} s wall with {args.jobs} jobs"
    )
    if args.json:
        rows = [
            {
                "kernel": r.kernel,
                "arch": r.arch,
                "pointers": r.pointers(),
                "params": {k: str(v) for k, v in r.params().items()},
                "cases": r.cases,
                "float64": r.is_float64(),
                **res,
            }
            for r, res in pairs
        ]
        Path(args.json).write_text(json.dumps(rows, indent=1))
    for req, why in bad:
        print(f"FAIL {req.kernel} sm_{req.arch} {req.params()}: {why}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
