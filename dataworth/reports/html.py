"""The parts every HTML report shares: the stylesheet, escaping and number formatting, the run-info and
metrics tables, PNG figures (matplotlib) and SVG histograms, and the atomic write.

Pages are self-contained (inline CSS, PNGs and SVG inlined, no JavaScript), so they open the same from an
MLflow artifact view, an e-mail attachment or a laptop without network. Everything that comes from a
user is escaped; a page only ever contains markup written in this package.
"""

from __future__ import annotations

import html
import io
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Metrics are "higher is better" (MRR, recall@k, ...) unless their name says otherwise.
_LOWER_IS_BETTER = ("loss", "rank", "time", "second", "latency", "error", "memory", "bytes")

CSS = """
* { box-sizing: border-box; }
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  color: #1f2328; background: #f6f7f9; margin: 0; padding: 24px; line-height: 1.45; }
main { max-width: 1500px; margin: 0 auto; }
h1 { font-size: 24px; margin: 0 0 12px; }
h2 { font-size: 18px; margin: 28px 0 10px; }
h3 { font-size: 15px; margin: 0 0 6px; }
section.card, header.card { background: #fff; border: 1px solid #d8dee4; border-radius: 8px;
  padding: 16px 18px; margin: 0 0 18px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid #e4e7eb; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f2f5; font-weight: 600; }
table.info th { background: none; color: #59636e; font-weight: 500; white-space: nowrap; }
table.info td { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 12px; word-break: break-all; }
table.metrics td.num, table.metrics th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.metrics td.best { font-weight: 700; }
.note { color: #59636e; font-size: 12px; margin: 6px 0 0; }
nav ol { margin: 4px 0 0; padding-left: 22px; font-size: 13px; }
nav a { color: #0969da; text-decoration: none; }
nav a:hover { text-decoration: underline; }
.qid { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; color: #59636e;
  font-weight: 400; font-size: 13px; }
.label { font-size: 11px; font-weight: 600; text-transform: uppercase; letter-spacing: .04em;
  color: #59636e; margin: 10px 0 3px; }
.textbox { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px;
  white-space: pre-wrap; word-break: break-word; padding: 8px 10px; border-radius: 6px;
  max-height: 20em; overflow-y: auto; }
.prompt { background: #f0f2f5; border-left: 4px solid #afb8c1; }
.completion { background: #fff8c5; border-left: 4px solid #d4a72c; }
.badge { display: inline-block; font-size: 11px; font-weight: 600; padding: 1px 8px;
  border-radius: 10px; background: #ddf4ff; color: #0550ae; border: 1px solid #54aeff;
  text-transform: none; letter-spacing: 0; margin-left: 6px; vertical-align: 1px; }
.modes { display: grid; grid-template-columns: repeat(auto-fit, minmax(540px, 1fr));
  gap: 14px; margin-top: 14px; }
.mode { border: 1px solid #e4e7eb; border-radius: 6px; padding: 10px 12px; min-width: 0; }
.mode .summary { color: #59636e; font-size: 12px; font-weight: 400; margin-left: 6px; }
table.ranked { width: 100%; table-layout: fixed; }
table.ranked col.rank { width: 4.2em; }
table.ranked col.score { width: 6.5em; }
table.ranked col.doc { width: 7.5em; }
table.ranked col.ex { width: 7.5em; }
table.ranked td.rank, table.ranked td.score { text-align: right; font-variant-numeric: tabular-nums;
  white-space: nowrap; }
table.ranked th.rank, table.ranked th.score { text-align: right; }
table.ranked td.id { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 12px; word-break: break-all; }
table.ranked td.text div { white-space: pre-wrap; word-break: break-word; font-size: 12.5px; }
tr.relevant td { background: #dafbe1; }
.check { color: #1a7f37; font-weight: 700; margin-right: 3px; }
.empty { color: #8c959f; font-style: italic; font-size: 13px; }
a.top { float: right; font-size: 12px; font-weight: 400; color: #0969da; text-decoration: none; }
img.plot { max-width: 100%; height: auto; display: block; }
.hists { display: flex; flex-wrap: wrap; gap: 8px 16px; }
.hists svg { max-width: 100%; height: auto; font-family: inherit; }
.hists .t { font-size: 12px; fill: #1f2328; }
.hists .l { font-size: 10px; fill: #57606a; }
.hists .e { font-size: 11px; fill: #8c959f; }
.hists .a { stroke: #8c959f; stroke-width: 1; }
.tokenwise { margin-top: 14px; border: 1px solid #e4e7eb; border-radius: 6px; padding: 10px 12px; }
.tokenwise .split { margin: 10px 0 0; padding-top: 8px; border-top: 1px solid #eef0f2; }
.tokenwise .pair { font-size: 13px; }
.tokenwise .mode-name { font-weight: 600; }
.tokens { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px;
  line-height: 1.9; white-space: pre-wrap; word-break: break-word; }
.tok { padding: 2px 0; border-radius: 2px; }
.legend { display: flex; align-items: center; gap: 8px; font-size: 12px; color: #59636e; flex-wrap: wrap; }
.legend .scale { display: inline-block; width: 160px; height: 12px; border: 1px solid #d8dee4;
  background: linear-gradient(to right, #b2182b, #ffffff, #2166ac); }
"""

