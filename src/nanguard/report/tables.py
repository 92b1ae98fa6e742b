"""The report's tables as HTML fragments: incidents (with their diagnosis), the audit summary, final.json.

Every value from a run file goes through `text()` (html.escape): a reason, an id or a module name is
data, and a `<script>` in it must show as text.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

from nanguard.report.load import number
from nanguard.report.plots import ACTION_COLORS, UNKNOWN_ACTION_COLOR
from nanguard.report.svg import format_number

MAX_INCIDENT_ROWS = 1000  # a run with thousands of notes keeps a readable report; the rest is in the log
MAX_IDS = 8


def text(value: Any) -> str:
    """A value as escaped text: numbers readable, non-finite as NaN/Inf, None as an empty cell."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Inf" if value > 0 else "-Inf"
        return escape(format_number(value))
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, (list, tuple)):
        return id_list(value)
    if isinstance(value, dict):
        return ", ".join(f"{escape(str(key))}: {text(item)}" for key, item in value.items())
    if isinstance(value, str) and number(value) is not None and value.strip().lower() in ("nan", "inf", "-inf"):
        return text(number(value))
    return escape(str(value))


def ident(value: Any) -> str:
    """An id or a name as written (image 139077, not 139,077)."""
    return "" if value is None else escape(str(value))


def id_list(values: Any, limit: int = MAX_IDS) -> str:
    if not isinstance(values, (list, tuple)):
        return ident(values)
    shown = ", ".join(ident(v) for v in values[:limit])
    return shown + (f" <span class=\"muted\">+{len(values) - limit} more</span>" if len(values) > limit else "")


def badge(action: Any) -> str:
    name = str(action or "none")
    color = ACTION_COLORS.get(name, UNKNOWN_ACTION_COLOR)
    return f'<span class="badge" style="background:{color}">{escape(name)}</span>'


def _table(head: list[str], rows: list[list[str]], css: str = "") -> str:
    cells = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>'


def _diagnosis_cells(diagnosis: Any) -> tuple[str, str, str]:
    """(verdict cell, module / first op cell, advice cell) of an incident's optional `diagnosis`.

    Ids the diagnosis names are shown in bold in the ids cell: the culprits among the batch."""
    if not isinstance(diagnosis, dict):
        return '<span class="muted">–</span>', "", ""
    verdict = f'<strong>{text(diagnosis.get("verdict") or "unknown")}</strong>'
    facts = []
    reproduced = diagnosis.get("reproduced")
    if reproduced is not None:
        facts.append("reproduced" if reproduced else "not reproduced")
    for key in ("rank", "phase", "loss_component"):
        if diagnosis.get(key) is not None and diagnosis.get(key) != "":
            facts.append(f"{key.replace('_', ' ')}: {text(diagnosis[key])}")
    seconds = number(diagnosis.get("seconds")) if "seconds" in diagnosis else None
    if seconds is not None and math.isfinite(seconds):
        facts.append(f"{seconds:.1f} s")
    if facts:
        verdict += f'<div class="muted">{"; ".join(facts)}</div>'
    evidence = diagnosis.get("evidence")
    if isinstance(evidence, list) and evidence:
        verdict += '<ul class="evidence">' + "".join(f"<li>{text(item)}</li>" for item in evidence[:6]) + "</ul>"
    where = []
    if diagnosis.get("module"):
        where.append(f"<code>{text(diagnosis['module'])}</code>")
    if diagnosis.get("first_op"):
        where.append(f'first op <code>{text(diagnosis["first_op"])}</code>')
    return verdict, "<br/>".join(where), text(diagnosis.get("advice"))


def _ids_cell(incident: dict[str, Any]) -> str:
    lines = []
    diagnosis = incident.get("diagnosis") if isinstance(incident.get("diagnosis"), dict) else {}
    for label, key in (("images", "image_ids"), ("annotations", "annotation_ids")):
        culprits = diagnosis.get(key)
        batch = incident.get(key) if isinstance(incident.get(key), list) else []
        if isinstance(culprits, list) and culprits:  # the diagnosis narrowed the batch down
            of_batch = f' <span class="muted">of {id_list(batch)}</span>' if batch and batch != culprits else ""
            lines.append(f"{label}: <strong>{id_list(culprits)}</strong>{of_batch}")
        elif isinstance(incident.get(key), list) and incident[key]:
            lines.append(f"{label}: {id_list(incident[key])}")
    if incident.get("quarantined"):
        lines.append(f"quarantined: {id_list(incident['quarantined'])}")
    for target in (incident.get("invalid_targets") or [])[:3]:
        if isinstance(target, dict):
            lines.append(f'dropped box {ident(target.get("annotation_id"))}: {text(target.get("why"))}')
    return "<br/>".join(lines)


