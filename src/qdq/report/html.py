"""The HTML report: one self-contained file (plotly.js inlined once, no network) drawing what
`report.measure` measured. docs/report.md says why plotly and what each chart shows."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from pathlib import Path

import plotly.graph_objects as go
import plotly.io
import plotly.offline

from qdq.outputs import staged
from qdq.plan.frontier import ENOUGH_DB
from qdq.report.compare import Comparison
from qdq.report.measure import LayerRow, ReportData
from qdq.report.ranges import ActivationView, WeightView
from qdq.report.summary import size_change

METHOD_COLOURS = {"minmax": "#7f7f7f", "percentile": "#2ca02c", "kl": "#9467bd", "mse": "#ff7f0e"}
CHOSEN = "#d62728"
Chart = Callable[[go.Figure], str]  # adds a figure to the page; returns the element to place
CONFIG = {"displaylogo": False, "responsive": True}
STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1400px;padding:0 16px;color:#222}
h1{font-size:20px} h2{font-size:17px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse} td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}
th{background:#f5f5f5;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.sortable th{cursor:pointer} .sortable th::after{content:" \\2195";color:#aaa}
.split{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:16px;align-items:start}
.scroll{max-height:60vh;overflow:auto}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:8px}
.float td{color:#888} .note{color:#666} .chosen td{font-weight:600}
"""
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(table => {
  table.querySelectorAll("th").forEach((th, column) => th.addEventListener("click", () => {
    const body = table.tBodies[0], up = th.dataset.order !== "up";
    const key = row => { const c = row.cells[column]; const v = c.dataset.value;
      return v === undefined ? c.textContent : parseFloat(v); };
    const rows = Array.from(body.rows).sort((a, b) => {
      const x = key(a), y = key(b);
      return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1); });
    th.dataset.order = up ? "up" : "down";
    rows.forEach(row => body.appendChild(row));
  }));
});
const config = JSON.parse(document.getElementById("plot-config").textContent);
const charts = Array.from(document.querySelectorAll("div.chart")), drawn = new Map();
function draw(div) {  // each chart is drawn once, when it first comes near the screen
  if (!drawn.has(div)) {
    const figure = JSON.parse(document.getElementById(div.dataset.figure).textContent);
    drawn.set(div, Plotly.newPlot(div, figure.data, figure.layout, config));
  }
  return drawn.get(div);
}
const near = new IntersectionObserver(entries => entries.forEach(entry => {
  if (entry.isIntersecting) { near.unobserve(entry.target); draw(entry.target); }
}), {rootMargin: "300px"});
charts.forEach(div => near.observe(div));
window.qdqDrawn = () => Promise.all(drawn.values()).then(() => performance.now());
window.qdqDrawAll = () => Promise.all(charts.map(draw)).then(() => performance.now());
"""


def write_report(data: ReportData, path: str | Path) -> int:
    """Write the report to `path` atomically; returns its size in bytes."""
    # a file name of bytes that are not UTF-8 reaches the page with surrogates: shown as "?"
    page = render(data).encode("utf-8", errors="replace")
    with staged(Path(path)) as temporary:
        temporary.write_bytes(page)
    return len(page)


def render(data: ReportData) -> str:
    """The whole page as a string."""
    figures: list[str] = []

    def chart(figure: go.Figure) -> str:
        figures.append(plotly.io.to_json(figure, validate=False).replace("</", "<\\/"))
        # The height is reserved, so that only the charts near the screen draw.
        style = f"height:{figure.layout.height}px"
        return f'<div class="chart" data-figure="fig-{len(figures) - 1}" style="{style}"></div>'

    sections = [
        _summary(data),
        _run(data),
        _activations(data, chart),
        _layers(data.layers, chart),
        _weights(data, chart),
        _profile(data.op_times, chart),
    ]
    payload = "".join(
        f'<script type="application/json" id="fig-{i}">{f}</script>' for i, f in enumerate(figures)
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>qdq report: {html.escape(data.title)}</title><style>{STYLE}</style>"
        f"<script>{plotly.offline.get_plotlyjs()}</script></head><body>"
        f"<h1>qdq report: {html.escape(data.title)}</h1>{''.join(sections)}{payload}"
        f'<script type="application/json" id="plot-config">{json.dumps(CONFIG)}</script>'
        f"<script>{SCRIPT}</script></body></html>"
    )


def _summary(data: ReportData) -> str:
    c = data.comparison
    (f_size, q_size), rows = c.sizes, []
    rows.append(
        (
            "size",
            f"{f_size / 1e3:.1f} kB",
            f"{q_size / 1e3:.1f} kB",
            size_change(f_size, q_size),
        )
    )
    timed = [("batch 1", *c.latency_ms)] if c.latency_ms else []
    if c.batch_latency_ms:
        timed.append((c.batch_label(), *c.batch_latency_ms[1:]))
    for run, f, q in timed:
        label = f"latency (1 thread, {run}, median)"
        rows.append((label, f"{f:.3f} ms", f"{q:.3f} ms", f"{f / q:.2f}x speed-up"))
    if c.accuracy:
        f, q = c.accuracy
        rows.append(("accuracy", f"{f:.2%}", f"{q:.2%}", f"{(q - f) * 100:+.2f} points"))
    cells = "".join(
        f"<tr><th>{html.escape(a)}</th><td>{b}</td><td>{q}</td><td>{d}</td></tr>"
        for a, b, q, d in rows
    )
    outputs = []
    for name, stats in c.outputs.items():
        top1 = c.output_stats(name).get("top1_agreement")
        agreement = "—" if top1 is None else f"{top1:.2%}"
        if stats.values:  # a label: the share of its values equal to FP32's
            agreement = f"{stats.equal / stats.values:.2%} equal"
        read = c.readings.get(name)
        measured = c.output_stats(name)  # None where no batch was of FP32's shape
        outputs.append(
            f"<tr><td>{html.escape(name)}</td><td class=num>{_fixed(measured['sqnr_db'], 2)}</td>"
            f"<td class=num>{_fixed(measured['cosine'], 6)}</td><td class=num>{agreement}</td>"
            + (f"<td>{html.escape(read.as_text()) if read else '—'}</td>" if c.readings else "")
            + "</tr>"
        )
    reads = "<th>decisions read as FP32 reads them</th>" if c.readings else ""
    return (
        '<section id="summary"><h2>Summary</h2>'
        + "".join(f'<p class="note">{html.escape(n)}</p>' for n in c.notes)
        + f'<p class="note">{c.samples} samples</p>'
        f"<table><tr><th></th><th>FP32</th><th>INT8</th><th></th></tr>{cells}</table><p></p>"
        "<table><tr><th>output</th><th>SQNR (dB)</th><th>cosine</th>"
        f"<th>top-1 agreement</th>{reads}</tr>{''.join(outputs)}</table>{_parts(c)}</section>"
    )


def _run(data: ReportData) -> str:
    """How `qdq quantize` chose the plan, when it wrote this report: its notes (the range
    method, smoothing, rounding, stages skipped) and the candidate plans `--prefer` took one of,
    each with its score and its time, so a reader sees what int8 cost and bought."""
    run = data.run
    if run is None or not (run.notes or run.candidates):
        return ""
    notes = "".join(
        f'<p class="note">{html.escape(n)}</p>' for n in [*run.notes, *run.other_picks()]
    )
    rows = "".join(
        f"<tr{' class=chosen' if c.chosen else ''}><td>{html.escape(c.name)}</td>"
        f"<td class=num>{c.score:.2f}</td><td class=num>{c.latency_ms:.3f}</td>"
        f"<td class=num>{c.int8_nodes}</td><td>{'chosen' if c.chosen else ''}</td></tr>"
        for c in run.candidates
    )
    if run.candidates and run.float_ms is not None:
        fp32 = f"<td class=num>{run.float_ms:.3f}</td>"
        rows += f"<tr><td>FP32</td><td></td>{fp32}<td></td><td></td></tr>"
    table = (
        "<table><tr><th>candidate plan</th><th>worst output part (dB, lower quartile; at "
        f"least {ENOUGH_DB:g} where a recognizer reads every sample as FP32 does)</th>"
        f"<th>ms per sample (1 thread)</th><th>int8 nodes</th><th></th></tr>{rows}</table>"
        if rows
        else ""
    )
    return f'<section id="plan"><h2>How qdq quantized it</h2>{notes}{table}</section>'


def _fixed(value: float | None, digits: int) -> str:
    """`value` to `digits` decimals; a dash where nothing was measured."""
    return "—" if value is None else f"{value:.{digits}f}"


def _parts(c: Comparison) -> str:
    """Each part of an output that joins quantities (a detector's boxes and scores), judged as
    its task: SQNR, top-1 agreement of confident positions, F1 of FP32's detections."""
    if not c.parts:
        return ""
    rows = []
    for label, stats in c.parts.items():
        d = stats.as_dict()
        top1, f1 = d.get("top1_agreement"), d.get("detection_f1")
        rows.append(
            f"<tr><td>{html.escape(label)}</td><td>{stats.part.kind}</td>"
            f"<td class=num>{_fixed(d['sqnr_db'], 2)}</td>"
            f"<td class=num>{'—' if top1 is None else f'{top1:.2%}'}</td>"
            f"<td class=num>{'—' if f1 is None else f'{f1:.3f}'}</td></tr>"
        )
    return (
        '<p class="note">outputs that join quantities, judged per part (the worst part drives '
        "qdq's automatic choices):</p><table><tr><th>part</th><th>holds</th><th>SQNR (dB)</th>"
        "<th>top-1 agreement (confident positions)</th><th>F1 of FP32's detections</th></tr>"
        f"{''.join(rows)}</table>"
    )


def _layers(layers: list[LayerRow], chart: Chart) -> str:
    sensitivity = any(r.sensitivity_db is not None for r in layers)
    head = "<th>node</th><th>op</th><th>decision</th><th>SQNR (dB)</th>"
    head += "<th>sensitivity (dB)</th>" if sensitivity else ""
    body = []
    for r in layers:
        kind = "int8" if r.quantized or r.weights_only else "float"
        shown = "int8 weights" if r.weights_only else kind
        cells = [
            f"<td>{html.escape(r.node)}</td><td>{html.escape(r.op_type)}</td>",
            f"<td>{shown}: {html.escape(r.reason)}</td>",
            _number(r.sqnr_db),
        ]
        if sensitivity:
            cells.append(_number(r.sensitivity_db))
        body.append(f'<tr class="{kind}" data-decision="{kind}">{"".join(cells)}</tr>')
    drawn = [
        r for r in layers if r.quantized and r.sqnr_db is not None and math.isfinite(r.sqnr_db)
    ]
    figure = go.Figure(
        go.Bar(
            y=[_plain(r.node) for r in drawn],
            x=[r.sqnr_db for r in drawn],
            orientation="h",
            name="SQNR (dB)",
        )
    )
    if sensitivity:
        figure.add_bar(
            y=[_plain(r.node) for r in drawn],
            x=[r.sensitivity_db for r in drawn],
            orientation="h",
            name="sensitivity (dB)",
        )
    figure.update_layout(
        height=max(260, 22 * len(drawn) + 80),
        margin={"l": 8, "r": 8, "t": 30, "b": 30},
        title="output SQNR per int8 layer (FP32 vs INT8)",
        yaxis={"autorange": "reversed", "automargin": True},
    )
    return (
        '<section id="layers"><h2>Layers</h2><div class="split"><div class="scroll">'
        f'<table id="layer-table" class="sortable"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>{chart(figure)}</div></section>"
    )


def _plain(name: str) -> str:
    """A model's name as a chart shows it: plotly reads <b>, <br>, <a> and &entities; in its
    titles and labels, so a tensor named `x<br>y` had been drawn on two lines."""
    return html.escape(name, quote=False)


def _number(value: float | None) -> str:
    """A dB cell: exact (+inf) sorts best; NaN (a NaN tensor) and none sort worst."""
    if value is None or math.isnan(value):
        return f'<td class=num data-value="-1e9">{"—" if value is None else "NaN"}</td>'
    if math.isfinite(value):
        return f'<td class=num data-value="{value}">{value:.2f}</td>'
    shown = "exact" if value > 0 else "-inf"
    return f'<td class=num data-value="{math.copysign(1e9, value)}">{shown}</td>'


def _activations(data: ReportData, chart: Chart) -> str:
    undrawn = (
        f" {data.undrawn} quantized activations the FP32 model does not compute (SmoothQuant's "
        "inputs divided per channel) have none."
        if data.undrawn
        else ""
    )
    return _charts(
        "activations",
        "Activation histograms",
        "FP32 values of each quantized activation, worst SQNR first{more}. Dashed: each "
        "calibration method's range; solid red: the range in the INT8 model." + undrawn,
        [chart(_histogram(v)) for v in data.activations],
        data,
    )


def _charts(key: str, title: str, text: str, charts: list[str], data: ReportData) -> str:
    """A section of charts in a grid; `{more}` in `text` says how many were left out."""
    more = data.hidden.get(key, 0)
    left_out = f"; {more} more left out (--all-charts shows every one)" if more else ""
    return (
        f'<section id="{key}"><h2>{title}</h2><p class="note">{text.format(more=left_out)}</p>'
        f"<div class=grid>{''.join(charts)}</div></section>"
    )


def _histogram(view: ActivationView) -> go.Figure:
    centres = (view.edges[:-1] + view.edges[1:]) / 2
    figure = go.Figure(go.Bar(x=centres, y=view.counts, marker_color="#1f77b4", showlegend=False))
    for method, bounds in view.methods.items():
        line = {"color": METHOD_COLOURS[method], "dash": "dash", "width": 1.5}
        _range_lines(figure, bounds, method, line)
    _range_lines(figure, view.chosen, f"chosen (~{view.closest})", {"color": CHOSEN, "width": 3})
    sqnr = f", SQNR {view.sqnr_db:.1f} dB" if view.sqnr_db is not None else ""
    figure.update_layout(
        title={"text": f"{_plain(view.tensor)}{sqnr}", "font": {"size": 12}},
        height=280,
        bargap=0,
        margin={"l": 40, "r": 8, "t": 30, "b": 30},
        legend={"font": {"size": 10}},
        yaxis={"type": "log", "title": "count"},
        yaxis2={"overlaying": "y", "range": [0, 1], "visible": False},
    )
    return figure


def _range_lines(figure: go.Figure, bounds: tuple[float, float], name: str, line: dict) -> None:
    """Two full-height vertical lines at `bounds`, one legend entry (on the hidden axis y2)."""
    lo, hi = bounds
    figure.add_scatter(
        x=[lo, lo, None, hi, hi],
        y=[0, 1, None, 0, 1],
        yaxis="y2",
        mode="lines",
        name=f"{name} {lo:.3g}..{hi:.3g}",
        line=line,
    )


def _weights(data: ReportData, chart: Chart) -> str:
    return _charts(
        "weights",
        "Weight ranges per output channel",
        "Widest spread first (per-tensor magnitude / median channel magnitude){more}. The "
        "dashed lines are the per-tensor range.",
        [chart(_weight_ranges(w)) for w in data.weights],
        data,
    )


def _weight_ranges(view: WeightView) -> go.Figure:
    channels = list(range(view.lo.size))
    figure = go.Figure(
        go.Bar(
            x=channels,
            y=view.hi - view.lo,
            base=view.lo,
            marker_color="#1f77b4",
            name="channel range",
        )
    )
    for value in (float(view.lo.min()), float(view.hi.max())):
        figure.add_hline(y=value, line={"color": CHOSEN, "dash": "dash", "width": 1})
    figure.update_layout(
        title={"text": f"{_plain(view.tensor)} (spread {view.spread:.1f}x)", "font": {"size": 12}},
        height=260,
        margin={"l": 40, "r": 8, "t": 30, "b": 30},
        showlegend=False,
        xaxis={"title": "output channel"},
    )
    return figure


def _profile(times: tuple[dict[str, float], dict[str, float]], chart: Chart) -> str:
    figure = go.Figure()
    for label, per_op in zip(("FP32", "INT8"), times, strict=True):
        figure.add_bar(
            y=[_plain(op) for op in per_op],
            x=list(per_op.values()),
            orientation="h",
            name=f"{label} ({sum(per_op.values()):.3f} ms)",
        )
    rows = len(set(times[0]) | set(times[1]))
    figure.update_layout(
        height=max(240, 26 * rows + 80),
        barmode="group",
        xaxis={"title": "ms per run"},
        yaxis={"autorange": "reversed", "automargin": True},
        margin={"l": 8, "r": 8, "t": 30, "b": 40},
        title="time per op type (ONNX Runtime profiler, 1 thread, batch 1, optimized graphs)",
    )
    return f'<section id="profile"><h2>Time per op type</h2>{chart(figure)}</section>'
