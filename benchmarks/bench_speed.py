"""Speed: int8 vs fp32 latency, QAT vs float training steps, export time, diff vs Polygraphy.

    python benchmarks/bench_speed.py [--qat Q.pt --qat-all8 A.pt --float F.pt --repeats 30]

Every number is a median over repeats, and every comparison a ratio of medians measured in this
run, the contenders timed round-robin (one call of each per round) so that load from other jobs
falls on all of them alike. Absolute times depend on the machine and its load; the ratios are
the result.

1. Inference: onnxruntime, fully optimized sessions, same threads, one input; the int8 model
   against the float model it was exported beside (deployq) or quantized from (quantize_static).
2. Training step (forward, backward, Adam step) of the QAT checkpoint's model: float, deployq QAT,
   deployq QAT + distillation, torch.ao FX QAT.
3. Export: ``deployq export`` of the QAT checkpoint against a plain ``torch.onnx.export`` of the
   float model.
4. ``deployq diff`` against Polygraphy comparing the same float / int8 pair on the same inputs,
   both as the command lines a user types.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx
import torch
from torch import nn

import deployq
from benchmarks import common
from benchmarks.training_steps import output_l1, step_fn, torch_ao_step
from deployq.qat import checkpoint as ck
from deployq.qat import loading
from deployq.train import distill as dst
from deployq.qat import fake_quant
from deployq.qat.config import QConfig
from deployq.qat.config import from_dict as config_from_dict
from deployq.examples.lowlight.evaluate import VAL_SIZE, validation_set
from deployq.deploy.export import ExportResult
from deployq.qat.loading import resolve_model
from deployq.core.runtime import load_onnx, session

SCRIPT = "bench_speed.py"
INTEGER_CONVS = ("QLinearConv", "ConvInteger", "QLinearConvTranspose")
FLOAT_CONVS = ("Conv", "FusedConv", "ConvTranspose", "NhwcFusedConv")
LOWLIGHT_DISTILL = ("DBF.DBF_conv9.lrelu_dup1", "DBLE.dual_conv9.lrelu_dup1")  # the example recipe's


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_lowlight_arguments(parser)
    parser.add_argument("--size", type=int, default=VAL_SIZE, help="low-light input crop in raw pixels")
    parser.add_argument("--repeats", type=int, default=30, help="timed inference runs of each model")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime and torch threads")
    parser.add_argument("--unet-width", type=int, default=32, help="width of the zoo UNet")
    parser.add_argument("--unet-size", type=int, default=128, help="side of the zoo UNet's input")
    parser.add_argument("--step-repeats", type=int, default=10, help="timed training steps of each kind")
    parser.add_argument("--step-batch", type=int, default=16, help="training batch (the example's recipes: 16)")
    parser.add_argument("--no-compile", action="store_true",
                        help="time deployq's QAT with eager quantizer kernels only (no C kernels; quick runs)")
    parser.add_argument("--step-size", type=int, default=64, help="training crop in raw pixels")
    parser.add_argument("--distill-layers", help="layers distilled in the step timing, comma-separated (default: "
                        "the low-light recipe's two, else the model's last activation quant point)")
    parser.add_argument("--export-repeats", type=int, default=3)
    parser.add_argument("--diff-repeats", type=int, default=5)
    parser.add_argument("--diff-inputs", type=int, default=4, help="inputs both diff tools compare on")
    return parser.parse_args(argv)


def ratio_cell(value: float, reference: float) -> str:
    return f"{value / reference:.2f}×"


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


# ------------------------------------------------------------------------------------ inference


@dataclass
class LatencyRow:
    model: str
    quantization: str
    fp32: float
    int8: float
    integer_convs: int
    convs: int


def latency(model: str, quantization: str, fp32: Path, int8: Path, x: np.ndarray, args: argparse.Namespace,
            work: Path) -> LatencyRow:
    """Median latency of the fp32 and int8 models on input `x`, timed round-robin."""
    sessions = {name: session(load_onnx(p), optimize=True, threads=args.threads) for name, p in
                (("fp32", fp32), ("int8", int8))}
    times = common.round_robin({name: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x}))
                                for name, s in sessions.items()}, args.repeats, warmup=2)
    ops = common.optimized_ops(int8, args.threads, work)
    integer = sum(ops[o] for o in INTEGER_CONVS)
    return LatencyRow(model, quantization, common.median(times["fp32"]), common.median(times["int8"]), integer,
                      integer + sum(ops[o] for o in FLOAT_CONVS))


def zoo_unet_export(args: argparse.Namespace, work: Path) -> tuple[Path, Path, np.ndarray]:
    """The zoo UNet at a bigger width, PTQ-calibrated on random inputs, exported."""
    shape = (1, 3, args.unet_size, args.unet_size)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(shape, generator=gen) for _ in range(2)]
    ckpt = common.calibrated_checkpoint(work / "unet.pt", "deployq.examples.zoo:unet", {"width": args.unet_width},
                                        shape, batches)
    result = common.export_checkpoint(ckpt, work / "unet")
    return result.files["float"], result.files["int8"], batches[0].numpy()


def latency_rows(exports: dict, args: argparse.Namespace, ckpts: common.LowlightCheckpoints, work: Path) -> list[LatencyRow]:
    feeds = exports["input"]
    qat, all8 = exports["qat"], exports["qat_all8"]
    static = common.quantize_static_qdq(exports["float"], work / "ort_minmax.onnx", [exports["input"]], "MinMax")
    unet_fp32, unet_int8, unet_feeds = zoo_unet_export(args, work)
    side = args.size // 2
    return [
        latency(f"low-light {side}×{side}", f"deployq, 10-bit head/tail ({ckpts.qat.name})", qat.files["float"],
                qat.files["int8"], feeds, args, work),
        latency(f"low-light {side}×{side}", f"deployq, all 8-bit ({ckpts.qat_all8.name})", all8.files["float"],
                all8.files["int8"], feeds, args, work),
        latency(f"low-light {side}×{side}", f"ORT quantize_static MinMax ({ckpts.float.name})", exports["float"], static,
                feeds, args, work),
        latency(f"zoo UNet width {args.unet_width}, {args.unet_size}×{args.unet_size}", "deployq PTQ, 8-bit",
                unet_fp32, unet_int8, unet_feeds, args, work),
    ]


def latency_section(rows: list[LatencyRow], args: argparse.Namespace) -> list[str]:
    lines = ["### Inference latency: onnxruntime int8 vs fp32", ""]
    lines += common.table(["model", "int8 model", "fp32 median (ms)", "int8 median (ms)", "int8 / fp32",
                           "integer convs after optimization"],
                          [(r.model, r.quantization, ms(r.fp32), ms(r.int8), f"{r.int8 / r.fp32:.2f}",
                            f"{r.integer_convs} / {r.convs}") for r in rows], "llrrrr")
    lines += ["", f"{args.repeats} runs of each model, round-robin, batch 1, {args.threads} onnxruntime thread(s), "
              "ORT_ENABLE_ALL. *integer convs*: convolutions onnxruntime runs as integer kernels (QLinearConv, "
              "ConvInteger) in the optimized graph; 9..16-bit layers run as exact float emulation (docs/design.md, contract "
              "4), so they stay float convolutions between Q/DQ pairs. The fp32 model of each row is the float "
              "graph exported beside the int8 one (or quantized into it, for quantize_static, calibrated here on "
              "one input: latency does not depend on the ranges)."]
    return lines


# ------------------------------------------------------------------------------------ training


def distill_step(student: nn.Module, float_model: nn.Module, example: torch.Tensor, inputs: torch.Tensor,
                 layers: list[str], config: QConfig) -> Callable[[], None]:
    """A deployq QAT step with feature distillation from the float teacher (as ``deployq train``)."""
    net = dst.expose(student, layers)
    teacher = dst.Teacher(deployq.prepare(float_model, (example,), config), layers)
    distill = dst.DistillationLoss({name: 1.0 for name in layers})

    def loss(output: tuple) -> torch.Tensor:
        prediction, features = output
        _, teacher_features = teacher(inputs)
        return output_l1(prediction) + distill(features, teacher_features)

    return step_fn(net, inputs, loss)


def distill_layers(student: nn.Module, requested: Optional[str]) -> list[str]:
    """The layers to distil: `requested`, else the low-light recipe's if the model has them, else
    the last activation quant point."""
    if requested:
        return [n for n in requested.split(",") if n]
    points = deployq.quant_points(student)
    if all(name in points for name in LOWLIGHT_DISTILL):
        return list(LOWLIGHT_DISTILL)
    return [next(n for n, p in reversed(points.items()) if p.kind == "activation")]


def with_kernels(compiled: bool, step: Callable[[], None]) -> Callable[[], None]:
    """`step` with the quantizers' math as fused kernels (what `deployq train` runs) or eager."""
    def run() -> None:
        fake_quant.use_compiled_kernels(compiled)
        step()
    return run