def incident_table(incidents: list[dict[str, Any]]) -> str:
    if not incidents:
        return '<p class="muted">No incidents: every step was healthy.</p>'
    rows = []
    for incident in incidents[:MAX_INCIDENT_ROWS]:
        kinds = [k for k in incident.get("kinds") or [] if k != incident.get("kind")]
        kind = f'<code>{text(incident.get("kind"))}</code>'
        if kinds:
            kind += f'<div class="muted">also {", ".join(text(k) for k in kinds)}</div>'
        if incident.get("components"):
            kind += f'<div class="muted">non-finite: {id_list(incident["components"])}</div>'
        action = badge(incident.get("action"))
        if incident.get("applied") is False:
            action += '<div class="muted">not applied</div>'
        if incident.get("restored_step") is not None:
            action += f'<div class="muted">restored state after step {text(incident["restored_step"])}</div>'
        reason = text(incident.get("reason"))
        if incident.get("verdict"):
            reason += f'<div class="verdict">{text(incident["verdict"])}</div>'
        if incident.get("model_error"):
            reason += f'<div class="muted">model error: {text(incident["model_error"])}</div>'
        verdict, where, advice = _diagnosis_cells(incident.get("diagnosis"))
        rows.append([f'<span class="num">{text(incident["step"])}</span>', kind, action, reason, verdict, where,
                     _ids_cell(incident), advice])
    table = _table(["Step", "Kind", "Action", "Reason", "Diagnosis", "Module / first op", "Images / annotations",
                    "Advice"], rows, "incidents")
    if len(incidents) > MAX_INCIDENT_ROWS:
        table += (f'<p class="muted">The first {MAX_INCIDENT_ROWS} of {len(incidents):,} incidents are shown; '
                  "all are in incidents.jsonl.</p>")
    return table


def audit_section(audit: dict[str, Any] | None) -> str:
    if audit is None:
        return '<p class="muted">No audit.json: the run did not audit its data (data.audit=off), or the file is missing.</p>'
    summary = audit.get("summary") if isinstance(audit.get("summary"), dict) else {}
    totals = [[text(key), f'<span class="num">{text(summary.get(key))}</span>']
              for key in ("images", "annotations", "errors", "warnings", "info") if key in summary]
    severity: dict[str, str] = {}
    first_ids: dict[str, list[str]] = {}
    for finding in audit.get("findings") or []:
        if isinstance(finding, dict) and isinstance(finding.get("check"), str):
            check = finding["check"]
            severity.setdefault(check, str(finding.get("severity") or ""))
            ids = first_ids.setdefault(check, [])
            if len(ids) < 5:
                annotation_id = finding.get("annotation_id")
                ids.append(ident(annotation_id if annotation_id is not None else finding.get("image_id")))
    by_check = summary.get("by_check") if isinstance(summary.get("by_check"), dict) else {}
    checks = [[f"<code>{text(name)}</code>", text(severity.get(name, "")), f'<span class="num">{text(count)}</span>',
               ", ".join(first_ids.get(name, []))]
              for name, count in by_check.items() if isinstance(count, (int, float)) and count]
    parts = []
    if audit.get("file"):
        parts.append(f'<p>Audited <code>{text(audit["file"])}</code> before training.</p>')
    parts.append('<div class="pair">' + _table(["total", "count"], totals, "compact"))
    if checks:
        parts.append(_table(["check", "severity", "count", "first ids"], checks, "compact") + "</div>")
    else:
        parts.append('<p class="muted">No check found anything.</p></div>')
    return "".join(parts)


def final_table(final: dict[str, Any] | None) -> str:
    if final is None:
        return '<p class="muted">No final.json: the run is still training, or it stopped before its end.</p>'
    rows = [[f"<code>{escape(str(key))}</code>", text(value) or '<span class="muted">–</span>'] for key, value in final.items()]
    return _table(["field", "value"], rows, "compact")
