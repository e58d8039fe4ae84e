"""Benchmark: the QAT training step on a GPU (CUDA), against a float step and torch.ao's FX QAT.

    python benchmarks/bench_qat_gpu.py              # on a machine with a CUDA device

The low-light example's network (`examples/lowlight/checkpoints/qat.pt`: its float weights and its
quantization config, 10-bit head and tail), Adam, one fixed batch per size; every contender's
steps timed round-robin after warm-up steps (the compiled kernels compile in the first), each step
ended by a device synchronization. Writes benchmarks/results/qat_gpu.md; on a machine without CUDA
it says so and writes nothing.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import deployq
from benchmarks import common
from benchmarks.training_steps import output_l1, step_fn, torch_ao_step
from deployq.qat import checkpoint as ck
from deployq.examples import lowlight
from deployq.qat import fake_quant, loading

SCRIPT = "bench_qat_gpu.py"
CHECKPOINT = Path(lowlight.__file__).parent / "checkpoints" / "qat.pt"  # installed or in the checkout


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", default="32,128", help="packed input sides to time, comma-separated")
    parser.add_argument("--batch", type=int, default=16, help="training batch (the example's recipes: 16)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each contender")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each contender first")
    return parser.parse_args(argv)


def synchronized(step: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        step()
        torch.cuda.synchronize()
    return run


def with_kernels(compiled: bool, step: Callable[[], None]) -> Callable[[], None]:
    """`step` with the quantizers' math compiled (torch.compile, on CUDA) or eager."""
    def run() -> None:
        fake_quant.use_compiled_kernels(compiled)
        step()
    return run


def contenders(checkpoint: ck.Checkpoint, inputs: torch.Tensor) -> dict[str, Callable[[], None]]:
    float_model = loading.checkpoint_float_model(checkpoint, None).train()
    student = deployq.prepare(float_model, (inputs[:1].cpu(),), checkpoint.config).cuda()
    deployq.calibrate(student, [inputs], progress=False)
    compiled, eager = True, False
    steps = {"float": step_fn(copy.deepcopy(float_model).cuda(), inputs, output_l1),
             "deployq QAT (compiled kernels)": with_kernels(compiled, step_fn(student, inputs, output_l1)),
             "deployq QAT, eager kernels": with_kernels(eager, step_fn(copy.deepcopy(student), inputs, output_l1))}
    try:  # the same QAT model with its forward and backward replayed as one CUDA graph (no launches)
        graphed = copy.deepcopy(student)
        fake_quant.use_compiled_kernels(eager)
        graphed = torch.cuda.make_graphed_callables(graphed, (inputs,))
        steps["deployq QAT, eager kernels in a CUDA graph"] = with_kernels(eager, step_fn(graphed, inputs, output_l1))
    except Exception as err:  # a model that cannot be captured is a result too
        print(f"CUDA graph: {common.error_text(err)}", file=sys.stderr)
    try:
        steps["torch.ao FX QAT (x86 qconfig)"] = torch_ao_step(float_model.cuda(), inputs[:1], inputs)
    except Exception as err:  # torch.ao's failure on this model is a result too
        print(f"torch.ao: {common.error_text(err)}", file=sys.stderr)
    return {name: synchronized(step) for name, step in steps.items()}


def size_rows(checkpoint: ck.Checkpoint, side: int, args: argparse.Namespace) -> list[list[str]]:
    gen = torch.Generator().manual_seed(0)
    inputs = torch.rand((args.batch, checkpoint.inputs[0].shape[1], side, side), generator=gen).cuda()
    steps = contenders(checkpoint, inputs)
    first = {}
    for name, step in steps.items():  # the first step compiles what it compiles: timed apart
        start = time.perf_counter()
        step()
        first[name] = time.perf_counter() - start
    with common.quiet():
        times = common.round_robin(steps, args.steps, warmup=args.warmup)
    base = common.median(times["float"])
    return [[f"{args.batch}×4×{side}×{side}", name, f"{1000 * common.median(t):.1f}",
             f"{common.median(t) / base:.2f}×", f"{first[name]:.1f}"] for name, t in times.items()]


def run(argv: list[str]) -> common.Section:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise common.BenchmarkError("no CUDA device: this benchmark times the QAT step on a GPU")
    checkpoint = ck.load(CHECKPOINT)
    rows = []
    for side in (int(s) for s in args.sides.split(",") if s):
        rows += size_rows(checkpoint, side, args)
    device = torch.cuda.get_device_name()
    lines = common.table(["batch", "training step", "median (ms)", "× float", "first step (s)"], rows, "llrrr")
    lines += ["", f"Device: {device}, torch {torch.__version__} (CUDA {torch.version.cuda}); model "
              f"`{checkpoint.factory}` {checkpoint.factory_kwargs} with the checkpoint's config; Adam; "
              f"{args.steps} steps of each contender round-robin after {args.warmup} warm-up steps, each ended by "
              "torch.cuda.synchronize(). *compiled kernels*: the quantizers' forward and backward math through "
              "torch.compile (what `deployq train` does); *in a CUDA graph*: torch.cuda.make_graphed_callables over the "
              "prepared model, forward and backward replayed without launching each kernel (the optimizer outside "
              "it); *first step*: the first call, compilation included. "
              "torch.ao quantizes with its own placement (fewer quant points than deployq's) and fixed "
              "(non-learned) scales."]
    return common.Section("qat_gpu", "QAT training step on a GPU", common.command_line(SCRIPT, argv), lines)


def main(argv: list[str]) -> int:
    return common.main_for(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
