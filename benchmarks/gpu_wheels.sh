#!/usr/bin/env bash
# Run on a machine with PyPI, from the repo root, before benchmarks/gpu_run.sh on a GPU machine that may reach no
# package index: downloads the pure-Python wheels the GPU benchmarks need beyond torch, triton, transformers,
# accelerate, pyarrow, pandas, xxhash and huggingface-hub (trl, liger-kernel, datasets and datasets' two missing
# dependencies) into .whl/ (about 2 MiB), which git ignores; copy it to the GPU machine with the working tree.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl trl==1.16.0 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -l .whl