# The heat map's diverging scale: white at 0, these at ±1 (ColorBrewer RdBu's ends).
HEAT_POSITIVE = (33, 102, 172)
HEAT_NEGATIVE = (178, 24, 43)


def escape(value: Any) -> str:
    """HTML-escaped text of any value (None is empty), quotes included: safe in text and attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def fmt_number(value: Any, digits: int = 4) -> str:
    """A number to `digits` significant digits; "–" for None, the escaped text for a non-number."""
    if value is None:
        return "–"
    try:
        return f"{float(value):.{digits}g}"
    except (TypeError, ValueError):
        return escape(value)


def fmt_metric(value: Any) -> str:
    # Rates in [0, 1] (MRR, recall@k) get fixed decimals so a column lines up.
    try:
        f = float(value)
    except (TypeError, ValueError):
        return fmt_number(value)
    return f"{f:.4f}" if abs(f) <= 1 else fmt_number(f)


def lower_is_better(metric: str) -> bool:
    name = metric.lower()
    return any(hint in name for hint in _LOWER_IS_BETTER)


def finite(values: Iterable[Any]) -> list[float]:
    """The values that are finite numbers, as floats (None, NaN, inf and text are dropped)."""
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def heat_color(value: float) -> tuple[str, str]:
    """(background, text colour) of a value in [-1, 1] on the diverging scale: white at 0, HEAT_POSITIVE at 1 and
    HEAT_NEGATIVE at -1, linear in between; text turns white on the darker half."""
    v = max(-1.0, min(1.0, float(value))) if math.isfinite(float(value)) else 0.0
    end = HEAT_POSITIVE if v >= 0 else HEAT_NEGATIVE
    a = abs(v)
    r, g, b = (round(255 + (c - 255) * a) for c in end)
    return f"rgb({r},{g},{b})", "#ffffff" if a > 0.55 else "#1f2328"


def run_info_html(run_info: dict[str, str] | None) -> str:
    """A key/value table of where a run's inputs and outputs are (empty without run info)."""
    if not run_info:
        return ""
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in run_info.items())
    return f'<table class="info">{rows}</table>'


def metrics_html(metrics: dict[str, dict[str, float]]) -> str:
    """The "Evaluation" card: modes (or methods) × metrics, the best value of each metric in bold."""
    names: list[str] = []
    for per_mode in metrics.values():
        names.extend(n for n in per_mode if n not in names)
    best: dict[str, float] = {}
    for n in names:
        vals = finite(m.get(n) for m in metrics.values())
        if vals:
            best[n] = min(vals) if lower_is_better(n) else max(vals)
    head = "".join(f'<th class="num">{escape(n)}</th>' for n in names)
    body = []
    for mode, per_mode in metrics.items():
        cells = []
        for n in names:
            v = per_mode.get(n)
            is_best = n in best and finite([v]) == [best[n]]
            cls = "num best" if is_best else "num"
            cells.append(f'<td class="{cls}">{fmt_metric(v)}</td>')
        body.append(f"<tr><th>{escape(mode)}</th>{''.join(cells)}</tr>")
    return (
        '<section class="card"><h2 style="margin-top:0">Evaluation</h2>'
        f'<table class="metrics"><thead><tr><th>mode</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
        '<p class="note">Bold: best value per metric across modes.</p></section>'
    )


