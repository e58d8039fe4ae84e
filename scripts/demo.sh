#!/usr/bin/env bash
# The main job on the shipped default: export the low-light example's QAT checkpoint to float and
# int8 ONNX, diff them layer by layer on real (synthetic) DNG files, and enhance those files.
# Sets up .venv with the pinned versions first (once).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-venv.sh ""  # no extras (an empty argument: not this script's own $1)
out="${1:-build/lowlight}"
ckpt="examples/lowlight/checkpoints/qat.pt"

echo "== deployq export (QAT checkpoint -> float + int8 ONNX) =="
deployq export --ckpt "$ckpt" --target int8 --out "$out"

echo "== held-out DNG files (SID layout) =="
python -m deployq.examples.lowlight.make_raw "$out/raw" --scenes 4 --size 256

echo "== deployq diff (float vs int8, quant point by quant point) =="
deployq diff "$out/model.float.onnx" "$out/model.int8.onnx" --input "$out/raw/short" --top 12 --html "$out/diff.html"

echo "== deployq check (torch fake-quant vs ONNX, in integer codes) =="
deployq check --ckpt "$ckpt" --onnx "$out/model.int8.onnx" --random 2 | tail -n 1

echo "== deployq run (raw -> int8 ONNX -> sRGB PNG) =="
deployq run "$out/model.int8.onnx" "$out/raw/short" --out "$out/png" --bench 20
