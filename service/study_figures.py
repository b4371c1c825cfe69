"""Optuna's own Plotly figures of a study, made safe for the pages.

The hypervolume history, the parameter importances and the parallel coordinates are Optuna's
(``optuna.visualization``); this module only chooses their arguments for liptune's studies
(one figure per objective where Optuna needs a target, objective keys as names), restyles them
like the rest of the pages, and turns the cases Optuna cannot plot (too few trials, one
objective, a parameter that never varies) into :func:`dashboards.figures.empty_figure` with the
reason, instead of an exception or a blank plot.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import optuna
import plotly.graph_objects as go
from optuna.trial import TrialState

from dashboards.figures import FONT_FAMILY, empty_figure, metric_label

# Two warnings Optuna gives on every call, filtered once here (``catch_warnings`` is not
# thread-safe, and the server draws figures in worker threads): PED-ANOVA ranks parameters for
# *low* target values (the targets below are signed for that on purpose), and the hypervolume
# history is experimental.
warnings.filterwarnings(
    "ignore", message=r".*computes the importances of params to achieve low", category=UserWarning
)
warnings.filterwarnings(
    "ignore",
    message=r".*plot_hypervolume_history is experimental",
    category=optuna.exceptions.ExperimentalWarning,
)

#: Fewest completed trials for which an importance is more than noise.
MIN_TRIALS_FOR_IMPORTANCE = 4
_PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7"]


def _completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _restyle(figure: go.Figure, title: str | None) -> go.Figure:
    figure.update_layout(
        template="plotly_white",
        title={"text": title or "", "x": 0.0, "xanchor": "left", "font": {"size": 15}},
        font={"family": FONT_FAMILY, "size": 12, "color": "#1F2937"},
        margin={"l": 60, "r": 24, "t": 48 if title else 28, "b": 52},
    )
    return figure


def hypervolume_history_figure(
    study: optuna.Study, reference_point: Sequence[float], *, title: str | None = None
) -> go.Figure:
    """Optuna's ``plot_hypervolume_history``: the hypervolume dominated by the feasible completed
    trials so far, against the trial number.

    ``reference_point`` has one coordinate per objective, worse than any value a trial can reach
    (0 for the accuracies). A single-objective study has no hypervolume: Optuna's optimization
    history is drawn instead.
    """
    if not _completed(study):
        return empty_figure("No completed trial yet.", title=title)
    if len(study.directions) == 1:
        figure = optuna.visualization.plot_optimization_history(study)
        title = "Best value so far (one objective: no hypervolume)"
    else:
        figure = optuna.visualization.plot_hypervolume_history(study, list(reference_point))
    for trace in figure.data:
        trace.update(marker={"color": _PALETTE[0]}, line={"color": _PALETTE[0]})
    last = max(trial.number for trial in study.get_trials(deepcopy=False))
    figure.update_xaxes(range=[-0.5, max(last, 1) + 0.5])  # a lone first trial sits at the left
    figure.update_yaxes(rangemode="tozero")
    return _restyle(figure, title)


def param_importances_figure(
    study: optuna.Study, objective_keys: Sequence[str], *, title: str | None = None
) -> go.Figure:
    """Optuna's ``plot_param_importances`` (PED-ANOVA, conditional parameters included), one bar
    group per objective, named by ``objective_keys`` (one per objective, in study order).

    PED-ANOVA ranks the parameters by how much they matter to reach *low* target values, so a
    maximised objective is negated: the bars say what matters to reach good values.
    """
    completed = _completed(study)
    if len(completed) < MIN_TRIALS_FOR_IMPORTANCE:
        return empty_figure(
            f"Importances need at least {MIN_TRIALS_FOR_IMPORTANCE} completed trials "
            f"({len(completed)} so far).",
            title=title,
        )
    varying = _varying_params(completed)
    if not varying:
        return empty_figure("No parameter varies across the completed trials.", title=title)
    traces: list[go.Bar] = []
    for index, key in enumerate(objective_keys):
        sign = -1.0 if study.directions[index] == optuna.study.StudyDirection.MAXIMIZE else 1.0
        try:
            part = optuna.visualization.plot_param_importances(
                study,
                params=varying,
                target=lambda trial, index=index, sign=sign: sign * trial.values[index],
                target_name=metric_label(key),
            )
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            return empty_figure(f"Optuna could not rank the parameters: {error}", title=title)
        for trace in part.data:
            trace.update(marker={"color": _PALETTE[index % len(_PALETTE)]}, showlegend=True)
            traces.append(trace)
    if not traces:
        return empty_figure("No objective value to explain yet.", title=title)
    figure = go.Figure(data=traces)
    figure.update_layout(
        barmode="group",
        xaxis={"title": {"text": "importance"}, "range": [0, 1.1]},
        yaxis={"title": {"text": ""}},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1},
    )
    return _restyle(figure, title)


def parallel_coordinate_figure(
    study: optuna.Study,
    objective_index: int,
    objective_key: str,
    *,
    title: str | None = None,
) -> go.Figure:
    """Optuna's ``plot_parallel_coordinate`` coloured by one objective; a parameter of another
    loss family than a trial's is shown on its axis's "missing" tick (Optuna's convention)."""
    completed = _completed(study)
    if len(completed) < 2:
        return empty_figure(
            f"Parallel coordinates need at least 2 completed trials ({len(completed)} so far).",
            title=title,
        )
    if not _varying_params(completed):
        return empty_figure("No parameter varies across the completed trials.", title=title)
    figure = optuna.visualization.plot_parallel_coordinate(
        study,
        target=lambda trial: trial.values[objective_index],
        target_name=metric_label(objective_key),
    )
    return _restyle(figure, title)


def _varying_params(trials: Sequence[optuna.trial.FrozenTrial]) -> list[str]:
    """Parameters that take at least two values among ``trials`` (present in any of them)."""
    seen: dict[str, set[str]] = {}
    for trial in trials:
        for name, value in trial.params.items():
            seen.setdefault(name, set()).add(repr(value))
    return sorted(name for name, values in seen.items() if len(values) > 1)
