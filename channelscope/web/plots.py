"""Plots as geometry, drawn server-side: each function turns numbers from a page object into a
Chart (coordinates, colours, tooltips, links) that templates/_plots.html draws as inline SVG.
No JavaScript is needed to see them, and no markup is built in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from channelscope.web import pages

WIDTH, HEIGHT = 420, 180
LEFT, RIGHT, TOP, BOTTOM = 44, 10, 12, 30
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
GREY = "#9aa0a6"


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    fill: str
    title: str
    href: str | None = None
    text: str | None = None  # a label drawn inside the cell (heatmaps)
    ink: str = "#000"


@dataclass
class Series:
    points: str  # "x,y x,y ..."
    stroke: str
    title: str
    dashed: bool = False


@dataclass
class Rule:
    """A straight line across the plot with a label: a cut-off or a baseline."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str
    stroke: str = "#555"


@dataclass
class Chart:
    title: str
    description: str  # what an axis means and where the numbers come from (for screen readers too)
    width: int = WIDTH
    height: int = HEIGHT
    x_label: str = ""
    y_label: str = ""
    x_ticks: list[tuple[float, str]] = field(default_factory=list)
    y_ticks: list[tuple[float, str]] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    legend: list[tuple[str, str]] = field(default_factory=list)  # (colour, label)
    axes: bool = True
    row_labels: list[tuple[float, str]] = field(default_factory=list)  # heatmaps
    column_labels: list[tuple[float, str]] = field(default_factory=list)


class Scale:
    def __init__(self, lo: float, hi: float, out_lo: float, out_hi: float):
        if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
            lo, hi = (lo, lo + 1.0) if math.isfinite(lo) else (0.0, 1.0)
        self.lo, self.hi, self.out_lo, self.out_hi = lo, hi, out_lo, out_hi

    def __call__(self, v: float) -> float:
        v = min(max(v, self.lo), self.hi) if math.isfinite(v) else self.lo
        return round(self.out_lo + (v - self.lo) / (self.hi - self.lo) * (self.out_hi - self.out_lo), 2)

    def ticks(self, count: int = 5, fmt: str = "{:g}") -> list[tuple[float, str]]:
        step = _nice_step((self.hi - self.lo) / max(1, count))
        first = math.ceil(self.lo / step) * step
        out, v = [], first
        while v <= self.hi + 1e-9 and len(out) < 20:
            out.append((self(v), fmt.format(round(v, 10))))
            v += step
        return out


def _nice_step(raw: float) -> float:
    if raw <= 0 or not math.isfinite(raw):
        return 1.0
    power = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * power >= raw:
            return m * power
    return 10 * power


def _x_scale(lo, hi, width=WIDTH):
    return Scale(lo, hi, LEFT, width - RIGHT)


def _y_scale(lo, hi, height=HEIGHT):
    return Scale(lo, hi, height - BOTTOM, TOP)


