"""A self-contained HTML report of a :class:`~unlearn.audit.certificate.Certificate`.

Every figure is drawn with matplotlib's Agg backend from the certificate's own numbers and
embedded as a base64 PNG, so the file opens anywhere without network access:

* metric bars: each metric of the unlearned model against the band of the retrained references
  (their individual values as grey dots, the original model as a black cross);
* forget-set loss histograms for the original, unlearned and retrained models;
* the timeline of the deletion requests (submitted, claimed, applied, certified);
* cost: removal time against retraining time.
"""

from __future__ import annotations

import base64
import html
import io
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from unlearn.audit.certificate import Certificate

__all__ = ["render_html", "figures"]

_GREEN, _RED, _GREY, _BLUE = "#2e7d32", "#c62828", "#9e9e9e", "#1565c0"
_EVENT_COLORS = {"submitted": "#6a1b9a", "claimed": "#ef6c00", "applied": _BLUE,
                 "certified": _GREEN, "failed": _RED, "rejected": _RED,
                 "rolled_back": _GREY, "released": _GREY, "retried": "#8d6e63"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def metric_bands_figure(cert: Certificate) -> Any:
    """Small multiples: one axis per check with a reference band."""
    plt = _plt()
    checks = [c for c in cert.checks if c.name in cert.references]
    cols = 2
    rows = (len(checks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 1.25 * rows + 0.6), squeeze=False)
    for ax, c in zip(axes.ravel(), checks, strict=False):
        refs = np.asarray(cert.references[c.name], dtype=float)
        values = [c.value, *refs.tolist()]
        if cert.original is not None and c.name in cert.original:
            values.append(cert.original[c.name])
        lo = c.low if c.low is not None else min(min(values), c.high or 0.0)
        hi = c.high if c.high is not None else max(max(values), c.low or 0.0)
        span = max(hi - lo, max(values) - min(values), 1e-6)
        left = min(lo, min(values)) - 0.08 * span
        right = max(hi, max(values)) + 0.08 * span
        band_lo = c.low if c.low is not None else left
        band_hi = c.high if c.high is not None else right
        ax.axvspan(band_lo, band_hi, color=_GREY, alpha=0.25, lw=0)
        if c.ref_mean is not None:
            ax.axvline(c.ref_mean, color=_GREY, lw=1, ls="--")
        ax.scatter(refs, np.zeros_like(refs), color="#616161", s=18, zorder=3,
                   label="retrained references")
        ax.barh(0, c.value - band_lo if c.low is not None else c.value - left,
                left=band_lo if c.low is not None else left, height=0.35,
                color=_GREEN if c.passed else _RED, alpha=0.35, zorder=2)
        ax.scatter([c.value], [0], color=_GREEN if c.passed else _RED, s=70, marker="D",
                   zorder=4, label="unlearned")
        if cert.original is not None and c.name in cert.original:
            ax.scatter([cert.original[c.name]], [0], color="black", marker="x", s=60,
                       zorder=5, label="original")
        ax.set_xlim(left, right)
        ax.set_ylim(-0.6, 0.6)
        ax.set_yticks([])
        verdict = "pass" if c.passed else "FAIL"
        ax.set_title(f"{c.name}  ({verdict}; {_side(c.direction)})", fontsize=9, loc="left",
                     color="black" if c.passed else _RED)
        ax.tick_params(axis="x", labelsize=8)
    for ax in axes.ravel()[len(checks):]:
        ax.axis("off")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=3, fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return fig


def _side(direction: str) -> str:
    return {"both": "inside band", "upper": "at most band top",
            "lower": "at least band bottom"}[direction]


def loss_histogram_figure(cert: Certificate) -> Any:
    plt = _plt()
    h = cert.histograms
    edges = np.asarray(h["edges"], dtype=float)
    centers = 0.5 * (edges[1:] + edges[:-1])
    fig, ax = plt.subplots(figsize=(8, 3.6))
    styles = {"original": ("black", "-"), "unlearned": (_BLUE, "-"), "retrained": (_GREY, "-")}
    for name in ("retrained", "original", "unlearned"):
        if name not in h["density"]:
            continue
        dens = np.asarray(h["density"][name], dtype=float)
        color, ls = styles[name]
        med = h.get("median_loss", {}).get(name)
        label = f"{name} (median loss {med:.3g})" if med is not None else name
        if name == "retrained":
            ax.fill_between(centers, dens, step="mid", color=color, alpha=0.4, label=label)
        else:
            ax.step(centers, dens, where="mid", color=color, ls=ls, lw=2, label=label)
    ax.set_xlabel("log10 of the per-example training loss on the forget set")
    ax.set_ylabel("fraction of examples")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _time(text: str) -> datetime:
    t = datetime.fromisoformat(text)
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def _unit(span_s: float) -> tuple[float, str]:
    for div, name in ((86400.0, "days"), (3600.0, "hours"), (60.0, "minutes")):
        if span_s >= 3 * div:
            return div, name
    return 1.0, "seconds"


def timeline_figure(cert: Certificate) -> Any | None:
    """One row per request: its events, in time since the first event of all."""
    if not cert.timeline:
        return None
    plt = _plt()
    rows = cert.timeline
    times = [[_time(e["at"]) for e in r["events"]] for r in rows]
    flat = [t for ts in times for t in ts]
    if not flat:
        return None
    t0 = min(flat)
    div, unit = _unit((max(flat) - t0).total_seconds())
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.8))
    seen: set[str] = set()
    for y, (req, ts) in enumerate(zip(rows, times, strict=True)):
        xs = [(t - t0).total_seconds() / div for t in ts]
        if xs:
            ax.plot([min(xs), max(xs)], [y, y], color=_GREY, lw=2, zorder=1)
        for e, x in zip(req["events"], xs, strict=True):
            kind = e["kind"]
            ax.scatter([x], [y], color=_EVENT_COLORS.get(kind, "black"), s=45, zorder=3,
                       label=None if kind in seen else kind)
            seen.add(kind)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"#{r['request_id']} {r['requester']} ({r['n_ids']} ids, {r['state']})"
                        for r in rows], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.invert_yaxis()
    ax.set_xlabel(f"{unit} since the first event ({t0.strftime('%Y-%m-%d %H:%M:%S %Z')})")
    ax.legend(fontsize=8, ncol=min(len(seen), 6), loc="lower center",
              bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def cost_figure(cert: Certificate) -> Any | None:
    c = cert.cost
    secs = [s for s in c.get("retrain_seconds") or [] if s is not None]
    if c.get("removal_seconds") is None and not secs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 2.2))
    labels, values, colors = [], [], []
    if c.get("removal_seconds") is not None:
        labels.append(f"removal ({c.get('removal_method') or 'method'})")
        values.append(c["removal_seconds"])
        colors.append(_BLUE)
    if secs:
        labels.append(f"retraining (mean of {len(secs)})")
        values.append(float(np.mean(secs)))
        colors.append(_GREY)
    ax.barh(range(len(values)), values, color=colors, height=0.6)
    if secs:
        ax.scatter(secs, [len(values) - 1] * len(secs), color="black", s=14, zorder=3,
                   label="each retraining")
        # outside the axes, right of the plot: it cannot cover a bar, a dot or a label
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    from matplotlib.ticker import NullFormatter

    for i, v in enumerate(values):
        right = max([v] + (secs if i == len(values) - 1 and secs else []))
        # a fixed offset in points past the bar's (or its rightmost dot's) end, on any scale
        ax.annotate(f"{v:.3g} s", (right, i), xytext=(6, 0), textcoords="offset points",
                    va="center", fontsize=9)
    ax.set_yticks(range(len(values)))
    ax.set_yticklabels(labels, fontsize=9)
    lo, hi = min(values + secs), max(values + secs)
    if lo > 0 and hi / lo > 20:  # removal and retraining far apart: log scale
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(lo / 3, hi * 8)
        ax.set_xlabel("seconds (log scale)")
    else:
        ax.set_xlim(0, hi * 1.3)
        ax.set_xlabel("seconds")
    title = "wall-clock seconds"
    if c.get("speedup"):
        title += f"; speed-up {c['speedup']:.3g}x"
    ax.set_title(title, fontsize=10, loc="left")
    fig.tight_layout()
    return fig