def figure(width: float, height: float):
    """A matplotlib Figure on an Agg canvas, never pyplot: no global state, no GUI backend, and the
    caller's own matplotlib backend (e.g. in a notebook) is left untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def histogram_png(score_samples: dict[str, list[float]]) -> bytes:
    """One score histogram per mode (non-finite scores dropped), four panels to a row."""
    modes = list(score_samples)
    ncols = min(len(modes), 4)
    nrows = math.ceil(len(modes) / ncols)
    fig = figure(3.6 * ncols, 2.6 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colors = HIST_COLORS
    for i, ax in enumerate(axes.flat):
        if i >= len(modes):
            ax.set_visible(False)
            continue
        mode = modes[i]
        vals = finite(score_samples[mode])
        ax.set_title(f"{mode}  (n={len(vals)})", fontsize=10)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("score", fontsize=8)
        if i % ncols == 0:
            ax.set_ylabel("count", fontsize=8)
        if not vals:
            ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes, color="#8c959f")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        bins = int(min(40, max(5, math.sqrt(len(vals)))))
        ax.hist(vals, bins=bins, color=colors[i % len(colors)], alpha=0.85, edgecolor="white", linewidth=0.4)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return png_bytes(fig)


HIST_COLORS = ("#0969da", "#1a7f37", "#bf3989", "#bc4c00", "#8250df", "#0a7f83", "#9a6700", "#57606a")


def _bin_counts(values: list[float], bins: int) -> tuple[float, float, list[int]]:
    """Counts of `values` in `bins` equal bins over [min, max] (a value at max in the last bin)."""
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12 * max(abs(lo), abs(hi), 1e-300):  # one value: one bar centred on it
        lo, hi = lo - 0.5 * max(abs(lo), 1.0), hi + 0.5 * max(abs(hi), 1.0)
    counts = [0] * bins
    width = (hi - lo) / bins
    for v in values:
        counts[min(bins - 1, max(0, int((v - lo) / width)))] += 1
    return lo, hi, counts


def _histogram_panel_svg(mode: str, values: list[float], color: str) -> str:
    w, h, left, right, top, bottom = 300, 180, 34, 12, 26, 34
    pw, ph = w - left - right, h - top - bottom
    parts = [
        f'<svg class="hist" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" xmlns="http://www.w3.org/2000/svg">',
        f"<title>Histogram of {escape(mode)} scores, {len(values)} values</title>",
        f'<text x="{w / 2}" y="15" text-anchor="middle" class="t">{escape(mode)}  (n={len(values)})</text>',
    ]
    if not values:
        parts.append(f'<text x="{w / 2}" y="{top + ph / 2}" text-anchor="middle" class="e">no scores</text></svg>')
        return "".join(parts)
    bins = int(min(40, max(5, math.sqrt(len(values)))))
    lo, hi, counts = _bin_counts(values, bins)
    peak = max(counts)
    bw = pw / bins
    for i, c in enumerate(counts):
        if c:
            bh = ph * c / peak
            x, y = left + i * bw, top + ph - bh
            parts.append(
                f'<rect x="{x:.2f}" y="{y:.2f}" width="{max(bw - 0.6, 0.5):.2f}" height="{bh:.2f}" fill="{color}">'
                f"<title>{fmt_number(lo + i * (hi - lo) / bins, 3)} – {fmt_number(lo + (i + 1) * (hi - lo) / bins, 3)}"
                f": {c}</title></rect>"
            )
    base = top + ph
    parts.append(f'<line x1="{left}" y1="{base}" x2="{left + pw}" y2="{base}" class="a"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base}" class="a"/>')
    for frac, anchor in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
        x = left + frac * pw
        parts.append(f'<line x1="{x:.2f}" y1="{base}" x2="{x:.2f}" y2="{base + 4}" class="a"/>')
        label = fmt_number(lo + frac * (hi - lo), 3)
        parts.append(f'<text x="{x:.2f}" y="{base + 15}" text-anchor="{anchor}" class="l">{label}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{h - 3}" text-anchor="middle" class="l">score</text>')
    parts.append(f'<text x="{left - 4}" y="{top + 4}" text-anchor="end" class="l">{peak}</text>')
    parts.append(f'<text x="{left - 4}" y="{base}" text-anchor="end" class="l">0</text>')
    parts.append(
        f'<text x="10" y="{top + ph / 2}" text-anchor="middle" class="l" '
        f'transform="rotate(-90 10 {top + ph / 2})">count</text></svg>'
    )
    return "".join(parts)


def histogram_svg(score_samples: dict[str, list[float]]) -> str:
    """One score histogram per mode (non-finite scores dropped) as inline SVG panels, wrapped side by side: the
    query report's histograms, drawn without matplotlib (whose import and first figure cost a `dataworth query`
    about a second of its start-up) and sharp at any zoom. Each bar's tooltip gives its range and count."""
    panels = [
        _histogram_panel_svg(mode, finite(values), HIST_COLORS[i % len(HIST_COLORS)])
        for i, (mode, values) in enumerate(score_samples.items())
    ]
    return f'<div class="hists">{"".join(panels)}</div>'


def write_report(html: str, path: str | os.PathLike) -> Path:
    """Write the page atomically: readers see the old file or the whole new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(html)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; a report is meant to be read by others, like any written file.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
