"""The test suite's own cost: wall time of the README's test command and each worker's peak memory.

    python benchmarks/bench_suite.py [--workers 2] [--tests tests/]

Runs ``pytest -n WORKERS --dist loadscope`` (what ``scripts/test.sh`` runs, in the current
environment) and records, from a small plugin loaded into every worker, the peak resident memory
(``ru_maxrss``) of each worker process. The budget (issue: tests that stay affordable): under
15 minutes on a quiet 2-core machine, under 6 GB per worker. The slowest tests are listed, with
the machine's load at the start, so that a slow run on a busy machine reads as such.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

SCRIPT = "bench_suite.py"
BUDGET_S, BUDGET_MIB = 15 * 60, 6 * 1024
PLUGIN = '''
import json, os, resource
from pathlib import Path


def pytest_sessionfinish(session, exitstatus):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "controller")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    Path(os.environ["DEPLOYQ_SUITE_RSS"], worker + ".json").write_text(json.dumps({"worker": worker, "mib": peak}))
'''


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (the README's command: 2)")
    parser.add_argument("--tests", default="tests/", help="what pytest runs (a subset for a quick look)")
    return parser.parse_args(argv)


def run(argv: list[str]) -> common.Section:
    args = parse_args(argv)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_suite.") as tmp:
        (Path(tmp) / "deployq_suite_memory.py").write_text(PLUGIN)
        env = {**os.environ, "PYTHONPATH": tmp, "DEPLOYQ_SUITE_RSS": tmp}
        command = [sys.executable, "-m", "pytest", "-n", str(args.workers), "--dist", "loadscope", "-q",
                   "--durations=10", "-p", "deployq_suite_memory", args.tests]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=common.ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        peaks = {json.loads(p.read_text())["worker"]: json.loads(p.read_text())["mib"]
                 for p in Path(tmp).glob("*.json")}
    tail = done.stdout.strip().splitlines()
    if done.returncode != 0:  # the failures, for whoever reads the log
        print("\n".join(line for line in tail if line.startswith(("FAILED", "ERROR"))) or "\n".join(tail[-40:]),
              file=sys.stderr)
    summary = next((line for line in reversed(tail) if " in " in line and ("passed" in line or "failed" in line)),
                   f"exit status {done.returncode}")
    slowest = [m.groups() for m in (re.match(r"^(\d+\.\d+)s (call|setup|teardown)\s+(\S+)", line) for line in tail)
               if m][:10]
    workers = {k: v for k, v in peaks.items() if k != "controller"} or peaks
    peak = max(workers.values(), default=float("nan"))
    rows = [["wall time", f"{seconds / 60:.1f} min", f"{BUDGET_S / 60:.0f} min", "yes" if seconds <= BUDGET_S else "no"],
            ["peak memory of a worker", f"{peak / 1024:.2f} GiB ({', '.join(f'{k} {v / 1024:.2f}' for k, v in sorted(workers.items()))})",
             f"{BUDGET_MIB / 1024:.0f} GiB", "yes" if peak <= BUDGET_MIB else "no"]]
    body = common.table(["what", "measured", "budget", "within"], rows, "lrrl") + [
        "", f"`pytest -n {args.workers} --dist loadscope {args.tests}`: {summary.strip('= ')}. Load average "
        f"at the start: {load:.2f} on {common.usable_cores()} cores (above ~0.5, another job shared the machine "
        "and the time is not the suite's own).", "", "Slowest tests:", "",
        *common.table(["seconds", "phase", "test"], [[t, phase, f"`{test}`"] for t, phase, test in slowest], "rll")]
    return common.Section("suite", "The test suite: time and memory", common.command_line(SCRIPT, argv), body)


def main(argv: list[str]) -> int:
    return common.main_for(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