def _points(xs, ys, sx: Scale, sy: Scale) -> str:
    """A polyline's points, scaled with numpy (a neuron page draws hundreds of them)."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    px = sx.out_lo + (np.clip(x, sx.lo, sx.hi) - sx.lo) / (sx.hi - sx.lo) * (sx.out_hi - sx.out_lo)
    py = sy.out_lo + (np.clip(y, sy.lo, sy.hi) - sy.lo) / (sy.hi - sy.lo) * (sy.out_hi - sy.out_lo)
    return " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px.tolist(), py.tolist(), strict=True))


def histogram(hist: pages.Histogram, title: str, marks: list[tuple[float, str]] | None = None) -> Chart:
    """Counts of z-scores on a log scale: the tails, where a channel's tokens are, stay visible
    beside a bulk of tens of thousands of tokens."""
    chart = Chart(
        title=title,
        description=f"z-scores of the projection over {hist.scored_tokens:,} scored tokens; "
        "counts on a log scale",
        x_label="z-score",
        y_label="tokens (log)",
    )
    if not hist.bins:
        return chart
    sx = _x_scale(hist.bins[0].low, hist.bins[-1].high)
    top = max(1.0, math.log10(max(b.count for b in hist.bins) + 1))
    sy = _y_scale(0, top)
    for b in hist.bins:
        if b.count == 0:
            continue
        y = sy(math.log10(b.count + 1))
        chart.bars.append(
            Bar(
                x=sx(b.low),
                y=y,
                width=max(0.8, sx(b.high) - sx(b.low) - 0.3),
                height=round(sy.out_lo - y, 2),
                fill="#4a78b0",
                title=f"z {b.low:.1f} to {b.high:.1f}: {b.count:,} tokens",
            )
        )
    chart.x_ticks = sx.ticks(6)
    chart.y_ticks = [(sy(math.log10(10**k + 1)), f"{10**k:,}") for k in range(int(top) + 1)]
    for z, label in marks or []:
        chart.rules.append(Rule(sx(z), sy.out_lo, sx(z), TOP, label, "#d62728"))
    return chart


def density(d: pages.Density, threshold: float | None) -> Chart:
    """One signal's values over every corpus position, counts on a log scale (the rare large
    values are what the top contexts show); the activation's threshold marked."""
    step = (d.high - d.low) / max(1, len(d.counts))
    hist = pages.Histogram(
        scored_tokens=sum(d.counts),
        bins=[
            pages.HistogramBin(low=d.low + i * step, high=d.low + (i + 1) * step, count=c)
            for i, c in enumerate(d.counts)
        ],
    )
    # "Active" is |activation| above the threshold: both edges are marked.
    marks = [] if threshold is None else [(-threshold, "-90th pct |a|"), (threshold, "90th pct |a|")]
    chart = histogram(hist, f"Density: {d.signal}", marks)
    chart.description = (
        f"{d.meaning}, at every position of the corpus; counts on a log scale, values beyond the "
        "axis in the end bins"
    )
    chart.x_label, chart.y_label = d.signal, "positions (log)"
    for bar in chart.bars:
        bar.title = bar.title.replace("z ", f"{d.signal} ", 1).replace(" tokens", " positions")
    if threshold is not None:
        chart.legend = [
            ("#d62728", f"the 90th percentile of |activation|, {threshold:.3g}: active beyond \u00b1 it")
        ]
    return chart


STAGE = "#7f7f7f"


def kurtosis_curves(
    channels: list[pages.ChannelOut], step_size: int, unit: str, stage_change: int | None = None
) -> Chart:
    """Each channel's unweighted excess kurtosis against optimisation step. stage_change: the
    fast solver's switch from AdamW exploration to descent on the sphere (rotate.fast_channel),
    where the curves kink."""
    description = f"each channel's excess kurtosis of its unweighted projection, recorded every {unit}"
    if stage_change is not None:
        description += (
            f"; the dashed line at {unit} {stage_change} is where the fast solver stops exploring "
            "with AdamW and descends on the sphere |c| = |w|, so the curves bend there"
        )
    chart = Chart(
        title="Kurtosis during optimisation",
        description=description,
        x_label=unit,
        y_label="excess kurtosis",
        legend=[
            (GREY if ch.generic else PALETTE[ch.index % len(PALETTE)], f"channel {ch.index}")
            for ch in channels
        ],
    )
    if stage_change is not None:
        chart.legend.append((STAGE, f"solver stage change ({unit} {stage_change})"))
    longest = max((len(ch.history) for ch in channels), default=0)
    values = [v for ch in channels for v in ch.history if math.isfinite(v)]
    if not longest or not values:
        return chart
    sx = _x_scale(0, max(1, (longest - 1) * step_size))
    sy = _y_scale(min(0.0, min(values)), max(values) * 1.05)
    for ch in channels:
        colour = GREY if ch.generic else PALETTE[ch.index % len(PALETTE)]
        xs = [i * step_size for i in range(len(ch.history))]
        chart.series.append(
            Series(
                _points(xs, ch.history, sx, sy),
                colour,
                f"channel {ch.index}: kurtosis {ch.kurtosis:.1f} at step {ch.step}",
                ch.generic,
            )
        )
    chart.x_ticks, chart.y_ticks = sx.ticks(6), sy.ticks(4)
    if stage_change is not None and 0 < stage_change < (longest - 1) * step_size:
        chart.rules.append(Rule(sx(stage_change), sy.out_lo, sx(stage_change), TOP, "", STAGE))
    return chart


