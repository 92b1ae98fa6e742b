"""RUN_DIR/report.html: one self-contained page (inline CSS and SVG; no script, font or network).

    build_report("runs/a")  -> the HTML text
    write_report("runs/a")  -> Path("runs/a/report.html"), written atomically

The page is well-formed XML as well as HTML (self-closed void elements, no named entities), so a test or
a tool can parse it with xml.etree. It carries MARKER: nanguard overwrites a report.html only when the
marker says nanguard wrote it, never a file of the user's.
"""

from __future__ import annotations

import math
import re
from html import escape
from pathlib import Path
from typing import Any

from nanguard.errors import UserError
from nanguard.fileio import atomic_write_text
from nanguard.report.load import RunData, load_run, number
from nanguard.report.plots import ACTION_COLORS, all_charts
from nanguard.report.tables import audit_section, final_table, incident_table, text

# Characters XML forbids (control characters, lone surrogates a JSON "\ud800" can carry): a run file's
# text must not make the page unparsable or unencodable.
_NOT_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
REPORT_FILE = "report.html"
MARKER = "<!-- written by nanguard report -->"

STYLE = """
:root { color-scheme: light; }
body { margin: 0; background: #f5f6f8; color: #1f2328;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid #d8dce2; }
h3 { font-size: 15px; margin: 0 0 2px; }
code { font: 12.5px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #eef0f3;
  padding: 0 3px; border-radius: 3px; }
.path { color: #59636e; font-size: 13px; }
.status { display: inline-block; padding: 2px 10px; border-radius: 12px; color: #fff; font-weight: 600;
  font-size: 13px; vertical-align: middle; margin-left: 8px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: 10px; margin: 16px 0; }
.card { background: #fff; border: 1px solid #dde1e6; border-radius: 8px; padding: 10px 12px; }
.card .label { color: #59636e; font-size: 12px; letter-spacing: .02em; }
.card .value { font-size: 22px; font-weight: 600; font-variant-numeric: tabular-nums; }
.card.alert .value { color: #c0392b; }
.note { background: #fff8e6; border: 1px solid #f0d58c; border-radius: 8px; padding: 8px 14px; margin: 12px 0; }
.note.stop { background: #fdecea; border-color: #f1aaa4; }
.note ul { margin: 4px 0; padding-left: 20px; }
figure { background: #fff; border: 1px solid #dde1e6; border-radius: 8px; margin: 0 0 14px; padding: 12px 14px 6px; }
figcaption { color: #59636e; font-size: 13px; margin-bottom: 6px; }
svg.chart { width: 100%; height: auto; display: block; }
svg .grid { stroke: #e6e8eb; stroke-width: 1; }
svg .axis { stroke: #8a9099; }
svg .frame { fill: none; stroke: #c3c8cf; }
svg .tick { font-size: 11px; fill: #59636e; font-variant-numeric: tabular-nums; }
svg .legend { font-size: 12px; fill: #1f2328; }
svg .nonfinite { font-size: 10px; font-weight: 700; fill: #c0392b; }
svg .empty { font-size: 14px; fill: #8a9099; }
table { border-collapse: collapse; background: #fff; border: 1px solid #dde1e6; margin: 8px 0; font-size: 13px; }
table.incidents { width: 100%; }
th { background: #eef0f3; text-align: left; font-weight: 600; padding: 6px 8px; border-bottom: 1px solid #d8dce2; }
td { padding: 6px 8px; vertical-align: top; border-top: 1px solid #eceef1; overflow-wrap: break-word; }
tbody tr:nth-child(even) { background: #f8f9fb; }
table.compact td, table.compact th { padding: 4px 10px; }
.num { font-variant-numeric: tabular-nums; }
td .num, table.compact td:nth-child(n+2) { white-space: nowrap; }
.badge { display: inline-block; color: #fff; border-radius: 4px; padding: 0 6px; font-size: 12px; font-weight: 600; }
.muted { color: #6a737d; font-size: 12px; }
.verdict { margin-top: 4px; font-weight: 600; color: #8a1f11; }
ul.evidence { margin: 4px 0 0; padding-left: 16px; font-size: 12px; color: #404850; }
.pair { display: flex; gap: 16px; flex-wrap: wrap; align-items: flex-start; }
details pre { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: 10px; overflow: auto;
  font-size: 12px; max-height: 480px; }
footer { margin-top: 36px; color: #8a9099; font-size: 12px; }
@media print { body { background: #fff; } figure, table { break-inside: avoid; } }
"""

STATUS_COLORS = {"completed": "#2e7d32", "stopped": "#c0392b"}


def _final_number(data: RunData, key: str) -> float | None:
    value = number((data.final or {}).get(key)) if key in (data.final or {}) else None
    return value


def _card(label: str, value: str, alert: bool = False) -> str:
    return (f'<div class="card{" alert" if alert else ""}"><div class="label">{escape(label)}</div>'
            f'<div class="value">{value}</div></div>')


