"""Small SVG charts for the HTML report: lines over steps, incident markers, a shaded band, a legend.

    line_chart([Series("total_loss", points, "#222")], markers=[Marker(120, "#e15759", "rollback", "step 120")])

returns one `<svg>` element as a string: well-formed XML, no script, no external font or stylesheet (the
text takes the page's font). x is the step; y is linear, or logarithmic when the finite values span more
than two decades (`log_y=None`). A non-finite value cannot be placed on the axis, so it is drawn as a
triangle at the top edge labelled NaN or Inf (-Inf: at the bottom edge), and the line breaks there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH = 960
LEFT, RIGHT, BOTTOM = 64, 18, 34
LEGEND_ROW = 18
CHAR_WIDTH = 6.6  # of the 12-px legend text, a generous average so labels never overlap


@dataclass(frozen=True)
class Series:
    """A line. `points` are (x, y); y None is a gap, y NaN/Inf a marker at the edge."""

    name: str
    points: Sequence[tuple[float, float | None]]
    color: str
    width: float = 1.6


@dataclass(frozen=True)
class Marker:
    """A vertical line at x (an incident); `group` is its legend entry, `title` its tooltip."""

    x: float
    color: str
    group: str
    title: str
    dashed: bool = False


@dataclass(frozen=True)
class Band:
    """A shaded area between two curves: `points` are (x, low, high)."""

    name: str
    points: Sequence[tuple[float, float, float]]
    color: str


def format_number(value: float) -> str:
    """A tick or table number: 0, 0.25, 1.5, 3.142, 2e-5, 1e6 (no "e-05", no "0.30000000000000004")."""
    if value == 0:
        return "0"
    text = f"{value:.4g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.3g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        return f"{mantissa}e{int(exponent)}"
    return text


def format_step(value: float) -> str:
    return f"{int(round(value)):,}"


def nice_step(span: float, target: int, factors: Sequence[float] = (1, 2, 2.5, 5, 10)) -> float:
    """A 1-2-5 step that cuts `span` into about `target` intervals."""
    raw = span / max(target, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in factors:
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def choose_log(values: Sequence[float]) -> bool:
    """Log scale when the positive finite values span more than two decades and none is negative."""
    finite = [v for v in values if math.isfinite(v)]
    positive = [v for v in finite if v > 0]
    if not positive or any(v < 0 for v in finite):
        return False
    return max(positive) / min(positive) > 100


class _Axes:
    """Data -> pixel mapping of one plot area."""

    def __init__(self, x_range: tuple[float, float], y_values: list[float], log: bool, top: float, height: float,
                 width: int) -> None:
        self.x0, self.x1 = x_range
        self.first_step = self.x0  # no tick left of it: a single logged step does not label step -1
        if self.x1 <= self.x0:
            self.x0, self.x1 = self.x0 - 1, self.x1 + 1
        self.left, self.right, self.top, self.bottom = LEFT, width - RIGHT, top, top + height
        self.log = log
        if log:
            positive = [v for v in y_values if v > 0]
            low, high = math.floor(math.log10(min(positive))), math.ceil(math.log10(max(positive)))
            self.y0, self.y1 = low, max(high, low + 1)  # in decades
            stride = max(1, math.ceil((self.y1 - self.y0) / 6))
            self.y_ticks = [10.0 ** d for d in range(int(self.y0), int(self.y1) + 1, stride)]
        else:
            low, high = (min(y_values), max(y_values)) if y_values else (0.0, 1.0)
            if low >= 0 and low <= 0.5 * high:
                low = 0.0  # a quantity that goes to zero reads best from zero
            if high - low <= 1e-9 * max(abs(high), abs(low)):  # a constant: show it against zero
                low, high = (min(low, 0.0), max(high, 0.0)) if high != 0 else (0.0, 1.0)
                low, high = low * 1.25, high * 1.25
            step = nice_step(high - low, 5)
            self.y0, self.y1 = math.floor(low / step) * step, math.ceil(high / step) * step
            count = int(round((self.y1 - self.y0) / step))
            self.y_ticks = [self.y0 + i * step for i in range(count + 1)]

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.right - self.left)

    def py(self, y: float) -> float:
        if self.log:
            position = math.log10(y) if y > 0 else self.y0  # zero on a log axis: the bottom edge
        else:
            position = y
        return self.bottom - (position - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)

    def x_ticks(self) -> list[float]:
        step = max(1.0, nice_step(self.x1 - self.x0, 8, factors=(1, 2, 5, 10)))  # steps are integers
        first = math.ceil(self.first_step / step) * step
        return [first + i * step for i in range(int((self.x1 - first) / step) + 1)]


def _legend(entries: list[tuple[str, str, str]], width: int) -> tuple[list[str], float]:
    """SVG of the legend rows (entries: label, kind line|marker|dashed|band, colour) and their height."""
    parts, x, row = [], float(LEFT), 0
    for label, kind, color in entries:
        item = 26 + CHAR_WIDTH * len(label) + 14
        if x + item > width - RIGHT and x > LEFT:
            x, row = float(LEFT), row + 1
        y = 12 + row * LEGEND_ROW
        if kind == "band":
            parts.append(f'<rect x="{x:.1f}" y="{y - 6}" width="20" height="10" fill="{color}" fill-opacity="0.25"/>')
        elif kind in ("marker", "dashed"):
            dash = ' stroke-dasharray="3 2"' if kind == "dashed" else ""
            parts.append(f'<line x1="{x + 10:.1f}" y1="{y - 7}" x2="{x + 10:.1f}" y2="{y + 5}" stroke="{color}" '
                         f'stroke-width="2.5"{dash}/>')
        else:
            parts.append(f'<line x1="{x:.1f}" y1="{y - 1}" x2="{x + 20:.1f}" y2="{y - 1}" stroke="{color}" stroke-width="2.5"/>')
        parts.append(f'<text x="{x + 26:.1f}" y="{y + 3}" class="legend">{escape(label)}</text>')
        x += item
    return parts, (row + 1) * LEGEND_ROW if entries else 0


def _thin(points: list[tuple[float, float | None]], axes: _Axes) -> list[tuple[float, float | None]]:
    """At most a few points per pixel column: the first, last, lowest and highest finite ones (a spike
    survives), and every gap and non-finite value."""
    if len(points) <= 2 * (axes.right - axes.left):
        return points
    kept: list[tuple[float, float | None]] = []
    column: list[tuple[float, float | None]] = []

    def flush() -> None:
        finite = [p for p in column if p[1] is not None and math.isfinite(p[1])]
        keep = {id(p) for p in finite[:1] + finite[-1:]}
        if finite:
            keep |= {id(min(finite, key=lambda p: p[1])), id(max(finite, key=lambda p: p[1]))}
        kept.extend(p for p in column if id(p) in keep or p[1] is None or not math.isfinite(p[1]))

    current = None
    for point in points:
        pixel = int(axes.px(point[0]))
        if pixel != current and column:
            flush()
            column = []
        current = pixel
        column.append(point)
    flush()
    return kept


def _series_path(series: Series, axes: _Axes) -> str:
    commands, pen_down = [], False
    for x, y in _thin(list(series.points), axes):
        if y is None or not math.isfinite(y):
            pen_down = False
            continue
        point = f"{axes.px(x):.1f},{axes.py(y):.1f}"
        commands.append(f"L{point}" if pen_down else f"M{point} l0,0")  # l0,0: a lone point shows as a dot
        pen_down = True
    if not commands:
        return ""
    return (f'<path d="{" ".join(commands)}" fill="none" stroke="{series.color}" stroke-width="{series.width}" '
            f'stroke-linejoin="round" stroke-linecap="round"><title>{escape(series.name)}</title></path>')


def _nonfinite_marks(series: Sequence[Series], axes: _Axes) -> list[str]:
    parts, labelled = [], []
    for line in series:
        for x, y in line.points:
            if y is None or math.isfinite(y):
                continue
            px = axes.px(x)
            text = "NaN" if math.isnan(y) else ("Inf" if y > 0 else "-Inf")
            tip = escape(f"{line.name} = {text.lower()} at step {format_step(x)}")
            if text == "-Inf":
                edge, tip_y, label_y = axes.bottom, axes.bottom - 8, axes.bottom - 11
            else:
                edge, tip_y, label_y = axes.top, axes.top + 8, axes.top - 4
            parts.append(f'<polygon points="{px - 4:.1f},{edge:.1f} {px + 4:.1f},{edge:.1f} {px:.1f},{tip_y:.1f}" '
                         f'fill="{line.color}" stroke="#fff" stroke-width="0.5"><title>{tip}</title></polygon>')
            if all(abs(px - other) > 26 for other in labelled):  # one label per cluster
                labelled.append(px)
                parts.append(f'<text x="{px:.1f}" y="{label_y:.1f}" class="nonfinite" text-anchor="middle">{text}</text>')
    return parts


def _frame(axes: _Axes, y_label: str) -> list[str]:
    parts = []
    for value in axes.y_ticks:
        y = axes.py(value)
        parts.append(f'<line x1="{axes.left}" y1="{y:.1f}" x2="{axes.right}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{axes.left - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">'
                     f'{format_number(value)}</text>')
    for x in axes.x_ticks():
        px = axes.px(x)
        parts.append(f'<line x1="{px:.1f}" y1="{axes.bottom}" x2="{px:.1f}" y2="{axes.bottom + 4}" class="axis"/>')
        parts.append(f'<text x="{px:.1f}" y="{axes.bottom + 16}" class="tick" text-anchor="middle">{format_step(x)}</text>')
    parts.append(f'<rect x="{axes.left}" y="{axes.top:.1f}" width="{axes.right - axes.left}" '
                 f'height="{axes.bottom - axes.top:.1f}" class="frame"/>')
    parts.append(f'<text x="{axes.right}" y="{axes.bottom + 30}" class="tick" text-anchor="end">step</text>')
    if y_label:
        parts.append(f'<text x="14" y="{(axes.top + axes.bottom) / 2:.1f}" class="tick" text-anchor="middle" '
                     f'transform="rotate(-90 14 {(axes.top + axes.bottom) / 2:.1f})">{escape(y_label)}</text>')
    return parts


def _markers(markers: Sequence[Marker], axes: _Axes) -> list[str]:
    # Many incidents would hide the curves behind them: the more markers, the fainter each one.
    opacity = 0.8 if len(markers) <= 30 else max(0.3, 0.8 * 30 / len(markers))
    width = 1.5 if len(markers) <= 30 else 1.0
    parts = []
    for marker in markers:
        px = axes.px(marker.x)
        dash = ' stroke-dasharray="4 3"' if marker.dashed else ""
        parts.append(f'<line x1="{px:.1f}" y1="{axes.top:.1f}" x2="{px:.1f}" y2="{axes.bottom:.1f}" stroke="{marker.color}" '
                     f'stroke-width="{width}" stroke-opacity="{opacity:.2f}"{dash}><title>{escape(marker.title)}</title></line>')
    return parts


def _marker_legend(markers: Sequence[Marker]) -> list[tuple[str, str, str]]:
    groups: dict[str, tuple[str, str, str]] = {}
    for marker in markers:
        groups.setdefault(marker.group, (marker.group, "dashed" if marker.dashed else "marker", marker.color))
    return list(groups.values())


def _svg(parts: list[str], height: float, label: str, width: int) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height:.0f}" class="chart" role="img" '
            f'aria-label="{escape(label)}"><title>{escape(label)}</title>' + "".join(parts) + "</svg>")


def line_chart(series: Sequence[Series], *, markers: Sequence[Marker] = (), bands: Sequence[Band] = (),
               x_range: tuple[float, float] | None = None, log_y: bool | None = None, y_label: str = "",
               label: str = "chart", height: int = 300, width: int = WIDTH) -> str:
    """One chart: `series` as lines, `bands` shaded behind them, `markers` as vertical lines; returns `<svg>`."""
    values = [y for line in series for _, y in line.points if y is not None and math.isfinite(y)]
    values += [v for band in bands for _, low, high in band.points for v in (low, high) if math.isfinite(v)]
    log = choose_log(values) if log_y is None else (log_y and any(v > 0 for v in values))
    xs = [x for line in series for x, _ in line.points] + [m.x for m in markers]
    x_range = x_range or ((min(xs), max(xs)) if xs else (0.0, 1.0))
    entries = [(s.name, "line", s.color) for s in series] + [(b.name, "band", b.color) for b in bands]
    legend, legend_height = _legend(entries + _marker_legend(markers), width)
    top = legend_height + 18  # room for the NaN / Inf labels above the plot
    axes = _Axes(x_range, values, log, top, height - top - BOTTOM, width)
    parts = legend + _frame(axes, y_label + (" (log)" if log else ""))
    for band in bands:
        kept = [(x, lo, hi) for x, lo, hi in band.points if math.isfinite(lo) and math.isfinite(hi)]
        if kept:
            outline = [(axes.px(x), axes.py(hi)) for x, _, hi in kept] + [(axes.px(x), axes.py(lo)) for x, lo, _ in reversed(kept)]
            parts.append(f'<polygon points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in outline)}" fill="{band.color}" '
                         f'fill-opacity="0.18"><title>{escape(band.name)}</title></polygon>')
    parts += _markers(markers, axes)
    parts += [path for path in (_series_path(line, axes) for line in series) if path]
    parts += _nonfinite_marks(series, axes)
    if not values and not any(y is not None for line in series for _, y in line.points):
        parts.append(f'<text x="{(axes.left + axes.right) / 2}" y="{(axes.top + axes.bottom) / 2:.1f}" '
                     'class="empty" text-anchor="middle">no values logged</text>')
    return _svg(parts, height, label, width)


def strip_chart(markers: Sequence[Marker], *, x_range: tuple[float, float], label: str = "strip",
                width: int = WIDTH) -> str:
    """A one-row strip with a tick per marker (e.g. the skipped steps) on the shared step axis."""
    legend, legend_height = _legend(_marker_legend(markers), width)
    top = legend_height + 8
    axes = _Axes(x_range, [0.0, 1.0], False, top, 28, width)
    parts = legend + [f'<rect x="{axes.left}" y="{axes.top:.1f}" width="{axes.right - axes.left}" height="28" class="frame"/>']
    for x in axes.x_ticks():
        px = axes.px(x)
        parts.append(f'<text x="{px:.1f}" y="{axes.bottom + 16}" class="tick" text-anchor="middle">{format_step(x)}</text>')
    parts += _markers(markers, axes)
    if not markers:
        parts.append(f'<text x="{(axes.left + axes.right) / 2}" y="{axes.top + 18:.1f}" class="empty" '
                     'text-anchor="middle">none</text>')
    return _svg(parts, axes.bottom + 24, label, width)
