#!/usr/bin/env bash
# Run ON THE GPU MACHINE, from the repo root, with .whl/ copied there (see benchmarks/gpu_wheels.sh):
#     bash benchmarks/gpu_run.sh PART...      PART: env check elementwise fused trl-small trl-1.5b
# Installs those wheels into /tmp/site (no index, no deps: torch/triton/transformers stay the image's),
# puts src/ on PYTHONPATH (cfpo_loss from this working tree), and runs each part in turn, writing its log and
# JSON to $OUT (default /tmp/bench_out). A part that fails does not stop the next one.
set -uo pipefail
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD/src
else
    echo "no .whl/ here: trl, liger and datasets rows will fail (run benchmarks/gpu_wheels.sh here first)"
    export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
rc=0
for part in "$@"; do
    echo "===== $part $(date -u +%H:%M:%S)"
    case $part in
        env) nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
             python3 -m pip list 2>/dev/null | grep -iE '^(torch|triton|transformers|accelerate|trl|liger.kernel|datasets|pyarrow|dill|multiprocess) '
             python3 -c "import trl.kernels, liger_kernel.chunked_loss, datasets, cfpo_loss; print('imports ok')" ;;
        check) python3 benchmarks/bench_fused.py --device cuda --check 2>&1 | tee "$OUT/check.log" ;;
        elementwise) python3 benchmarks/bench_elementwise.py --device cuda 2>&1 | tee "$OUT/elementwise.log" ;;
        fused) python3 benchmarks/bench_fused.py --device cuda --json "$OUT/fused.json" 2>&1 | tee "$OUT/fused.log" ;;
        trl-small) python3 benchmarks/bench_trl_fused.py --device cuda --sizes 4l-h1024 4l-h2048 \
                       --json "$OUT/trl_small.json" 2>&1 | tee "$OUT/trl_small.log" ;;
        trl-1.5b) python3 benchmarks/bench_trl_fused.py --device cuda --sizes 1.5b \
                      --json "$OUT/trl_1p5b.json" 2>&1 | tee "$OUT/trl_1p5b.log" ;;
        *) echo "unknown part $part"; rc=2 ;;
    esac
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
done
exit $rc
