#!/usr/bin/env bash
# Everything that needs the GPU, in one call of the lent machine (see benchmarks/README.md):
#   the whole test suite on CUDA (conformance of every mixer with the Triton paths, kernels natively),
#   the full-attention backend check, then the three benchmarks, which write benchmarks/results/<gpu>.json
#   and, on the lent machine, $OUT/results-*.json to merge back with `python benchmarks/common.py FILE...`.
# Usage (repo root): bash benchmarks/gpu_all.sh [tests|bench|all]   (default all)
set -uo pipefail
what=${1:-all}
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then  # fla-core for the comparisons, carried as a wheel
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
    # the PyPI xformers wheel is built against CUDA 12: its runtime (nvidia-cuda-runtime-cu12, carried too)
    export LD_LIBRARY_PATH=/tmp/site/nvidia/cuda_runtime/lib:${LD_LIBRARY_PATH:-}
fi
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)"
rc=0
if [[ $what == tests || $what == all ]]; then
    bash benchmarks/gpu_tests.sh "$OUT" || rc=1
    python3 -m mixerzoo demo --device cuda 2>&1 | tee "$OUT/demo.log" | tail -n 20 || rc=1
fi
if [[ $what == bench || $what == all ]]; then
    python3 benchmarks/check_backends.py 2>&1 | tee "$OUT/backends.log" | tail -n 20 || rc=1
    python3 benchmarks/attention.py 2>&1 | tee "$OUT/attention.log" | tail -n 40 || rc=1
    python3 benchmarks/gdn.py 2>&1 | tee "$OUT/gdn.log" | tail -n 30 || rc=1
    python3 benchmarks/eviction.py 2>&1 | tee "$OUT/eviction.log" | tail -n 30 || rc=1
fi
exit $rc
