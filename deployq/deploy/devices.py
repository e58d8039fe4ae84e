"""Device profiles for export: what each onnxruntime execution provider needs, and how much of a model it takes.

A profile is a set of constraints on the quant config (refused with a message saying what to
change) and exact rewrites of the exported graph:

    cpu     onnxruntime's CPU provider (the default): any config, shapes as exported; ConvTranspose
            (kernel = stride) as Conv + DepthToSpace, which the provider runs as QLinearConv where a QDQ
            ConvTranspose stays float
    nnapi   Android NNAPI: 8-bit activations (u8) and 8-bit symmetric weights; fixed input shapes;
            ConvTranspose (kernel = stride) as Conv + DepthToSpace(DCR)
    qnn     Qualcomm QNN (HTP): u8/u16 activations (the 10-bit layers run natively as 16-bit),
            8-bit symmetric weights; fixed input shapes
    xnnpack XNNPACK (ORT Mobile's CPU kernels on Arm): 8-bit activations (u8 or s8), 8-bit symmetric
            weights; ConvTranspose (kernel = stride) as Conv + DepthToSpace; shapes as exported
    coreml  Apple CoreML: takes no QuantizeLinear/DequantizeLinear, so the profile's model is the float
            graph with the learned weights (the dequantized weight codes); fixed shapes; ConvTranspose
            as Conv + DepthToSpace

Every rewrite keeps the QDQ reference view: the quant points, their names and their values
(``deployq check`` ≤ 1 LSB). :func:`coverage` asks onnxruntime's own mobile usability checker
(``onnxruntime.tools.mobile_helpers.usability_checker``, what ``check_onnx_model_mobile_usability``
runs) how many nodes NNAPI and CoreML would take, in how many partitions. It covers those two
providers only; QNN and XNNPACK have no such checker in onnxruntime.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

import numpy as np
import onnx

from deployq.core.qformula import dequantize_np
from deployq.core.qparams import QuantPoint

if TYPE_CHECKING:
    import onnxruntime as ort


@dataclass(frozen=True)
class Device:
    name: str
    provider: str
    about: str
    fixed_shapes: bool = False
    block_convtranspose: bool = False  # ConvTranspose (kernel = stride) -> Conv + DepthToSpace
    max_activation_bits: int = 16
    max_weight_bits: int = 16
    signed_activations: bool = True
    symmetric_weights: bool = False
    takes_qdq: bool = True
    ort_platform: Optional[str] = None  # target_platform of onnxruntime's ORT-format converter
    ort_style: str = "Fixed"  # its optimization style: "Runtime" for providers that compile a partition
    carry_bits: int = 8  # widest codes the provider moves as integers (Q/DQ carried through data movement)


DEVICES = {d.name: d for d in (
    Device("cpu", "CPU", "onnxruntime's CPU provider: any config, shapes as exported, ConvTranspose as Conv",
           block_convtranspose=True),
    Device("nnapi", "NNAPI", "Android NNAPI: 8-bit, fixed shapes, no ConvTranspose", fixed_shapes=True,
           block_convtranspose=True, max_activation_bits=8, max_weight_bits=8, signed_activations=False,
           symmetric_weights=True, ort_platform="arm", ort_style="Runtime"),
    Device("qnn", "QNN", "Qualcomm QNN: u8/u16 activations, 8-bit symmetric weights, fixed shapes",
           fixed_shapes=True, max_weight_bits=8, signed_activations=False, symmetric_weights=True,
           ort_platform="arm", ort_style="Runtime", carry_bits=16),
    Device("xnnpack", "XNNPACK", "XNNPACK (ORT Mobile on Arm CPUs): 8-bit, symmetric weights, ConvTranspose as Conv",
           block_convtranspose=True, max_activation_bits=8, max_weight_bits=8, symmetric_weights=True,
           ort_platform="arm", ort_style="Runtime"),
    Device("coreml", "CoreML", "Apple CoreML: float model with the learned weights (CoreML takes no Q/DQ)",
           fixed_shapes=True, block_convtranspose=True, takes_qdq=False, ort_platform="arm", ort_style="Runtime"),
)}
DEVICE_KEY = "deployq.device"  # model metadata: the profile a model was exported for


def device(name: "str | Device") -> Device:
    """The profile called `name` (a :class:`Device` is returned as it is)."""
    if isinstance(name, Device):
        return name
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    return DEVICES[name]


def _names(points: list[str], limit: int = 4) -> str:
    return ", ".join(points[:limit]) + (f" and {len(points) - limit} more" if len(points) > limit else "")


def check_config(dev: Device, records: Iterable[QuantPoint]) -> None:
    """Refuse a config `dev` cannot run, naming the quant points and what to change."""
    records = list(records)
    acts = [r for r in records if r.kind != "weight"]
    weights = [r for r in records if r.kind == "weight"]
    problems = []
    wide = [r.name for r in acts if r.bits > dev.max_activation_bits]
    if wide:
        problems.append(f"{len(wide)} activation quant points are wider than {dev.max_activation_bits} bits "
                        f"({_names(wide)}); give them {dev.max_activation_bits} bits in the config's `layers` "
                        "(or train with an all-8-bit config)"
                        + ("; --device qnn runs 9-16-bit activations" if dev.name == "nnapi" else ""))
    wide = [r.name for r in weights if r.bits > dev.max_weight_bits]
    if wide:
        problems.append(f"{len(wide)} weights are wider than {dev.max_weight_bits} bits ({_names(wide)}); "
                        f"give them {dev.max_weight_bits} bits in the config's `layers`")
    signed = [r.name for r in acts if r.signed]
    if signed and not dev.signed_activations:
        problems.append(f"{len(signed)} activation quant points are signed ({_names(signed)}); {dev.provider} "
                        "takes unsigned activations: drop --act-signed (or `signed: true` in the config)")
    affine = [r.name for r in weights if not r.symmetric]
    if affine and dev.symmetric_weights:
        problems.append(f"{len(affine)} weights are affine ({_names(affine)}); {dev.provider} takes symmetric "
                        "weights: use scheme per_channel_symmetric for them")
    if problems:
        raise ValueError(f"--device {dev.name}: the config asks for what {dev.provider} cannot run: "
                         + "; ".join(problems))


def fix_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """`model` with every input at the given fixed shape (onnxruntime's own helpers; in place)."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    try:
        for name, shape in shapes.items():
            make_input_shape_fixed(model.graph, name, list(shape))
        fix_output_shapes(model)
    except (ValueError, onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ValueError(f"cannot fix the input shapes to {shapes}: {err}") from None
    return model


def _dequantized(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray:
    """The value of DequantizeLinear(constant codes, scale[, zero point]), by the one formula."""
    q, scale, *zp = (onnx.numpy_helper.to_array(inits[i]) for i in node.input if i)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % max(q.ndim, 1) if scale.ndim else None
    return dequantize_np(q, scale, zp[0] if zp else np.zeros_like(scale), axis)


def learned_float(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> onnx.ModelProto:
    """The float model with each weight and bias replaced by its dequantized codes from `quant_model`:
    the float graph computing with the weights as the integer model holds them. Layers are matched
    by node name and input index (both models come from one export)."""
    inits = {i.name: i for i in quant_model.graph.initializer}
    makers = {o: n for n in quant_model.graph.node for o in n.output}
    learned: dict[tuple[str, int], np.ndarray] = {}
    for node in quant_model.graph.node:
        for index, name in enumerate(node.input):
            dq = makers.get(name)
            if dq is not None and dq.op_type == "DequantizeLinear" and all(i in inits for i in dq.input if i):
                learned[(node.name, index)] = _dequantized(dq, inits)
    out = onnx.ModelProto()
    out.CopyFrom(float_model)
    values = {i.name: i for i in out.graph.initializer}
    done = set()
    for node in out.graph.node:
        for index, name in enumerate(node.input):
            key = (node.name, index)
            if key in learned and name in values and tuple(values[name].dims) == learned[key].shape:
                values[name].CopyFrom(onnx.numpy_helper.from_array(learned[key], name))
                done.add(key)
    missing = sorted(set(learned) - done)
    if missing:
        raise ValueError(f"the float model has no weight matching the integer model's {missing[0][0]!r} "
                         f"(input {missing[0][1]}) and {len(missing) - 1} more; export the two together")
    return out


@dataclass(frozen=True)
class Coverage:
    provider: str
    nodes: int
    supported: int
    partitions: int

    @property
    def share(self) -> float:
        return self.supported / self.nodes if self.nodes else 0.0

    def text(self) -> str:
        return f"{self.supported}/{self.nodes} nodes ({self.share:.1%}) in {self.partitions} partition(s)"

    def to_json(self) -> dict:
        return {**asdict(self), "share": round(self.share, 4)}


CHECKED_PROVIDERS = ("NNAPI", "CoreML NeuralNetwork", "CoreML MLProgram")


def coverage(model: onnx.ModelProto) -> tuple[list[Coverage], Optional[str]]:
    """How much of `model` NNAPI and CoreML would take, by onnxruntime's mobile usability checker,
    after the basic-level optimization it applies first: (coverages, None), or ([], why) if the
    checker could not run (a measurement never fails an export). Dynamic shapes count as
    unsupported, as the checker counts them."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import optimize_model

    checks = {"NNAPI": lambda m: uc.check_nnapi_partitions(m, True),
              "CoreML NeuralNetwork": lambda m: uc.check_coreml_partitions(
                  m, True, "coreml_supported_neuralnetwork_ops.md"),
              "CoreML MLProgram": lambda m: uc.check_coreml_partitions(m, True, "coreml_supported_mlprogram_ops.md")}
    logging.getLogger("usability_checker").setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="deployq-coverage-") as tmp:
            src, opt = Path(tmp) / "model.onnx", Path(tmp) / "model.basic.onnx"
            onnx.save(model, src)
            optimize_model(src, opt)
            shaped = onnx.shape_inference.infer_shapes(onnx.load(str(opt)), strict_mode=True)
        found = []
        for provider in CHECKED_PROVIDERS:
            info = checks[provider](shaped)
            found.append(Coverage(provider, info.num_nodes, info.num_supported_nodes, info.num_partitions))
        return found, None
    except Exception as err:  # noqa: BLE001 - onnxruntime's tools raise anything; the export stands without them
        return [], f"{type(err).__name__}: {err}"


def to_ort_format(model: onnx.ModelProto, dev: Device) -> tuple[bytes, bytes]:
    """(ORT-format model, required-operators config for a reduced onnxruntime build) of `model`, by
    onnxruntime's own converter, with the settings its documentation gives: the ``Runtime`` style
    for providers that compile a partition (NNAPI, QNN, CoreML: basic optimizations, the others
    saved to replay on what the provider leaves to the CPU), ``Fixed`` for the CPU (all
    optimizations, without the x86-only NCHWc layout, so the file runs anywhere)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with tempfile.TemporaryDirectory(prefix="deployq-ort-") as tmp:
        src, out = Path(tmp) / "in" / "model.onnx", Path(tmp) / "out"
        src.parent.mkdir()
        onnx.save(model, src)
        logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # "Created config in /tmp/..."
        with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its progress
            convert_onnx_models_to_ort(src, out, [OptimizationStyle[dev.ort_style]], target_platform=dev.ort_platform)
        (ort_file,), (config,) = list(out.glob("*.ort")), list(out.glob("*.config"))
        operators = [line for line in config.read_text().splitlines() if not line.startswith("#")]
        header = (f"# operators of a deployq export for --device {dev.name} (onnxruntime {_ort_version()}, "
                  f"{dev.ort_style} optimization style); build with --include_ops_by_config")
        return ort_file.read_bytes(), "\n".join([header, *operators, ""]).encode()


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def ort_reference(model: onnx.ModelProto, dev: Device) -> "ort.InferenceSession":
    """A CPU session of `model` optimized as :func:`to_ort_format` optimized it for `dev`: what
    its ORT-format file must compute."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.qdqisint8allowed", "1" if dev.ort_platform == "arm" else "0")
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if dev.ort_style == "Runtime"
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["NchwcTransformer"])


def device_of(metadata: dict[str, str]) -> Device:
    """The profile a model was exported for, from its metadata (``cpu`` for models without one)."""
    return DEVICES.get(metadata.get(DEVICE_KEY, "cpu"), DEVICES["cpu"])
