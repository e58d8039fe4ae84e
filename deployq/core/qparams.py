"""The qparams schema: what is written to ``qparams.json``, stored in checkpoints, and read by the
ONNX rewriter. One record per quant point, keyed by its name (docs/design.md, contract 1).

    {"format": "deployq-qparams", "version": 1,
     "quant_points": [{"name": "DBF.DBF_conv1.Conv1.weight", "kind": "weight", "bits": 10,
                       "signed": true, "symmetric": false, "axis": 0,
                       "scale": [...], "zero_point": [...], "qmin": -512, "qmax": 511,
                       "op": "Conv2d", "layer": "DBF.DBF_conv1.Conv1", "input": "x", "observer": null}, ...]}

``axis`` is null for per-tensor records (one scale); ``input`` names the quant point that feeds a
weight layer (its scale times the weight scale is the int32 bias scale); ``observer`` is the
calibration method that set an activation's range, with its arguments if it has any (``minmax``,
``percentile(lower=0.001, upper=99.999)``, ``mse``, ``kl``: the config's, or the one ``--ptq search``
chose), null for weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from deployq.core.qformula import CodeRange, qrange
from deployq.core.qspec import QuantSpec

FORMAT, VERSION = "deployq-qparams", 1
KINDS = ("input", "activation", "weight")


class QParamsError(ValueError):
    pass


@dataclass(frozen=True)
class QuantPoint(CodeRange):
    """The one record of a quant point, from :func:`deployq.prepare` to ``qparams.json`` and diff.

    Identity (``name``, ``kind``, ``op``; for weights the ``layer`` and the ``input`` quant point
    that feeds it) and grid (``bits``, ``signed``, ``symmetric``, ``axis``: None per tensor, else
    the channel axis) are set when the point is planned; ``scale`` and ``zero_point`` are empty
    until calibration fills them (:meth:`with_qparams`). ``qmin``/``qmax`` always come from
    :func:`~deployq.core.qformula.qrange`. ``spec``, ``quantizer`` (the fake quantizer's module
    path) and ``members`` (module names a config may use for it) say where prepare put the point;
    they are not part of ``qparams.json``.
    """

    name: str
    kind: str
    bits: int
    signed: bool
    symmetric: bool = False
    axis: Optional[int] = None
    scale: tuple[float, ...] = ()
    zero_point: tuple[int, ...] = ()
    op: str = ""
    layer: Optional[str] = None
    input: Optional[str] = None
    observer: Optional[str] = field(default=None, compare=False)
    spec: Optional[QuantSpec] = field(default=None, compare=False, repr=False)
    quantizer: str = field(default="", compare=False)
    members: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        where = f"quant point {self.name!r}"
        if self.kind not in KINDS:
            raise QParamsError(f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        try:
            qrange(self.bits, self.signed)
        except ValueError as err:
            raise QParamsError(f"{where}: {err}") from None
        if not self.scale and not self.zero_point:
            return  # planned, not calibrated yet
        if len(self.scale) == 0 or len(self.scale) != len(self.zero_point):
            raise QParamsError(f"{where}: scale and zero_point must be non-empty and of equal length")
        if self.axis is None and len(self.scale) != 1:
            raise QParamsError(f"{where}: per-tensor record with {len(self.scale)} scales")
        if not all(math.isfinite(s) and s > 0 for s in self.scale):
            raise QParamsError(f"{where}: scales must be finite and > 0")
        if not all(self.qmin <= z <= self.qmax for z in self.zero_point):
            raise QParamsError(f"{where}: zero point outside [{self.qmin}, {self.qmax}]")

    @property
    def calibrated(self) -> bool:
        return bool(self.scale)

    @property
    def scale_array(self) -> np.ndarray:
        a = np.asarray(self.scale, dtype=np.float32)
        return a.reshape(()) if self.axis is None else a

    @property
    def zero_point_array(self) -> np.ndarray:
        a = np.asarray(self.zero_point, dtype=np.int64)
        return a.reshape(()) if self.axis is None else a

    def with_qparams(self, scale: Any, zero_point: Any) -> "QuantPoint":
        """This point with its scale and zero point (per channel along ``axis``, else one each)."""
        s = np.asarray(scale, dtype=np.float32).reshape(-1)
        z = np.rint(np.asarray(zero_point, dtype=np.float64)).astype(np.int64).reshape(-1)
        return replace(self, scale=tuple(float(v) for v in s), zero_point=tuple(int(v) for v in z))

    def to_json(self) -> dict[str, Any]:
        d = {f: getattr(self, f) for f in SCHEMA_FIELDS}
        d["scale"], d["zero_point"] = list(self.scale), list(self.zero_point)
        d["qmin"], d["qmax"] = self.qmin, self.qmax
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "QuantPoint":
        try:
            fields_ = {k: d[k] for k in SCHEMA_FIELDS if k in d}
            point = cls(**{**fields_, "scale": tuple(float(s) for s in d["scale"]),
                           "zero_point": tuple(int(z) for z in d["zero_point"])})
            stored = (d["qmin"], d["qmax"])
        except (KeyError, TypeError) as err:
            raise QParamsError(f"bad qparams record {d.get('name', '?')!r}: {err}") from None
        if stored != (point.qmin, point.qmax):
            raise QParamsError(f"quant point {point.name!r}: qmin/qmax {stored[0]}/{stored[1]} do not match "
                               f"{point.bits}-bit {'signed' if point.signed else 'unsigned'} "
                               f"{(point.qmin, point.qmax)}")
        return point


# the fields qparams.json stores (besides qmin / qmax, written for readers and checked on load)
SCHEMA_FIELDS = ("name", "kind", "bits", "signed", "symmetric", "axis", "scale", "zero_point", "op", "layer", "input",
                 "observer")


def make(name: str, kind: str, bits: int, signed: bool, symmetric: bool, axis: Optional[int],
         scale: Any, zero_point: Any, **extra: Any) -> QuantPoint:
    """A calibrated record: :class:`QuantPoint` with ``scale`` / ``zero_point`` from arrays."""
    return QuantPoint(name, kind, bits, signed, symmetric, axis, **extra).with_qparams(scale, zero_point)


def dump(records: Iterable[QuantPoint]) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "quant_points": [r.to_json() for r in records]}


def load(data: dict[str, Any] | str | Path) -> dict[str, QuantPoint]:
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
    records = [QuantPoint.from_json(d) for d in data.get("quant_points", [])]
    return {r.name: r for r in records}
