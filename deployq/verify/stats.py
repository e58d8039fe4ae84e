"""Error statistics of ``deployq diff``: streamed per quant point, one row each, and the report.

SQNR = 10·log10(Σx² / Σ(x − x̂)²) in dB, cosine similarity, MSE, max |error|, and for quantized
tensors the error in LSB units: the distance between the quant model's code and the code of the
float value (0 = exact rounding). Everything is sums, batch by batch, never whole tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from deployq.core.decibels import ratio_db
from deployq.core.qformula import quantize_np
from deployq.verify.report import to_html
from deployq.core.runtime import ModelFileError

from .match import MatchedPoint

__all__ = ["LSB_BINS", "SAMPLE", "DiffReport", "Row", "Stats"]

LSB_BINS = ("0", "1", ">1")
SAMPLE = 4096  # float values kept per quant point for the report's value histogram


@dataclass
class Stats:
    """Streaming error statistics of a quantized tensor against its float reference."""

    n: int = 0
    ref_sq: float = 0.0
    err_sq: float = 0.0
    dot: float = 0.0
    quant_sq: float = 0.0
    max_err: float = 0.0
    lsb: list[int] = field(default_factory=lambda: [0, 0, 0])
    sample: Optional[np.ndarray] = None  # a quant point's float values (evenly spaced, up to SAMPLE) for its histogram
    example: Optional[tuple[np.ndarray, np.ndarray]] = None  # a model output: (float, quantized) of the first item

    def _keep(self, ref: np.ndarray, quant: np.ndarray, point: Optional[MatchedPoint]) -> None:
        if point is None:
            if self.example is None and ref.ndim >= 1 and len(ref):
                self.example = (np.array(ref[0], np.float32), np.array(quant[0], np.float32))
            return
        have = 0 if self.sample is None else self.sample.size
        if have < SAMPLE and ref.size:
            flat = ref.ravel()
            taken = flat[::max(1, flat.size // SAMPLE)][:SAMPLE - have].astype(np.float32)
            self.sample = taken if self.sample is None else np.concatenate([self.sample, taken])

    def add(self, ref: np.ndarray, quant: np.ndarray, point: Optional[MatchedPoint] = None,
            codes: Optional[np.ndarray] = None) -> None:
        if ref.shape != quant.shape:
            raise ModelFileError(f"{point.name if point else 'tensor'}: float shape {ref.shape} vs quantized {quant.shape}")
        self._keep(ref, quant, point)
        r, q = ref.astype(np.float64).ravel(), quant.astype(np.float64).ravel()
        e = r - q
        self.n += r.size
        self.ref_sq += float(r @ r)
        self.err_sq += float(e @ e)
        self.dot += float(r @ q)
        self.quant_sq += float(q @ q)
        self.max_err = max(self.max_err, float(np.abs(e).max(initial=0.0)))
        if point is not None:
            self.add_lsb(ref, point, codes if codes is not None else quant, codes is not None)

    def add_lsb(self, ref: np.ndarray, point: MatchedPoint, quant: np.ndarray, are_codes: bool) -> None:
        """Distance, in codes, between the quantized tensor and the float value's own code."""
        axis = point.axis
        want = quantize_np(ref, point.scale, point.zero_point, point.qmin, point.qmax, axis)
        have = quant.astype(np.int64) if are_codes else quantize_np(quant, point.scale, point.zero_point, point.qmin, point.qmax, axis)
        d = np.abs(want - have)
        self.lsb[0] += int((d == 0).sum())
        self.lsb[1] += int((d == 1).sum())
        self.lsb[2] += int((d > 1).sum())

    @property
    def sqnr_db(self) -> float:
        return ratio_db(self.ref_sq, self.err_sq)

    @property
    def cosine(self) -> float:
        denom = math.sqrt(self.ref_sq * self.quant_sq)
        return self.dot / denom if denom else (1.0 if self.err_sq == 0 else 0.0)

    @property
    def mse(self) -> float:
        return self.err_sq / self.n if self.n else 0.0

    def to_json(self) -> dict:
        lsb_total = sum(self.lsb)
        return {"elements": self.n, "sqnr_db": _finite(self.sqnr_db), "cosine": self.cosine, "mse": self.mse,
                "max_abs_err": self.max_err,
                "lsb_histogram": dict(zip(LSB_BINS, self.lsb)) if lsb_total else None}


def _finite(v: float) -> Optional[float]:
    return v if math.isfinite(v) else (None if math.isnan(v) else (1e9 if v > 0 else -1e9))


