"""Plotly figures of the web pages, built from plain data.

Every builder here is a pure function: numbers, strings and small dataclasses in, a
:class:`plotly.graph_objects.Figure` out; nothing reads a database, a study or a file. The service
turns Optuna trials and certificate radii into these inputs (``service/routers/pages.py``) and the
pages draw the result with ``Plotly.react``. When there is nothing to draw, a builder returns
:func:`empty_figure` with a sentence saying why, so a new, failed or one-trial study still renders.

Traces that the pages and tests look up carry ``meta={"role": ...}``: ``"family"`` (all trials
of one loss family), ``"front"`` (the Pareto front, joined in order of x), ``"meeting"`` (trials
that meet the requirement filters) and ``"recommended"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import plotly.graph_objects as go

#: One colour per loss family, stable across pages (colour-blind safe, after Okabe and Ito).
FAMILY_COLORS: dict[str, str] = {
    "hkr": "#0072B2",
    "soft_hkr": "#CC79A7",
    "tau_ce": "#E69F00",
    "offset_ce": "#B8A000",  # Okabe-Ito yellow, darkened to read on white
    "hinge": "#009E73",
    "kr": "#D55E00",
    "cosine": "#56B4E9",
}
#: Colour of a family this module does not know (a newer worker's loss, say).
OTHER_COLOR = "#6B7280"
#: Colours of the curves that are not one per family.
ACCENT_COLOR = "#111827"
MEETING_COLOR = "#16A34A"
RECOMMENDED_COLOR = "#F59E0B"
#: Line styles that tell apart the curves of one loss family.
DASHES = ("solid", "dash", "dot", "dashdot", "longdash")

#: Metrics that are fractions in [0, 1].
FRACTION_METRICS = ("accuracy", "certified_accuracy", "empirical_robust_accuracy")
#: How the pages name the loss hyper-parameters (the guidelines write alpha_KR).
PARAM_LABELS = {"margin": "margin", "alpha_kr": "alpha_KR", "temperature": "temperature"}
FONT_FAMILY = 'system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif'


def family_color(family: str) -> str:
    """The colour of a loss family's markers and curves."""
    return FAMILY_COLORS.get(family, OTHER_COLOR)


def metric_label(key: str) -> str:
    """A readable axis title for a metric key, e.g. ``certified_accuracy_eps_0.3`` ->
    ``certified accuracy (eps = 0.3)``."""
    name, _, eps = key.partition("_eps_")
    label = name.replace("_", " ")
    if name == "training_time":
        label += " (s)"
    return f"{label} (eps = {eps})" if eps else label