def step_contenders(checkpoint: ck.Checkpoint, factory: Optional[str], inputs: torch.Tensor,
                    requested_layers: Optional[str], compile_kernels: bool = True,
                    ) -> tuple[dict[str, Callable[[], None]], dict[str, str], list[str]]:
    """The training steps to time ({name: step}), the ones that could not be built ({name: error})
    and the distillation layers."""
    float_model = loading.checkpoint_float_model(checkpoint, factory).train()
    example = inputs[:1]
    student = deployq.prepare(float_model, (example,), checkpoint.config)
    deployq.calibrate(student, [inputs], progress=False)
    layers = distill_layers(student, requested_layers)
    compiled, eager = compile_kernels, False
    contenders = {"float": step_fn(copy.deepcopy(float_model), inputs, output_l1),
                  "deployq QAT": with_kernels(compiled, step_fn(student, inputs, output_l1)),
                  f"deployq QAT + distillation ({len(layers)} layers)": with_kernels(compiled, distill_step(
                      copy.deepcopy(student), float_model, example, inputs, layers, checkpoint.config)),
                  "deployq QAT, eager kernels": with_kernels(eager, step_fn(copy.deepcopy(student), inputs, output_l1))}
    plain = straight_through_config(checkpoint.config)
    if plain is not None:  # the same model with torch.ao's rounding gradient: what the method costs
        ste = deployq.prepare(float_model, (example,), plain)
        deployq.calibrate(ste, [inputs], progress=False)
        contenders[STE_ROW] = with_kernels(compiled, step_fn(ste, inputs, output_l1))
    failures = {}
    try:
        contenders["torch.ao FX QAT (x86)"] = torch_ao_step(float_model, example, inputs)
    except Exception as err:  # torch.ao's failure on this model is the result
        failures["torch.ao FX QAT (x86)"] = common.error_text(err)
    return contenders, failures, layers


