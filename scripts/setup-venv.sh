#!/usr/bin/env bash
# Create .venv (once) and install deployq with the pinned versions of constraints.txt.
# Usage: source scripts/setup-venv.sh [EXTRA]   e.g. EXTRA=test installs deployq[test]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DEPLOYQ_VENV:-$root/.venv}"
extra="${1:-}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
spec="$root"
[ -n "$extra" ] && spec="$root[$extra]"
stamp="$venv/.deployq-installed-${extra:-base}"
if [ ! -f "$stamp" ] || [ "$root/constraints.txt" -nt "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install --quiet -c "$root/constraints.txt" -e "$spec"
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
