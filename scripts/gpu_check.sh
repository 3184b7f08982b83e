#!/usr/bin/env bash
# What a session lent a GPU runs first: the whole suite on CUDA, then the GPU benchmark.
#
#   bash scripts/gpu_check.sh fetch     # here, with network: peer wheels into .whl/
#   bash scripts/gpu_check.sh tests     # on the GPU machine (no network)
#   bash scripts/gpu_check.sh compile   # every Triton specialisation for sm_80/90/100:
#                                       # registers, spills (make gpu-compile; no GPU needed)
#   bash scripts/gpu_check.sh triton-op # the triton_ops traced on CUDA: opcheck, aot_eager
#                                       # full graph, Inductor (~3 min; tests runs them too)
#   bash scripts/gpu_check.sh bench float32 [bench flags]   # on the GPU machine,
#   bash scripts/gpu_check.sh bench bfloat16                # one call each (~5 min)
#   bash scripts/gpu_check.sh bench float32 --deterministic --cases encoder-N2 decoder-N2
#
# The GPU machine has Python 3.12, torch, triton, numba, pytest and hypothesis
# but no network: the package runs from src/, and what it lacks travels as wheels
# in .whl/ (carry it: the device tool's `carry` argument). Logs and JSON go to
# $OUT (the device tool's output folder), or ./gpu_out.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: gpu_check.sh fetch|tests|compile|triton-op|bench DTYPE [bench flags]}
out=${OUT:-gpu_out}
mkdir -p "$out"
if [ -z "${PYTHON:-}" ] && [ "$stage" = fetch ] && [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python # reading torch-ms-deform-attn's metadata imports torch
fi
py=${PYTHON:-python3}

if [ "$stage" = fetch ]; then
    mkdir -p .whl
    # deformops is pure Python (its Triton kernels compile on first use);
    # pycocotools for the training tests; setuptools, wheel and packaging to
    # build torch-ms-deform-attn from source there, against that torch and CUDA.
    $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl deformops==3.0.1 pycocotools==2.0.10 'setuptools>=77' wheel 'packaging>=24.2' \
        || exit
    $py -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d .whl \
        torch-ms-deform-attn==0.1.1 || exit
    ls -l .whl
    exit
fi

site=/tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --upgrade --target $site .whl/*.whl || exit
fi
export PYTHONPATH=src:$site PYTHONUNBUFFERED=1
unset TRITON_INTERPRET # the real compiler, not the interpreter CI uses

if [ "$stage" = bench ] && [ ! -d $site/torch_ms_deform_attn ] &&
    compgen -G ".whl/torch_ms_deform_attn-*.tar.gz" >/dev/null; then
    # The reference CUDA op's descendant, for this GPU only (a minute or two;
    # once per machine). FORCE_CUDA: fail rather than build a CPU-only peer.
    arch=$($py -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    TORCH_CUDA_ARCH_LIST=$arch FORCE_CUDA=1 $py -m pip install -q --no-index --no-deps \
        --no-build-isolation --target $site .whl/torch_ms_deform_attn-*.tar.gz 2>&1 | tail -5 ||
        echo "torch-ms-deform-attn not built: the benchmark leaves it out"
fi

$py - <<'PY' | tee "$out/env.txt"
import torch, triton
print(f"torch {torch.__version__}, triton {triton.__version__}, "
      f"{torch.cuda.get_device_name()}, cuda {torch.version.cuda}")
PY

case "$stage" in
compile)
    PYTHON=$py bash scripts/gpu_compile.sh --json "$out/gpu_compile.json" 2>&1 | tee "$out/gpu_compile.md"
    exit "${PIPESTATUS[0]}"
    ;;
triton-op)
    # Only a GPU runs these as triton_ops (the interpreter makes them opaque):
    # opcheck's test_aot_dispatch_* trace them, Inductor compiles their kernels.
    $py -m pytest -q -rs --durations=10 tests/ops/test_triton.py \
        -k "kernel_ops or trace_into or inductor or public" 2>&1 | tee "$out/triton_op.log"
    exit "${PIPESTATUS[0]}"
    ;;
tests)
    # pytest-xdist is there, but the CPU kernels' numba cache is shared: no -n.
    $py -m pytest -q -rs --durations=15 tests 2>&1 | tee "$out/tests.log"
    ;;
bench)
    dtype=${2:?bench needs a dtype: float32, bfloat16, float16}
    shift 2
    name=bench_$dtype$(printf '%s' "$*" | tr -c 'A-Za-z0-9' '_' | sed 's/_*$//')
    $py -m msdeformattn.bench --device cuda --dtype "$dtype" "$@" \
        --json "$out/$name.json" 2>&1 | tee "$out/$name.md"
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
