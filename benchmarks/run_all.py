"""Run every benchmark and rewrite BENCHMARKS.md: one command, one environment header.

    python benchmarks/run_all.py                      # full settings (~15-20 min on 2 cores)
    python benchmarks/run_all.py --quick              # small settings: checks the harness, not the numbers
    python benchmarks/run_all.py --qat runs/qat/last.pt --only lowlight,parity   # updates results/ only
    python benchmarks/run_all.py --only lowlight,parity --merge   # and BENCHMARKS.md, the rest as results/ has it

Each benchmark also writes its own section to benchmarks/results/<name>.md, and every section
names the command that reproduces it. The low-light benchmarks evaluate the checkpoints in
examples/lowlight/checkpoints/ (or the paths given) and never train them; all of them are checked
before anything runs. Peers (Polygraphy, scikit-learn) come from the ``[bench]`` extra.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import (bench_conformance, bench_devices, bench_digits, bench_hessian, bench_latency, bench_lowlight,
                        bench_mutants, bench_parity, bench_ptq, bench_scale, bench_speed, bench_suite, bench_timm,
                        common)
from deployq.core.files import AtomicOutputs

OUTPUT = common.ROOT / "BENCHMARKS.md"

# name: (module, full settings, quick settings, uses the low-light checkpoints)
BENCHMARKS: dict[str, tuple[ModuleType, list[str], list[str], bool]] = {
    "lowlight": (bench_lowlight, ["--qat-seeds", "runs/lowlight/qat_seed1/best.pt,runs/lowlight/qat_seed2/best.pt",
                                  "--qat-nodistill-seeds",
                                  "runs/lowlight/qat_nodistill_seed1/best.pt,runs/lowlight/qat_nodistill_seed2/best.pt"],
                 ["--test-items", "2", "--calib-items", "2"], True),
    "digits": (bench_digits, [], ["--float-epochs", "1", "--qat-epochs", "1", "--calib-items", "32", "--seeds", "0"], False),
    "parity": (bench_parity, [], ["--models", "plain_cnn", "--batches", "1"], True),
    "speed": (bench_speed, [], ["--repeats", "2", "--step-repeats", "1", "--step-batch", "4", "--no-compile",
                                "--export-repeats", "1", "--diff-repeats", "1",
                                "--diff-inputs", "1", "--unet-width", "4", "--unet-size", "16"], True),
    "latency": (bench_latency, [], ["--widths", "8", "--sizes", "32", "--threads", "1", "--repeats", "1",
                                    "--profile", "8,32"], True),
    "scale": (bench_scale, [], ["--depths", "1,2", "--repeats", "1"], False),
    "hessian": (bench_hessian, ["--threads", "1", "--ckpt", "examples/lowlight/checkpoints/qat.pt", "--dng-frames", "3",
                                "--batches", "8", "--reference-iter", "0"],
                ["--threads", "1", "--batches", "2", "--reference-iter", "10"], False),
    "devices": (bench_devices, [], ["--models", "unet", "--size", "32", "--repeats", "2", "--calib", "2"], True),
    "ptq": (bench_ptq, [], ["--models", "lowlight", "--lowlight-size", "16", "--calib", "2", "--eval", "2",
                            "--adaround-iterations", "2", "--rows", "deployq PTQ (plain),+ adaround,+ bias"], True),
    "conformance": (bench_conformance, [], ["--models", "squeezenet1_1", "--size", "64", "--calib", "2", "--eval", "2",
                                            "--repeats", "2"], False),
    # the rows of the full sweep are kept (and committed) in results/timm_rows/: a run goes on where
    # the last one stopped, and a family is measured again by deleting its row
    "timm": (bench_timm, ["--jobs", "2", "--timeout", "2400", "--rows", "benchmarks/results/timm_rows"],
             ["--families", "resnet", "--calib", "2", "--eval", "2"], False),
    "mutants": (bench_mutants, [], ["--only", "formula: multiply by 1/s"], False),
    "suite": (bench_suite, [], ["--tests", "tests/test_qformula.py"], False),
}
# Sections whose benchmarks run alone, never from here: they need tools installed beside the venv
# (scripts/install-peers.sh: NNCF, AIMET, wheels with trained models) or take an hour. BENCHMARKS.md
# places them as their own last run left them in results/, and its header names that run.
STANDALONE = ("peers", "onnx_in", "onnx_convert", "budgets", "ranges", "qat_gpu")
INTRO = [
    "# Benchmarks",
    "",
    "deployq against its peers (onnxruntime.quantization, torch.ao, Polygraphy), all produced by one "
    "command. Times are medians over repeats and comparisons are ratios measured in the same run "
    "(contenders timed round-robin), never single absolute times: the machine below was shared with "
    "other jobs. Each section names the command that reproduces it alone.",
]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small settings (for the smoke test)")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, default=OUTPUT, help="the markdown file to rewrite")
    parser.add_argument("--results", type=Path, default=common.RESULTS, help="folder for the per-benchmark sections")
    parser.add_argument("--merge", action="store_true",
                        help="with --only: rewrite BENCHMARKS.md too, every other section as its last run left it "
                             "in results/ (the table of contents names each section's run)")
    common.add_lowlight_arguments(parser)
    return parser.parse_args(argv)


def selected(only: str | None) -> list[str]:
    names = [n for n in (only or "").split(",") if n] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise common.BenchmarkError(f"unknown benchmarks {unknown}; known: {', '.join(BENCHMARKS)}")
    return names


def benchmark_argv(name: str, quick: bool, ckpts: common.LowlightCheckpoints) -> list[str]:
    _, full, small, lowlight = BENCHMARKS[name]
    return (small if quick else full) + (common.lowlight_argv(ckpts) if lowlight else [])


def document(sections: list[common.Section], records: dict[str, dict], environment: list[str],
             ckpts: common.LowlightCheckpoints, run: dict[str, str]) -> str:
    """BENCHMARKS.md: the intro, the environment, a table of contents, then every section.

    ``records`` holds each section's run (:func:`common.section_record`); sections from earlier runs than this one
    (``--merge``) are named in the header with the run that made them."""
    lines = INTRO + ["", "## Environment", ""] + environment
    lines.append(f"- low-light checkpoints: {ckpts.describe()}")
    earlier = {(r["run"]["date"], r["run"]["command"], r["run"].get("machine", "")) for r in records.values()
               if r["run"] != run}
    for date, command, machine in sorted(earlier):
        keys = [s.key for s in sections if records[s.key]["run"]["date"] == date]
        lines.append(f"- sections {', '.join(keys)}: from the run of {date} (`{command}`; {machine}), "
                     f"{'run alone' if set(keys) <= set(STANDALONE) else 'kept by `--merge`'}")
    lines += ["", "| section | reproduce alone | run | wall time (s) |", "|---|---|---|---:|"]
    lines += [f"| [{s.title}](#{anchor(s.title)}) | `{s.command}` | {records[s.key]['run']['date'][:16]} | "
              f"{records[s.key]['seconds']:.0f} |" for s in sections]
    lines += goals({s.key: s.facts for s in sections})
    return "\n".join(lines) + "\n\n" + "\n".join(s.markdown() for s in sections)


def goals(facts: dict[str, dict[str, float]]) -> list[str]:
    """The speed goals against this run's numbers: met, or the measured reason they are not."""
    rows = []
    speed, latency, hessian = facts.get("speed", {}), facts.get("latency", {}), facts.get("hessian", {})
    if "qat_step" in speed:
        step, ao = speed["qat_step"], speed.get("torch_ao_step", math.nan)
        ste = f", with the straight-through rounding gradient {speed['ste_step']:.2f}×" if "ste_step" in speed else ""
        rows.append(["QAT training step / float step (low-light, CPU)", f"{step:.2f}× (eager kernels "
                     f"{speed['eager_step']:.2f}×{ste}; torch.ao FX QAT {ao:.2f}×)",
                     "≤ 1.5×", "yes" if step <= 1.5 else
                     f"no: the fake quantizers (C kernels and their autograd nodes, forward and backward of every "
                     f"quant point) take {speed['fake_quant_share']:.2f}× a whole float step (profile in the speed "
                     "section)"])
        rows.append(["QAT training step against torch.ao FX QAT on the same model", f"{step / ao:.2f}× torch.ao's "
                     "step", "≤ 1×", "yes" if step <= ao else "no"])
        share = speed.get("compile_share", math.nan)
        rows.append(["torch.compile's share of a QAT step (CPU)", f"{100 * share:.1f} %", "< 10 %",
                     "yes" if share < 0.1 else "no"])
    if "shared_seconds" in hessian:
        t = hessian["shared_seconds"]
        rho, ceiling = hessian["spearman"], hessian.get("spearman_ceiling", math.nan)
        same = rho >= ceiling  # as close to the per-layer ranking as the per-layer estimator is to itself
        rows.append([f"Hessian trace of all {hessian['layers']:.0f} activations", f"{t:.1f} s (per-layer products "
                     f"{hessian['per_layer_seconds']:.1f} s; rankings' Spearman ρ {rho:.3f}, the per-layer estimator "
                     f"against itself with another seed {ceiling:.3f}; {hessian['agree']:.0f} of "
                     f"{hessian['layers']:.0f} layers agree within 2 s.e.)",
                     "≤ 60 s, the per-layer estimator's ranking (within its own seed-to-seed spread)",
                     "yes" if t <= 60 and same else
                     "no: " + ("over 60 s" if t > 60 else "the ranking differs from the per-layer one by more "
                               "than the per-layer estimator differs from itself")])
    if "cli_seconds" in hessian:
        t = hessian["cli_seconds"]
        rows.append(["`deployq hessian` with its defaults on a folder of whole DNG frames (a fresh process)",
                     f"{t:.1f} s; top 3 {'within' if hessian['cli_top_within_spread'] else 'outside'} the per-layer "
                     "estimator's seed-to-seed spread", "≤ 60 s on a quiet 2-core machine, ranking checked",
                     "yes" if t <= 60 and hessian["cli_top_within_spread"] else "no"])
    if "speedup_wide" in latency:
        wide = latency["speedup_wide"]
        rows.append([f"int8 / fp32 speed-up, width {latency['width']:.0f}, {latency['size']:.0f}² packed, 1 thread, "
                     "10-bit head/tail", f"{wide:.2f}× (all 8-bit {latency['speedup_all8']:.2f}×, "
                     f"--device nnapi {latency['speedup_nnapi']:.2f}×)", "≥ 2.5×", "yes" if wide >= 2.5 else
                     f"no: the 10-bit layers' float convolutions take {latency.get('wide_float_conv_share', math.nan):.0%} "
                     "of the int8 model's time, and their exact integer form (2 ConvInteger + int32 combine) is "
                     f"{latency.get('exact_wide_conv', math.nan):.1f}× the float Conv at best; "
                     + (f"all 8-bit, the same network with those layers as integer kernels, reaches "
                        f"{latency['speedup_all8']:.2f}×" if latency["speedup_all8"] >= 2.5 else
                        f"even all 8-bit reaches only {latency['speedup_all8']:.2f}×")])
    if not rows:
        return []
    return ["", "### Speed goals in this run", "",
            *common.table(["what", "measured", "goal", "met"], rows, "llll")]


def anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    kept = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def run_benchmarks(names: list[str], quick: bool, ckpts: common.LowlightCheckpoints,
                   log: Callable[[str], None]) -> tuple[list[common.Section], dict[str, float]]:
    sections, seconds = [], {}
    for i, name in enumerate(names, 1):
        argv = benchmark_argv(name, quick, ckpts)
        log(f"[{i}/{len(names)}] {common.command_line(f'bench_{name}.py', argv)}")
        start = time.perf_counter()
        section = BENCHMARKS[name][0].run(argv)
        seconds[name] = time.perf_counter() - start
        log(f"      done in {seconds[name]:.0f} s")
        sections.append(section)
    return sections, seconds


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    command = common.command_line("run_all.py", list(argv))
    environment = common.environment_lines(command)
    run = common.run_info(command)
    try:
        names = selected(args.only)
        if args.merge and args.only is None:
            raise common.BenchmarkError("--merge keeps the sections --only does not name; without --only every "
                                        "section runs anyway")
        kept = ({key: common.load_section_record(args.results, key) for key in BENCHMARKS if key not in names}
                if args.merge else {})
        ckpts = common.lowlight_checkpoints(args)
        if any(BENCHMARKS[n][3] for n in names):
            ckpts.check()
        sections, seconds = run_benchmarks(names, args.quick, ckpts, lambda line: print(line, flush=True))
    except common.BenchmarkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    records = {s.key: common.section_record(s, seconds[s.key], run) for s in sections}
    records.update({key: data for key, (_, data) in kept.items()})
    fresh = {s.key: s for s in sections}
    ordered = [fresh[key] if key in fresh else kept[key][0] for key in BENCHMARKS if key in fresh or key in kept]
    for key in STANDALONE:
        if (args.results / f"{key}.json").is_file():
            section, records[key] = common.load_section_record(args.results, key)
            ordered.append(section)
    # BENCHMARKS.md holds whole runs: a subset only updates its results/ sections, unless --merge
    # places it among the others' last runs, or --out names another file for it
    partial = args.only is not None and args.out == OUTPUT and not args.merge
    common.write_sections(sections, args.results, records)
    if not partial:
        with AtomicOutputs() as out:
            out.write_text(args.out, document(ordered, records, environment, ckpts, run))
    written = f"{args.results}/*.md" if partial else str(args.out)
    print(f"wrote {written} ({len(sections)} sections, {sum(seconds.values()):.0f} s)")
    if partial:
        print(f"{OUTPUT.name} unchanged: it holds whole runs (run without --only, or with --merge, to rewrite it)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
