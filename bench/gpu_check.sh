#!/usr/bin/env bash
# The GPU check, as one command on a CUDA machine (bench/bench_gpu.py's docstring says what it measures):
#   bash bench/gpu_check.sh          # about 5 minutes on one H200; nothing is downloaded
# 1. the `gpu` tests (tests/test_gpu.py: training, bf16, generation, checkpoints and HF import on cuda vs CPU);
# 2. GPT-2 small and medium training steps and decoding against Hugging Face transformers, one table.
# It uses the machine's own python3 and torch (install nothing: meshtron runs from this tree on PYTHONPATH).
# Logs and the table also go to $OUT when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp/meshtron-gpu-check}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
          "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
"$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rs 2>&1 | tee "$OUT_DIR/gpu_tests.log"
tests=${PIPESTATUS[0]}
"$PY" bench/bench_gpu.py "$@" 2>&1 | tee "$OUT_DIR/gpu_bench.log"
bench=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests, benchmark exit $bench"
exit $(( tests != 0 || bench != 0 ))
