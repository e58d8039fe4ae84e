"""What every benchmark shares: the environment header, timing, markdown, sections and checkpoints.

Timing rule (the machine is shared): every number is a median over repeats, and every comparison
is a ratio of medians taken in the same run, the contenders timed round-robin so that load from
other jobs falls on both alike.
"""

from __future__ import annotations

import functools
import json
import contextlib
import datetime
import importlib.metadata
import io
import logging
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

import deployq
from deployq.qat.checkpoint import InputSpec
from deployq.qat.checkpoint import load as load_checkpoint
from deployq.qat.loading import import_factory
from deployq.deploy.export import ExportResult, export
from deployq.exporters.torch_export import clear_export_cache
from deployq.core.files import AtomicOutputs
from deployq.qat.loading import resolve_model
from deployq.core.runtime import cpu_isa, isa_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PEERS = ROOT / ".peers"  # where scripts/install-peers.sh puts NNCF, AIMET and facenet-pytorch (not the venv)


def peers_importable() -> None:
    """Put .peers/ on the import path (after the venv's own packages)."""
    if str(PEERS) not in sys.path:
        sys.path.append(str(PEERS))
LOWLIGHT_CHECKPOINTS = ROOT / "examples" / "lowlight" / "checkpoints"
LOWLIGHT_FACTORY = "deployq.examples.lowlight.model:build"
PACKAGES = ("torch", "onnx", "onnxruntime", "deployq", "polygraphy", "scikit-learn", "numpy")


class BenchmarkError(RuntimeError):
    """A benchmark that cannot run; the message says what is missing and how to get it."""


# ---------------------------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def versions() -> dict[str, str]:
    """Python and the libraries a benchmark touches ('not installed' for a missing peer)."""
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def machine_text() -> str:
    """The CPU, its ISA, the usable cores, the OS and the current load, in one line."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu_model()} ({isa_text(cpu_isa())}), {usable_cores()} usable cores, "
            f"{platform.system()} {platform.release()}, 1-minute load average at the start {load:.2f}")


def git_commit() -> str:
    """The repository's commit (short), with ``+changes`` where the tree differs from it (results of
    earlier benchmark runs, which a run rewrites, do not count); "" outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":!benchmarks/results", ":!BENCHMARKS.md"], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return commit + ("+changes" if changed else "")


def run_info(command: str) -> dict[str, str]:
    """When, by which command and on which machine a run happened (kept with each section)."""
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
            "machine": machine_text()}


def environment_lines(command: str) -> list[str]:
    """The header every result file starts with: machine, versions, command, date."""
    return [
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {machine_text()}",
        "- versions: " + ", ".join(f"{name} {version}" for name, version in versions().items()),
        f"- command: `{command}`",
    ]


def command_line(script: str, argv: Sequence[str]) -> str:
    """How to rerun a benchmark: ``python benchmarks/<script> <argv>``."""
    return " ".join(["python", f"benchmarks/{script}", *(shlex.quote(a) for a in argv)])


# ---------------------------------------------------------------------------------- sections


@dataclass
class Section:
    """One benchmark's result: a titled markdown block that names the command reproducing it."""

    key: str  # the file name under results/, without .md
    title: str
    command: str
    lines: list[str]
    facts: dict[str, float] = field(default_factory=dict)  # key numbers other summaries quote (run_all's goals)

    def markdown(self) -> str:
        return "\n".join([f"## {self.title}", "", f"Reproduce: `{self.command}`", "", *self.lines]) + "\n"


def section_record(section: Section, seconds: float, run: dict[str, str]) -> dict:
    """What ``results/<key>.json`` keeps of a section, so that a later merge can place it again."""
    return {"key": section.key, "title": section.title, "command": section.command, "lines": section.lines,
            "facts": section.facts, "seconds": seconds, "run": run}