def format_value(value: object) -> str:
    """A short, readable rendering of a parameter or metric value for hover texts."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return "∞" if value == "Infinity" else value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float):
        number = float(value)
        if math.isinf(number):
            return "∞" if number > 0 else "-∞"
        if math.isnan(number):
            return "—"
        return f"{number:.4g}"
    return str(value)


# --------------------------------------------------------------------------- common pieces


def _layout(
    title: str | None, x_title: str | None = None, y_title: str | None = None
) -> dict[str, object]:
    return {
        "template": "plotly_white",
        "title": {"text": title or "", "x": 0.0, "xanchor": "left", "font": {"size": 15}},
        "font": {"family": FONT_FAMILY, "size": 12, "color": "#1F2937"},
        "margin": {"l": 60, "r": 24, "t": 48 if title else 24, "b": 52},
        "xaxis": {"title": {"text": x_title or ""}, "zeroline": False},
        "yaxis": {"title": {"text": y_title or ""}, "zeroline": False},
        "legend": {"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1},
        "hoverlabel": {"font": {"family": FONT_FAMILY}},
    }


def empty_figure(message: str, *, title: str | None = None) -> go.Figure:
    """A figure with no data that says why: ``message`` centred where the plot would be.

    ``layout.meta["empty"]`` holds the message so that pages and tests can tell it apart.
    """
    layout = _layout(title)
    layout["xaxis"] = {"visible": False}
    layout["yaxis"] = {"visible": False}
    layout["meta"] = {"empty": message}
    layout["annotations"] = [
        {
            "text": message,
            "xref": "paper",
            "yref": "paper",
            "x": 0.5,
            "y": 0.5,
            "showarrow": False,
            "font": {"size": 14, "color": "#6B7280"},
        }
    ]
    return go.Figure(layout=layout)


def is_empty(figure: go.Figure) -> bool:
    """Whether ``figure`` came from :func:`empty_figure`."""
    meta = figure.layout.meta
    return isinstance(meta, Mapping) and "empty" in meta


# --------------------------------------------------------------------------- trade-off


@dataclass(frozen=True)
class TrialPoint:
    """One completed trial placed in the trade-off plane.

    ``x`` and ``y`` are its two plotted objectives; ``values`` every metric shown on hover
    (objective key -> value); ``params`` its loss hyper-parameters (``inf`` may be the string
    ``"Infinity"``, as the JSON API writes it).
    """

    number: int
    family: str
    x: float
    y: float
    params: Mapping[str, object] = field(default_factory=dict)
    values: Mapping[str, float] = field(default_factory=dict)
    feasible: bool | None = None
    pruned_at_epoch: int | None = None


#: Pruned trials: drawn behind the others, greyed.
PRUNED_COLOR = "#9ca3af"


def _hover_text(point: TrialPoint) -> str:
    lines = [f"<b>trial #{point.number}</b> · {point.family}"]
    lines += [f"{label}: {format_value(point.params.get(p))}" for p, label in PARAM_LABELS.items()]
    lines += [f"{metric_label(key)}: {format_value(v)}" for key, v in point.values.items()]
    if point.feasible is False:
        lines.append("<i>does not meet the study's requirements</i>")
    if point.pruned_at_epoch is not None:
        lines.append(f"<i>pruned after epoch {point.pruned_at_epoch} (validation values)</i>")
    return "<br>".join(lines)


def _marker_symbol(point: TrialPoint) -> str:
    return "x" if point.feasible is False else "circle"


def pareto_figure(
    points: Sequence[TrialPoint],
    front: Iterable[int],
    *,
    x_key: str,
    y_key: str,
    meeting: Iterable[int] = (),
    recommended: int | None = None,
    title: str | None = None,
    pruned: Sequence[TrialPoint] = (),
) -> go.Figure:
    """Every trial in the (``x_key``, ``y_key``) plane, the Pareto front highlighted and joined.

    Args:
        points: the completed trials, one marker each, coloured by loss family (one trace per
            family, in :data:`FAMILY_COLORS` order; infeasible trials drawn as crosses).
        front: numbers of the trials on the front; drawn again, larger and outlined, joined by
            a line in increasing x (role ``"front"``).
        x_key, y_key: the metric keys of the axes, for their titles.
        meeting: numbers of the trials that meet the page's requirement filters, ringed in
            green (role ``"meeting"``; no trace when empty).
        recommended: the recommended trial's number, a star (role ``"recommended"``).
        pruned: trials the pruner stopped, at the validation values they reached, greyed and
            labelled with their epoch (role ``"pruned"``; never on the front).
    """
    x_title, y_title = metric_label(x_key), metric_label(y_key)
    if not points and not pruned:
        return empty_figure(
            "No completed trial yet: trials appear here as they finish.", title=title
        )

    by_number = {point.number: point for point in points}
    families = sorted({p.family for p in points}, key=_family_order)
    traces: list[go.Scatter] = []
    if pruned:
        traces.append(
            go.Scatter(
                x=[p.x for p in pruned],
                y=[p.y for p in pruned],
                mode="markers+text",
                name="pruned",
                meta={"role": "pruned"},
                customdata=[p.number for p in pruned],
                text=[f"e{p.pruned_at_epoch}" for p in pruned],
                textposition="top center",
                textfont={"color": PRUNED_COLOR, "size": 9},
                hovertext=[_hover_text(p) for p in pruned],
                hovertemplate="%{hovertext}<extra>pruned</extra>",
                marker={"color": PRUNED_COLOR, "size": 7, "opacity": 0.6, "symbol": "circle"},
            )
        )
    for family in families:
        members = [p for p in points if p.family == family]
        traces.append(
            go.Scatter(
                x=[p.x for p in members],
                y=[p.y for p in members],
                mode="markers",
                name=family,
                legendgroup=family,
                meta={"role": "family", "family": family},
                customdata=[p.number for p in members],
                text=[_hover_text(p) for p in members],
                hovertemplate="%{text}<extra></extra>",
                marker={
                    "color": family_color(family),
                    "size": 9,
                    "opacity": 0.55,
                    "symbol": [_marker_symbol(p) for p in members],
                    "line": {"width": 0},
                },
            )
        )

    front_points = sorted(
        (by_number[n] for n in set(front) if n in by_number), key=lambda p: (p.x, -p.y)
    )
    traces.append(
        go.Scatter(
            x=[p.x for p in front_points],
            y=[p.y for p in front_points],
            mode="lines+markers",
            name="Pareto front",
            meta={"role": "front"},
            customdata=[p.number for p in front_points],
            text=[_hover_text(p) for p in front_points],
            hovertemplate="%{text}<extra>front</extra>",
            line={"color": ACCENT_COLOR, "width": 1.5, "shape": "linear"},
            marker={
                "color": [family_color(p.family) for p in front_points],
                "size": 13,
                "symbol": [_marker_symbol(p) for p in front_points],
                "line": {"color": ACCENT_COLOR, "width": 2},
            },
        )
    )

    meeting_points = [by_number[n] for n in sorted(set(meeting)) if n in by_number]
    if meeting_points:
        traces.append(
            go.Scatter(
                x=[p.x for p in meeting_points],
                y=[p.y for p in meeting_points],
                mode="markers",
                name="meets the requirements",
                meta={"role": "meeting"},
                customdata=[p.number for p in meeting_points],
                hoverinfo="skip",
                marker={
                    "symbol": "circle-open",
                    "size": 21,
                    "color": MEETING_COLOR,
                    "line": {"width": 2.5},
                },
            )
        )
    if recommended is not None and recommended in by_number:
        best = by_number[recommended]
        traces.append(
            go.Scatter(
                x=[best.x],
                y=[best.y],
                mode="markers",
                name=f"recommended (#{best.number})",
                meta={"role": "recommended"},
                customdata=[best.number],
                text=[_hover_text(best)],
                hovertemplate="%{text}<extra>recommended</extra>",
                marker={
                    "symbol": "star",
                    "size": 22,
                    "color": RECOMMENDED_COLOR,
                    "line": {"color": ACCENT_COLOR, "width": 1},
                },
            )
        )

    layout = _layout(title, x_title, y_title)
    for axis, key, values in (
        ("xaxis", x_key, [p.x for p in (*points, *pruned)]),
        ("yaxis", y_key, [p.y for p in (*points, *pruned)]),
    ):
        if len(set(values)) == 1 and key.partition("_eps_")[0] in FRACTION_METRICS:
            layout[axis] = {**layout[axis], "range": [0, 1.02]}  # one value: show it on [0, 1]
    layout["meta"] = {
        "front": [p.number for p in front_points],
        "meeting": [p.number for p in meeting_points],
        "recommended": recommended if recommended in by_number else None,
        "pruned": [p.number for p in pruned],
    }
    layout["hovermode"] = "closest"
    return go.Figure(data=traces, layout=layout)


def _family_order(family: str) -> tuple[int, str]:
    order = list(FAMILY_COLORS)
    return (order.index(family) if family in order else len(order), family)


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class AccuracyCurve:
    """Certified accuracy of one trial as a function of eps (``eps`` and
    ``certified_accuracy`` have the same length)."""

    number: int
    family: str
    eps: Sequence[float]
    certified_accuracy: Sequence[float]


def certified_accuracy_curves_figure(
    curves: Sequence[AccuracyCurve],
    *,
    eps: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """One curve per trial, certified accuracy against eps, coloured by loss family; a dashed
    vertical line marks the selected ``eps``. These are the curves the guidelines read to choose
    a model: where they cross says which trial wins at which robustness level."""
    if not curves:
        return empty_figure("No trial on the front has stored certificate radii yet.", title=title)
    # Curves of one family share its colour; their rank within it picks the dash.
    ranks: list[int] = []
    per_family: dict[str, int] = {}
    for curve in curves:
        ranks.append(per_family.get(curve.family, 0))
        per_family[curve.family] = ranks[-1] + 1
    traces = [
        go.Scatter(
            x=list(curve.eps),
            y=list(curve.certified_accuracy),
            mode="lines",
            name=f"#{curve.number} {curve.family}",
            meta={"role": "curve", "trial": curve.number},
            line={
                "color": family_color(curve.family),
                "width": 2,
                "dash": DASHES[rank % len(DASHES)],
            },
            hovertemplate=(
                f"trial #{curve.number}<br>eps %{{x:.3g}}<br>certified accuracy %{{y:.3f}}"
                "<extra></extra>"
            ),
        )
        for curve, rank in zip(curves, ranks, strict=True)
    ]
    layout = _layout(title, "eps (L2 radius)", "certified accuracy")
    layout["yaxis"] = {**layout["yaxis"], "range": [0, 1.02]}
    layout["hovermode"] = "closest"
    figure = go.Figure(data=traces, layout=layout)
    if eps is not None:
        figure.add_vline(
            x=eps,
            line={"dash": "dash", "color": ACCENT_COLOR, "width": 1},
            annotation_text=f"eps = {eps:g}",
            annotation_position="top right",
        )
    return figure


def radii_histogram_figure(
    radii: Sequence[float],
    n: int,
    *,
    eps: Sequence[float] = (),
    title: str | None = None,
) -> go.Figure:
    """The distribution of certificate radii of one trial's test points.

    Args:
        radii: radii of the correctly classified points (a misclassified point has no
            certificate); shape (k,), k <= n.
        n: number of test points.
        eps: radii to mark with dashed lines (the study's reporting eps), each labelled with
            the certified accuracy there, ``#{radius > eps} / n``.
    """
    if n == 0:
        return empty_figure("This trial stored no certificate radii.", title=title)
    radii = [float(r) for r in radii]
    misclassified = n - len(radii)
    histogram = go.Histogram(
        x=radii,
        name="correctly classified",
        meta={"role": "radii"},
        marker={"color": FAMILY_COLORS["hkr"], "line": {"color": "#FFFFFF", "width": 0.5}},
        nbinsx=min(60, max(10, len(radii) // 20)),
        hovertemplate="radius %{x}<br>%{y} points<extra></extra>",
    )
    layout = _layout(title, "certificate radius (L2)", "test points")
    layout["bargap"] = 0.02
    layout["showlegend"] = False
    layout["margin"] = {**layout["margin"], "t": 40}
    layout["annotations"] = [
        {
            "text": f"{len(radii)} of {n} test points correctly classified; "
            f"{misclassified} misclassified (no certificate)",
            "xref": "paper",
            "yref": "paper",
            "x": 1,
            "y": 1.0,
            "xanchor": "right",
            "yanchor": "bottom",
            "showarrow": False,
            "font": {"size": 12, "color": "#4B5563"},
        }
    ]
    figure = go.Figure(data=[histogram], layout=layout)
    for value in eps:  # labels run along their lines: nearby eps stay readable
        certified = sum(r > value for r in radii) / n
        figure.add_vline(
            x=value,
            line={"dash": "dash", "color": ACCENT_COLOR, "width": 1},
            annotation_text=f"eps {value:g}: {certified:.1%}",
            annotation_position="top right",
            annotation_textangle=-90,
            annotation_yanchor="top",
            annotation_font_size=11,
        )
    return figure


# --------------------------------------------------------------------------- attack check

#: Colour of the attacked points whose certificate the attack broke.
VIOLATION_COLOR = "#DC2626"


def certificate_tightness_figure(
    pairs: Sequence[tuple[float, float | None]],
    *,
    tightness: Mapping[str, float | None] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Certified radius against the adversarial distance a minimal-norm attack found, one marker
    per attacked test point, with the diagonal y = x.

    A sound certificate lies on or below the diagonal (radius <= distance); a point above it
    (role ``"violation"``, red) is a broken certificate. Points where the attack found no
    adversarial example (distance ``None``) cannot be placed and are counted in the annotation.

    Args:
        pairs: ``(certified radius, adversarial distance)`` per attacked point.
        tightness: ``tightness_median``/``_p10``/``_p90`` of radius / distance, shown in the
            annotation when given.
    """
    if not pairs:
        return empty_figure(
            "No attack check is stored for this trial (it runs on completed trials).", title=title
        )
    found = [(float(r), float(d)) for r, d in pairs if d is not None]
    missed = len(pairs) - len(found)
    sound = [(r, d) for r, d in found if d >= r]
    broken = [(r, d) for r, d in found if d < r]
    upper = max([0.0, *(max(r, d) for r, d in found)]) * 1.05 or 1.0
    hover = "adversarial distance %{x:.4f}<br>certified radius %{y:.4f}<extra></extra>"
    data = [
        go.Scatter(
            x=[0.0, upper],
            y=[0.0, upper],
            mode="lines",
            name="radius = distance",
            meta={"role": "diagonal"},
            line={"color": ACCENT_COLOR, "dash": "dash", "width": 1},
            hoverinfo="skip",
        ),
        go.Scatter(
            x=[d for _, d in sound],
            y=[r for r, _ in sound],
            mode="markers",
            name="certificate holds",
            meta={"role": "attacked"},
            marker={"color": FAMILY_COLORS["hkr"], "size": 7, "opacity": 0.8},
            hovertemplate=hover,
        ),
    ]
    if broken:
        data.append(
            go.Scatter(
                x=[d for _, d in broken],
                y=[r for r, _ in broken],
                mode="markers",
                name="certificate broken",
                meta={"role": "violation"},
                marker={"color": VIOLATION_COLOR, "size": 10, "symbol": "x"},
                hovertemplate=hover,
            )
        )
    layout = _layout(title, "adversarial distance (L2, minimal-norm attack)", "certified radius")
    layout["xaxis"] = {**layout["xaxis"], "range": [0.0, upper]}
    layout["yaxis"] = {**layout["yaxis"], "range": [0.0, upper]}
    words = [f"{len(pairs)} attacked points", f"{len(broken)} broken"]
    if missed:
        words.append(f"{missed} not drawn (no adversarial example found)")
    quantiles = [
        f"{name} {tightness[key]:.3f}"
        for name, key in (
            ("p10", "tightness_p10"),
            ("median", "tightness_median"),
            ("p90", "tightness_p90"),
        )
        if tightness and tightness.get(key) is not None
    ]
    text = "; ".join(words)
    if quantiles:
        text += "<br>radius / distance: " + ", ".join(quantiles)
    layout["meta"] = {"points": len(pairs), "violations": len(broken), "missed": missed}
    layout["annotations"] = [
        {
            "text": text,
            "xref": "paper",
            "yref": "paper",
            "x": 0,
            "y": 1.0,
            "xanchor": "left",
            "yanchor": "bottom",
            "showarrow": False,
            "font": {"size": 12, "color": VIOLATION_COLOR if broken else "#4B5563"},
        }
    ]
    # the counts above the plot, the legend under it
    layout["margin"] = {**layout["margin"], "t": 64, "b": 96}
    layout["legend"] = {"orientation": "h", "x": 0, "xanchor": "left", "y": -0.2, "yanchor": "top"}
    return go.Figure(data=data, layout=layout)


# --------------------------------------------------------------------------- training


def training_curves_figure(
    epochs: Sequence[Mapping[str, float]], *, title: str | None = None
) -> go.Figure:
    """Per-epoch curves of one trial: the training loss on the right axis, validation accuracy
    and every ``val_certified_accuracy_eps_*`` on the left (0 to 1).

    ``epochs`` is the trial's ``liptune.epochs`` user attribute: a list of dicts with ``epoch``,
    ``train_loss``, ``val_accuracy``, ``val_certified_accuracy_eps_X``... and ``seconds``.
    """
    if not epochs:
        return empty_figure("This trial recorded no epoch yet.", title=title)
    x = [row.get("epoch", index + 1) for index, row in enumerate(epochs)]
    accuracy_keys = sorted(
        {k for row in epochs for k in row if k.startswith("val_") and "accuracy" in k},
        key=_accuracy_key_order,
    )
    traces: list[go.Scatter] = []
    palette = ["#111827", "#0072B2", "#009E73", "#E69F00", "#CC79A7", "#D55E00", "#56B4E9"]
    for index, key in enumerate(accuracy_keys):
        traces.append(
            go.Scatter(
                x=x,
                y=[row.get(key) for row in epochs],
                mode="lines+markers",
                name=metric_label(key.removeprefix("val_")),
                meta={"role": "accuracy", "key": key},
                line={"color": palette[index % len(palette)], "width": 2},
                marker={"size": 5},
            )
        )
    if any("train_loss" in row for row in epochs):
        traces.append(
            go.Scatter(
                x=x,
                y=[row.get("train_loss") for row in epochs],
                mode="lines",
                name="training loss",
                meta={"role": "loss"},
                yaxis="y2",
                line={"color": "#9CA3AF", "width": 2, "dash": "dot"},
            )
        )
    layout = _layout(title, "epoch", "validation accuracy")
    layout["yaxis"] = {**layout["yaxis"], "range": [0, 1.02]}
    layout["yaxis2"] = {
        "title": {"text": "training loss"},
        "overlaying": "y",
        "side": "right",
        "showgrid": False,
        "zeroline": False,
    }
    layout["margin"] = {**layout["margin"], "r": 64}
    layout["hovermode"] = "x unified"
    return go.Figure(data=traces, layout=layout)


def _accuracy_key_order(key: str) -> tuple[int, float]:
    _, _, eps = key.partition("_eps_")
    try:
        return (1, float(eps)) if eps else (0, 0.0)
    except ValueError:
        return (2, 0.0)
