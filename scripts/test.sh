#!/usr/bin/env bash
# Install the test dependencies (pinned, into .venv) and run the whole test suite on 2 workers
# (--dist loadscope: a test class or module runs in one worker, so the conformance tests of one
# model share its exports).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-venv.sh test,bench
python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadscope --durations=15 "$@"
