#!/usr/bin/env bash
# Everything a lent GPU session needs, in one command, writing under $OUT:
#   build the CUDA extension (JIT, timed), run the GPU tests, run the benchmark.
# Run from the repository root on the GPU machine:  bash benchmarks/gpu_session.sh
# Liger-Kernel is not installed there: carry its wheel (and triton's, if the version differs) in
# .whl/ (see the device notes) to include the HF + Liger column; it is skipped otherwise.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 SHARDFORMER_EXT_DIR=/tmp/sf-ext
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
{ nvidia-smi; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1
tail -1 "$OUT/env.txt"

echo "== build"
python3 -c "import time; t = time.time(); from shardformer.kernels import cuda; print('extension loaded:', cuda.available(), f'{time.time() - t:.0f}s')" 2>&1 | tee "$OUT/build.log"

echo "== GPU tests"
timeout 240 python3 -m pytest -q -m gpu tests/test_kernels_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15

echo "== benchmark"
timeout 330 python3 examples/benchmark.py --out "$OUT/benchmark.json" 2>&1 | tee "$OUT/benchmark.log" | tail -40