def kurtosis_by_index(channels: list[pages.ChannelOut], min_kurtosis: float, urls: dict[int, str]) -> Chart:
    """Kurtosis against channel index with the junk cut-off (min_kurtosis) drawn across."""
    chart = Chart(
        title="Kurtosis by channel",
        description=f"channels in discovery order; the line is the cut-off min_kurtosis = {min_kurtosis:g}",
        x_label="channel",
        y_label="excess kurtosis",
        legend=[
            (PALETTE[0], "above cut-off"),
            ("#c8d3e0", "below"),
            (GREY, "generic"),
            ("#555", f"dashed line: min_kurtosis {min_kurtosis:g}"),
        ],
    )
    if not channels:
        return chart
    n = len(channels)
    sx = _x_scale(-0.5, n - 0.5)
    top = max([ch.kurtosis for ch in channels] + [min_kurtosis]) * 1.08
    sy = _y_scale(min(0.0, min(ch.kurtosis for ch in channels)), top)
    width = max(1.0, (sx(1) - sx(0)) * 0.8)
    for ch in channels:
        y = sy(max(ch.kurtosis, 0.0))
        fill = GREY if ch.generic else PALETTE[0] if ch.kurtosis >= min_kurtosis else "#c8d3e0"
        note = " (generic)" if ch.generic else "" if ch.kurtosis >= min_kurtosis else " (below cut-off)"
        chart.bars.append(
            Bar(
                x=round(sx(ch.index) - width / 2, 2),
                y=y,
                width=round(width, 2),
                height=round(sy(0) - y, 2),
                fill=fill,
                title=f"channel {ch.index}: kurtosis {ch.kurtosis:.1f}{note}",
                href=urls.get(ch.index),
            )
        )
    # Named in the legend, not on the line: a label there sat on top of the bars.
    chart.rules.append(Rule(LEFT, sy(min_kurtosis), WIDTH - RIGHT, sy(min_kurtosis), ""))
    step = max(1, math.ceil(n / 10))
    chart.x_ticks = [(sx(i), str(i)) for i in range(0, n, step)]
    chart.y_ticks = sy.ticks(4)
    return chart


def reconstruction(side: pages.NeuronSideOut) -> Chart:
    """|P_k w| / |w| against k, beside random vectors at the same cosines: 50 random vectors
    already reach 0.99, so the curve alone proves nothing (docs/method.md, "Reconstruction and
    coverage")."""
    chart = Chart(
        title="Reconstruction",
        description="|P_k w| / |w| for the first k channels, beside random vectors at the same cosines to w, "
        "and the share of the neuron's vocabulary mass on tokens the channels claimed",
        x_label="channels k",
        y_label="share",
        legend=[(PALETTE[0], "channels"), (GREY, "random baseline"), (PALETTE[2], "vocabulary coverage")],
    )
    n = len(side.reconstruction)
    if not n:
        return chart
    sx = _x_scale(1, max(2, n))
    sy = _y_scale(0, 1)
    ks = list(range(1, n + 1))
    chart.series.append(Series(_points(ks, side.reconstruction, sx, sy), PALETTE[0], "channels"))
    if len(side.reconstruction_baseline) == n:
        chart.series.append(
            Series(_points(ks, side.reconstruction_baseline, sx, sy), GREY, "random baseline", True)
        )
    if len(side.coverage) == n:
        chart.series.append(Series(_points(ks, side.coverage, sx, sy), PALETTE[2], "vocabulary coverage"))
    chart.x_ticks = [(sx(k), str(k)) for k in range(1, n + 1, max(1, math.ceil(n / 10)))]
    chart.y_ticks = sy.ticks(4)
    return chart


def _diverging(v: float) -> tuple[str, str]:
    """Blue (-1) through white (0) to red (+1); dark cells get white ink."""
    v = max(-1.0, min(1.0, v if math.isfinite(v) else 0.0))
    a = abs(v)
    r, g, b = (
        (255, round(255 * (1 - a)), round(255 * (1 - a)))
        if v >= 0
        else (
            round(255 * (1 - a)),
            round(255 * (1 - a * 0.6)),
            255,
        )
    )
    return f"#{r:02x}{g:02x}{b:02x}", "#fff" if a > 0.6 else "#000"