def figures(cert: Certificate) -> dict[str, str]:
    """Base64 PNGs by name (``bands``, ``losses``, ``timeline``, ``cost``; the last two only
    when the certificate has the data)."""
    out = {"bands": _png(metric_bands_figure(cert)), "losses": _png(loss_histogram_figure(cert))}
    for name, make in (("timeline", timeline_figure), ("cost", cost_figure)):
        fig = make(cert)
        if fig is not None:
            out[name] = _png(fig)
    return out


def _num(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _summary_table(cert: Certificate) -> str:
    head = ("<tr><th>check</th><th>what</th><th>unlearned</th><th>allowed</th>"
            "<th>references (mean ± std)</th><th>original</th><th>result</th></tr>")
    rows = []
    for c in cert.checks:
        band = f"[{_num(c.low) if c.low is not None else '−∞'}, " \
               f"{_num(c.high) if c.high is not None else '∞'}]"
        ref = "–" if c.ref_mean is None else f"{c.ref_mean:.4g} ± {c.ref_std:.2g}"
        orig = _num((cert.original or {}).get(c.name))
        res = '<td class="pass">pass</td>' if c.passed else '<td class="fail">FAIL</td>'
        rows.append(f"<tr><td><code>{html.escape(c.name)}</code></td>"
                    f"<td>{html.escape(c.description)}</td><td>{_num(c.value)}</td>"
                    f"<td>{band}</td><td>{ref}</td><td>{orig}</td>{res}</tr>")
    return f'<table class="summary">{head}{"".join(rows)}</table>'


def _seeds(cfg: dict[str, Any]) -> str:
    seeds = cfg.get("seeds")
    if seeds is None:
        return "given by the caller"
    return "seeds " + html.escape(", ".join(str(x) for x in seeds))


def _kv_table(data: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_num(v)}</td></tr>"
                   for k, v in data.items() if not isinstance(v, (list, dict)))
    return f'<table class="kv">{rows}</table>'


