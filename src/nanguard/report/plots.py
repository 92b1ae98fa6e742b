"""The report's charts, built from a `RunData`: losses, gradient norm, LR, loss scale, skipped steps.

All share one step axis (the range of the logged steps and the incidents), so an incident lines up
across them. Incidents are vertical markers coloured by the action the policy took.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from nanguard.report.load import RunData, number
from nanguard.report.svg import Band, Marker, Series, format_number, line_chart, strip_chart

ACTION_COLORS = {
    "none": "#9aa0a6",
    "skip": "#f28e2b",
    "quarantine": "#b07aa1",
    "lr_backoff": "#9c755f",
    "rollback": "#e15759",
    "stop": "#1b1b1b",
}
UNKNOWN_ACTION_COLOR = "#bab0ac"
COMPONENT_COLORS = ["#4e79a7", "#59a14f", "#76b7b2", "#c9a227", "#ff9da7", "#8cd17d", "#499894", "#86bcb6"]
TOTAL_COLOR = "#222222"
BAND_COLOR = "#4e79a7"


@dataclass(frozen=True)
class Chart:
    """One figure of the report: a heading, a sentence on how to read it, and the `<svg>`."""

    key: str
    title: str
    caption: str
    svg: str


def step_range(data: RunData) -> tuple[float, float]:
    steps = [r["step"] for r in data.metrics] + [r["step"] for r in data.incidents]
    return (min(steps), max(steps)) if steps else (0.0, 1.0)


def incident_marker(incident: dict[str, Any]) -> Marker:
    action = str(incident.get("action") or "none")
    kind = incident.get("kind") or "incident"
    reason = str(incident.get("reason") or "")
    if len(reason) > 200:
        reason = reason[:199] + "…"
    title = f"step {incident['step']}: {kind} → {action}" + (f"\n{reason}" if reason else "")
    group = "no action (a note)" if action == "none" else action
    return Marker(incident["step"], ACTION_COLORS.get(action, UNKNOWN_ACTION_COLOR), group, title,
                  dashed=action == "stop")


def _markers(data: RunData, keep=lambda incident: True) -> list[Marker]:
    return [incident_marker(incident) for incident in data.incidents if keep(incident)]


def spike_band(data: RunData, points: list[tuple[float, float | None]]) -> Band | None:
    """Running median of the gradient norm ÷/× guard.spike_min_ratio, or None without that setting.

    The guard's spike test (a robust z-score and this ratio over the last spike_window healthy steps)
    sees every step; metrics.jsonl holds one step in log_every, so the median here is taken over a
    window of at least ten logged points: a guide to the eye, not the detector's exact threshold."""
    ratio = number(data.setting("guard", "spike_min_ratio", "spike_ratio"))
    if ratio is None or not math.isfinite(ratio) or ratio <= 1:
        return None
    window = number(data.setting("guard", "spike_window")) or 50.0
    log_every = number(data.setting("train", "log_every")) or 1.0
    span = max(window, 10 * log_every)
    healthy = [(x, y) for x, y in points if y is not None and math.isfinite(y) and y > 0]
    band, start = [], 0
    for index, (step, _) in enumerate(healthy):
        while healthy[start][0] < step - span:
            start += 1
        history = [y for _, y in healthy[start:index]]
        if history:
            median = statistics.median(history)
            band.append((step, median / ratio, median * ratio))
    if not band:
        return None
    return Band(f"running median ÷/× {format_number(ratio)} (spike ratio)", band, BAND_COLOR)


def loss_chart(data: RunData, x_range: tuple[float, float]) -> Chart:
    series = [Series(name, data.series(name), COMPONENT_COLORS[i % len(COMPONENT_COLORS)])
              for i, name in enumerate(data.loss_components())]
    series.append(Series("total_loss", data.series("total_loss"), TOTAL_COLOR, width=2.2))
    svg = line_chart(series, markers=_markers(data), x_range=x_range, y_label="loss", label="Loss components and total loss over steps")
    return Chart("loss", "Loss", "Each loss component and the total; vertical lines are incidents, coloured by the "
                 "action taken. A triangle at the top edge is a NaN or Inf value.", svg)


def grad_chart(data: RunData, x_range: tuple[float, float]) -> Chart:
    points = data.series("grad_norm")
    band = spike_band(data, points)
    svg = line_chart([Series("grad_norm", points, "#4e79a7")], markers=_markers(data), bands=[band] if band else [],
                     x_range=x_range, y_label="gradient norm", label="Gradient norm over steps")
    caption = "Global gradient norm before clipping, with every incident marked."
    if band:
        caption += (" The band is the running median of the logged norms divided and multiplied by "
                    "guard.spike_min_ratio: a spike must also clear the guard's robust z-score, over every step.")
    return Chart("grad", "Gradient norm", caption, svg)


def lr_chart(data: RunData, x_range: tuple[float, float]) -> Chart:
    markers = _markers(data, lambda incident: incident.get("action") in ("lr_backoff", "rollback", "stop"))
    svg = line_chart([Series("lr", data.series("lr"), "#59a14f")], markers=markers, x_range=x_range, y_label="learning rate",
                     label="Learning rate over steps")
    return Chart("lr", "Learning rate", "The LR each logged step ran with; LR back-offs, rollbacks and a stop are marked.", svg)


def loss_scale_chart(data: RunData, x_range: tuple[float, float]) -> Chart | None:
    points = data.series("loss_scale")
    if not points:
        return None
    markers = _markers(data, lambda incident: incident.get("applied") is False)
    svg = line_chart([Series("loss_scale", points, "#b07aa1")], markers=markers, x_range=x_range, y_label="loss scale",
                     label="fp16 loss scale over steps")
    return Chart("loss_scale", "Loss scale", "The fp16 GradScaler's scale; skipped steps are marked.", svg)


def skipped_strip(data: RunData, x_range: tuple[float, float]) -> Chart:
    skipped = _markers(data, lambda incident: incident.get("applied") is False)
    svg = strip_chart(skipped, x_range=x_range, label="Skipped steps")
    return Chart("skipped", f"Skipped steps ({len(skipped)})",
                 "Steps whose update was not applied (incidents with applied = false), coloured by action.", svg)


def all_charts(data: RunData) -> list[Chart]:
    x_range = step_range(data)
    charts = [loss_chart(data, x_range), grad_chart(data, x_range), lr_chart(data, x_range),
              loss_scale_chart(data, x_range), skipped_strip(data, x_range)]
    return [chart for chart in charts if chart is not None]
