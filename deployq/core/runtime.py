"""ONNX files and onnxruntime: loading with clear errors, sessions, model inputs, the CPU's ISA.

Two views (docs/design.md, contract 5): the *reference* view runs with graph optimizations disabled and
computes QDQ semantics exactly, so intermediate tensors can be read by adding graph outputs; the
*kernel* view runs fully optimized (integer kernels), where extra outputs would break fusion, so it
is only ever run on truncated sub-models (see :mod:`deployq.verify.diff`, mode ``kernel``).
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError

ONNX_TO_NUMPY = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.UINT8: np.uint8,
                 onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT16: np.uint16,
                 onnx.TensorProto.INT16: np.int16, onnx.TensorProto.INT32: np.int32,
                 onnx.TensorProto.INT64: np.int64}


class ModelFileError(ValueError):
    """A file that is not a usable ONNX model, or two models that cannot be compared."""


# onnxruntime's own exception types (none of them is a RuntimeError or ValueError)
ORT_ERRORS = tuple(e for e in vars(ort.capi.onnxruntime_pybind11_state).values()
                   if isinstance(e, type) and issubclass(e, Exception))


def ort_message(err: BaseException) -> str:
    """onnxruntime's message without its '[ONNXRuntimeError] : 1 : FAIL :' prefix, one paragraph."""
    text = " ".join(str(err).split())
    return re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", text)[:600]


@functools.lru_cache(maxsize=1)
def max_opset() -> int:
    """The newest ONNX opset both the installed onnx and onnxruntime support (onnxruntime is
    asked with a one-node model at each opset onnx knows, newest first)."""
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    for opset in range(onnx.defs.onnx_opset_version(), 0, -1):
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [value],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 10
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except ORT_ERRORS:
            continue
        return opset
    return 0


def load_onnx(path: str | Path, runtime: bool = True) -> onnx.ModelProto:
    """An ONNX model from `path`; with `runtime`, also one this onnxruntime can load (IR version,
    operators, domains), or a :class:`ModelFileError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file" if not path.exists() else f"{path} is a folder, not an ONNX file")
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, OSError, RuntimeWarning) as err:
        raise ModelFileError(f"{path} is not an ONNX model ({type(err).__name__}: {err})") from None
    if not model.graph.node:
        raise ModelFileError(f"{path} is not an ONNX model (its graph has no nodes)")
    if runtime:
        session(model, optimize=False, label=str(path))
    return model


def session(model: onnx.ModelProto, *, optimize: bool, extra_outputs: Iterable[str] = (),
            threads: int = 1, label: str = "the model") -> ort.InferenceSession:
    """A CPU session. With `extra_outputs` the given tensors become graph outputs (reference view).
    A model onnxruntime refuses is a :class:`ModelFileError` naming `label`."""
    extra = [n for n in dict.fromkeys(extra_outputs) if n not in {o.name for o in model.graph.output}]
    if extra:
        if optimize:
            raise ValueError("extra outputs break kernel fusion; read tensors only in the reference view")
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        copy.graph.output.extend(onnx.ValueInfoProto(name=n) for n in extra)
        model = copy
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except ORT_ERRORS as err:
        raise ModelFileError(f"onnxruntime {ort.__version__} cannot load {label}: {ort_message(err)}") from None


def is_ort_format(path: str | Path) -> bool:
    """True for an ORT-format model file (``.ort``: what ORT Mobile and minimal builds load)."""
    return Path(path).suffix.lower() == ".ort"


def ort_format_session(path: str | Path, *, threads: int = 1) -> ort.InferenceSession:
    """A CPU session for an ORT-format file; a file onnxruntime refuses is a :class:`ModelFileError`."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file" if not path.exists() else f"{path} is a folder, not an ORT file")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except ORT_ERRORS as err:
        raise ModelFileError(f"onnxruntime {ort.__version__} cannot load {path}: {ort_message(err)}") from None


def run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], label: str = "the model") -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    try:
        return dict(zip(names, sess.run(names, feeds)))
    except ORT_ERRORS as err:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in feeds.items())
        raise ModelFileError(f"onnxruntime could not run {label} on inputs {shapes}: {ort_message(err)}") from None


@dataclass(frozen=True)
class InputInfo:
    name: str
    shape: tuple[int, ...]  # symbolic dimensions resolved to 1
    dtype: type
    free: tuple[int, ...] = ()  # symbolic dimensions after the batch (e.g. a --dynamic-hw export's H, W)


def inputs_of(model: onnx.ModelProto) -> list[InputInfo]:
    initializers = {i.name for i in model.graph.initializer}
    out = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        fixed = [d.HasField("dim_value") and d.dim_value > 0 for d in tensor.shape.dim]
        shape = tuple(d.dim_value if ok else 1 for d, ok in zip(tensor.shape.dim, fixed))
        free = tuple(i for i, ok in enumerate(fixed) if not ok and i > 0)
        out.append(InputInfo(value.name, shape, ONNX_TO_NUMPY.get(tensor.elem_type, np.float32), free))
    return out