def _timeline_table(cert: Certificate) -> str:
    """The requests' current states and their events, as text under the timeline figure."""
    head = "<tr><th>request</th><th>requester</th><th>ids</th><th>state</th><th>events</th></tr>"
    rows = "".join(
        f"<tr><td>#{_num(r['request_id'])}</td><td>{_num(r['requester'])}</td>"
        f"<td>{_num(r['n_ids'])}</td><td class='state'>{_num(r['state'])}</td>"
        f"<td>{' → '.join(html.escape(str(e['kind'])) for e in r['events'])}</td></tr>"
        for r in cert.timeline)
    return f'<table class="timeline">{head}{rows}</table>'


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1100px;
margin:24px auto;padding:0 16px;color:#212121;line-height:1.45}
h1{margin-bottom:4px}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.verdict{display:inline-block;padding:6px 14px;border-radius:6px;color:#fff;font-weight:600;
font-size:20px}.verdict.pass{background:#2e7d32}.verdict.fail{background:#c62828}
table{border-collapse:collapse;margin:8px 0;font-size:14px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f5f5f5}td.pass{color:#2e7d32;font-weight:600}
td.fail{color:#fff;background:#c62828;font-weight:600}
img{max-width:100%;border:1px solid #eee;margin:6px 0}.muted{color:#757575;font-size:13px}
"""


def render_html(cert: Certificate, path: str | os.PathLike[str]) -> Path:
    """Write the report to ``path`` (atomically) and return the path."""
    from unlearn.audit.certificate import _atomic_write

    figs = figures(cert)
    verdict = "pass" if cert.passed else "fail"
    n_ok = len(cert.checks) - len(cert.failed)
    cfg = cert.config
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>unlearn certificate</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Unlearning certificate</h1>",
        f"<p><span class='verdict {verdict}'>{verdict.upper()}</span> "
        f"&nbsp;{n_ok} of {len(cert.checks)} checks passed; average gap to retraining "
        f"{cert.average_gap:.2f} percentage points.</p>",
        f"<p class='muted'>schema {html.escape(cert.schema)} · created "
        f"{html.escape(cert.created_at)} · {cfg.get('n_references')} retrained references "
        f"({_seeds(cfg)}) · band = reference mean ± max(k·std, "
        f"floor), k = {cfg.get('k')} · forget {cfg.get('n_forget')}, retain "
        f"{cfg.get('n_retain')}, test {cfg.get('n_test')} examples</p>",
        "<h2>Summary</h2>", _summary_table(cert),
        "<h2>Metrics against the retraining band</h2>",
        "<p class='muted'>Grey band: what the retrained references allow; grey dots: each "
        "reference (model-to-reference metrics of a reference are measured against the other "
        "references); diamond: the unlearned model; cross: the original model.</p>",
        _img(figs["bands"], "metric bands"),
        "<h2>Forget-set losses</h2>",
        "<p class='muted'>A model that forgot should have the forget-set loss distribution of "
        "the retrained models, not of the original.</p>",
        _img(figs["losses"], "forget-set loss histograms"),
        "<h2>Membership inference</h2>",
        _kv_table({"population MIA efficacy (unlearned)": cert.metrics.get("mia_efficacy"),
                   "MIA attack training accuracy": cert.mia.get("attack_train_accuracy"),
                   "LiRA flagged (unlearned)": cert.metrics.get("lira_flagged"),
                   "LiRA false-positive rate": cert.lira.get("fpr"),
                   "LiRA flagged on test (≈ fpr)": cert.lira.get("test_flagged"),
                   "LiRA variance": cert.lira.get("variance"),
                   "LiRA shadow (reference) models": cert.lira.get("n_references")}),
    ]
    if cert.privacy is not None:
        parts += ["<h2>(ε, δ) certified removal</h2>", _kv_table(cert.privacy)]
    parts.append("<h2>Cost</h2>")
    parts.append(_img(figs["cost"], "cost") if "cost" in figs
                 else "<p class='muted'>No timings recorded.</p>")
    parts.append(_kv_table(cert.cost))
    parts.append("<h2>Request timeline</h2>")
    parts.append(_img(figs["timeline"], "request timeline") if "timeline" in figs
                 else "<p class='muted'>No ledger was given to the audit.</p>")
    if cert.timeline:
        parts.append(_timeline_table(cert))
    parts.append("<p class='muted'>Passing means these tests cannot tell the model from "
                 "retraining at this number of references; only an (ε, δ) section is a formal "
                 "guarantee.</p></body></html>")
    out = Path(path)
    _atomic_write(out, "\n".join(parts).encode("utf-8"))
    return out
