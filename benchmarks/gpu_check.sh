#!/usr/bin/env bash
# The GPU numbers of the README in one command for a lent device (about 9 minutes on one H200):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# training MFU of imagenet256 and cc12m-256 and the latency of one guided 1024^2 image, per mode; each part is
# time-boxed so a slow compile cannot eat the others. Tables go to stdout and OUT_DIR (default: runs/gpu_check).
set -u
out=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
if [ ! -x "$py" ]; then
  python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && .venv/bin/pip install -q -e . && py=.venv/bin/python
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
timeout 270 "$py" benchmarks/train_speed.py --presets imagenet256 cc12m-256 --modes bf16 bf16+cl bf16+cl+compile \
  --mfu --steps 10 | tee "$out/train_speed.md"
timeout 240 "$py" benchmarks/sample_speed.py --presets cc12m-1024 --modes bf16 bf16+cl bf16+cl+compile \
  --runs ddim:50 dpmpp_2m:15 unipc:10 | tee "$out/sample_speed.md"
