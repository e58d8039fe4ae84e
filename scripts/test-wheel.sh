#!/usr/bin/env bash
# The tests that a packaging mistake (a module, a data file or a dependency left out) would fail,
# run against the built wheel installed outside the source tree, as a user gets deployq.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-venv.sh test,bench
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip wheel --quiet --no-deps -w "$work/dist" .
python -m pip install --quiet --no-deps --target "$work/site" "$work"/dist/deployq-*.whl
cp -r tests "$work/tests"
cp pyproject.toml "$work/"  # the pytest settings (markers, warning filters); not the sources
cd "$work"
export PYTHONPATH="$work/site"
python -c "import deployq, sys; assert deployq.__file__.startswith('$work/site'), deployq.__file__; print('testing', deployq.__file__)"
python -m pytest -q -n "${PYTEST_WORKERS:-2}" -p no:cacheprovider tests/test_lowlight.py tests/test_export.py \
    tests/test_run.py tests/test_checkpoint.py tests/test_hostile.py tests/test_files.py tests/test_api.py \
    tests/test_native_kernels.py
