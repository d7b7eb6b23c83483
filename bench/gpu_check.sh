#!/usr/bin/env bash
# One command on a CUDA machine: bf16 LoRA steps on a Qwen3-0.6B-shaped model, GradCache at 8x the
# batch, full fine-tuning for comparison, FSDP over the machine's GPUs, and a Qwen3-VL-2B-shaped
# model; JSON + a markdown table in bench/results/ (or --out DIR). Budget: under 8 minutes on one H200.
#   bench/gpu_check.sh                 # on the GPU machine
#   bench/gpu_check.sh --dry-run       # CPU, tiny shapes (what make test runs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Hard stop a little under 8 minutes; sections stop starting after --budget-s (420 s by default).
exec timeout --signal=TERM 470 "$PY" -m bench.gpu_check "$@"
