#!/usr/bin/env bash
# Issue 16's GPU rows in one prepared run (~8 minutes on an H200); every result file goes under $OUT.
#   (a) ControlNet forward, SD1.5 and SDXL, batch 2, fp16: ours eager / cached hint / compiled / CUDA-graphed vs
#       diffusers eager and graphed (bench_controlnet_forward.py);
#   (b) in a real ComfyUI (COMFYUI_PATH, COMFYUI_PYTHON): the step with 0, 1, 2 ControlNets, ours vs core,
#       accelerate none / compile / cuda_graph (bench_comfyui_step.py); skipped, saying so, without COMFYUI_PATH;
#   (c) training samples/s and peak memory, ours vs diffusers' ControlNet step, SD1.5 512^2 batch 8 bf16
#       (bench_train.py).
# Each part has its own time limit, so one that hangs cannot eat the others' time.
#   OUT=/some/dir bash bench/gpu_bench.sh            # on the GPU machine
#   bash bench/gpu_bench.sh --smoke                  # CPU: every part's code path on tiny shapes, nothing written
set -u
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--smoke" ]; then OUT=$(mktemp -d); else OUT=${OUT:-bench/results}; fi
mkdir -p "$OUT"
PP=$(mktemp -d)  # `import zeroconv` resolves to this checkout
ln -s "$PWD" "$PP/zeroconv"
export PYTHONPATH="$PP${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
status=0
part() {  # part LIMIT_S NAME COMMAND...: run with a time limit, log to $OUT/NAME.log, remember failures
    local limit=$1 name=$2; shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -40
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "!! $name exited $rc (124: over its limit)"; status=1; }
}
if [ "${1:-}" = "--smoke" ]; then
    part 300 smoke-forward "$PY" bench/bench_controlnet_forward.py --smoke
    part 300 smoke-train "$PY" bench/bench_train.py --smoke
    exit $status
fi
{
    date -u; uptime; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    "$PY" -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, platform.python_version())"
    "$PY" -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -1
    echo "ComfyUI: ${COMFYUI_PATH:-not given (part b skipped)}"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
part 210 forward "$PY" bench/bench_controlnet_forward.py --iters 50 --out "$OUT"
if [ -n "${COMFYUI_PATH:-}" ]; then
    part 150 comfyui-step "$PY" bench/bench_comfyui_step.py --device cuda --size 512 --steps 10 --repeats 3 \
        --accelerate none,compile,cuda_graph --out "$OUT"
else
    echo "== comfyui-step skipped: set COMFYUI_PATH (and COMFYUI_PYTHON) to a ComfyUI checkout" | tee "$OUT/comfyui-step.log"
fi
part 120 train "$PY" bench/bench_train.py --batch 8 --size 512 --precision bf16 --warmup 3 --iters 10 --out "$OUT"
rm -rf "$PP"
exit $status
