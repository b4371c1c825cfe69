"""The figure builders of the pages: pure functions from plain data (and Optuna studies) to
Plotly figures."""

from __future__ import annotations

import math

import numpy as np
import optuna
import plotly.graph_objects as go
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from dashboards import figures
from dashboards.figures import AccuracyCurve, TrialPoint
from service import study_figures

optuna.logging.set_verbosity(optuna.logging.WARNING)


def traces_with_role(figure: go.Figure, role: str) -> list:
    return [trace for trace in figure.data if (trace.meta or {}).get("role") == role]


def point(number, family="hkr", x=0.5, y=0.5, feasible=True, **params):
    return TrialPoint(
        number=number,
        family=family,
        x=x,
        y=y,
        params={"loss": family, **params},
        values={"accuracy": x, "certified_accuracy_eps_0.3": y},
        feasible=feasible,
    )


# --------------------------------------------------------------------------- labels


def test_metric_label_names_eps_and_units():
    assert figures.metric_label("certified_accuracy_eps_0.3") == "certified accuracy (eps = 0.3)"
    assert figures.metric_label("accuracy") == "accuracy"
    assert figures.metric_label("training_time") == "training time (s)"


@pytest.mark.parametrize(
    ("value", "text"),
    [(math.inf, "∞"), ("Infinity", "∞"), (None, "—"), (0.123456, "0.1235"), ("hkr", "hkr")],
)
def test_format_value(value, text):
    assert figures.format_value(value) == text


def test_family_colors_are_distinct_and_unknown_families_get_the_neutral_colour():
    assert len(set(figures.FAMILY_COLORS.values())) == len(figures.FAMILY_COLORS)
    assert figures.family_color("not-a-family") == figures.OTHER_COLOR


# --------------------------------------------------------------------------- trade-off


def test_pareto_figure_draws_every_trial_once_per_family_and_joins_the_front():
    points = [
        point(0, "hkr", 0.9, 0.2, margin=0.1, alpha_kr=math.inf),
        point(1, "hkr", 0.7, 0.5, margin=1.0, alpha_kr=10.0),
        point(2, "tau_ce", 0.8, 0.1, temperature=5.0),
        point(3, "tau_ce", 0.6, 0.6, temperature=0.5),
    ]
    figure = figures.pareto_figure(
        points, front=[3, 0, 1], x_key="accuracy", y_key="certified_accuracy_eps_0.3"
    )
    families = traces_with_role(figure, "family")
    assert [trace.name for trace in families] == ["hkr", "tau_ce"]
    assert sum(len(trace.x) for trace in families) == len(points)
    assert {trace.marker.color for trace in families} == {
        figures.FAMILY_COLORS["hkr"],
        figures.FAMILY_COLORS["tau_ce"],
    }
    (front,) = traces_with_role(figure, "front")
    assert front.mode == "lines+markers"
    assert list(front.customdata) == [3, 1, 0]  # joined in increasing accuracy
    assert list(front.x) == [0.6, 0.7, 0.9]
    assert list(front.marker.color) == [
        figures.FAMILY_COLORS["tau_ce"],
        figures.FAMILY_COLORS["hkr"],
        figures.FAMILY_COLORS["hkr"],
    ]
    assert figure.layout.meta["front"] == [3, 1, 0]
    assert not traces_with_role(figure, "meeting")
    assert not traces_with_role(figure, "recommended")
    assert figure.layout.xaxis.title.text == "accuracy"


def test_pareto_hover_shows_the_hyper_parameters_and_values():
    figure = figures.pareto_figure(
        [point(7, "hkr", 0.9, 0.4, margin=0.25, alpha_kr="Infinity")],
        front=[7],
        x_key="accuracy",
        y_key="certified_accuracy_eps_0.3",
    )
    (hover,) = traces_with_role(figure, "family")[0].text
    assert "trial #7" in hover
    assert "margin: 0.25" in hover
    assert "alpha_KR: ∞" in hover
    assert "temperature: —" in hover
    assert "certified accuracy (eps = 0.3): 0.4" in hover


