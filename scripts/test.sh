#!/usr/bin/env bash
# Install the test dependencies (pinned, into .venv) and run the whole test suite on 2 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-venv.sh test,bench
python -m pytest -n "${PYTEST_WORKERS:-2}" "$@"
