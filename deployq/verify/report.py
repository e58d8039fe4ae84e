"""Rendering of reports: diff's terminal table and self-contained HTML page, check's table.

The HTML page loads nothing from the network: inline CSS, SVG (SQNR by layer with the layer names,
LSB-error and value histograms, per-channel weight ranges), PNG data URIs (an image model's float
and quantized output and their error) and a small sorting script, so it opens anywhere, offline.
"""

from __future__ import annotations

import base64
import html
import math
from typing import TYPE_CHECKING, Any, Optional

import imageio.v3
import numpy as np
from rich.table import Table

from deployq.core.runtime import isa_text

if TYPE_CHECKING:
    from deployq.verify.check import ParityReport

# What is rendered: a deployq.verify.stats.DiffReport and its Rows. stats renders its reports with
# this module, so this one names them without importing them (no import circle between the two).
DiffReport = Row = Any


def _db(v: float) -> str:
    if math.isinf(v):
        return "exact" if v > 0 else "-inf"
    return f"{v:.1f}"


def _lsb(row: Row) -> str:
    total = sum(row.stats.lsb)
    if not total:
        return ""
    return " / ".join(f"{100 * c / total:.2f}%" if c else "0" for c in row.stats.lsb)


def rows_to_show(report: DiffReport, top: Optional[int]) -> list[Row]:
    if top:
        return report.ranking()[:top]
    return report.rows


