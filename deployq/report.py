"""Rendering of diff reports: a terminal table (rich) and a self-contained HTML page.

The HTML page has no scripts, stylesheets or fonts from the network: inline CSS and inline SVG
(a per-layer SQNR plot and per-layer LSB-error histograms), so it opens anywhere, offline.
"""

from __future__ import annotations

import html
import math
from typing import Optional

from rich.table import Table

from deployq.diff import DiffReport, Row
from deployq.sim import isa_text


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
h1{font-size:20px} table{border-collapse:collapse;width:100%} td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}
td.n,th.n{text-align:left;font-family:ui-monospace,monospace} tr.w{color:#888} tr.j{background:#fee}
.verdict{padding:8px 12px;background:#f4f6fa;border-left:4px solid #36c;margin:12px 0} .warn{border-color:#c33;background:#fdf0f0}
"""


def _sqnr_plot(rows: list[Row], width: int = 1100, height: int = 260) -> str:
    acts = [r for r in rows if r.point.kind == "activation" and math.isfinite(r.stats.sqnr_db)]
    if not acts:
        return ""
    values = [r.stats.sqnr_db for r in acts]
    lo, hi = min(values), max(values)
    lo, hi = math.floor(lo / 10) * 10, math.ceil(hi / 10) * 10 + (10 if hi == lo else 0)
    pad = 40
    x = lambda i: pad + (width - 2 * pad) * (i / max(1, len(acts) - 1))  # noqa: E731
    y = lambda v: height - pad - (height - 2 * pad) * (v - lo) / (hi - lo)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="SQNR per layer">']
    for tick in range(int(lo), int(hi) + 1, 10):
        parts.append(f'<line x1="{pad}" x2="{width - pad}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#eee"/>'
                     f'<text x="{pad - 6}" y="{y(tick) + 4:.1f}" font-size="11" text-anchor="end">{tick}</text>')
    points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
    parts.append(f'<polyline fill="none" stroke="#36c" stroke-width="1.5" points="{points}"/>')
    for i, r in enumerate(acts):
        color = "#c33" if r.jump else "#36c"
        parts.append(f'<circle cx="{x(i):.1f}" cy="{y(values[i]):.1f}" r="{4 if r.jump else 2.5}" fill="{color}">'
                     f'<title>{html.escape(r.point.name)}: {values[i]:.1f} dB</title></circle>')
    parts.append(f'<text x="{pad}" y="{height - 8}" font-size="11">layers in graph order</text>'
                 f'<text x="12" y="{pad - 14}" font-size="11">SQNR (dB)</text></svg>')
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


def to_html(report: DiffReport, title: str, fail_below: Optional[float] = None) -> str:
    sensitivity = report.mode == "sensitivity"
    rows = report.ranking() if sensitivity else report.rows
    body = [f"<h1>{html.escape(title)}</h1>",
            f'<div class="verdict">{html.escape(report.verdict(fail_below))}</div>',
            f"<p>mode <b>{report.mode}</b>, {report.batches} batches, {report.seconds:.1f} s, "
            f"CPU {html.escape(isa_text(report.isa))}</p>"]
    for w in report.warnings:
        body.append(f'<div class="verdict warn">{html.escape(w)}</div>')
    body.append(_sqnr_plot(report.rows))
    head = "<tr><th>#</th><th class=n>name</th><th>op</th><th>bits</th><th>SQNR dB</th><th>cosine</th><th>max err</th>"
    head += "" if sensitivity else "<th>LSB 0/1/&gt;1</th><th>histogram</th>"
    body.append(f"<table>{head}</tr>")
    for i, r in enumerate(rows):
        p, s = r.point, r.stats
        cls = "w" if p.kind == "weight" else ("j" if r.jump else "")
        cells = (f"<td>{i}</td><td class=n>{html.escape(p.name)}</td><td>{html.escape(p.op)}</td><td>{p.bits}</td>"
                 f"<td>{_db(s.sqnr_db)}</td><td>{s.cosine:.5f}</td><td>{s.max_err:.3g}</td>")
        if not sensitivity:
            cells += f"<td>{html.escape(_lsb(r))}</td><td>{_histogram(r)}</td>"
        body.append(f'<tr class="{cls}">{cells}</tr>')
    body.append("</table>")
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")