@dataclass
class Row:
    point: MatchedPoint
    stats: Stats
    jump: bool = False
    drop_db: Optional[float] = None

    def to_json(self) -> dict:
        p = self.point
        return {"name": p.name, "kind": p.kind, "op": p.op, "bits": p.bits, "signed": p.signed,
                "inputs": list(p.inputs), "jump": self.jump, "drop_db": self.drop_db, **self.stats.to_json()}


@dataclass
class DiffReport:
    mode: str
    rows: list[Row]
    outputs: dict[str, Stats]
    batches: int
    seconds: float
    isa: dict
    unmatched: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    jump_db: float = 6.0
    title: str = "deployq diff"
    # the outputs of the integer model running freely on onnxruntime's fused kernels, against the
    # float model's (every mode measures them; the rows read the unoptimized graphs)
    deployed: dict[str, Stats] = field(default_factory=dict)

    def worst(self, k: int = 5) -> list[Row]:
        """The `k` weakest activation quant points (lowest SQNR; most sensitive in sensitivity mode)."""
        return self.ranking()[:k]

    def to_html(self, fail_below: Optional[float] = None) -> str:
        """The report as one self-contained HTML page (what ``deployq diff --html`` writes)."""
        return to_html(self, self.title, fail_below)

    def ranking(self) -> list[Row]:
        """Activation rows, worst first (lowest SQNR)."""
        rows = [r for r in self.rows if r.point.kind == "activation"]
        return sorted(rows, key=lambda r: r.stats.sqnr_db)

    @property
    def first_jump(self) -> Optional[Row]:
        return next((r for r in self.rows if r.jump), None)

    @property
    def gate_sqnr(self) -> float:
        """What --fail-below tests: the model output's SQNR (accumulated, local), or the worst
        quant point's (sensitivity: output SQNR with that point alone quantized; kernel)."""
        if self.outputs:
            return min(s.sqnr_db for s in self.outputs.values())
        ranked = self.ranking()
        return ranked[0].stats.sqnr_db if ranked else math.inf

    def passed(self, fail_below: Optional[float]) -> bool:
        return fail_below is None or self.gate_sqnr >= fail_below

    def verdict(self, fail_below: Optional[float] = None) -> str:
        parts = [self.mode]
        if self.outputs:
            parts.append(f"output SQNR {self.gate_sqnr:.1f} dB, cosine {min(s.cosine for s in self.outputs.values()):.5f}")
        if self.deployed:
            parts.append(f"the integer model on onnxruntime's kernels: output SQNR "
                         f"{min(s.sqnr_db for s in self.deployed.values()):.1f} dB")
        if self.mode == "kernel":
            lsb = [sum(r.stats.lsb[i] for r in self.rows) for i in range(3)]
            total = max(1, sum(lsb))
            parts.append(f"integer kernels vs reference: {100 * lsb[0] / total:.3f}% equal codes, "
                         f"{100 * lsb[2] / total:.3f}% off by more than 1 LSB")
        ranked = self.ranking()
        if ranked:
            worst = ranked[0]
            label = "most sensitive" if self.mode == "sensitivity" else "weakest"
            parts.append(f"{label} {worst.point.name} ({worst.stats.sqnr_db:.1f} dB)")
        if self.first_jump is not None:
            parts.append(f"error jumps at {self.first_jump.point.name} (-{self.first_jump.drop_db:.1f} dB)")
        if fail_below is not None:
            parts.append(("PASS" if self.passed(fail_below) else "FAIL") + f" (--fail-below {fail_below:g} dB)")
        return "; ".join(parts)

    def to_json(self) -> dict:
        return {"mode": self.mode, "batches": self.batches, "seconds": self.seconds, "cpu": self.isa,
                "gate_sqnr_db": _finite(self.gate_sqnr),
                "outputs": {k: v.to_json() for k, v in self.outputs.items()},
                "deployed_outputs": {k: v.to_json() for k, v in self.deployed.items()},
                "first_jump": self.first_jump.point.name if self.first_jump else None,
                "ranking": [r.point.name for r in self.ranking()],
                "rows": [r.to_json() for r in self.rows], "unmatched": self.unmatched, "warnings": self.warnings}


def _mark_jumps(rows: list[Row], jump_db: float) -> None:
    by_name = {r.point.name: r for r in rows}
    for row in rows:  # measured from quantized layers on: a model input is near-lossless, so the
        # first layer after it would always look like a jump
        upstream = [by_name[n].stats.sqnr_db for n in row.point.inputs if n in by_name and by_name[n].point.op != "input"]
        if not upstream or not math.isfinite(row.stats.sqnr_db):
            continue
        best = min(upstream)
        if math.isfinite(best):
            row.drop_db = best - row.stats.sqnr_db
            row.jump = row.drop_db >= jump_db
    first = next((r for r in rows if r.jump), None)
    for r in rows:
        r.jump = r is first
