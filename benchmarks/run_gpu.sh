#!/usr/bin/env bash
# The GPU checks in one command, for a CUDA machine (about 9 minutes on an H200):
#     bash benchmarks/run_gpu.sh [OUT]        # OUT: where gpu.{json,md} and speed-gpu.{json,md} go
# 1. benchmarks/gpu.py: the T1 recipe at full protocol (s/round per method, GPU utilisation, runs per GPU, the
#    projected full grid); 2. benchmarks/speed.py on CUDA (N=10): harness vs peer-style loop vs eager floor.
# Needs torch with CUDA and this package importable (installed here without dependencies; MLflow not needed).
set -u
OUT=${1:-benchmarks/results}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
$PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
mkdir -p "$OUT"
timeout 330 $PY -m benchmarks.gpu --out "$OUT" --budget 290 2>&1 | tee "$OUT/gpu.log"
timeout 170 $PY -m benchmarks.speed --device cuda --setting N=10 --reps 2 --no-mlflow --no-levers \
    --out "$OUT" --name speed-gpu 2>&1 | tail -15
ls -la "$OUT"