def table(report: DiffReport, top: Optional[int] = None) -> Table:
    sensitivity = report.mode == "sensitivity"
    title = {"accumulated": "float vs quantized, errors accumulated from the input",
             "local": "each layer fed with the float model's values: its own error",
             "sensitivity": "one quant point at a time, everything else float: output error",
             "kernel": "integer kernels (fully optimized sub-models) vs the reference view"}[report.mode]
    t = Table(title=f"deployq diff --mode {report.mode}: {title}")
    t.add_column("#", justify="right")
    t.add_column("name", no_wrap=True)
    t.add_column("op")
    t.add_column("bits", justify="right")
    t.add_column("output SQNR dB" if sensitivity else "SQNR dB", justify="right")
    t.add_column("cosine", justify="right")
    t.add_column("max err", justify="right")
    if not sensitivity:
        t.add_column("LSB 0 / 1 / >1", justify="right")
    shown = rows_to_show(report, top)
    marked = any(row.jump for row in shown)
    if marked:
        t.add_column("")
    index = {id(r): i for i, r in enumerate(report.rows)}
    for row in shown:
        p, s = row.point, row.stats
        cells = [str(index[id(row)]), p.name, p.op if p.kind == "activation" else f"{p.op} weight", str(p.bits),
                 _db(s.sqnr_db), f"{s.cosine:.5f}", f"{s.max_err:.3g}"]
        if not sensitivity:
            cells.append(_lsb(row))
        if marked:
            cells.append(f"[bold red]<- error jumps (-{row.drop_db:.1f} dB)[/]" if row.jump else "")
        t.add_row(*cells, style="dim" if p.kind == "weight" else None)
    return t


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px} h2{font-size:17px;margin-top:28px} table{border-collapse:collapse;width:100%}
td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:right;vertical-align:middle}
th{cursor:pointer;user-select:none;background:#fafafa} th:hover{background:#eef}
td.n,th.n{text-align:left;font-family:ui-monospace,monospace} tr.j{background:#fee}
.verdict{padding:8px 12px;background:#f4f6fa;border-left:4px solid #36c;margin:12px 0} .warn{border-color:#c33;background:#fdf0f0}
figure{display:inline-block;margin:0 16px 8px 0;text-align:center} figure img{width:320px;image-rendering:pixelated;border:1px solid #ddd}
figcaption{font-size:12px;color:#555} .note{color:#666;font-size:12px}
"""

# click a header to sort its table (numbers numerically); no network, no libraries
_SORT = """
document.querySelectorAll('table.sort th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], rows = Array.from(body.rows), up = th.dataset.up !== '1';
  const key = r => { const t = r.cells[col].dataset.v ?? r.cells[col].textContent; const v = parseFloat(t);
                     return isNaN(v) ? t : v; };
  rows.sort((a, b) => { const x = key(a), y = key(b); return (x > y ? 1 : x < y ? -1 : 0) * (up ? 1 : -1); });
  th.dataset.up = up ? '1' : '0'; rows.forEach(r => body.appendChild(r));
}));
"""

_HEAT = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float64)  # dark -> light


def _png(image: np.ndarray) -> str:
    """A uint8 HxW or HxWx3 array as a data: URI (the page stays one offline file)."""
    data = imageio.v3.imwrite("<bytes>", image, extension=".png")
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _to_rgb(chw: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """A (C, H, W) output as an 8-bit picture: 3 channels as RGB, otherwise the first channel."""
    planes = chw[:3] if chw.shape[0] == 3 else chw[:1]
    scaled = np.clip((planes - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    image = np.rint(255 * np.moveaxis(scaled, 0, -1)).astype(np.uint8)
    return image[..., 0] if image.shape[-1] == 1 else image


def _heat(error: np.ndarray) -> np.ndarray:
    """|error| (H, W) as a heat map, black (none) to light yellow (the largest)."""
    t = error / error.max() if error.max() > 0 else error
    x = t * (len(_HEAT) - 1)
    i = np.clip(np.floor(x).astype(int), 0, len(_HEAT) - 2)
    f = (x - i)[..., None]
    return np.rint(_HEAT[i] * (1 - f) + _HEAT[i + 1] * f).astype(np.uint8)


def parity_table(report: ParityReport) -> Table:
    """``deployq check``'s table: per quant point, the share of equal codes and the 1 / >1 LSB counts."""
    t = Table(title=f"deployq check: torch fake-quant vs {report.onnx} (codes)")
    for col in ("name", "kind", "bits", "elements", "equal", "1 LSB", ">1 LSB"):
        t.add_column(col, justify="left" if col in ("name", "kind") else "right", no_wrap=col == "name")
    for p in report.points:
        t.add_row(p.name, p.kind, str(p.bits), str(p.elements), f"{100 * p.exact_fraction:.3f}%", str(p.one),
                  f"[bold red]{p.more}[/]" if p.more else "0")
    return t


def _pictures(report: DiffReport) -> list[str]:
    """Float output, quantized output and their error, side by side, for every image-like output."""
    parts = []
    for name, stats in report.outputs.items():
        if stats.example is None or stats.example[0].ndim != 3 or min(stats.example[0].shape[1:]) < 8:
            continue
        ref, quant = (np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0) for a in stats.example)
        lo, hi = (float(v) for v in np.percentile(ref, [0.5, 99.5]))
        error = np.abs(quant - ref).mean(axis=0)
        shown = "" if ref.shape[0] in (1, 3) else f" (channel 0 of {ref.shape[0]})"
        parts.append(f"<h2>Output {html.escape(name)}{shown}</h2>")
        for label, image in (("float", _to_rgb(ref, lo, hi)), ("quantized", _to_rgb(quant, lo, hi)),
                             (f"|error|, mean over channels (max {error.max():.3g})", _heat(error))):
            parts.append(f'<figure><img alt="{html.escape(label)}" src="{_png(image)}">'
                         f"<figcaption>{html.escape(label)}</figcaption></figure>")
        parts.append(f'<p class=note>the first input; output SQNR {_db(stats.sqnr_db)} dB; both pictures are '
                     f"scaled alike, from the float output's 0.5-99.5 percentiles</p>")
    return parts


def _sqnr_plot(rows: list[Row], width: int = 1150, height: int = 380) -> str:
    acts = [r for r in rows if r.point.kind == "activation" and math.isfinite(r.stats.sqnr_db)]
    if not acts:
        return ""
    values = [r.stats.sqnr_db for r in acts]
    lo, hi = min(values), max(values)
    lo, hi = math.floor(lo / 10) * 10, math.ceil(hi / 10) * 10 + (10 if hi == lo else 0)
    left, top, bottom = 40, 30, 150  # room below for the layer names
    x = lambda i: left + (width - left - 20) * (i / max(1, len(acts) - 1))  # noqa: E731
    y = lambda v: top + (height - top - bottom) * (hi - v) / (hi - lo)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="SQNR per layer">']
    for tick in range(int(lo), int(hi) + 1, 10):
        parts.append(f'<line x1="{left}" x2="{width - 20}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" font-size="11" text-anchor="end">{tick}</text>')
    points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
    parts.append(f'<polyline fill="none" stroke="#36c" stroke-width="1.5" points="{points}"/>')
    every = max(1, math.ceil(len(acts) / 60))  # at most ~60 names on the axis; every point has a tooltip
    for i, r in enumerate(acts):
        color = "#c33" if r.jump else "#36c"
        parts.append(f'<circle cx="{x(i):.1f}" cy="{y(values[i]):.1f}" r="{4 if r.jump else 2.5}" fill="{color}">'
                     f'<title>{html.escape(r.point.name)}: {values[i]:.1f} dB</title></circle>')
        if i % every == 0 or r.jump:
            name = r.point.name if len(r.point.name) <= 24 else "…" + r.point.name[-23:]
            parts.append(f'<text transform="translate({x(i) + 3:.1f},{height - bottom + 8}) rotate(60)" font-size="10" '
                         f'fill="{color}" font-family="monospace">{html.escape(name)}</text>')
    parts.append(f'<text x="12" y="{top - 12}" font-size="11">SQNR (dB) per activation quant point, in graph order</text></svg>')
    return "".join(parts)


def _histogram(row: Row, width: int = 90, height: int = 18) -> str:
    total = sum(row.stats.lsb)
    if not total:
        return ""
    colors = ("#4a4", "#eb3", "#c33")
    bar = width / 3
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">']
    for i, (count, color) in enumerate(zip(row.stats.lsb, colors)):
        h = 0 if not count else max(1.5, height * count / total)
        parts.append(f'<rect x="{i * bar + 1:.1f}" y="{height - h:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" fill="{color}">'
                     f'<title>{("0", "1", ">1")[i]} LSB: {count}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


def _clip_range(row: Row) -> tuple[float, float]:
    """The values the quant point can represent: [(qmin − zp)·s, (qmax − zp)·s] (per-tensor)."""
    p = row.point
    s, zp = float(np.max(p.scale)), float(np.min(p.zero_point))
    return (p.qmin - zp) * s, (p.qmax - zp) * s


def _value_histogram(row: Row, width: int = 160, height: int = 34, bins: int = 40) -> str:
    """The float values at a quant point, with its representable range marked (red lines)."""
    values = row.stats.sample
    if values is None or row.point.scale.size != 1:
        return ""
    values = values[np.isfinite(values)]  # an overflowing float model: its histogram shows what is finite
    if not values.size:
        return ""
    clip_lo, clip_hi = _clip_range(row)
    lo, hi = min(float(values.min()), clip_lo), max(float(values.max()), clip_hi)
    counts, _ = np.histogram(values, bins=bins, range=(lo, hi if hi > lo else lo + 1))
    peak = max(1, int(counts.max()))
    x = lambda v: width * (v - lo) / ((hi - lo) or 1.0)  # noqa: E731
    outside = float(np.mean((values < clip_lo) | (values > clip_hi)))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
             f'<title>values {lo:.3g} … {hi:.3g}; representable {clip_lo:.3g} … {clip_hi:.3g}; '
             f'{100 * outside:.2f}% of values clipped</title>']
    step = width / bins
    for i, c in enumerate(counts):
        h = 0 if not c else max(1.0, (height - 2) * math.sqrt(c / peak))
        parts.append(f'<rect x="{i * step:.1f}" y="{height - h:.1f}" width="{max(step - 0.5, 0.5):.1f}" height="{h:.1f}" fill="#789"/>')
    for edge in (clip_lo, clip_hi):
        parts.append(f'<line x1="{x(edge):.1f}" x2="{x(edge):.1f}" y1="0" y2="{height}" stroke="#c33" stroke-width="1.5"/>')
    parts.append("</svg>")
    return "".join(parts)


def _channel_ranges(row: Row, width: int = 520, height: int = 90) -> str:
    """Per output channel: the float weights' [min, max] (bar) against the channel's representable
    range (grey box): outlier channels stand out."""
    p = row.point
    w = p.float_weight
    if w is None or w.ndim < 2:
        return ""
    axis = p.axis if p.axis is not None else 0
    flat = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    mins, maxs = flat.min(axis=1), flat.max(axis=1)
    scale = np.broadcast_to(p.scale, mins.shape).astype(np.float64)
    zp = np.broadcast_to(p.zero_point, mins.shape).astype(np.float64)
    rep_lo, rep_hi = (p.qmin - zp) * scale, (p.qmax - zp) * scale
    top = max(float(np.abs(np.concatenate([mins, maxs, rep_lo, rep_hi])).max()), 1e-12)
    y = lambda v: height / 2 - (height / 2 - 2) * v / top  # noqa: E731
    step = width / len(mins)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
             f'<line x1="0" x2="{width}" y1="{height / 2}" y2="{height / 2}" stroke="#ccc"/>']
    for c in range(len(mins)):
        x0 = c * step
        parts.append(f'<rect x="{x0:.1f}" y="{y(rep_hi[c]):.1f}" width="{max(step - 0.5, 0.5):.1f}" '
                     f'height="{y(rep_lo[c]) - y(rep_hi[c]):.1f}" fill="#eee"/>'
                     f'<rect x="{x0 + step * 0.2:.1f}" y="{y(maxs[c]):.1f}" width="{max(step * 0.6, 0.5):.1f}" '
                     f'height="{max(y(mins[c]) - y(maxs[c]), 0.5):.1f}" fill="#36c">'
                     f'<title>channel {c}: {mins[c]:.3g} … {maxs[c]:.3g}</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


def _table(rows: list[Row], index: dict[int, int], sensitivity: bool, weights: bool) -> str:
    head = ["#", "name", "op", "bits", "output SQNR dB" if sensitivity else "SQNR dB", "cosine", "max err"]
    if not sensitivity:
        head += ["LSB 0/1/&gt;1", "LSB error"]
    if not weights:
        head.append("float values, representable range in red")
    out = ["<table class=sort><thead><tr>"
           + "".join(f"<th{' class=n' if h == 'name' else ''}>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        p, s = r.point, r.stats
        sqnr = s.sqnr_db if math.isfinite(s.sqnr_db) else (1e9 if s.sqnr_db > 0 else -1e9)
        cells = (f"<td>{index[id(r)]}</td><td class=n>{html.escape(p.name)}</td><td>{html.escape(p.op)}</td>"
                 f"<td>{p.bits}</td><td data-v='{sqnr}'>{_db(s.sqnr_db)}</td><td>{s.cosine:.5f}</td><td>{s.max_err:.3g}</td>")
        if not sensitivity:
            cells += f"<td>{html.escape(_lsb(r))}</td><td>{_histogram(r)}</td>"
        if not weights:
            cells += f"<td>{_value_histogram(r)}</td>"
        out.append(f'<tr class="{"j" if r.jump else ""}">{cells}</tr>')
    out.append("</tbody></table>")
    return "".join(out)


def to_html(report: DiffReport, title: str, fail_below: Optional[float] = None, worst_weights: int = 5) -> str:
    """The report as one page: verdict, the outputs as pictures (image models), SQNR by layer with
    names, the activations and the weights in separate sortable tables (click a header), per-channel
    weight ranges of the weakest weight layers. Inline CSS, SVG, PNG and script: opens offline."""
    sensitivity = report.mode == "sensitivity"
    index = {id(r): i for i, r in enumerate(report.rows)}
    acts = report.ranking() if sensitivity else [r for r in report.rows if r.point.kind == "activation"]
    weights = [r for r in report.rows if r.point.kind == "weight"]
    body = [f"<h1>{html.escape(title)}</h1>",
            f'<div class="verdict">{html.escape(report.verdict(fail_below))}</div>',
            f"<p>mode <b>{report.mode}</b>, {report.batches} batches, {report.seconds:.1f} s, "
            f"CPU {html.escape(isa_text(report.isa))}</p>"]
    for w in report.warnings:
        body.append(f'<div class="verdict warn">{html.escape(w)}</div>')
    body += _pictures(report)
    body.append("<h2>SQNR by layer</h2>" + _sqnr_plot(report.rows))
    body.append(f"<h2>Activations ({len(acts)})</h2><p class=note>click a column to sort; rows in red mark "
                "where the error jumps</p>" + _table(acts, index, sensitivity, weights=False))
    if weights:
        body.append(f"<h2>Weights ({len(weights)})</h2>" + _table(weights, index, sensitivity, weights=True))
        worst = sorted(weights, key=lambda r: r.stats.sqnr_db)[:worst_weights]
        body.append(f"<h2>Per-channel weight ranges of the {len(worst)} weakest weight layers</h2>"
                    "<p class=note>blue: each output channel's float weights, min to max; grey: what the "
                    "channel's quantization can represent</p>")
        for r in worst:
            body.append(f"<p class=n><b>{html.escape(r.point.name)}</b> ({_db(r.stats.sqnr_db)} dB)</p>"
                        + _channel_ranges(r))
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}<script>{_SORT}</script></body></html>\n")