def with_shapes(inputs: list[InputInfo], shapes: Optional[Sequence[tuple[Optional[str], tuple[int, ...]]]],
                where: str = "--input-shape") -> list[InputInfo]:
    """`inputs` with the shapes given as ``[(name or None, shape), ...]``, checked against the
    model's fixed dimensions; every symbolic dimension after the batch needs one."""
    given = {name if name is not None else (inputs[0].name if len(inputs) == 1 else None): tuple(shape)
             for name, shape in (shapes or [])}
    if None in given:
        raise ModelFileError(f"the model takes {len(inputs)} inputs; name each in {where} (NAME:N,C,H,W)")
    unknown = [n for n in given if n not in {i.name for i in inputs}]
    if unknown:
        raise ModelFileError(f"{where} names {', '.join(unknown)}; the model's inputs are {', '.join(i.name for i in inputs)}")
    out = []
    for i in inputs:
        shape = given.get(i.name)
        if shape is None:
            if i.free:
                raise ModelFileError(f"input {i.name!r} has symbolic dimensions {list(i.free)} (e.g. a --dynamic-hw "
                                     f"export): give {where} {i.name}:N,C,H,W")
            out.append(i)
            continue
        fixed = [d for k, d in enumerate(i.shape) if k > 0 and k not in i.free]
        if len(shape) != len(i.shape) or [d for k, d in enumerate(shape) if k > 0 and k not in i.free] != fixed:
            raise ModelFileError(f"{where} {shape} does not fit input {i.name!r} of shape "
                                 f"{tuple('?' if k == 0 or k in i.free else d for k, d in enumerate(i.shape))}")
        out.append(InputInfo(i.name, shape, i.dtype))
    return out


def check_same_inputs(a: onnx.ModelProto, b: onnx.ModelProto, a_name: str, b_name: str, *,
                      by_order: bool = False) -> list[InputInfo]:
    """`a`'s inputs, after checking that `b` takes the same (names and shapes; names only unless
    `by_order`, for another tool's export that names its inputs its own way). A size symbolic in
    one model (a user's file with any height and width) takes the other's fixed size."""
    ia, ib = inputs_of(a), inputs_of(b)
    merged = [_common_input(x, y, by_order) for x, y in zip(ia, ib)] if len(ia) == len(ib) else []
    if len(merged) != len(ia) or None in merged:
        show = lambda infos: [(i.name, tuple("?" if d in i.free else s for d, s in enumerate(i.shape)))  # noqa: E731
                              for i in infos]
        raise ModelFileError(f"the models take different inputs: {a_name} {show(ia)}, {b_name} {show(ib)}")
    return merged


def _common_input(a: InputInfo, b: InputInfo, by_order: bool) -> Optional[InputInfo]:
    """`a` with the sizes `b` fixes where `a`'s are symbolic (the batch counts as one), or None
    where they disagree."""
    if (a.name != b.name and not by_order) or len(a.shape) != len(b.shape):
        return None
    shape, free = [], []
    for d, (x, y) in enumerate(zip(a.shape, b.shape)):
        if d in a.free or d in b.free or x == y:
            shape.append(y if d in a.free else x)
            if d in a.free and d in b.free:
                free.append(d)
        else:
            return None
    return dataclasses.replace(a, shape=tuple(shape), free=tuple(free))


def random_feeds(inputs: list[InputInfo], count: int, seed: int = 0,
                 ranges: Optional[dict[str, tuple[float, float]]] = None) -> Iterator[dict[str, np.ndarray]]:
    """`count` random inputs: uniform over each input's quantized range if known, else [0, 1)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        feeds = {}
        for i in inputs:
            lo, hi = (ranges or {}).get(i.name, (0.0, 1.0))
            feeds[i.name] = rng.uniform(lo, hi, size=i.shape).astype(i.dtype)
        yield feeds


def cpu_isa() -> dict[str, object]:
    """What the CPU offers integer kernels: AVX2, AVX-512, VNNI (x86) or dot product (Arm)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    machine = platform.machine().lower()
    return {
        "arch": machine,
        "avx2": "avx2" in flags,
        "avx512": "avx512f" in flags,
        "vnni": bool({"avx512_vnni", "avx_vnni", "asimddp"} & flags),
        "amx": "amx_int8" in flags,
        "flags_read": bool(flags),
    }


def isa_text(isa: dict[str, object]) -> str:
    names = [k.upper() if k != "avx512" else "AVX-512" for k in ("avx2", "avx512", "vnni", "amx") if isa.get(k)]
    return f"{isa['arch']}: {', '.join(names) or 'no SIMD integer extensions found'}"