def _sequential(v: float, lo: float, hi: float) -> tuple[str, str]:
    """White to dark blue."""
    t = 0.0 if hi <= lo or not math.isfinite(v) else max(0.0, min(1.0, (v - lo) / (hi - lo)))
    r, g, b = round(255 - 225 * t), round(255 - 170 * t), round(255 - 75 * t)
    return f"#{r:02x}{g:02x}{b:02x}", "#fff" if t > 0.55 else "#000"


def cosine_heatmap(cosines: list[list[float]]) -> Chart:
    """The cells below the diagonal: the matrix is symmetric and its diagonal is 1, so the rest
    would say everything twice (and cost a neuron page of C = 50 channels 2,500 cells)."""
    n = len(cosines)
    rows = max(1, n - 1)
    cell = max(8, min(28, 360 // rows))
    chart = Chart(
        title="Channel x channel cosine",
        description="cos between channel vectors (row i, column j < i); each channel is a reflection of "
        "the same w, so a shared component along w lifts every cell",
        width=LEFT + cell * rows + RIGHT,
        height=TOP + cell * rows + BOTTOM,
        axes=False,
    )
    for i in range(1, n):
        for j in range(i):
            v = cosines[i][j]
            fill, ink = _diverging(v)
            chart.bars.append(
                Bar(
                    x=LEFT + j * cell,
                    y=TOP + (i - 1) * cell,
                    width=cell,
                    height=cell,
                    fill=fill,
                    title=f"channels {i} and {j}: cos {v:.2f}",
                    text=f"{v:.1f}".replace("0.", ".") if cell >= 22 else None,
                    ink=ink,
                )
            )
    chart.legend = [
        (_diverging(v)[0], name)
        for v, name in ((-1.0, "opposite"), (0.0, "orthogonal"), (1.0, "same direction"))
    ]
    step = max(1, math.ceil(rows / 12))
    chart.row_labels = [(TOP + (i - 1) * cell + cell / 2, str(i)) for i in range(1, n, step)]
    chart.column_labels = [(LEFT + j * cell + cell / 2, str(j)) for j in range(0, n - 1, step)]
    return chart


def layer_side_heatmap(
    cells: list[pages.LayerSideCell], n_layers: int, sides: list[str], metric: str
) -> Chart:
    """One row per layer, one column per side, each cell a link to that layer side's table."""
    label = {"mean_kurtosis": "mean neuron kurtosis", "mean_channels": "channels above the cut-off"}[metric]
    cell_w, cell_h = 64, max(10, min(18, 540 // max(1, n_layers)))
    chart = Chart(
        title=label.capitalize(),
        description=f"{label} per layer and side; empty cells have no computed neurons yet",
        width=LEFT + cell_w * len(sides) + RIGHT,
        height=TOP + 14 + cell_h * n_layers + 8,
        axes=False,
    )
    values = [getattr(c, metric) for c in cells if getattr(c, metric) is not None]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    chart.legend = [
        (_sequential(lo, lo, hi)[0], f"lowest, {lo:.1f}"),
        (_sequential((lo + hi) / 2, lo, hi)[0], "→"),
        (_sequential(hi, lo, hi)[0], f"highest, {hi:.1f}"),
        ("#f1f1f1", "not computed"),
    ]
    by_key = {(c.layer, c.side): c for c in cells}
    for layer in range(n_layers):
        for j, side in enumerate(sides):
            c = by_key.get((layer, side))
            x, y = LEFT + j * cell_w, TOP + 14 + layer * cell_h
            if c is None or getattr(c, metric) is None:
                chart.bars.append(
                    Bar(x, y, cell_w - 1, cell_h - 1, "#f1f1f1", f"layer {layer} {side}: not computed")
                )
                continue
            value = getattr(c, metric)
            over = c.vectors if metric == "mean_kurtosis" else c.neurons
            fill, ink = _sequential(value, lo, hi)
            chart.bars.append(
                Bar(
                    x,
                    y,
                    cell_w - 1,
                    cell_h - 1,
                    fill,
                    f"layer {layer} {side}: {label} {value:.1f} over {over:,} neurons",
                    c.url,
                    f"{value:.1f}" if cell_h >= 12 else None,
                    ink,
                )
            )
    chart.row_labels = [(TOP + 14 + i * cell_h + cell_h / 2, str(i)) for i in range(n_layers)]
    chart.column_labels = [(LEFT + j * cell_w + cell_w / 2, s) for j, s in enumerate(sides)]
    return chart