def load_section_record(results: Path, key: str) -> tuple[Section, dict]:
    """The section and record an earlier run left in ``results/<key>.json``."""
    path = results / f"{key}.json"
    try:
        data = json.loads(path.read_text())
        section = Section(data["key"], data["title"], data["command"], list(data["lines"]), dict(data["facts"]))
        _ = (data["seconds"], data["run"]["date"], data["run"]["command"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BenchmarkError(f"{path}: no record of an earlier run of section {key!r} ({type(err).__name__}: "
                             f"{err}); run that section first") from None
    return section, data


def write_sections(sections: Iterable[Section], results: Path, records: Mapping[str, dict]) -> list[Path]:
    """Each section to ``results/<key>.md`` and its record to ``results/<key>.json``, all renamed
    into place together."""
    with AtomicOutputs() as out:
        written = []
        for section in sections:
            written.append(out.write_text(results / f"{section.key}.md", section.markdown()))
            out.write_text(results / f"{section.key}.json", json.dumps(records[section.key], indent=1) + "\n")
        return written


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: Optional[str] = None) -> list[str]:
    """A markdown table; `align` has one letter per column, 'l' or 'r' (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def chosen_models(text: str, known: Sequence[str]) -> list[str]:
    """The comma-separated names of a ``--models`` option, each one of `known`."""
    names = [n for n in text.split(",") if n]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise BenchmarkError(f"unknown models {unknown}; known: {', '.join(known)}")
    return names


def error_text(err: BaseException) -> str:
    """An error's type and first sentence, fit for a table cell (no colour codes, no pipes)."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    sentence = lines[0].split(". ")[0].rstrip(".") if lines else ""
    return f"{type(err).__name__}: {sentence[:160]}".replace("|", "/")


def percent(fraction: float, digits: int = 3) -> str:
    return f"{100 * fraction:.{digits}f}%"


def main_for(run: Callable[[list[str]], Section], argv: list[str], results: Path = RESULTS) -> int:
    """The `main` of one benchmark module: run it, write its section and record, print it."""
    start = time.perf_counter()
    try:
        section = run(argv)
    except BenchmarkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    write_sections([section], results, {section.key: section_record(section, seconds, run_info(section.command))})
    print(section.markdown())
    return 0


# ---------------------------------------------------------------------------------- timing


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def round_robin(contenders: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each contender over `repeats` rounds; one call of each per round, in turn."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the block, restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence what peers print (onnxruntime.quantization's prints and logging, deprecation
    warnings) so the harness output stays readable; errors still raise."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


# ---------------------------------------------------------------------------------- models


def calibrated_checkpoint(path: Path, factory: str, kwargs: Mapping[str, Any], shape: tuple[int, ...],
                          batches: Sequence[torch.Tensor], model: Optional[torch.nn.Module] = None,
                          config: Any = None) -> Path:
    """A deployq checkpoint of `model` (default: ``factory(**kwargs)``'s own weights), prepared and
    calibrated on `batches`: post-training quantization, saved as training would save it."""
    model = model if model is not None else import_factory(factory, allowed=True)(**kwargs)
    qmodel = deployq.prepare(model, torch.zeros(shape), config)
    deployq.calibrate(qmodel, batches, progress=False)
    return deployq.save_checkpoint(path, qmodel, factory=factory, factory_kwargs=dict(kwargs),
                                   inputs=[InputSpec("x", shape)])


def export_checkpoint(ckpt: Path, out_dir: Path, *, factory: Optional[str] = None,
                      input_shape: Optional[tuple[int, ...]] = None, target: str = "int8",
                      factory_kwargs: Optional[dict] = None) -> ExportResult:
    """``deployq export --ckpt CKPT [--model FACTORY [--model-kwargs K]] [--input-shape S] --target T
    --out OUT``, from scratch: not from the float export an earlier call in this process left behind."""
    clear_export_cache()
    with quiet():
        source = resolve_model(ckpt=str(ckpt), factory=factory, input_shape=input_shape, factory_kwargs=factory_kwargs)
        return export(source, out_dir, target=target, progress=False)


_EXPORTS: dict[tuple, ExportResult] = {}
_EXPORT_DIRS: list[tempfile.TemporaryDirectory] = []  # one, made on first use, removed at exit


def shared_export(ckpt: Path, *, factory: Optional[str] = None, input_shape: Optional[tuple[int, ...]] = None,
                  target: str = "int8", factory_kwargs: Optional[dict] = None) -> ExportResult:
    """:func:`export_checkpoint`, once per process for the same file (path, size, mtime), factory,
    shape and target: benchmarks that evaluate one checkpoint share its export. Callers must not
    modify the result. Timing benchmarks call :func:`export_checkpoint` instead."""
    stat = Path(ckpt).stat()
    key = (str(Path(ckpt).resolve()), stat.st_size, stat.st_mtime_ns, factory, input_shape, target,
           json.dumps(factory_kwargs, sort_keys=True))
    if key not in _EXPORTS:
        if not _EXPORT_DIRS:
            _EXPORT_DIRS.append(tempfile.TemporaryDirectory(prefix="deployq-bench-exports."))
        out = Path(_EXPORT_DIRS[0].name) / str(len(_EXPORTS))
        _EXPORTS[key] = export_checkpoint(ckpt, out, factory=factory, input_shape=input_shape, target=target,
                                          factory_kwargs=factory_kwargs)
    return _EXPORTS[key]


# ---------------------------------------------------------------------------------- low-light


LOWLIGHT_RUNS = ROOT / "runs" / "lowlight"
LOWLIGHT_FILES = {  # field: (default path, what it is). The ablations are not shipped (their size):
    # examples/lowlight/README.md has the commands that train them into runs/lowlight
    "float": (LOWLIGHT_CHECKPOINTS / "float.pt", "float state_dict of the low-light model"),
    "float_control": (LOWLIGHT_RUNS / "float_control" / "float_control.pt",
                      "float state_dict trained on as long as QAT (the control; trained, not shipped)"),
    "qat": (LOWLIGHT_CHECKPOINTS / "qat.pt", "deployq checkpoint: QAT with distillation, 10-bit head/tail"),
    "qat_nodistill": (LOWLIGHT_RUNS / "qat_nodistill" / "best.pt",
                      "deployq checkpoint: QAT without distillation (trained, not shipped)"),
    "qat_all8": (LOWLIGHT_CHECKPOINTS / "qat_all8.pt", "deployq checkpoint: QAT with every layer at 8 bits"),
}
SHIPPED = ("float", "qat", "qat_all8")


@dataclass(frozen=True)
class LowlightCheckpoints:
    """The low-light example's trained checkpoints (evaluated, never trained, by the harness)."""

    float: Path
    float_control: Path
    qat: Path
    qat_nodistill: Path
    qat_all8: Path
    factory: Optional[str] = None  # a model factory outside deployq, named by the user

    @property
    def float_factory(self) -> str:
        return self.factory or LOWLIGHT_FACTORY

    @functools.cached_property
    def float_kwargs(self) -> dict:
        """The factory's keyword arguments for the plain float state_dicts: what the QAT checkpoint,
        which was trained from them, records (e.g. the width)."""
        return dict(load_checkpoint(self.qat).factory_kwargs)

    def paths(self) -> dict[str, Path]:
        return {name: Path(getattr(self, name)) for name in LOWLIGHT_FILES}

    def check(self, *names: str) -> "LowlightCheckpoints":
        """Raise one clear error naming every missing file among `names` (default: the shipped ones)."""
        names = names or SHIPPED
        missing = [f"{flag(n)} {p}" for n, p in self.paths().items() if n in names and not p.is_file()]
        if missing:
            raise BenchmarkError(
                "low-light checkpoint(s) not found: " + ", ".join(missing) + ". The harness evaluates the "
                "trained checkpoints and never trains them: train them (python -m "
                "deployq.examples.lowlight.train_float, then deployq train) or pass their paths.")
        return self

    def describe(self) -> str:
        """The files, relative to the repository where they are inside it, and the factory."""
        text = ", ".join(f"`{shown_path(p)}`" for p in self.paths().values())
        return text + (f" (model factory `{self.factory}`)" if self.factory else "")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown_path(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def add_lowlight_arguments(parser: Any) -> None:
    for name, (path, what) in LOWLIGHT_FILES.items():
        parser.add_argument(flag(name), dest=f"{name}_ckpt", type=Path, default=path, metavar="PATH", help=what)
    parser.add_argument("--factory", metavar="PKG.MOD:FN", help="the checkpoints' model factory, if not inside deployq")


def lowlight_checkpoints(args: Any) -> LowlightCheckpoints:
    return LowlightCheckpoints(*(getattr(args, f"{name}_ckpt") for name in LOWLIGHT_FILES), args.factory)


def lowlight_argv(ckpts: LowlightCheckpoints) -> list[str]:
    """The command-line form of `ckpts` (paths that differ from the defaults), for reproduce lines."""
    argv = []
    for name, path in ckpts.paths().items():
        if path.resolve() != LOWLIGHT_FILES[name][0]:
            argv += [flag(name), str(path)]
    return argv + (["--factory", ckpts.factory] if ckpts.factory else [])


# ---------------------------------------------------------------------------------- graphs

# layers onnxruntime runs as integer kernels, and those it runs in float, in an optimized graph
INTEGER_LAYERS = ("QLinearConv", "ConvInteger", "QLinearConvTranspose", "QLinearMatMul", "MatMulInteger",
                  "MatMulIntegerToFloat", "QGemm", "DynamicQuantizeMatMul")
FLOAT_LAYERS = ("Conv", "FusedConv", "ConvTranspose", "NhwcFusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm")


def optimized_ops(path: Path, threads: int, work: Path) -> Counter:
    """Op types of the graph onnxruntime really runs (fully optimized, as saved by ORT)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.optimized_model_filepath = str(work / f"{Path(path).stem}.optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


# ---------------------------------------------------------------------------------- peers


CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile")


def quantize_static_qdq(float_onnx: Path, out: Path, calibration: Sequence[Any], method: str) -> Path:
    """onnxruntime.quantization.quantize_static as its docs recommend for CPUs: QDQ format,
    u8 activations, s8 per-channel weights, calibrated with `method` on `calibration` arrays
    (one model input each, batch included)."""
    name = onnx.load(str(float_onnx)).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration)

        def get_next(self) -> Optional[dict[str, Any]]:
            item = next(self.items, None)
            return None if item is None else {name: item}

    with quiet():
        quantize_static(str(float_onnx), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method))
    return out
