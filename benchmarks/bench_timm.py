"""timm sweep: one small variant of every architecture family in timm's registry, through every stage.

    python benchmarks/bench_timm.py [--families resnet,levit] [--calib 16] [--eval 8] [--timeout 900]
                                    [--jobs 2] [--rows DIR]

For every family of ``deployq.examples.timm_models.FAMILIES`` (random weights, BatchNorm statistics
of photographs, the family's small input size), each in its own process (a crash or a hang is a
row, not the end of the run):

1. **inspect**: prepare the model (capture, normalize, place); how it was captured, how many quant points;
2. **export**: deployq post-training export at int8 with calibration data (`deployq export --model ... --calib ...`);
3. **check**: torch fake-quant vs onnxruntime (reference view, local), at most 1 LSB everywhere;
4. **diff**: the int16 export's ``diff --mode local``: every row pairs a quant point with itself, so
   every row must be at least 50 dB on calibration inputs, or within 1 dB of what rounding to its
   own int16 grid allows (the float tensor's power over step²/12: a tensor whose max is 1000 times
   its rms, efficientvit_mit's attention sums, gets 41 dB from int16 rounding alone; a row paired
   with the wrong tensor is tens of dB below that);
5. **vs quantize_static**: output SQNR of the fully optimized int8 graph against the float graph on
   held-out crops, for deployq and for onnxruntime's ``quantize_static`` (QDQ, per-channel s8 weights,
   u8 activations, MinMax) on deployq's float graph with the same calibration crops; deployq passes
   at or above quantize_static's minus 0.1 dB.

A stage that fails names its reason; later stages are not run. ``--rows DIR`` keeps every family's
row in DIR as it is measured (with the commit it was measured at) and measures only the families
without one there: a sweep of hours can stop and go on, and a family rerun after a fix is one file
deleted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from deployq.core.files import atomic_path

SCRIPT = "bench_timm.py"
FACTORY = "deployq.examples.timm_models:build"
STAGES = ("inspect", "export", "check", "diff", "vs quantize_static")
PAIRING_DB = 50.0
MARGIN_DB = 0.1


@dataclass
class Row:
    family: str
    model: str = ""
    params_m: float = math.nan
    size: int = 0
    capture: str = ""
    points: int = 0
    export_s: float = math.nan
    check_lsb: int = -1
    pairing_db: float = math.nan
    deployq_db: float = math.nan
    static_db: float = math.nan
    deployq_qdq_db: float = math.nan  # the same two models without fused kernels (QDQ computed in float)
    static_qdq_db: float = math.nan
    failed_stage: str = ""
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    commit: str = ""  # the deployq commit it was measured at

    @property
    def passed(self) -> int:
        """How many stages passed (all five: the row passes)."""
        return STAGES.index(self.failed_stage) if self.failed_stage else len(STAGES)


def parse_args(argv: list[str]) -> argparse.Namespace:
    from deployq.examples.timm_models import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="timm families, comma-separated")
    parser.add_argument("--calib", type=int, default=16, help="calibration crops (both tools)")
    parser.add_argument("--eval", type=int, default=32, help="held-out crops the SQNR is measured on")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds one family may take")
    parser.add_argument("--jobs", type=int, default=1, help="families measured at once (one process each)")
    parser.add_argument("--rows", type=Path, help="folder that keeps each family's row; families with one are not rerun")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one family in this process (the worker)
    parser.add_argument("--row", type=Path, help=argparse.SUPPRESS)  # where the worker writes its row
    return parser.parse_args(argv)


def _stage(row: Row, name: str, fn):
    """Run one stage; on failure record it in `row` and return None."""
    try:
        return fn()
    except Exception as err:  # a failing stage is a result of the benchmark
        row.failed_stage, row.reason = name, common.error_text(err)
        return None


def measure(family: str, args: argparse.Namespace, work: Path) -> Row:
    import numpy as np
    import torch

    from benchmarks.bench_conformance import outputs, sqnr_db
    from deployq.deploy.export import export
    from deployq.examples import timm_models
    from deployq.examples import torchvision_models as tvm
    from deployq.qat.loading import resolve_model
    from deployq.qat.prepare import quant_points
    from deployq.verify.check import check_parity
    from deployq.verify.diff import diff

    row = Row(family)
    model, kwargs, size = timm_models.family_model(family)
    row.model, row.size = kwargs["name"], size
    row.params_m = sum(p.numel() for p in model.parameters()) / 1e6
    model = tvm.with_photo_statistics(model, size, batches=2)
    torch.save(model.state_dict(), work / "state.pt")
    calib = tvm.photo_crops(args.calib, size, seed=10).numpy()
    np.save(work / "calib.npy", calib)
    held_out = tvm.photo_crops(args.eval, size, held_out=True, seed=20).numpy()
    shape = (1, 3, size, size)

    def load():
        return resolve_model(ckpt=str(work / "state.pt"), factory=FACTORY, factory_kwargs=kwargs, input_shape=shape)

    with common.quiet():
        source = _stage(row, "inspect", load)
        if source is None:
            return row
        points = source.qmodel.get_submodule("act_quant")
        row.capture, row.points, row.notes = points.capture, len(quant_points(source.qmodel)), list(points.notes)
        done = _stage(row, "export", lambda: common.timed(lambda: export(
            source, work / "int8", calib=str(work / "calib.npy"), calib_limit=args.calib, ort_format=False,
            progress=False)))
        if done is None:
            return row
        result, row.export_s = done
    name_in = result.quant_model.graph.input[0].name
    feeds = [{name_in: x[None]} for x in held_out]

    def check():
        parity = check_parity(result.qmodel, result.quant_model, [torch.from_numpy(f[name_in]) for f in feeds[:2]])
        row.check_lsb = parity.max_lsb
        if parity.max_lsb > 1:
            raise AssertionError(parity.verdict())

    if _stage(row, "check", lambda: check() or True) is None:
        return row

    def pairing():
        with common.quiet():
            wide = export(load(), work / "int16", target="int16", calib=str(work / "calib.npy"),
                          calib_limit=args.calib, ort_format=False, progress=False)
        report = diff(wide.float_model, wide.quant_model, [{name_in: x[None]} for x in calib[:2]], mode="local",
                      progress=False)
        worst = min(report.rows, key=lambda r: r.stats.sqnr_db)
        row.pairing_db = worst.stats.sqnr_db
        for r in report.rows:
            floor = min(PAIRING_DB, grid_limit_db(r) - 1.0)
            if r.stats.sqnr_db < floor:
                raise AssertionError(f"int16 local row {r.point.name!r} is {r.stats.sqnr_db:.1f} dB "
                                     f"(< {floor:.1f}; its grid allows {grid_limit_db(r):.1f})")

    if _stage(row, "diff", lambda: pairing() or True) is None:
        return row

    def versus():
        def db(path, optimize=True):
            return sqnr_db(flat, [o for out in outputs(path, feeds, optimize) for o in out])

        flat = [o for out in outputs(result.files["float"], feeds) for o in out]
        row.deployq_db, row.deployq_qdq_db = db(result.files["int8"]), db(result.files["int8"], optimize=False)
        try:  # the peer failing (to quantize, or to run what it wrote) is its row's note, not deployq's failure
            static = common.quantize_static_qdq(result.files["float"], work / "static.onnx",
                                                [x[None] for x in calib], "MinMax")
            row.static_db, row.static_qdq_db = db(static), db(static, optimize=False)
        except Exception as err:
            row.notes.append(f"quantize_static failed: {common.error_text(err)[:200]}")
            return
        if row.deployq_db < row.static_db - MARGIN_DB:
            raise AssertionError(f"int8 output SQNR {row.deployq_db:.2f} dB, quantize_static {row.static_db:.2f} dB "
                                 f"(QDQ semantics without fused kernels: {row.deployq_qdq_db:.2f} and "
                                 f"{row.static_qdq_db:.2f} dB)")

    _stage(row, "vs quantize_static", lambda: versus() or True)
    return row


def grid_limit_db(row) -> float:
    """The SQNR rounding to a diff row's own grid allows: its float tensor's mean power over the
    uniform rounding noise step²/12 (per-tensor activation step)."""
    step = max(row.point.record.scale)
    power = row.stats.ref_sq / max(row.stats.n, 1)
    return 10 * math.log10(power / (step * step / 12)) if power > 0 and step > 0 else math.inf


def run_one(family: str, args: argparse.Namespace) -> Row:
    with tempfile.TemporaryDirectory(prefix=f"bench_timm.{family}.") as tmp:
        try:
            with common.torch_threads(1):
                return measure(family, args, Path(tmp))
        except Exception as err:  # building the model or its data failed
            return Row(family, failed_stage="inspect", reason=f"setting up: {common.error_text(err)}")


def run_isolated(family: str, args: argparse.Namespace) -> Row:
    """`family` measured in a fresh process (a crash, an out-of-memory kill or a hang is a row);
    with ``--rows``, read from there if it was measured before, else measured and kept there."""
    kept = args.rows / f"{family}.json" if args.rows else None
    if kept is not None and kept.exists():
        return Row(**json.loads(kept.read_text()))
    row = _measure_isolated(family, args)
    row.commit = row.commit or common.git_commit()
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(kept) as tmp:  # a sweep stopped mid-write leaves no half row
            Path(tmp).write_text(json.dumps(asdict(row)))
    return row


def _measure_isolated(family: str, args: argparse.Namespace) -> Row:
    with tempfile.TemporaryDirectory(prefix="bench_timm.row.") as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--one", family, "--row", str(out),
                   "--calib", str(args.calib), "--eval", str(args.eval)]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
        except subprocess.TimeoutExpired:
            return Row(family, failed_stage="inspect", reason=f"timed out after {args.timeout} s")
        if not out.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            return Row(family, failed_stage="inspect", reason=f"the worker died ({tail[0][:200]})")
        row = Row(**json.loads(out.read_text()))
        print(f"{family}: {time.perf_counter() - start:.0f} s, "
              f"{'passes' if not row.failed_stage else row.failed_stage + ': ' + row.reason[:120]}", file=sys.stderr)
        return row


def _db(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def cells(r: Row) -> list[str]:
    marks = ["✓" if i < r.passed else ("✗" if i == r.passed else "") for i in range(len(STAGES))]
    return [r.family, r.model, f"{r.params_m:.1f}" if not math.isnan(r.params_m) else "-", str(r.size or "-"),
            r.capture or "-", str(r.points or "-"), *marks,
            str(r.check_lsb) if r.check_lsb >= 0 else "-", _db(r.pairing_db), _db(r.deployq_db), _db(r.static_db),
            "-" if math.isnan(r.deployq_db - r.static_db) else f"{r.deployq_db - r.static_db:+.2f}",
            _failure_text(r)]


def _failure_text(r: Row) -> str:
    """Why the row stopped; or, where it passed, why the peer has no number."""
    if r.failed_stage:
        text = f"{r.failed_stage}: {r.reason}"
    else:
        text = next((n for n in r.notes if n.startswith("quantize_static failed")), "")
    return text.replace("|", "\\|").replace("\n", " ")[:300]


def _percent(k: int, n: int) -> str:
    """k of n in percent, rounded down to a tenth: 93 of 98 is 94.8 %, never a 95 % it is not."""
    return f"{math.floor(1000 * k / max(n, 1)) / 10:.1f} %"


def summary(rows: list[Row]) -> list[str]:
    n = len(rows)
    passed = [r for r in rows if not r.failed_stage]
    compared = [r for r in rows if not math.isnan(r.deployq_db) and not math.isnan(r.static_db)]
    ahead = sum(r.deployq_db >= r.static_db - MARGIN_DB for r in compared)
    per_stage = [sum(r.passed > i for r in rows) for i in range(len(STAGES))]
    captured = {m: sum(r.capture == m for r in rows) for m in sorted({r.capture for r in rows if r.capture})}
    return [
        f"**{len(passed)} of {n} families pass every stage** ({_percent(len(passed), n)}). "
        f"Per stage: {', '.join(f'{s} {k}/{n}' for s, k in zip(STAGES, per_stage))}. deployq's int8 output SQNR is at "
        f"or above quantize_static's minus {MARGIN_DB} dB on {ahead} of the {len(compared)} families both ran "
        f"({_percent(ahead, len(compared))}). "
        f"Captured with {', '.join(f'{m}: {k}' for m, k in captured.items())}.",
    ]


def run(argv: list[str]) -> common.Section:
    args = parse_args(argv)
    from deployq.examples.timm_models import FAMILIES, import_timm

    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise common.BenchmarkError(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    try:
        timm = import_timm()
    except ImportError as err:
        raise common.BenchmarkError(f"{err} (it is in the [bench] extra)") from None
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:  # each family is its own process
        rows = list(pool.map(lambda f: run_isolated(f, args), families))
    commits = Counter(r.commit or "unknown" for r in rows)
    body = common.table(
        ["family", "model", "params (M)", "input", "capture", "quant points", *STAGES, "check max LSB",
         "int16 local: lowest row (dB)", "int8 SQNR deployq (dB)", "quantize_static (dB)", "Δ (dB)", "failure"],
        [cells(r) for r in rows], "lllrlrcccccrrrrrl")
    notes = [
        "",
        *summary(rows),
        "",
        f"timm {timm.__version__}; {len(families)} families of the {len(FAMILIES)} in "
        "`deployq.examples.timm_models.FAMILIES` (every module of `timm.models` that registers a model, its "
        "variant with the fewest parameters; `depth=2` where that variant has over 80 M). Random weights with "
        "BatchNorm statistics of photographs; calibration: "
        f"{args.calib} crops of scikit-image's photographs, SQNR on {args.eval} crops of two other photographs, "
        "all outputs of the fully optimized graphs. ✓: the stage passed, ✗: where the family stopped (the "
        "failure column says why). *capture*: fx (symbolic torch.fx) or torch.export (symbolic tracing "
        "stopped at Python control flow). quantize_static: QDQ, per-channel s8 weights, u8 activations, "
        "MinMax, on deployq's float graph with the same calibration crops; both scored fully optimized (fused "
        "integer kernels; where that fails the stage, the failure also gives both without fused kernels, the "
        "QDQ semantics every CPU computes alike). Rows measured at "
        + ", ".join(f"`{c}` ({k})" for c, k in commits.most_common()) + ".",
    ]
    return common.Section("timm", "timm sweep: every architecture family through inspect, export, check, diff and "
                          "against quantize_static", common.command_line(SCRIPT, argv), body + notes)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.one:  # the worker: one family, its row as JSON
        row = run_one(args.one, args)
        row.commit = common.git_commit()
        args.row.write_text(json.dumps(asdict(row)))
        return 0
    return common.main_for(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