def test_pareto_figure_marks_requirements_recommendation_and_infeasible_trials():
    points = [
        point(0, x=0.9, y=0.2),
        point(1, x=0.7, y=0.5),
        point(2, x=0.5, y=0.4, feasible=False),
    ]
    figure = figures.pareto_figure(
        points,
        front=[0, 1],
        x_key="accuracy",
        y_key="certified_accuracy_eps_0.3",
        meeting=[1, 2],
        recommended=1,
    )
    (meeting,) = traces_with_role(figure, "meeting")
    assert list(meeting.customdata) == [1, 2]
    (recommended,) = traces_with_role(figure, "recommended")
    assert (recommended.x, recommended.y) == ((0.7,), (0.5,))
    assert recommended.marker.symbol == "star"
    assert list(traces_with_role(figure, "family")[0].marker.symbol) == ["circle", "circle", "x"]
    assert figure.layout.meta["recommended"] == 1


def test_pareto_figure_ignores_front_numbers_it_has_no_point_for():
    figure = figures.pareto_figure(
        [point(0)], front=[0, 5], x_key="accuracy", y_key="accuracy", recommended=5
    )
    assert list(traces_with_role(figure, "front")[0].customdata) == [0]
    assert not traces_with_role(figure, "recommended")


def test_pareto_figure_of_no_trial_explains_itself():
    figure = figures.pareto_figure([], front=[], x_key="accuracy", y_key="accuracy")
    assert figures.is_empty(figure)
    assert len(figure.data) == 0
    assert "No completed trial" in figure.layout.annotations[0].text


def test_one_trial_is_its_own_front():
    figure = figures.pareto_figure(
        [point(0)], front=[0], x_key="accuracy", y_key="certified_accuracy_eps_0.3"
    )
    assert len(traces_with_role(figure, "front")[0].x) == 1
    assert not figures.is_empty(figure)
    assert tuple(figure.layout.xaxis.range) == (0, 1.02)  # not Plotly's -0.5 to 1.5 around it


# --------------------------------------------------------------------------- certificates


def test_certified_accuracy_curves_one_per_trial_with_the_eps_marked():
    grid = [0.0, 0.5, 1.0]
    curves = [
        AccuracyCurve(0, "hkr", grid, [0.9, 0.5, 0.1]),
        AccuracyCurve(4, "cosine", grid, [0.95, 0.3, 0.0]),
    ]
    figure = figures.certified_accuracy_curves_figure(curves, eps=0.5)
    assert [trace.name for trace in figure.data] == ["#0 hkr", "#4 cosine"]
    assert figure.data[1].line.color == figures.FAMILY_COLORS["cosine"]
    assert [shape.x0 for shape in figure.layout.shapes] == [0.5]
    assert figures.is_empty(figures.certified_accuracy_curves_figure([]))


def test_radii_histogram_counts_points_and_labels_certified_accuracy_at_each_eps():
    radii = np.array([0.05, 0.2, 0.2, 0.4, 0.8, 1.5])
    figure = figures.radii_histogram_figure(radii, n=10, eps=[0.1, 0.5])
    (histogram,) = figure.data
    assert len(histogram.x) == 6
    assert "4 misclassified" in figure.layout.annotations[0].text
    labels = [a.text for a in figure.layout.annotations[1:]]
    assert labels == ["eps 0.1: 50.0%", "eps 0.5: 20.0%"]
    assert len(figure.layout.shapes) == 2
    assert figures.is_empty(figures.radii_histogram_figure([], n=0))


# --------------------------------------------------------------------------- training


def test_training_curves_put_accuracies_left_and_the_loss_right():
    epochs = [
        {
            "epoch": e,
            "train_loss": 1.0 / e,
            "val_accuracy": 0.5 + 0.1 * e,
            "val_certified_accuracy_eps_0.5": 0.1 * e,
            "val_certified_accuracy_eps_0.25": 0.15 * e,
            "seconds": 1.0,
        }
        for e in (1, 2, 3)
    ]
    figure = figures.training_curves_figure(epochs)
    accuracy = traces_with_role(figure, "accuracy")
    assert [trace.meta["key"] for trace in accuracy] == [
        "val_accuracy",
        "val_certified_accuracy_eps_0.25",
        "val_certified_accuracy_eps_0.5",
    ]
    (loss,) = traces_with_role(figure, "loss")
    assert loss.yaxis == "y2"
    assert list(loss.x) == [1, 2, 3]
    assert figure.layout.yaxis2.side == "right"
    assert figures.is_empty(figures.training_curves_figure([]))


# --------------------------------------------------------------------------- Optuna's figures


