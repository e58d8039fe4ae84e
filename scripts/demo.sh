#!/usr/bin/env bash
# The main job on the shipped default: export the low-light example's QAT checkpoint to float and
# int8 ONNX, diff them layer by layer on DNG files from a camera training never saw, enhance whole
# frames with both models and put float | int8 | ground truth side by side in one PNG.
# Sets up .venv with the pinned versions first (once).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-venv.sh ""  # no extras (an empty argument: not this script's own $1)
out="${1:-build/lowlight}"
ckpt="examples/lowlight/checkpoints/qat.pt"

echo "== deployq export (QAT checkpoint -> float + int8 ONNX, any frame size) =="
deployq export --ckpt "$ckpt" --target int8 --dynamic-hw --out "$out"

echo "== DNG files from the test camera (SID layout): 256 x 256 crops, and two whole frames =="
python -m deployq.examples.lowlight.make_raw "$out/raw" --scenes 4 --size 256 --split test
python -m deployq.examples.lowlight.make_raw "$out/frames" --scenes 2 --size 0 --split test --seed 3

echo "== deployq diff (float vs int8, quant point by quant point) =="
deployq diff "$out/model.float.onnx" "$out/model.int8.onnx" --input "$out/raw/short" --input-shape 1,4,128,128 \
    --top 12 --html "$out/diff.html"

echo "== deployq check (torch fake-quant vs ONNX, in integer codes) =="
deployq check --ckpt "$ckpt" --onnx "$out/model.int8.onnx" --random 2 | tail -n 1

echo "== deployq run (raw -> ONNX -> sRGB PNG, whole frames in one call): int8, and the float model (float.pt) =="
deployq run "$out/model.int8.onnx" "$out/frames/short" --out "$out/png-int8" --bench 20
deployq export --ckpt examples/lowlight/checkpoints/float.pt --model deployq.examples.lowlight.model:build \
    --model-kwargs '{"width": 16}' --input-shape 1,4,64,64 --target fp32 --dynamic-hw --out "$out/float" -q
deployq run "$out/float/model.float.onnx" "$out/frames/short" --out "$out/png-float"
python -m deployq.examples.lowlight.compare "$out/frames" --float "$out/png-float" --int8 "$out/png-int8" \
    --out "$out/compare.png"
