"""deployq against the tools users pick instead (NNCF, AIMET, quantize_static), on trained models, in one run.

    scripts/install-peers.sh            # NNCF, AIMET and facenet-pytorch into .peers/ (not the venv)
    python benchmarks/bench_peers.py [--models digits,lowlight,pnet,rnet,onet]

Models and data as in ``bench_ptq.py``: the digits CNN trained here (seed 0) and the shipped
low-light network; the same calibration inputs (32) for every tool and the same held-out inputs
(16; 450 for digits). And MTCNN's three face-detection networks with the trained weights inside
facenet-pytorch's wheel (PReLU, max pooling, two or three outputs), on ``bench_budgets.py``'s
crops: 32 of three photographs to calibrate, 256 of three others held out. Contenders, each from
the same trained weights:

* deployq: plain min/max calibration, and ``--ptq bias`` (bias correction); each also with
  ``quantize_outputs: false`` (the layer making the model's output keeps it float, as NNCF does)
  and, on the models with PReLU or LeakyReLU, ``quantize_before_sloped: false`` (a layer whose
  output only those read keeps it float, NNCF's placement there: fewer integer kernels);
* ``quantize_static`` (MinMax, Entropy, Percentile; QDQ, per-channel s8 weights, u8 activations) on
  deployq's float graph;
* NNCF's ONNX ``nncf.quantize`` on deployq's float graph (converted to opset 19: at 21, NNCF 3.4
  writes QuantizeLinear nodes onnxruntime refuses): its default (fast bias correction), its
  full bias correction (``fast_bias_correction=False``), and that with min/max activation ranges
  and no overflow fix (NNCF's default halves the weight range, 7 bits, for CPUs without VNNI);
* AIMET's ``QuantizationSimModel`` on the torch model (BatchNorm folded, min/max, 8-bit weights per
  channel and activations, its default per-channel config), exported as a QDQ ONNX file with
  int32 biases (``aimet_torch.onnx.export``);
* on the low-light model, the example's 10-bit head and tail (``examples/lowlight/quant.yaml``):
  deployq's export with it, and AIMET's QuantSim with the same layers' and input's widths set on its
  quantizers, run in torch (AIMET exports no 10-bit file; its QuantSim shares one quantizer among a
  concat's inputs and output, deployq widens a concat to the widest tensor it joins);
* on the digits CNN and the low-light model, 4-bit weights (W4A8): deployq plain (its default observer at 4 bits, ``mse``, and ``minmax``) and
  ``--ptq adaround``, AIMET's QuantSim and AdaRound at ``default_param_bw=4``, run in torch (its
  ONNX export holds 8-bit weight codes).

Columns: output SQNR (dB) of the fully optimized graph against deployq's float graph on the
held-out inputs (top-1 agreement with float for digits); the seconds the tool took (calibration
included, the float ONNX export not); the Conv / Gemm / MatMul that onnxruntime runs as integer
kernels, of all; and how many of the file's quantized weight layers ``deployq diff`` pairs with
deployq's float graph (by name, or by graph position where the file names its tensors its own
way) and how many of its quantized tensors stay unpaired.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

if __package__ in (None, ""):  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

SCRIPT = "bench_peers.py"
MODELS = ("digits", "lowlight", "pnet", "rnet", "onet")
TITLES = {"digits": "digits CNN (trained)", "lowlight": "low-light network (trained)",
          **{f"{n}net": f"MTCNN {n.upper()}Net (facenet-pytorch's trained weights)" for n in "pro"}}
STATIC_METHODS = ("MinMax", "Entropy", "Percentile")  # onnxruntime's calibration methods
MTCNN_HELD_OUT = 256  # crops of three other photographs, as many as bench_budgets.py scores on
# NNCF 3.4 writes QuantizeLinear nodes onnxruntime refuses (output_dtype INT8 with a UINT8 zero
# point) into an opset-21 graph such as deployq's float export; it is given the graph at opset 19
NNCF_OPSET = 19
FLOAT_OUTPUTS = {"quantize_outputs": False}  # the layer making a model output runs in float, as NNCF leaves it
BEFORE_SLOPED_FLOAT = {"quantize_before_sloped": False}  # a layer read only by PReLU / LeakyReLU runs in float
WIDE_CONFIG = common.ROOT / "examples" / "lowlight" / "quant.yaml"  # the example's 10-bit head and tail layers
W4A8 = {"weight": {"bits": 4}}  # 4-bit weights, 8-bit activations
W4A8_MINMAX = {"weight": {"bits": 4, "observer": "minmax"}}  # the same with min/max weight ranges


def parse_args(argv: list[str]) -> argparse.Namespace:
    from benchmarks import bench_ptq

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from " + ", ".join(MODELS))
    args = parser.parse_args(argv)
    return argparse.Namespace(**{**vars(bench_ptq.parse_args([])), **vars(args)})


def import_peers() -> None:
    """Make NNCF and AIMET importable from .peers/, or say how to install them."""
    common.peers_importable()
    from deployq.examples.torchvision_models import import_torchvision

    import_torchvision()  # AIMET imports torchvision; the CPU-safe way in
    try:
        import aimet_torch  # noqa: F401
        import nncf  # noqa: F401
    except ImportError as err:
        raise common.BenchmarkError(f"NNCF / AIMET not importable ({err}): run scripts/install-peers.sh first")


def nncf_quantize(float_onnx: Path, out: Path, calibration: list[np.ndarray], full_bias_correction: bool,
                  tuned: bool = False) -> Path:
    """NNCF's ONNX quantization; `tuned`: min/max activation ranges and no overflow fix (its 7-bit
    weights for CPUs without VNNI), the best of 18 option sets on these models in an earlier trial."""
    import nncf
    import onnx
    import onnx.version_converter
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    model = onnx.load(str(float_onnx))
    if max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) > NNCF_OPSET:
        model = onnx.version_converter.convert_version(model, NNCF_OPSET)
    name = model.graph.input[0].name
    dataset = nncf.Dataset(calibration, lambda x: {name: x})
    advanced = AdvancedQuantizationParameters(
        overflow_fix=OverflowFix.DISABLE, activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX,
    ) if tuned else None
    quantized = nncf.quantize(model, dataset, subset_size=len(calibration),
                              fast_bias_correction=not full_bias_correction, advanced_parameters=advanced)
    onnx.save(quantized, str(out))
    return out


AIMET_ADAROUND_ITERATIONS = 200  # per layer, as deployq's default (AIMET's own default: 10,000)
AIMET_ADAROUND_SAMPLES = 8


def aimet_quantize(model, out: Path, calibration: list[np.ndarray], method: str = "") -> Path:
    """AIMET's QuantSim (min/max, 8-bit, per-channel weights) after BatchNorm folding, or after its
    cross-layer equalization (`method` "cle": BN folding, equalization and bias absorption), or with
    AdaRound's weights (`method` "adaround": AIMET_ADAROUND_ITERATIONS per layer on the first
    AIMET_ADAROUND_SAMPLES inputs, its parameter encodings frozen in the QuantSim), exported."""
    import aimet_torch.onnx

    sim, dummy = aimet_sim(model, out.parent, calibration, method)
    aimet_torch.onnx.export(sim, dummy, str(out), input_names=["input"], output_names=["output"], opset_version=13,
                            dynamo=False, export_int32_bias=True, prequantize_constants=True)
    return out


def aimet_sim(model, work: Path, calibration: list[np.ndarray], method: str = "", widths: Optional[Path] = None,
              param_bw: int = 8):
    """(AIMET's calibrated QuantSim as `aimet_quantize` describes it, its dummy input); `widths`: a
    deployq config whose layer rules' and input's bit widths are set on the same modules first;
    `param_bw`: the weights' bits (AdaRound's too)."""
    import aimet_torch
    import aimet_torch.onnx
    import torch
    from aimet_torch.batch_norm_fold import fold_all_batch_norms
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.model_preparer import prepare_model
    from aimet_torch.quantsim import QuantizationSimModel

    work.mkdir(parents=True, exist_ok=True)
    dummy = torch.from_numpy(calibration[0])
    model = prepare_model(model.eval())
    config = Path(aimet_torch.__path__[0]) / "common" / "quantsim_config" / "default_config_per_channel.json"
    encodings = None
    if method == "cle":
        from aimet_torch.cross_layer_equalization import equalize_model

        equalize_model(model, dummy_input=dummy)
    else:
        fold_all_batch_norms(model, input_shapes=tuple(dummy.shape), dummy_input=dummy)
    if method == "adaround":
        from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters

        batches = [torch.from_numpy(x) for x in calibration[:AIMET_ADAROUND_SAMPLES]]
        params = AdaroundParameters(batches, len(batches), default_num_iterations=AIMET_ADAROUND_ITERATIONS)
        model = Adaround.apply_adaround(model, dummy, params, str(work), "adaround", default_param_bw=param_bw,
                                        default_quant_scheme=QuantScheme.min_max, default_config_file=str(config))
        encodings = work / "adaround.encodings"
    sim = QuantizationSimModel(model, dummy_input=dummy, quant_scheme=QuantScheme.min_max, default_output_bw=8,
                               default_param_bw=param_bw, config_file=str(config))
    if encodings is not None:
        sim.set_and_freeze_param_encodings(str(encodings))
    if widths is not None:
        set_aimet_widths(sim.model, widths)

    def forward(m, _):
        with torch.no_grad():
            for x in calibration:
                m(torch.from_numpy(x))

    sim.compute_encodings(forward, None)
    return sim, dummy


def set_aimet_widths(sim_model, config_path: Path) -> None:
    """The widths a deployq config gives by layer rule (weight and activation bits) and to the
    model input, set on the quantizers of the QuantSim modules with the same names (deployq names a
    reused module's second call ``<name>_dup1``, AIMET's model preparer ``module_<name>_1``)."""
    import fnmatch
    import re

    from deployq.qat.config import load_config

    config = load_config(config_path)
    for name, module in sim_model.named_modules():
        if not hasattr(module, "output_quantizers"):
            continue
        for q in getattr(module, "input_quantizers", []):
            if q is not None and "bits" in config.input:  # AIMET quantizes the model inputs there
                q.bitwidth = config.input["bits"]
        for rule in config.layers:
            pattern = re.sub(r"(\w+)_dup(\d+)", r"module_\1_\2", rule.pattern)
            if not fnmatch.fnmatchcase(name, pattern):
                continue
            weight = module.param_quantizers["weight"] if "weight" in module.param_quantizers else None
            if weight is not None and "bits" in rule.weight:
                weight.bitwidth = rule.weight["bits"]
            for q in module.output_quantizers:
                if q is not None and "bits" in rule.activation:
                    q.bitwidth = rule.activation["bits"]


def integer_layers(path: Path, work: Path) -> tuple[int, int]:
    ops = common.optimized_ops(path, 1, work)
    integer = sum(ops[o] for o in common.INTEGER_LAYERS)
    return integer, integer + sum(ops[o] for o in common.FLOAT_LAYERS)


def pairing(float_onnx: Path, path: Path, calibration: list[np.ndarray]) -> tuple[int, int, int]:
    """(weight layers diff pairs, quantized weight layers in the file, quantized tensors left unpaired)."""
    import onnx

    import deployq
    from deployq.exporters.graph import WEIGHT_LAYER_OPS

    model = onnx.load(str(path))
    producers = {o: n for n in model.graph.node for o in n.output}
    layers = sum(n.op_type in WEIGHT_LAYER_OPS and len(n.input) > 1 and n.input[1] in producers
                 and producers[n.input[1]].op_type == "DequantizeLinear" for n in model.graph.node)
    report = deployq.diff(str(float_onnx), str(path), [x for x in calibration[:2]], mode="local")
    return sum(r.point.kind == "weight" for r in report.rows), layers, len(report.unmatched)


def _case(name: str, args: argparse.Namespace, work: Path):
    from benchmarks import bench_ptq

    if name == "lowlight":
        return bench_ptq.lowlight_case(args)
    return bench_ptq.digits_case(args, work) if name == "digits" else mtcnn_case(name, args, work)


def mtcnn_case(name: str, args: argparse.Namespace, work: Path):
    """One of MTCNN's networks with facenet-pytorch's trained weights: calibrated on crops of three
    photographs, scored on crops of three others (bench_budgets.py's data)."""
    import torch

    from benchmarks import bench_budgets
    from benchmarks.bench_ptq import Case
    from deployq.qat.loading import resolve_model

    class_name, weights, size = next(n for n in bench_budgets.NETWORKS if n[0].lower() == name)
    torch.save(bench_budgets.trained(class_name, weights).state_dict(), work / f"{name}.pt")
    return Case(TITLES[name], lambda config=None: resolve_model(
        ckpt=str(work / f"{name}.pt"), factory=f"facenet_pytorch.models.mtcnn:{class_name}",
        factory_kwargs={"pretrained": False}, input_shape=(1, 3, size, size), config=config),
        bench_budgets.crops(size, args.calib, 0, bench_budgets.CALIB_PHOTOS),
        bench_budgets.crops(size, MTCNN_HELD_OUT, 1, bench_budgets.HELD_OUT_PHOTOS))


def measure(name: str, args: argparse.Namespace, work: Path) -> list[list[str]]:
    from benchmarks.bench_conformance import outputs, sqnr_db, top1
    from deployq.deploy.export import export
    from deployq.ptq.pipeline import PTQOptions

    case = _case(name, args, work)
    calibration = list(case.calibration)
    plain, plain_s = common.timed(lambda: export(case.source(), work / "plain", calib=calibration,
                                                 calib_limit=args.calib, progress=False, ort_format=False))
    float_onnx = plain.files["float"]
    reference = None

    def score(path_or_outputs) -> tuple[float, Optional[float]]:
        """SQNR against the float graph of a file's outputs on the held-out inputs (or of those outputs)."""
        nonlocal reference
        feeds_float = [{plain.float_model.graph.input[0].name: x} for x in case.held_out]
        if reference is None:
            reference = outputs(float_onnx, feeds_float)
        import onnx

        ours = path_or_outputs
        if isinstance(path_or_outputs, Path):
            ours = outputs(path_or_outputs, [{onnx.load(str(path_or_outputs)).graph.input[0].name: x}
                                             for x in case.held_out])
        return sqnr_db([o for out in reference for o in out], [o for out in ours for o in out]), top1(reference, ours)

    def deployq(folder: str, methods: tuple[str, ...] = (), config=None) -> Path:
        extra = {"ptq": PTQOptions(methods)} if methods else {}
        return export(case.source(config), work / folder, calib=calibration, calib_limit=args.calib, progress=False,
                      ort_format=False, **extra).files["int8"]

    contenders: list[tuple[str, Callable[[], Path]]] = [
        ("deployq --ptq bias", lambda: deployq("bias", ("bias",))),
        ("deployq, outputs float (`quantize_outputs: false`)", lambda: deployq("out", (), FLOAT_OUTPUTS)),
        ("deployq --ptq bias, outputs float", lambda: deployq("bias_out", ("bias",), FLOAT_OUTPUTS)),
        *((f"quantize_static {method}", lambda method=method: common.quantize_static_qdq(
            float_onnx, work / f"static_{method}.onnx", calibration, method)) for method in STATIC_METHODS),
        ("NNCF default (fast bias correction)", lambda: nncf_quantize(float_onnx, work / "nncf.onnx", calibration, False)),
        ("NNCF full bias correction", lambda: nncf_quantize(float_onnx, work / "nncf_full.onnx", calibration, True)),
        ("NNCF full bias correction, min/max, no overflow fix",
         lambda: nncf_quantize(float_onnx, work / "nncf_tuned.onnx", calibration, True, tuned=True)),
        ("AIMET QuantSim min/max", lambda: aimet_quantize(case.source().float_model, work / "aimet.onnx", calibration)),
        ("deployq --ptq cle", lambda: deployq("cle", ("cle",))),
        ("AIMET CLE + QuantSim", lambda: aimet_quantize(case.source().float_model, work / "aimet_cle.onnx",
                                                         calibration, "cle")),
        ("deployq --ptq adaround", lambda: deployq("adaround", ("adaround",))),
        (f"AIMET AdaRound ({AIMET_ADAROUND_ITERATIONS} it., {AIMET_ADAROUND_SAMPLES} inputs) + QuantSim",
         lambda: aimet_quantize(case.source().float_model, work / "aimet_ada" / "aimet_ada.onnx", calibration,
                                "adaround")),
    ]
    if name != "digits":  # LeakyReLU (low-light) or PReLU (MTCNN) after the layers: NNCF's placement as an option
        contenders += [
            ("deployq, outputs read by PReLU / LeakyReLU float (`quantize_before_sloped: false`)",
             lambda: deployq("sloped", (), BEFORE_SLOPED_FLOAT)),
            ("deployq --ptq bias, outputs read by PReLU / LeakyReLU float",
             lambda: deployq("sloped_bias", ("bias",), BEFORE_SLOPED_FLOAT)),
        ]
    if name in ("digits", "lowlight"):  # 4-bit weights (W4A8): AIMET simulated in torch (it writes 8-bit weights)
        contenders += [
            ("deployq, 4-bit weights (W4A8; observer `auto`: mse)", lambda: deployq("w4", (), W4A8)),
            ("deployq, 4-bit weights, `observer: minmax`", lambda: deployq("w4_minmax", (), W4A8_MINMAX)),
            ("deployq --ptq adaround, 4-bit weights", lambda: deployq("w4_ada", ("adaround",), W4A8)),
            ("AIMET QuantSim min/max, 4-bit weights (simulated in torch)",
             lambda: aimet_simulated(case.source().float_model, work / "aimet_w4", calibration, case.held_out,
                                     param_bw=4)),
            (f"AIMET AdaRound ({AIMET_ADAROUND_ITERATIONS} it., {AIMET_ADAROUND_SAMPLES} inputs), 4-bit weights "
             "(simulated in torch)",
             lambda: aimet_simulated(case.source().float_model, work / "aimet_w4_ada", calibration, case.held_out,
                                     method="adaround", param_bw=4)),
        ]
    if name == "lowlight":  # the example's 10-bit head/tail layers, against AIMET's simulation of them
        contenders += [
            ("deployq, 10-bit head/tail (`examples/lowlight/quant.yaml`)", lambda: deployq("ten", (), str(WIDE_CONFIG))),
            ("deployq --ptq bias, 10-bit head/tail", lambda: deployq("ten_bias", ("bias",), str(WIDE_CONFIG))),
            ("AIMET QuantSim min/max, the same 10-bit layers (simulated in torch: it writes no 10-bit file)",
             lambda: aimet_simulated(case.source().float_model, work / "aimet_ten", calibration, case.held_out,
                                     widths=WIDE_CONFIG)),
        ]
    rows = [_row("deployq (min/max)", plain.files["int8"], plain_s, score, float_onnx, calibration, work)]
    for label, make in contenders:
        try:  # a tool that cannot quantize this model, or writes a file onnxruntime refuses, is a row
            with common.quiet():
                path, seconds = common.timed(make)
                rows.append(_row(label, path, seconds, score, float_onnx, calibration, work))
        except Exception as err:
            rows.append([label, f"cannot: {common.error_text(err)[:200]}", "", "", ""])
        print(f"{name}: {label}: {rows[-1][1]}", file=sys.stderr, flush=True)
    return rows


def aimet_simulated(model, work: Path, calibration: list[np.ndarray], held_out: list[np.ndarray], *,
                    method: str = "", widths: Optional[Path] = None, param_bw: int = 8) -> list[list]:
    """AIMET's QuantSim (:func:`aimet_sim`'s arguments) run in torch on the held-out inputs: its outputs."""
    import torch

    sim, _ = aimet_sim(model, work, calibration, method, widths, param_bw)
    with torch.no_grad():
        results = [sim.model(torch.from_numpy(x)) for x in held_out]
    return [[t.numpy() for t in (r if isinstance(r, (tuple, list)) else (r,))] for r in results]


def _row(label: str, made, seconds: float, score, float_onnx: Path, calibration, work: Path) -> list[str]:
    """A table row for a file (`made` a Path), or for outputs simulated in torch (no file to run)."""
    sqnr, agreement = score(made)
    text = f"{sqnr:.2f}" + (f" ({100 * agreement:.0f}%)" if agreement is not None else "")
    if not isinstance(made, Path):
        return [label, text, f"{seconds:.1f}", "- (no file)", "- (no file)"]
    integer, layers = integer_layers(made, work)
    paired, quantized, unpaired = pairing(float_onnx, made, calibration)
    return [label, text, f"{seconds:.1f}", f"{integer}/{layers}", f"{paired}/{quantized}, {unpaired} unpaired"]


def run(argv: list[str]) -> common.Section:
    import torch

    args = parse_args(argv)
    names = common.chosen_models(args.models, MODELS)
    import_peers()
    body: list[str] = []
    for name in names:  # every tool at its default threads, as a user runs it (see the footer)
        with tempfile.TemporaryDirectory(prefix=f"bench_peers.{name}.") as tmp:
            with common.quiet():
                rows = measure(name, args, Path(tmp))
        body += ["", f"**{TITLES[name]}**", ""]
        body += common.table(["quantization", "output SQNR dB (top-1 = float)", "seconds",
                              "integer layers", "diff: weight layers paired, tensors unpaired"], rows)
    body += ["", "NNCF 3.4.0 and AIMET 2.42.0 (`scripts/install-peers.sh`); scored with onnxruntime's CPU provider, "
             "1 thread. "
             f"AdaRound: {AIMET_ADAROUND_ITERATIONS} steps per layer for both tools, AIMET's on its first "
             f"{AIMET_ADAROUND_SAMPLES} calibration inputs (its guide's batch budget), deployq's on its "
             "`--refine-samples` (all the calibration inputs here). "
             "Seconds: the tool's own quantization (calibration included; deployq's export also writes the float "
             "graph, the checkpoint and qparams.json), one run, each tool at its default threads (torch, for deployq "
             f"and AIMET: {torch.get_num_threads()}; the onnxruntime sessions inside quantize_static and NNCF: one per "
             "core; the digits CNN is trained at 1 thread, so its weights do not depend on them). One seed. Machine: "
             + common.machine_text() + "."]
    return common.Section("peers", "deployq against NNCF, AIMET and quantize_static on trained models",
                          common.command_line(SCRIPT, argv), body)


if __name__ == "__main__":
    sys.exit(common.main_for(run, sys.argv[1:]))