def conditional_study(n_trials: int, directions=("maximize", "maximize")) -> optuna.Study:
    """A study over the conditional space of liptune: hkr (margin, alpha_kr with inf) or tau_ce
    (temperature)."""
    study = optuna.create_study(directions=list(directions))
    loss = CategoricalDistribution(["hkr", "tau_ce"])
    rng = np.random.default_rng(0)
    for index in range(n_trials):
        if index % 2 == 0:
            params = {
                "loss": "hkr",
                "margin": float(rng.uniform(0.01, 2)),
                "alpha_kr": [10.0, math.inf][index % 4 // 2],
            }
            distributions = {
                "loss": loss,
                "margin": FloatDistribution(0.01, 2.0, log=True),
                "alpha_kr": CategoricalDistribution([10.0, math.inf]),
            }
        else:
            params = {"loss": "tau_ce", "temperature": float(rng.uniform(0.1, 100))}
            distributions = {"loss": loss, "temperature": FloatDistribution(0.1, 100.0, log=True)}
        values = [float(rng.uniform(0.5, 1.0)), float(rng.uniform(0.0, 0.5))][: len(directions)]
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions=distributions, values=values)
        )
    return study


def test_hypervolume_history_is_optunas_with_one_point_per_trial():
    figure = study_figures.hypervolume_history_figure(conditional_study(5), [0.0, 0.0])
    assert not figures.is_empty(figure)
    assert len(figure.data[0].x) == 5
    assert list(figure.data[0].y) == sorted(figure.data[0].y)  # never decreases


def test_hypervolume_of_empty_and_single_objective_studies():
    assert figures.is_empty(study_figures.hypervolume_history_figure(conditional_study(0), [0, 0]))
    single = study_figures.hypervolume_history_figure(
        conditional_study(3, directions=("maximize",)), [0.0]
    )
    assert "no hypervolume" in single.layout.title.text


def test_param_importances_one_bar_group_per_objective_with_conditional_params():
    figure = study_figures.param_importances_figure(
        conditional_study(12), ["accuracy", "certified_accuracy_eps_0.3"]
    )
    assert [trace.name for trace in figure.data] == [
        "accuracy",
        "certified accuracy (eps = 0.3)",
    ]
    assert {"loss", "margin", "temperature"} <= set(figure.data[0].y)


def test_param_importances_need_enough_trials():
    figure = study_figures.param_importances_figure(conditional_study(2), ["a", "b"])
    assert figures.is_empty(figure)
    assert "at least 4" in figure.layout.meta["empty"]


def test_parallel_coordinates_show_each_parameter_and_the_objective():
    figure = study_figures.parallel_coordinate_figure(conditional_study(6), 1, "mean_radius")
    lines = [trace for trace in figure.data if trace.mode == "lines"]
    assert len(lines) == 6  # Optuna 5 draws one line per trial
    labels = list(figure.layout.xaxis.ticktext)
    assert labels[0] == "mean radius"
    assert {"loss", "margin", "alpha_kr", "temperature"} <= set(labels)
    assert figures.is_empty(study_figures.parallel_coordinate_figure(conditional_study(1), 0, "a"))


# --------------------------------------------------------------------------- attack check


def test_attack_figure_puts_sound_points_below_the_diagonal_and_marks_broken_ones():
    pairs = [(0.2, 0.5), (0.3, 0.3), (0.6, 0.4), (0.1, None)]
    fig = figures.certificate_tightness_figure(
        pairs, tightness={"tightness_median": 0.75, "tightness_p10": 0.5, "tightness_p90": 1.4}
    )
    (diagonal,) = traces_with_role(fig, "diagonal")
    assert list(diagonal.x) == list(diagonal.y) and diagonal.x[1] >= 0.6
    (sound,) = traces_with_role(fig, "attacked")
    assert list(zip(sound.x, sound.y, strict=True)) == [(0.5, 0.2), (0.3, 0.3)]
    (broken,) = traces_with_role(fig, "violation")
    assert (list(broken.x), list(broken.y)) == ([0.4], [0.6])
    assert fig.layout.meta == {"points": 4, "violations": 1, "missed": 1}
    text = fig.layout.annotations[0].text
    assert "1 broken" in text and "median 0.750" in text and "1 not drawn" in text


def test_attack_figure_without_pairs_explains_itself():
    fig = figures.certificate_tightness_figure([])
    assert figures.is_empty(fig) and "No attack check" in fig.layout.meta["empty"]
    assert traces_with_role(figures.certificate_tightness_figure([(0.1, 0.2)]), "violation") == []