STE_ROW = "deployq QAT, straight-through rounding gradient (DSQ off)"


def straight_through_config(config: QConfig) -> Optional[QConfig]:
    """`config` with DSQ's soft-rounding gradient replaced by the straight-through one (dsq_lsq ->
    lsq+, dsq -> fixed: the same learned or observed qparams), or None where it uses no DSQ."""
    plain = {"dsq_lsq": "lsq+", "dsq": "fixed"}
    found = []

    def swapped(value):
        if isinstance(value, dict):
            if value.get("quantizer") in plain:
                found.append(value["quantizer"])
                value = {**value, "quantizer": plain[value["quantizer"]], "quantizer_args": {}}
            return {k: swapped(v) for k, v in value.items()}
        return [swapped(v) for v in value] if isinstance(value, list) else value

    data = swapped(config.to_dict())
    return config_from_dict(data) if found else None


def training_section(args: argparse.Namespace, ckpts: common.LowlightCheckpoints,
                     facts: Optional[dict[str, float]] = None) -> list[str]:
    """The training-step table and its profile; the key ratios go into `facts`."""
    checkpoint = ck.load(ckpts.qat)
    side = args.step_size // 2
    gen = torch.Generator().manual_seed(0)
    inputs = torch.rand((args.step_batch, checkpoint.inputs[0].shape[1], side, side), generator=gen)
    contenders, failures, layers = step_contenders(checkpoint, ckpts.factory, inputs, args.distill_layers,
                                                   not args.no_compile)
    with common.quiet():
        times = common.round_robin(contenders, args.step_repeats)
    base = common.median(times["float"])
    rows = [(name, f"{common.median(t):.3f}", ratio_cell(common.median(t), base)) for name, t in times.items()]
    rows += [(name, "failed", error) for name, error in failures.items()]
    lines = ["### Training step: QAT over float", ""]
    lines += common.table(["training step", "median (s)", "× float"], rows, "lrr")
    lines += ["", f"Model: `{checkpoint.factory}` {checkpoint.factory_kwargs} (its initial weights: the step time "
              f"does not depend on them), batch {args.step_batch}×{tuple(inputs.shape[1:])}, Adam, "
              f"{args.step_repeats} steps of each kind round-robin after one warm-up, {torch.get_num_threads()} "
              "torch thread(s). deployq QAT uses the checkpoint's config; distillation layers: "
              f"{', '.join(f'`{n}`' for n in layers)}. Its quantizers' forward and backward run as the C "
              "kernels `deployq train` builds on a CPU (deployq/qat/kernels.c), or eagerly (the eager row). "
              f"The example's config learns DSQ's soft rounding at every point; the row `{STE_ROW}` is the "
              "same model with the straight-through rounding gradient that torch.ao uses (lsq+ for dsq_lsq, "
              "fixed for dsq). Adam is torch's fused implementation for every row (what `deployq train` uses)."]
    breakdown, shares = step_breakdown(contenders, ("float", "deployq QAT"))
    if facts is not None:
        medians = {name: common.median(t) for name, t in times.items()}
        qat = shares["deployq QAT"]
        facts.update(qat_step=medians["deployq QAT"] / base, eager_step=medians["deployq QAT, eager kernels"] / base,
                     fake_quant_share=qat.get(FAKE_QUANT, 0.0) / sum(shares["float"].values()),
                     compile_share=qat.get(TORCH_COMPILE, 0.0) / sum(qat.values()))
        for name, key in (("torch.ao FX QAT (x86)", "torch_ao_step"), (STE_ROW, "ste_step")):
            if name in medians:
                facts[key] = medians[name] / base
    return lines + breakdown

