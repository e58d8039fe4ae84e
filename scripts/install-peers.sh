#!/usr/bin/env bash
# Install the peer tools benchmarks/bench_peers.py and bench_onnx_in.py compare with (NNCF, AIMET), and
# facenet-pytorch (trained MTCNN weights inside its wheel; bench_peers.py, bench_budgets.py) into .peers/, beside
# the project's venv, not in it: both pull dependencies (a CUDA torch, torchvision) that would
# replace the pinned CPU torch. Only their pure-Python dependencies are installed, pinned.
# Usage: scripts/install-peers.sh   (after source scripts/setup-venv.sh test,bench)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${DEPLOYQ_VENV:-$root/.venv}/bin/python"
target="$root/.peers"
"$python" -m pip install --quiet --no-deps --target "$target" \
    nncf==3.4.0 aimet-torch==2.42.0 \
    attrs==26.1.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 \
    openvino-telemetry==2025.2.0 psutil==7.2.2 pydot==4.0.1 pyparsing==3.3.3 tabulate==0.10.0 \
    bokeh==3.9.2 tornado==6.6.1 \
    facenet-pytorch==2.6.0 requests==2.34.2 urllib3==2.8.0 charset-normalizer==3.5.3 idna==3.20 \
    certifi==2026.10.19.post1
# benchmarks/bench_onnx_in.py reads the trained models inside these wheels (not installed)
"$python" -m pip download --quiet --no-deps --dest "$target/wheels" rapidocr-onnxruntime==1.4.4 nudenet==3.4.2
echo "installed NNCF 3.4.0, AIMET 2.42.0 and facenet-pytorch 2.6.0 into $target, the wheels of rapidocr-onnxruntime and nudenet into $target/wheels"
