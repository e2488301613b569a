"""One self-contained HTML page per report: inline CSS, charts as embedded PNGs, no external resource."""

from __future__ import annotations

import html
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from qconvert.report import charts
from qconvert.report.data import error_grid, size_rows, tensor_kind

MIB = 2**20

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#1d1d1f;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 9px;text-align:right}
th{background:#f5f5f7}td:first-child,th:first-child{text-align:left}
code{background:#f5f5f7;padding:1px 4px;border-radius:3px;word-break:break-all}
img.chart{display:block;max-width:100%;margin:8px 0}.note{color:#666;font-size:12px}
.warn{color:#a33}table.facts td{text-align:left}
"""

# after load: how many charts decoded, and where (a headless browser reads this back from the DOM)
_SCRIPT = """
window.addEventListener('load', function () {
  var charts = Array.prototype.map.call(document.querySelectorAll('img.chart'), function (img) {
    var r = img.getBoundingClientRect();
    return {id: img.id, ok: img.complete && img.naturalWidth > 0,
            x: r.left + window.scrollX, y: r.top + window.scrollY, w: r.width, h: r.height};
  });
  document.body.setAttribute('data-charts', JSON.stringify(charts));
});
"""


@dataclass
class Output:
    path: Path
    report: dict
    evaluation: dict | None  # against the base, when there is one


def _e(value) -> str:
    return html.escape(str(value))


def _name(o: Output) -> str:
    return o.path.name


def _row(cells, header=False) -> str:
    tag = "th" if header else "td"
    return "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>"


def _what(report: dict) -> str:
    if "type" in report:
        return f"GGUF {report['type']}" + (" with imatrix" if report.get("imatrix") else "")
    return f"{report['method']} → {report['format']}"


def _summary(o: Output) -> str:
    r = o.report
    rows = [("source", _e(r["source"])), ("conversion", _e(_what(r))),
            ("size", f"{r['output_bytes'] / MIB:.1f} MiB (from {r['source_bytes'] / MIB:.1f} MiB, "
                     f"{r['source_bytes'] / max(r['output_bytes'], 1):.2f}× smaller)"),
            ("time", f"{r['seconds']:.1f} s")]
    if r.get("config"):
        rows.append(("settings", f"<code>{_e(json.dumps(r['config']))}</code>"))
    if r.get("calibration"):
        c = r["calibration"]
        rows.append(("calibration", _e(f"{c['dataset']}: {c['samples']} × {c['seq_len']} tokens, seed {c['seed']}")))
    if r.get("kv_cache"):
        rows.append(("KV cache", _e(r["kv_cache"])))
    peak = r.get("peak_memory") or {}
    if peak:
        rows.append(("peak memory", ", ".join(f"{k.replace('_bytes', '').replace('_', ' ')} {v / 2**30:.2f} GiB"
                                              for k, v in peak.items())))
    uncalibrated = sum(len(layer.get("uncalibrated", [])) for layer in r.get("layers", []))
    if uncalibrated:
        rows.append(("warning", f"<span class='warn'>{uncalibrated} linear(s) saw no calibration token</span>"))
    return "<table class='facts'>" + "".join(_row([k, v]) for k, v in rows) + "</table>"


def _quality(outputs: list[Output]) -> str:
    evaluated = [o for o in outputs if o.evaluation]
    if not evaluated:
        return "<p class='note'>Not evaluated: pass <code>--base BASE</code> to score perplexity and KL divergence.</p>"
    first = evaluated[0].evaluation
    head = _row(["model", "size (MiB)", "perplexity", "Δ perplexity", "KL vs base (nats)", "top-1 agreement"], True)
    rows = [_row([f"base: {_e(first['base'])}", f"{evaluated[0].report['source_bytes'] / MIB:.1f}",
                  f"{first['base_perplexity']:.3f}", "", "", ""])]
    for o in evaluated:
        e = o.evaluation
        rows.append(_row([_e(_name(o)), f"{o.report['output_bytes'] / MIB:.1f}", f"{e['perplexity']:.3f}",
                          f"{100 * (e['perplexity'] / e['base_perplexity'] - 1):+.2f} %",
                          f"{e['kl_divergence']:.4f}", f"{100 * e['top1_agreement']:.1f} %"]))
    note = (f"<p class='note'>Held-out text <code>{_e(first['dataset'])}</code>, {first['windows']} windows × "
            f"{first['seq_len']} tokens, never seen by calibration; each output read back from its files.</p>")
    return f"<table>{head}{''.join(rows)}</table>{note}"


def _heatmap(o: Output, index: int) -> str:
    grid = error_grid(o.report)
    if not grid.kinds:
        return "<p class='note'>No per-layer errors recorded.</p>"
    what = ("relative output error ‖X(W−Q)ᵀ‖²/‖XWᵀ‖² on a sample of each linear's calibration inputs"
            if grid.metric == "output error" else "relative weight error ‖W−Q‖²/‖W‖²")
    uri = charts.error_heatmap(grid, f"{_name(o)}: {grid.metric} by layer and linear")
    return f"<img class='chart' id='heatmap-{index}' alt='error heat map' src='{uri}'><p class='note'>{what}</p>"


def _sizes(o: Output, index: int) -> str:
    rows = size_rows(o.report, o.path)
    uri = charts.size_bars(rows, f"{_name(o)}: size by tensor kind")
    table = ""
    if "tensors" in o.report:  # GGUF mixtures: which tensor got which type
        by_kind: dict[str, Counter] = {}
        for name, t in o.report["tensors"].items():
            by_kind.setdefault(tensor_kind(name), Counter())[t["type"]] += 1
        table = ("<table>" + _row(["tensor kind", "types (tensors)"], True)
                 + "".join(_row([_e(k), _e(", ".join(f"{t} ×{n}" for t, n in c.most_common()))])
                           for k, c in by_kind.items()) + "</table>")
    return f"<img class='chart' id='sizes-{index}' alt='size by tensor kind' src='{uri}'>{table}"


def _layer_lines(outputs: list[Output]) -> str:
    grids = {_name(o): error_grid(o.report) for o in outputs}
    metrics = {g.metric for g in grids.values() if g.kinds}
    if len(outputs) < 2 or len(metrics) != 1:
        return ""
    series = {name: [(sum(vs) / len(vs)) if (vs := [v for v in row if v is not None]) else None for row in g.values]
              for name, g in grids.items() if g.kinds}
    uri = charts.layer_error_lines(series, metrics.pop())
    return f"<h2>Per layer, side by side</h2><img class='chart' id='layers' alt='error per layer' src='{uri}'>"


def _provenance(outputs: list[Output]) -> str:
    rows = [_row(["output", "tool", "command"], True)]
    rows += [_row([_e(_name(o)), _e(o.report["tool"]), f"<code>{_e(o.report.get('command') or '(library call)')}</code>"])
             for o in outputs]
    return "<table>" + "".join(rows) + "</table>"


def render(outputs: list[Output]) -> str:
    main = outputs[0]
    parts = [f"<h1>qconvert report: {_e(_name(main))}</h1>", _summary(main),
             "<h2>Quality against the base</h2>", _quality(outputs)]
    for i, o in enumerate(outputs):
        title = "" if i == 0 else f" ({_e(_name(o))})"
        parts += [f"<h2>Error by layer and linear{title}</h2>", _heatmap(o, i),
                  f"<h2>Size by tensor kind{title}</h2>", _sizes(o, i)]
    parts += [_layer_lines(outputs), "<h2>How each output was made</h2>", _provenance(outputs)]
    body = "\n".join(p for p in parts if p)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>qconvert report: "
            f"{_e(_name(main))}</title><style>{_CSS}</style></head><body>\n{body}\n<script>{_SCRIPT}</script>"
            f"</body></html>\n")


def index_page(results: list[dict], root: Path) -> str:
    """A batch's jobs, one row each, linking each job's report page."""
    head = _row(["job", "status", "size (MiB)", "perplexity", "KL vs base", "gates", "report"], True)
    rows = []
    for r in results:
        report = Path(r["report"]) if r.get("report") else None
        link = f"<a href='{_e(report.relative_to(root) if report.is_relative_to(root) else report.as_uri())}'>page</a>" \
            if report else ""
        gates = ", ".join(f"{g['gate']} {g['value']:.3g} ≤ {g['limit']:g} {'✓' if g['passed'] else '✗'}"
                          for g in r.get("gates", []))
        status = _e(r["status"]) + (" (resumed)" if r.get("resumed") else "")
        if r.get("error"):
            status += f"<br><span class='warn'>{_e(r['error'])}</span>"
        rows.append(_row([_e(r["id"]), status, f"{r['output_bytes'] / MIB:.1f}" if r.get("output_bytes") else "",
                          f"{r['perplexity']:.3f}" if r.get("perplexity") else "",
                          f"{r['kl_divergence']:.4f}" if r.get("kl_divergence") is not None else "", _e(gates), link]))
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>qconvert batch</title>"
            f"<style>{_CSS}</style></head><body><h1>qconvert batch</h1><table>{head}{''.join(rows)}</table>"
            f"</body></html>\n")