# where a step's CPU time goes: profiler event name (prefix) -> category; the rest is "other"
FAKE_QUANT = "fake quantizers (their autograd nodes, C kernels inside)"
TORCH_COMPILE = "torch.compile (guards and compiled kernels)"
STEP_CATEGORIES = (("aten::convolution_backward", "convolutions"), ("aten::mkldnn_convolution", "convolutions"),
                   ("aten::_convolution", "convolutions"), ("FakeQuantize", FAKE_QUANT),
                   ("## Call CompiledFxGraph", TORCH_COMPILE), ("TorchDynamo Cache Lookup", TORCH_COMPILE),
                   ("Torch-Compiled Region", TORCH_COMPILE), ("Optimizer.step", "optimizer"),
                   ("aten::_fused_adam", "optimizer"), ("aten::lerp_", "optimizer"), ("aten::addcdiv_", "optimizer"),
                   ("aten::addcmul_", "optimizer"), ("aten::sqrt", "optimizer"))


def step_breakdown(contenders: dict[str, Callable[[], None]], names: tuple[str, ...],
                   steps: int = 3) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Self CPU time per category (torch.profiler, `steps` steps of each), in ms per step: the
    table, and {contender: {category: ms}}."""
    from torch.profiler import ProfilerActivity, profile

    shares: dict[str, dict[str, float]] = {}
    for name in names:
        with common.quiet(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                contenders[name]()
        totals: dict[str, float] = {}
        for event in prof.key_averages():
            category = next((c for prefix, c in STEP_CATEGORIES if event.key.startswith(prefix)), "other")
            totals[category] = totals.get(category, 0.0) + event.self_cpu_time_total / 1e3 / steps
        shares[name] = totals
    categories = list(dict.fromkeys([c for _, c in STEP_CATEGORIES] + ["other"]))
    rows = [(c, *(f"{shares[n].get(c, 0.0):.0f}" for n in names)) for c in categories]
    rows.append(("total", *(f"{sum(shares[n].values()):.0f}" for n in names)))
    return ["", "Where a step's time goes (torch.profiler, self CPU time in ms per step, mean of "
            f"{steps} steps; the profiler's own overhead included):", "",
            *common.table(["category", *names], rows, "l" + "r" * len(names))], shares


# ------------------------------------------------------------------------------------ export


def export_section(args: argparse.Namespace, ckpts: common.LowlightCheckpoints, work: Path) -> list[str]:
    side = args.size // 2
    shape = (1, 4, side, side)
    float_model = resolve_model(ckpt=str(ckpts.qat), factory=ckpts.factory, input_shape=shape).float_model.eval()
    example = (torch.zeros(shape),)

    def deployq_export() -> None:
        common.export_checkpoint(ckpts.qat, work / "export_timing", factory=ckpts.factory, input_shape=shape)

    def torch_export() -> None:
        with common.quiet():
            torch.onnx.export(float_model, example, str(work / "torch_export.onnx"), dynamo=True)

    times = common.round_robin({"torch.onnx.export(float model, dynamo=True)": torch_export,
                                "deployq export (checkpoint -> float + int8 ONNX)": deployq_export},
                               args.export_repeats, warmup=0)
    base = common.median(next(iter(times.values())))
    lines = ["### Export time", ""]
    lines += common.table(["export", "median (s)", "× torch.onnx.export"],
                          [(n, f"{common.median(t):.2f}", ratio_cell(common.median(t), base)) for n, t in times.items()],
                          "lrr")
    lines += ["", f"{args.export_repeats} exports of each, round-robin, input {shape}. deployq export = load the "
              "checkpoint, rebuild the QAT model, torch.onnx export (dynamo) of the float graph with named quant "
              "points, the rewrite passes (fold BN, fuse activations, insert Q/DQ), loading both models in "
              "onnxruntime, the NNAPI/CoreML coverage check, the ORT-format conversion and writing the files; each "
              "export from scratch (the float-export cache of an earlier call in the process cleared)."]
    return lines


# ------------------------------------------------------------------------------------ diff tools


def tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        raise common.BenchmarkError(f"`{name}` is not installed; install the benchmark extra: pip install -e '.[bench]'")
    return path


def graph_tensors(model: onnx.ModelProto) -> set[str]:
    """Every tensor ``--onnx-outputs mark all`` makes an output: inputs and node outputs."""
    names = {i.name for i in model.graph.input}
    for node in model.graph.node:
        names.update(o for o in node.output if o)
    return names


def diff_commands(float_onnx: Path, int8_onnx: Path, inputs: np.ndarray, work: Path) -> dict[str, list[list[str]]]:
    """The command lines of both tools, on the same inputs (an .npy for deployq, JSON for Polygraphy)."""
    from polygraphy.json import save_json

    name = load_onnx(float_onnx).graph.input[0].name
    np.save(work / "inputs.npy", inputs)
    save_json([{name: x[None]} for x in inputs], str(work / "inputs.json"))
    polygraphy = tool("polygraphy")
    return {
        "deployq diff": [[tool("deployq"), "diff", str(float_onnx), str(int8_onnx), "--input", str(work / "inputs.npy"),
                          "--limit", str(len(inputs)), "--json", str(work / "deployq_diff.json")]],
        "Polygraphy (2 runs)": [
            [polygraphy, "run", str(float_onnx), "--onnxrt", "--onnx-outputs", "mark", "all",
             "--load-inputs", str(work / "inputs.json"), "--save-outputs", str(work / "float_outputs.json")],
            [polygraphy, "run", str(int8_onnx), "--onnxrt", "--onnx-outputs", "mark", "all",
             "--load-inputs", str(work / "inputs.json"), "--load-outputs", str(work / "float_outputs.json")]],
    }


def run_commands(commands: list[list[str]], logs: dict[str, str], name: str) -> None:
    """Run a tool's command lines in turn; exit status 1 is a failed comparison, not an error."""
    output = []
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode not in (0, 1):
            raise common.BenchmarkError(f"{' '.join(command)} exited {done.returncode}: {done.stderr[-800:]}")
        output.append(done.stdout + done.stderr)
    logs[name] = "\n".join(output)


