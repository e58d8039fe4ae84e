"""The qparams schema: what is written to ``qparams.json``, stored in checkpoints, and read by the
ONNX rewriter. One record per quant point, keyed by its name (docs/design.md, contract 1).

    {"format": "deployq-qparams", "version": 1,
     "quant_points": [{"name": "DBF.DBF_conv1.Conv1.weight", "kind": "weight", "bits": 10,
                       "signed": true, "symmetric": false, "axis": 0,
                       "scale": [...], "zero_point": [...], "qmin": -512, "qmax": 511,
                       "op": "Conv2d", "layer": "DBF.DBF_conv1.Conv1", "input": "x"}, ...]}

``axis`` is null for per-tensor records (one scale); ``input`` names the quant point that feeds a
weight layer (its scale times the weight scale is the int32 bias scale).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from deployq.qformula import qrange

FORMAT, VERSION = "deployq-qparams", 1
KINDS = ("input", "activation", "weight")


class QParamsError(ValueError):
    pass


@dataclass(frozen=True)
class QParams:
    name: str
    kind: str
    bits: int
    signed: bool
    symmetric: bool
    axis: Optional[int]
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    qmin: int
    qmax: int
    op: str = ""
    layer: Optional[str] = None
    input: Optional[str] = None

    def __post_init__(self) -> None:
        where = f"quant point {self.name!r}"
        if self.kind not in KINDS:
            raise QParamsError(f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        try:
            expected = qrange(self.bits, self.signed)
        except ValueError as err:
            raise QParamsError(f"{where}: {err}") from None
        if (self.qmin, self.qmax) != expected:
            raise QParamsError(f"{where}: qmin/qmax {self.qmin}/{self.qmax} do not match {self.bits}-bit "
                               f"{'signed' if self.signed else 'unsigned'} {expected}")
        if len(self.scale) == 0 or len(self.scale) != len(self.zero_point):
            raise QParamsError(f"{where}: scale and zero_point must be non-empty and of equal length")
        if self.axis is None and len(self.scale) != 1:
            raise QParamsError(f"{where}: per-tensor record with {len(self.scale)} scales")
        if not all(math.isfinite(s) and s > 0 for s in self.scale):
            raise QParamsError(f"{where}: scales must be finite and > 0")
        if not all(self.qmin <= z <= self.qmax for z in self.zero_point):
            raise QParamsError(f"{where}: zero point outside [{self.qmin}, {self.qmax}]")

    @property
    def scale_array(self) -> np.ndarray:
        a = np.asarray(self.scale, dtype=np.float32)
        return a.reshape(()) if self.axis is None else a

    @property
    def zero_point_array(self) -> np.ndarray:
        a = np.asarray(self.zero_point, dtype=np.int64)
        return a.reshape(()) if self.axis is None else a

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale"], d["zero_point"] = list(self.scale), list(self.zero_point)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "QParams":
        try:
            return cls(**{**d, "scale": tuple(float(s) for s in d["scale"]),
                          "zero_point": tuple(int(z) for z in d["zero_point"])})
        except (KeyError, TypeError) as err:
            raise QParamsError(f"bad qparams record {d.get('name', '?')!r}: {err}") from None


def make(name: str, kind: str, bits: int, signed: bool, symmetric: bool, axis: Optional[int],
         scale: Any, zero_point: Any, **extra: Any) -> QParams:
    s = np.asarray(scale, dtype=np.float32).reshape(-1)
    z = np.rint(np.asarray(zero_point, dtype=np.float64)).astype(np.int64).reshape(-1)
    qmin, qmax = qrange(bits, signed)
    return QParams(name, kind, bits, signed, symmetric, axis, tuple(float(v) for v in s),
                   tuple(int(v) for v in z), qmin, qmax, **extra)


def dump(records: Iterable[QParams]) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "quant_points": [r.to_json() for r in records]}


def load(data: dict[str, Any] | str | Path) -> dict[str, QParams]:
    if not isinstance(data, dict):
        path = Path(data)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise QParamsError(f"cannot read qparams file {path}: {err}") from None
    if data.get("format") != FORMAT:
        raise QParamsError(f"not a deployq qparams document (format={data.get('format')!r})")
    if data.get("version") != VERSION:
        raise QParamsError(f"qparams version {data.get('version')} is not supported (expected {VERSION})")
    records = [QParams.from_json(d) for d in data.get("quant_points", [])]
    return {r.name: r for r in records}
