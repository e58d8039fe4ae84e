"""Planted bugs: does the test suite notice when the code is wrong?

    python benchmarks/bench_mutants.py [--only NAME,NAME] [--timeout 900]

Each mutant is one realistic single-line bug in a critical function (the quantization formula,
BatchNorm folding, Q/DQ insertion, each rewrite pass, each post-training method, the capture and
placement of quant points, pairing in `diff`, the factory allow-list, the gates). For each, the
tree is copied (the package laid out as it is installed: ``deployq/``, ``calib/`` as
``deployq.calib``, ...), the one line is changed in the copy, and only the tests that cover that
code run on the copy. A mutant is *caught* when those tests fail; a survivor names a behaviour no
test checks. The list grows with the code: a new critical function gets its mutants here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

SCRIPT = "bench_mutants.py"
TREE = ("deployq", "calib", "exporters", "examples", "tests", "benchmarks", "docs", "README.md", "pyproject.toml")
INSTALLED_AS = {"calib": "calib", "exporters": "exporters", "examples": "examples"}  # deployq.<name>


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # file in the repository
    old: str  # a text that occurs exactly once in it
    new: str
    tests: tuple[str, ...]  # test files (or node ids) that cover the code


MUTANTS: tuple[Mutant, ...] = (
    Mutant("formula: round half away from zero", "deployq/core/qformula.py",
           "return torch.clamp(torch.round(x / s) + zp, qmin, qmax)",
           "return torch.clamp(torch.sign(x / s) * torch.floor(torch.abs(x / s) + 0.5) + zp, qmin, qmax)",
           ("tests/test_qformula.py",)),
    Mutant("formula: multiply by 1/s", "deployq/core/qformula.py",
           "return torch.clamp(torch.round(x / s) + zp, qmin, qmax)",
           "return torch.clamp(torch.round(x * (1.0 / s)) + zp, qmin, qmax)", ("tests/test_qformula.py",)),
    Mutant("formula (numpy): zero point before rounding", "deployq/core/qformula.py",
           "return np.clip(np.rint(x / s) + zp, qmin, qmax).astype(np.int64)",
           "return np.clip(np.rint(x / s + zp), qmin, qmax).astype(np.int64)",
           ("tests/test_qformula.py", "tests/test_insert_qdq.py")),
    Mutant("range: symmetric scale over 2·qmax", "deployq/core/qformula.py", "scale = amax / qmax",
           "scale = amax / (qmax + 1)", ("tests/test_qformula.py",)),
    Mutant("folding: bias without the mean", "deployq/core/folding.py",
           "centred = -mean if bias is None else bias - mean", "centred = 0 * mean if bias is None else bias",
           ("tests/test_fold_bn.py",)),
    Mutant("folding: scale by sqrt(var) not 1/sqrt", "deployq/core/folding.py",
           "return gamma / _sqrt(var + eps)", "return gamma * _sqrt(var + eps)", ("tests/test_fold_bn.py",)),
    Mutant("insert_qdq: no clip before a 10-bit code", "exporters/insert_qdq.py",
           "if clip and rec.bits not in (8, 16):", "if clip and rec.bits not in (8, 10, 16):",
           ("tests/test_insert_qdq.py",)),
    Mutant("insert_qdq: carry 16-bit codes on the CPU", "exporters/insert_qdq.py",
           "if rec.bits > carry_bits:", "if rec.bits > 16:", ("tests/test_insert_qdq.py",)),
    Mutant("global_pool: any spatial axis", "exporters/global_pool.py",
           "return sorted(a % 4 for a in axes) == [2, 3]", "return set(a % 4 for a in axes) <= {2, 3}",
           ("tests/test_global_pool.py",)),
    Mutant("fold_bn: fold a BN whose input is a quant point", "exporters/fold_bn.py",
           "if x.name in keep:", "if x.name in keep and False:", ("tests/test_fold_bn.py",)),
    Mutant("capture: keep no-ops between a layer and its activation", "deployq/qat/normalize.py",
           "    remove_noops(gm)\n    remove_dead_code(gm)", "    remove_dead_code(gm)",
           ("tests/test_capture.py",)),
    Mutant("capture: expand counted as a no-op", "deployq/qat/normalize.py",
           '_SHAPE_METHODS = {"view", "reshape",', '_SHAPE_METHODS = {"expand", "view", "reshape",',
           ("tests/test_capture.py",)),
    Mutant("capture: BatchNorm twin left in training mode", "deployq/qat/normalize.py",
           "            twin.train(source.training if source is not None else gm.training)\n", "",
           ("tests/test_capture.py",)),
    Mutant("placement: softmax on a calibrated range", "deployq/qat/placement.py",
           "if spec is not None and is_softmax(node, modules)", "if spec is None and is_softmax(node, modules)",
           ("tests/test_capture.py",)),
    Mutant("placement: shapes make values input-dependent", "deployq/qat/placement.py",
           "        if _reads_metadata(node) or aten_name(node.target) in _SHAPE_ATEN_READS:\n            continue",
           "        if False:\n            continue", ("tests/test_capture.py",)),
    Mutant("placement: add before ReLU quantized twice", "deployq/qat/placement.py",
           "                into_activation[activation] = name\n                continue",
           "                into_activation[activation] = name", ("tests/test_prepare.py",)),
    Mutant("export: CSE merges identical layers", "exporters/torch_export.py",  # after de-duplication, as torch.onnx
           "        common.DeduplicateInitializersPass(),",
           "        common.DeduplicateInitializersPass(),\n        common.CommonSubexpressionEliminationPass(),",
           ("tests/test_capture.py",)),
    Mutant("bias correction: sign flipped", "deployq/ptq/bias_correction.py",
           "shift_bias(layer, bias_rounding(layer) - delta)", "shift_bias(layer, bias_rounding(layer) + delta)",
           ("tests/test_bias_correction.py", "tests/test_ptq_pipeline.py")),
    Mutant("AdaRound: zero point subtracted twice", "deployq/ptq/adaround.py",
           "return grid.scale * (torch.clamp(floor + h + grid.zero_point, grid.qmin, grid.qmax) - grid.zero_point)",
           "return grid.scale * (torch.clamp(floor + h - grid.zero_point, grid.qmin, grid.qmax) - grid.zero_point)",
           ("tests/test_adaround.py",)),
    Mutant("diff: match against BN folded into the next Conv", "deployq/verify/match.py",
           "folded = fold_batchnorm_copy(float_model, quantized)", "folded = fold_batchnorm_copy(float_model)",
           ("tests/test_diff.py",)),
    Mutant("gate: the best output instead of the worst", "deployq/verify/stats.py",
           "return min(s.sqnr_db for s in self.outputs.values())",
           "return max(s.sqnr_db for s in self.outputs.values())", ("tests/test_diff.py",)),
    Mutant("allow-list: any deployq example", "deployq/qat/loading.py",
           "if not allowed and reference not in REGISTERED_FACTORIES:",
           'if not allowed and not reference.startswith("deployq.examples."):', ("tests/test_checkpoint.py",)),
    Mutant("bias: int32 codes left to saturate", "deployq/qat/quantizers.py",
           "return scale if self.scale_floor is None else torch.maximum(scale, self.scale_floor.to(scale.device))",
           "return scale",
           ("tests/test_export.py::test_a_bias_large_next_to_its_weights_keeps_its_value",)),
    Mutant("placement: average pool on a range of its own", "deployq/qat/placement.py",
           "shares = source.shares or source.name if source is not None and source.spec == spec else None",
           "shares = None", ("tests/test_capture.py::test_an_average_pool_is_quantized_on_its_inputs_grid",)),
    Mutant("placement: -inf padding observed", "deployq/qat/fx_ops.py",
           "        if _pads_for_max_pool(node, modules):\n            return True\n", "",
           ("tests/test_capture.py::test_minus_infinity_padding_before_a_max_pool_carries_its_input_quantization",)),
    Mutant("export: rewrite-rule constants left unnamed", "exporters/torch_export.py",
           "    _register_constants(model)\n", "",
           ("tests/test_capture.py::test_clamps_of_one_tensor_keep_their_bounds_and_points",)),
    Mutant("export: 5-D attention left to torch.onnx", "deployq/deploy/float_graph.py",
           "    _four_dimensional_attention(graph, named)\n", "",
           ("tests/test_capture.py::test_attention_on_five_dimensional_windows_exports",)),
    Mutant("check: 2 LSB apart passes", "deployq/verify/check.py",
           "def failures(self, max_lsb: int = 1) -> list[PointParity]:",
           "def failures(self, max_lsb: int = 2) -> list[PointParity]:", ("tests/test_api.py", "tests/test_hostile.py")),
    Mutant("search: scored on samples it observed", "deployq/ptq/calibration_search.py",
           "observed = inputs[len(scored):] if held_out else inputs", "observed = inputs",
           ("tests/test_ptq_pipeline.py::test_search_scores_each_output_alike_and_holds_its_scored_samples_out",)),
    Mutant("search: outputs pooled into one SQNR", "deployq/ptq/calibration_search.py",
           "return sum(min(db, CEILING_DB) for db in per_output) / len(per_output)",
           "return min(output_sqnr_db([t for r in reference for t in r], [t for v in values for t in v]), CEILING_DB)",
           ("tests/test_ptq_pipeline.py::test_search_scores_each_output_alike_and_holds_its_scored_samples_out",)),
    Mutant("bias correction: noise corrected too", "deployq/ptq/bias_correction.py",
           "delta.abs() > significance * spread / per_sample.shape[0] ** 0.5", "delta.abs() >= 0",
           ("tests/test_bias_correction.py",)),
    Mutant("bias correction: the whole mean corrected where samples disagree", "deployq/ptq/bias_correction.py",
           "shared = torch.sign(delta) * (delta.abs() - shrink * spread).clamp(min=0)", "shared = delta",
           ("tests/test_bias_correction.py",)),
    Mutant("PTQ budget: batches counted as samples", "deployq/qat/calibrate.py",
           "        seen += samples_in(batch)\n", "        seen += 1\n", ("tests/test_ptq_pipeline.py",)),
    Mutant("placement: a max pool's input observed as it is", "deployq/qat/prepare.py",
           "gm.get_submodule(path).observe_through = p.observe_through", "gm.get_submodule(path).observe_through = None",
           ("tests/test_capture.py::test_a_point_read_only_by_a_max_pool_takes_the_pools_range_and_stays_exact",)),
    Mutant("diff: the integer model's outputs from the unoptimized graph", "deployq/verify/diff.py",
           "session(float_model, optimize=True), session(quant_model, optimize=True)",
           "session(float_model, optimize=True), session(quant_model, optimize=False)",
           ("tests/test_diff.py::test_every_mode_reports_the_integer_model_as_onnxruntime_runs_it",)),
    Mutant("placement: a layer on shape-only values quantized", "deployq/qat/placement.py",
           "        if node not in from_inputs:\n            continue\n", "",
           ("tests/test_capture.py::test_layers_on_shape_only_values_stay_float_and_rolled_points_keep_their_grid",)),
    Mutant("insert_qdq: a Concat of one point's pieces reads no quantized input", "exporters/insert_qdq.py",
           "            if node is not None and node.op == \"Concat\":\n"
           "                return self._one_record([self.input_record(t) for t in node.inputs], node)\n", "",
           ("tests/test_capture.py::test_layers_on_shape_only_values_stay_float_and_rolled_points_keep_their_grid",)),
    Mutant("placement: a float op's output left float whoever reads it", "deployq/qat/placement.py",
           "all(r.op == \"output\" or computes_in_float(r, modules) for r in readers)", "True",
           ("tests/test_capture.py::test_a_hand_written_layer_norm_is_computed_in_float_where_a_rule_does_not_ask_otherwise",)),
    Mutant("placement: an average pool of a float tensor quantized", "deployq/qat/placement.py",
           "    floating = computes_in_float(node, modules) or (\n", "    floating = computes_in_float(node, modules) and (\n",
           ("tests/test_capture.py::test_a_tensor_only_float_ops_read_stays_float_and_that_is_more_accurate",)),
    Mutant("diff: a --dynamic-hw export's shape not read from files", "deployq/api.py",
           "input_shapes or _file_shapes(inputs, infos), where=", "input_shapes, where=",
           ("tests/test_diff.py::test_a_dynamic_hw_export_takes_its_shape_from_the_input_files",)),
)


def _copy_tree(root: Path, into: Path) -> Path:
    """The repository's files under `into`, and `into/site/deployq`: the package as installed
    (calib/, exporters/ and examples/ inside it), its files links to the copied ones. Returns the
    folder to put on PYTHONPATH."""
    for name in TREE:
        source = root / name
        if source.is_dir():
            shutil.copytree(source, into / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
        elif source.exists():
            shutil.copy2(source, into / name)
    site = into / "site" / "deployq"
    site.mkdir(parents=True)
    for entry in (into / "deployq").iterdir():
        (site / entry.name).symlink_to(entry)
    for name, folder in INSTALLED_AS.items():
        (site / name).symlink_to(into / folder)
    # pytest runs in the copy, whose own deployq/ comes first on sys.path: it needs the links too,
    # or deployq.exporters would be found by the editable install's finder, in the original tree
    for name, folder in INSTALLED_AS.items():
        (into / "deployq" / name).symlink_to(into / folder)
    return into / "site"


def _apply(tree: Path, mutant: Mutant) -> None:
    if not mutant.path:  # the control: the tree as it is
        return
    path = tree / mutant.path
    text = path.read_text()
    if text.count(mutant.old) != 1:
        raise common.BenchmarkError(f"mutant {mutant.name!r}: {mutant.path} has {text.count(mutant.old)} copies of "
                                    f"its line (needs exactly one); the code moved, update the mutant")
    path.write_text(text.replace(mutant.old, mutant.new))


@dataclass
class Outcome:
    mutant: Mutant
    caught: bool
    seconds: float
    detail: str


def run_mutant(root: Path, mutant: Mutant, timeout: int) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="bench_mutants.") as tmp:
        tree = Path(tmp)
        site = _copy_tree(root, tree)
        _apply(tree, mutant)
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests]
        env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Outcome(mutant, True, time.perf_counter() - start, f"the tests hung past {timeout} s")
        seconds = time.perf_counter() - start
        lines = done.stdout.strip().splitlines()
        failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
        detail = failed[0].split(" - ")[0] if failed else (lines[-1] if lines else f"exit {done.returncode}")
        return Outcome(mutant, done.returncode != 0, seconds, detail)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="mutant names (or a part of each), comma-separated")
    parser.add_argument("--timeout", type=int, default=900, help="seconds the tests of one mutant may take")
    return parser.parse_args(argv)


def run(argv: list[str]) -> common.Section:
    args = parse_args(argv)
    wanted = [w.strip() for w in (args.only or "").split(",") if w.strip()]
    mutants = [m for m in MUTANTS if not wanted or any(w in m.name for w in wanted)]
    if not mutants:
        raise common.BenchmarkError(f"no mutant matches {args.only!r}; known: {', '.join(m.name for m in MUTANTS)}")
    tests = tuple(sorted({t for m in mutants for t in m.tests}))
    control = run_mutant(common.ROOT, Mutant("control (no change)", "", "", "", tests), args.timeout * 2)
    if control.caught:  # the unchanged tree must pass the tests that are to catch the mutants
        raise common.BenchmarkError(f"the tests fail on the unchanged tree ({control.detail}); fix them first")
    outcomes = []
    for m in mutants:
        outcomes.append(run_mutant(common.ROOT, m, args.timeout))
        print(f"{m.name}: {'caught' if outcomes[-1].caught else 'SURVIVED'} ({outcomes[-1].seconds:.0f} s)",
              file=sys.stderr)
    caught = sum(o.caught for o in outcomes)
    rows = [[o.mutant.name, f"`{o.mutant.path}`", ", ".join(f"`{t.split('/')[-1]}`" for t in o.mutant.tests),
             "caught" if o.caught else "**survived**", o.detail.replace("|", "/")[:120], f"{o.seconds:.0f}"]
            for o in outcomes]
    survivors = [o.mutant.name for o in outcomes if not o.caught]
    body = common.table(["mutant", "file", "tests run", "result", "first failure", "s"], rows, "lllllr") + [
        "", f"**{caught} of {len(outcomes)} planted bugs caught ({100 * caught / len(outcomes):.0f} %).** "
        + (f"Survivors: {', '.join(survivors)}." if survivors else "No survivor."),
        "", "Each mutant changes one line of a copy of the tree; only the listed test files run on it "
        f"(`pytest -x`). The same test files pass on an unchanged copy first ({control.seconds:.0f} s). The list is "
        "`benchmarks/bench_mutants.py: MUTANTS`."]
    return common.Section("mutants", "Planted bugs: what the tests catch", common.command_line(SCRIPT, argv), body)


def main(argv: list[str]) -> int:
    return common.main_for(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