def diff_section(qat: ExportResult, inputs: np.ndarray, args: argparse.Namespace, work: Path) -> list[str]:
    float_onnx, int8_onnx = qat.files["float"], qat.files["int8"]
    commands = diff_commands(float_onnx, int8_onnx, inputs, work)
    logs: dict[str, str] = {}
    times = common.round_robin({name: (lambda c=c, n=name: run_commands(c, logs, n)) for name, c in commands.items()},
                               args.diff_repeats, warmup=0)
    base = common.median(times["deployq diff"])
    lines = ["### `deployq diff` vs Polygraphy: the same float / int8 pair", ""]
    lines += common.table(["tool", "median wall time (s)", "× deployq diff"],
                          [(n, f"{common.median(t):.2f}", ratio_cell(common.median(t), base)) for n, t in times.items()],
                          "lrr")
    lines += [""] + match_lines(qat, logs, work)
    lines += ["", f"Pair: `deployq export` of the QAT checkpoint; {len(inputs)} held-out inputs, the same for both "
              f"tools; {args.diff_repeats} runs of each, round-robin, each a fresh process as a user types it:"]
    lines += [f"- `{shown(command)}`" for group in commands.values() for command in group]
    return lines


def shown(command: list[str]) -> str:
    """A command line as a user would type it: the tool's name, files by their names."""
    return " ".join(Path(a).name if Path(a).is_absolute() else a for a in command)