def _header(data: RunData) -> str:
    final = data.final or {}
    status = str(final.get("status") or "unfinished: no final.json")
    color = STATUS_COLORS.get(status, "#b7791f")
    parts = [f'<h1>{escape(data.path.resolve().name)}<span class="status" style="background:{color}">'
             f"{escape(status)}</span></h1>", f'<div class="path">{escape(str(data.path.resolve()))}</div>']
    cards = []
    steps = final.get("steps")
    if isinstance(steps, int):
        cards.append(_card("steps", text(steps)))
    elif data.metrics:
        cards.append(_card("steps logged", f"{text(data.metrics[-1]['step'] + 1)}+"))
    for key in ("mAP", "mAP50", "mAP75"):
        value = _final_number(data, key)
        if value is not None:
            cards.append(_card(key, f"{value:.3f}" if math.isfinite(value) else text(value)))
    skipped = final.get("skipped_steps")
    if not isinstance(skipped, int):
        skipped = sum(1 for incident in data.incidents if incident.get("applied") is False)
    rollbacks = final.get("rollbacks")
    if not isinstance(rollbacks, int):
        rollbacks = sum(1 for incident in data.incidents if incident.get("action") == "rollback")
    incidents = final.get("incidents") if isinstance(final.get("incidents"), int) else len(data.incidents)
    cards += [_card("skipped steps", text(skipped), alert=skipped > 0), _card("rollbacks", text(rollbacks), alert=rollbacks > 0),
              _card("incidents", text(incidents))]
    speed = _final_number(data, "images_per_second")
    if speed is not None and math.isfinite(speed):
        cards.append(_card("images / s", f"{speed:.1f}"))
    seconds = _final_number(data, "train_seconds")
    if seconds is not None and math.isfinite(seconds):
        shown = f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
        cards.append(_card("train time", shown))
    if final.get("weights_finite") is False:
        cards.append(_card("weights", "not finite", alert=True))
    parts.append(f'<div class="cards">{"".join(cards)}</div>')
    if final.get("stopped") or status == "stopped":
        verdict = final.get("verdict") or "no verdict recorded"
        reason = f'<div class="muted">{text(final.get("stop_reason"))}</div>' if final.get("stop_reason") else ""
        parts.append(f'<div class="note stop"><strong>The guard stopped the run.</strong> {text(verdict)}{reason}</div>')
    if data.notes:
        items = "".join(f"<li>{escape(note)}</li>" for note in data.notes)
        parts.append(f'<div class="note"><strong>Not in this report:</strong><ul>{items}</ul></div>')
    return "".join(parts)


def _charts(data: RunData) -> str:
    if not data.metrics and not data.incidents:
        return '<p class="muted">No metrics.jsonl lines and no incidents yet: nothing to plot.</p>'
    return "".join(f'<figure id="{chart.key}"><h3>{escape(chart.title)}</h3><figcaption>{escape(chart.caption)}'
                   f"</figcaption>{chart.svg}</figure>" for chart in all_charts(data))


def _config(data: RunData) -> str:
    if not data.config_text:
        return ""
    return (f"<h2>Configuration</h2><details><summary>config.yaml, as resolved for this run "
            f"({len(data.config_text.splitlines())} lines)</summary><pre>{escape(data.config_text)}</pre></details>")


def _action_counts(data: RunData) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for incident in data.incidents:
        action = str(incident.get("action") or "none")
        counts[action] = counts.get(action, 0) + 1
    return {action: counts[action] for action in [*ACTION_COLORS, *sorted(counts)] if action in counts}


def build_report(run_dir: str | Path) -> str:
    """The report of `run_dir` as HTML text (reads the folder; writes nothing)."""
    data = load_run(run_dir)
    counts = _action_counts(data)
    summary = ", ".join(f"{count} {text(action)}" for action, count in counts.items())
    body = [
        _header(data),
        "<h2>Training curves</h2>", _charts(data),
        f"<h2>Incidents ({len(data.incidents):,})</h2>",
        f'<p class="muted">By action: {summary}.</p>' if summary else "",
        incident_table(data.incidents),
        "<h2>Data audit</h2>", audit_section(data.audit),
        "<h2>Final numbers</h2>", final_table(data.final),
        _config(data),
        "<footer>Written by <code>nanguard report</code> from the files in the run folder; "
        "run it again to refresh.</footer>",
    ]
    title = f"nanguard report: {data.path.resolve().name}"
    return _NOT_XML.sub("\ufffd", "<!DOCTYPE html>\n" + MARKER + "\n"
            '<html lang="en"><head><meta charset="utf-8"/>'
            '<meta name="viewport" content="width=device-width, initial-scale=1"/>'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
            f"<body><main>{''.join(body)}</main></body></html>\n")


def _written_by_nanguard(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return MARKER.encode() in head


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.html atomically and return its path. Refuses (UserError) to replace a
    report.html that nanguard did not write."""
    html = build_report(run_dir)  # checks run_dir first: a bad folder fails before anything is touched
    target = Path(run_dir) / REPORT_FILE
    if target.exists() or target.is_symlink():
        if not target.is_file() or not _written_by_nanguard(target):
            raise UserError(f"{target}: exists and was not written by nanguard report; move it away (nanguard "
                            "never overwrites a file it did not write), then run the report again")
    return atomic_write_text(target, html)
