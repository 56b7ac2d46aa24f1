#!/usr/bin/env bash
# GPU check of the BTC CUDA backend (< 8 minutes on an H200). Needs only what the device image has:
# python3 with torch, cupy-cuda13x, pytest (+ typer, rich, pyyaml, transformers); abq is not installed,
# so the package is taken from src/. Run from the repository root:  bash scripts/gpu_check.sh
# Writes the log, the pytest report and the GEMM benchmark (JSON + markdown) under $OUT when set,
# else under benchmarks/results/.
set -euo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu-check-$(date +%Y%m%d-%H%M%S).log"
exec > >(tee -a "$LOG") 2>&1

echo "== $(date -Is) abq GPU check, log: $LOG"
nvidia-smi || echo "nvidia-smi failed"
python3 - <<'PY'
import torch, cupy
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
print("cupy", cupy.__version__, "runtime", cupy.cuda.runtime.runtimeGetVersion())
from abqcli.btc import cuda as bc
print("abqcli.btc.cuda.available():", bc.available())
PY

echo "== GPU tests (bit-exact integer GEMM, quantize+pack, float output)"
status=0
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider --maxfail=25 --durations=10 \
    --junitxml="$RESULTS/gpu-tests.xml" tests/test_cuda_gpu.py || status=$?

echo "== compile and CPU indexing tests (nvcc, when present; NVRTC through CuPy's library)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_compile.py tests/test_cuda_indexing.py \
    || status=$?

echo "== GEMM benchmark"
timeout 120 python3 -m abqcli.bench_gemm --out "$RESULTS" || status=$?

echo "== done (status $status), log: $LOG"
exit "$status"