def polygraphy_counts(log: str) -> tuple[int, int]:
    """(outputs compared, outputs that passed) per input, read from `polygraphy run`'s log."""
    inputs = max(1, len(re.findall(r"Iteration: \d+", log)) // 2)  # both runs log every iteration
    compared = len(re.findall(r"Comparing Output: '", log)) // inputs
    return compared, len(re.findall(r"PASSED \| Output: '", log)) // inputs


def match_lines(qat: ExportResult, logs: dict[str, str], work: Path) -> list[str]:
    """What each tool could pair up between the two models, from deployq's JSON report, the
    graphs (Polygraphy pairs outputs by name) and Polygraphy's log."""
    float_names, int8_names = graph_tensors(qat.float_model), graph_tensors(qat.quant_model)
    activations = {n for n, r in qat.records.items() if r.kind != "weight"}
    weights = len(qat.records) - len(activations)
    kinds = [row["kind"] for row in json.loads((work / "deployq_diff.json").read_text())["rows"]]
    ours = {kind: kinds.count(kind) for kind in ("activation", "weight")}
    compared, passed = polygraphy_counts(logs["Polygraphy (2 runs)"])
    rows = [
        ("tensors paired float ↔ int8", f"{ours['activation']} activation quant points + {ours['weight']} weights",
         f"{compared} outputs of the same name"),
        ("activation quant points covered", f"{ours['activation']} / {len(activations)}",
         f"{len(activations & float_names & int8_names)} / {len(activations)}, but on the int8 model's tensor "
         "*before* its QuantizeLinear: the dequantized value the next layer reads has another name"),
        ("weights compared", f"{ours['weight']} / {weights} (folded float vs dequantized codes)",
         "0 (initializers are not outputs)"),
        ("int8-only tensors left unmatched", "0 (codes and dequantized values are read as part of their quant point)",
         f"{len(int8_names - float_names)} (Q codes, DQ values, weight DQ, Clip of 10-bit points)"),
        ("verdict per tensor", "SQNR, cosine, max error, error in LSB, first jump",
         f"pass/fail at rtol=atol=1e-5: {passed} of {compared} pass"),
        ("integer codes / LSB view", "yes (codes vs the float value's code)", "no (float values only)"),
    ]
    return common.table(["what", "deployq diff", "Polygraphy"], rows, "lll")


# ------------------------------------------------------------------------------------ run


def lowlight_exports(args: argparse.Namespace, ckpts: common.LowlightCheckpoints) -> dict:
    side = args.size // 2
    shape = (1, 4, side, side)
    held_out = validation_set(size=args.size)
    return {
        "float": common.shared_export(ckpts.float, factory=ckpts.float_factory, factory_kwargs=ckpts.float_kwargs,
                                      input_shape=shape,
                                      target="fp32").files["float"],
        "qat": common.shared_export(ckpts.qat, factory=ckpts.factory, input_shape=shape),
        "qat_all8": common.shared_export(ckpts.qat_all8, factory=ckpts.factory, input_shape=shape),
        "input": held_out[0]["input"].numpy()[None],
        "diff_inputs": np.stack([held_out[i]["input"].numpy() for i in range(args.diff_inputs)]),
    }


def run(argv: list[str]) -> common.Section:
    args = parse_args(argv)
    ckpts = common.lowlight_checkpoints(args).check("float", "qat", "qat_all8")
    with tempfile.TemporaryDirectory(prefix="bench_speed.") as tmp, common.torch_threads(args.threads):
        work = Path(tmp)
        exports = lowlight_exports(args, ckpts)
        lines = latency_section(latency_rows(exports, args, ckpts, work), args)
        facts: dict[str, float] = {}
        lines += [""] + training_section(args, ckpts, facts)
        lines += [""] + export_section(args, ckpts, work)
        lines += [""] + diff_section(exports["qat"], exports["diff_inputs"], args, work)
    return common.Section("speed", "Speed: inference, training step, export, diff",
                          common.command_line(SCRIPT, argv), lines, facts)


def main(argv: list[str]) -> int:
    return common.main_for(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
