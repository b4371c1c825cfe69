"""The sampler of a study, rebuilt from its spec by every worker.

Optuna does not store samplers: each worker builds the study's sampler from the spec, seeded with
the spec's seed combined with a number of its own (:func:`worker_seed`), so that two workers
starting at once do not suggest the same point. QMC is the exception: a scrambled Sobol sequence
is one sequence shared by all workers (Optuna hands out its indices through the storage), so
every worker must use the spec's seed itself.

``auto`` chooses by the shape of the space and the budget:

* NSGA-II for large budgets (``n_trials >`` :data:`LARGE_BUDGET`): its cost per suggestion does
  not grow with the number of finished trials;
* Optuna's GPSampler for a small numeric space (one loss family, every searched parameter a
  range, ``n_trials <=`` :data:`GP_MAX_TRIALS`): in Optuna 5 it handles several objectives
  (log EHVI) and constraints, and its cubic cost in the number of trials stays small;
* TPE otherwise, the space being categorical or conditional: multivariate and grouped (one
  Parzen estimator per family's sub-space), with the constant liar so that concurrent workers
  do not pile onto the same region.

``guided`` first walks the guidelines' one-dimensional trade-off curves of the families in the
space (:func:`guideline_points`: a temperature ladder for ``tau_ce``, a margin ladder at the
largest alpha_kr, ``inf`` = hinge only, then an alpha_kr ladder at a middle margin for ``hkr``;
HKR margins for inputs in [0, 1] between 0.01 and 5), one point per trial, then hands over to
the sampler ``auto`` would choose, which refines with those trials as its data. Each ladder
starts at the setting whose loss asks for the margin that certifies the study's eps
(:func:`eps_anchors`) and walks outwards, the accurate side first; the one-parameter families
come first. ``offset_ce`` starts at the offset that certifies the eps, walks the temperature at
that offset, then the offset at the best temperature so far (:class:`BestOf`: decided when each
of those trials starts, from the completed ones).

Requirements are recorded with ``trial.set_constraint`` before ``tell`` (Optuna 5 deprecates
samplers' ``constraints_func``); every sampler here reads them from the finished trials.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna

from liptune.certify import MARGIN_DIVISORS
from worker.search._space import grid, trial_params
from worker.spec import FAMILY_PARAMS, PARAM_DEFAULTS, Range, SearchSpace, StudySpec
from worker.trial._models import certificate_mode
from worker.trial.datasets import describe_dataset

#: Above this many trials ``auto`` uses NSGA-II.
LARGE_BUDGET = 300
#: At most this many trials for ``auto`` to use the Gaussian-process sampler.
GP_MAX_TRIALS = 100
#: What each ``StudySpec.sampler`` does (the catalogue serves these).
SAMPLER_DESCRIPTIONS = {
    "auto": "Chosen from the space and budget: NSGA-II above 300 trials, GP for one family "
    "with numeric ranges up to 100 trials, multivariate grouped TPE otherwise.",
    "guided": "The default. The guidelines' trade-off ladders first (temperature for tau_ce; "
    "margin at the largest alpha_kr, then alpha_kr for hkr; temperature at the certifying "
    "offset, then the offset at the best temperature for offset_ce), each from the setting "
    "whose margin certifies the objective's eps (temperature 1/g, margin or offset g, g = "
    "sqrt(2) eps for a global head) outwards, then what auto picks.",
    "tpe": "Optuna's TPE, multivariate and grouped, with the constant liar.",
    "gp": "Optuna's Gaussian-process sampler (log EHVI for several objectives).",
    "nsga2": "Optuna's NSGA-II.",
    "random": "Uniform (log-uniform for log ranges) random search.",
    "grid": "Every combination of one family's listed values, in random order.",
    "qmc": "A scrambled Sobol sequence shared by all workers.",
}
#: At most this many points per one-dimensional curve of the ``guided`` first batch (a listed
#: parameter with fewer values gives each of them).
LADDER_POINTS = 8
#: Which end of each curve is the accurate one (True: its larger values): a higher temperature,
#: a smaller margin, a larger alpha_kr (more weight on the hinge, less on the KR term).
ACCURATE_HIGH = {"temperature": True, "margin": False, "alpha_kr": True}
#: The guidelines' range of HKR margins for inputs in [0, 1].
GUIDELINE_MARGINS = (0.01, 5.0)


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler for ask/tell: the study's budget ends the search, not the grid.

    Optuna's ``GridSampler.after_trial`` calls ``study.stop()`` once the grid is walked, which
    raises outside ``study.optimize``; here a grid smaller than the budget is walked again.
    """

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: optuna.trial.TrialState,
        values: Sequence[float] | None,
    ) -> None:
        return None


def worker_seed(seed: int, worker_key: str) -> int:
    """A 32-bit seed mixing a study's ``seed`` with a worker's own key (e.g. its id and pid)."""
    sequence = np.random.SeedSequence([seed, zlib.crc32(worker_key.encode())])
    return int(sequence.generate_state(1)[0])


def _is_small_numeric(spec: StudySpec) -> bool:
    space = spec.search_space
    if len(space.families) > 1 or len(spec.baselines) > 0:
        return False
    searched = [getattr(space, name) for name in ("margin", "alpha_kr", "temperature")]
    ranges = [value for value in searched if isinstance(value, Range)]
    lists = [value for value in searched if isinstance(value, list) and len(value) > 1]
    return bool(ranges) and not lists and spec.n_trials <= GP_MAX_TRIALS


def resolve_sampler(spec: StudySpec) -> str:
    """The sampler a study uses: ``spec.sampler``, with ``auto`` resolved to a name (``guided``
    stays ``guided``; :func:`refining_sampler` names the one it hands over to)."""
    if spec.sampler != "auto":
        return spec.sampler
    return refining_sampler(spec)


def refining_sampler(spec: StudySpec) -> str:
    """The model-based sampler ``auto`` (and ``guided`` after its first batch) uses."""
    if spec.n_trials > LARGE_BUDGET:
        return "nsga2"
    if _is_small_numeric(spec):
        return "gp"
    return "tpe"


def build_sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    """The study's sampler, seeded with ``seed`` (see :func:`worker_seed`).

    Raises ``ValueError`` when the space does not suit the named sampler (``grid`` over ranges
    or over several loss families).
    """
    name = resolve_sampler(spec)
    if name == "guided":
        refined = spec.model_copy(update={"sampler": "auto"})
        return GuidedSampler(
            guideline_points(spec.search_space, LADDER_POINTS, eps_anchors(spec)),
            build_sampler(refined, seed),
            offset=len(spec.baselines),
            rank=ranking_objective(spec),
        )
    if name == "tpe":
        with warnings.catch_warnings():  # `group` is experimental, and exactly what we want
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(
                seed=seed, multivariate=True, group=True, constant_liar=True
            )
    if name == "gp":
        return optuna.samplers.GPSampler(
            seed=seed,
            n_startup_trials=min(10, max(2, spec.n_trials // 4)),
            warn_independent_sampling=False,
        )
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(
            seed=seed, population_size=max(2, min(50, spec.n_trials))
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return GridSampler(grid(spec.search_space), seed=seed)
    if name == "qmc":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.QMCSampler(
                seed=spec.seed, scramble=True, warn_independent_sampling=False
            )
    raise ValueError(
        f"unknown sampler {name!r}; choose one of auto, guided, tpe, gp, nsga2, random, grid"
    )


def _ladder(values: Range | list[float] | float | None, name: str, count: int) -> list[float]:
    """Up to ``count`` values spread over a searched parameter, sorted: log-spaced over a range
    (margins clipped to :data:`GUIDELINE_MARGINS` when the range allows), evenly picked from a
    sorted list; the one value of a fixed parameter."""
    if isinstance(values, Range):
        low, high = values.low, values.high
        if name == "margin":
            low, high = max(low, GUIDELINE_MARGINS[0]), min(high, GUIDELINE_MARGINS[1])
            if low >= high:
                low, high = values.low, values.high
        if values.log or name in ("margin", "alpha_kr", "temperature"):
            ladder = np.geomspace(max(low, 1e-12), high, count)
        else:
            ladder = np.linspace(low, high, count)
        return sorted({float(value) for value in np.clip(ladder, values.low, values.high)})
    if isinstance(values, list):
        ordered = sorted(set(values))
        picks = np.unique(np.rint(np.linspace(0, len(ordered) - 1, count)).astype(int))
        return [float(ordered[i]) for i in picks]
    return [PARAM_DEFAULTS[name] if values is None else float(values)]


def middle_out(ladder: list[float], name: str, anchor: float | None = None) -> list[float]:
    """A sorted ``ladder`` reordered from its value nearest ``anchor`` (in log scale; without
    one, from its middle) outwards, alternating sides, the accurate side first
    (:data:`ACCURATE_HIGH`; of two middle values, the accurate one).

    Why this order: the guidelines' curves run from a robust end to an accurate end, and a
    study's front is made where they bend, not at their ends (a model cannot certify more than
    it classifies, so the robust end's points are dominated or add little hypervolume). Every
    prefix of the order is spread around the start, so a small budget trains the likely knee
    first and a larger one walks on to the ends."""
    ordered = ladder if ACCURATE_HIGH.get(name, True) else ladder[::-1]
    # ``ordered`` runs robust -> accurate; the accurate one of two middles is the upper
    middle = len(ordered) // 2
    if anchor is not None and anchor > 0 and min(ordered) > 0:
        distances = [abs(np.log(value / anchor)) for value in ordered]
        middle = min(range(len(ordered)), key=lambda i: (round(distances[i], 9), -i))
    order = [middle]
    for step in range(1, len(ordered)):
        order += [i for i in (middle + step, middle - step) if 0 <= i < len(ordered)]
    return [ordered[i] for i in order]


def _middle(values: Range | list[float] | float | None, name: str) -> float:
    if isinstance(values, Range):
        return float(np.sqrt(values.low * values.high)) if values.low > 0 else values.high / 2
    if isinstance(values, list):
        ordered = sorted(set(values))
        return float(ordered[(len(ordered) - 1) // 2])
    return PARAM_DEFAULTS[name] if values is None else float(values)


def _largest(values: Range | list[float] | float | None, name: str) -> float:
    if isinstance(values, Range):
        return values.high
    if isinstance(values, list):
        return float(max(values))
    return PARAM_DEFAULTS[name] if values is None else float(values)


def certified_gap(spec: StudySpec) -> float | None:
    """The logit gap that certifies the study's eps: ``eps / s`` with s the certificate's scale
    (:mod:`liptune.certify`: 1 for a binary head's ``|f(x)|``, 1/sqrt(2) for a global head's
    ``(f_top1 - f_top2) / sqrt(2)``, 1/2 for a classwise one), eps the geometric mean of the
    certified-accuracy objectives' and requirements' eps. ``None`` when the study asks for no
    certificate at an eps (e.g. mean certified radius only)."""
    wanted = [
        item.eps
        for item in (*spec.objectives, *spec.requirements)
        if item.metric == "certified_accuracy" and item.eps is not None
    ]
    if not wanted:
        return None
    eps = math.exp(sum(math.log(value) for value in wanted) / len(wanted))
    described = describe_dataset(spec.dataset)
    return (
        eps
        * MARGIN_DIVISORS[
            certificate_mode(spec.model, described.input_shape, described.num_classes)
        ]
    )


def eps_anchors(spec: StudySpec) -> dict[str, float]:
    """Where the ``guided`` ladders start: the settings whose loss asks for the logit gap g
    that certifies the study's eps (:func:`certified_gap`).

    * HKR / hinge margin ``m = g`` (multiclass: the hinge pushes ``f_y - f_j`` to ``m``;
      binary: ``y f(x)`` to ``m / 2``, so ``m = 2 g``);
    * offset cross-entropy offset ``offset_margin = g``: it asks for ``f_y - f_j >= m``
      (binary: ``y f(x) >= m``, no halving);
    * tau-CE temperature ``tau = 1 / g``: ``CE(tau f) / tau`` stops pushing a gap once
      ``tau * gap`` is past about 1 (the softmax of the two classes is then ~0.73), so a
      temperature's margins scale as ``1 / tau`` (Bethune et al. 2022, "Pay attention to your
      loss").

    The front of (accuracy, certified accuracy at eps) bends where the loss's own margin meets
    the certificate's; a curve's middle is that knee only for one eps. Empty without an eps.
    """
    gap = certified_gap(spec)
    if gap is None:
        return {}
    binary = describe_dataset(spec.dataset).task == "binary"
    return {"margin": 2 * gap if binary else gap, "temperature": 1.0 / gap, "offset_margin": gap}


@dataclass(frozen=True)
class BestOf:
    """A ``guided`` point's value decided when its trial starts: the value of ``param`` in the
    best completed trial whose parameters include ``among`` (see :meth:`GuidedSampler.best`),
    ``fallback`` while none has completed (e.g. several workers starting together)."""

    param: str
    among: tuple[tuple[str, Any], ...]
    fallback: float


def guideline_points(
    space: SearchSpace, count: int, anchors: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """The ``guided`` first batch: for each family of ``space``, its one-dimensional trade-off
    curves of up to ``count`` points each, every curve walked outwards from its value nearest
    ``anchors[name]`` (``"temperature"``, ``"margin"``: see :func:`eps_anchors`), or from its
    middle (:func:`middle_out`), families interleaved so that a small budget sees every one, the
    one-parameter families (``tau_ce``, ``hinge``) first: one point of theirs already lies on
    their whole trade-off curve, where HKR's margin ladder is a slice of a two-parameter family
    (otherwise in the order of ``space.families``):

    * ``tau_ce``: the temperature ladder (high: accurate, low: robust);
    * ``hkr`` / ``soft_hkr``: the margin ladder at the largest alpha_kr (``inf`` = hinge only),
      then the alpha_kr ladder at the middle margin, from large to small (the guidelines' order:
      find the margin with the hinge alone, then lower alpha_kr);
    * ``offset_ce``: the temperature ladder at the offset nearest ``anchors["offset_margin"]``
      (from its middle, the accurate side first), then the offset ladder outwards from that
      offset at the best temperature of the first ladder (a :class:`BestOf`, falling back to
      the first ladder's start);
    * ``hinge``: the margin ladder; ``kr`` and ``cosine``: one point.
    """
    anchors = anchors or {}
    curves: list[list[dict[str, Any]]] = []
    for family in sorted(space.families, key=lambda name: len(FAMILY_PARAMS[name]) != 1):
        params = FAMILY_PARAMS[family]
        base: dict[str, Any] = {"loss": family}
        if "temperature" in params:
            base["temperature"] = _middle(space.temperature, "temperature")
        if family == "tau_ce":
            ladder = _ladder(space.temperature, "temperature", count)
            temperatures = middle_out(ladder, "temperature", anchors.get("temperature"))
            curves.append([{**base, "temperature": t} for t in temperatures])
        elif family == "offset_ce":
            margins = middle_out(
                _ladder(space.margin, "margin", count), "margin", anchors.get("offset_margin")
            )
            temperatures = middle_out(
                _ladder(space.temperature, "temperature", count), "temperature"
            )
            best = BestOf(
                "temperature", (("loss", family), ("margin", margins[0])), temperatures[0]
            )
            curves.append(
                [{**base, "margin": margins[0], "temperature": t} for t in temperatures]
                + [{**base, "margin": m, "temperature": best} for m in margins[1:]]
            )
        elif "margin" in params:
            alpha = (
                {"alpha_kr": _largest(space.alpha_kr, "alpha_kr")} if "alpha_kr" in params else {}
            )
            margins = middle_out(
                _ladder(space.margin, "margin", count), "margin", anchors.get("margin")
            )
            curve = [{**base, **alpha, "margin": m} for m in margins]
            if alpha:
                alphas = sorted(_ladder(space.alpha_kr, "alpha_kr", count), reverse=True)
                curve += [
                    {**base, "margin": margins[0], "alpha_kr": a}
                    for a in alphas
                    if a != alpha["alpha_kr"]
                ]
            curves.append(curve)
        else:
            curves.append([base])
    points: list[dict[str, Any]] = []
    for round_ in range(max(len(curve) for curve in curves)):
        points += [curve[round_] for curve in curves if round_ < len(curve)]
    return points


def ranking_objective(spec: StudySpec) -> tuple[int, float]:
    """Which objective decides a :class:`BestOf`, and its sign (1: maximised): the first
    certified accuracy (the ladders are anchored on its eps), else the first objective."""
    objectives = list(spec.objectives)
    index = next((i for i, item in enumerate(objectives) if item.metric == "certified_accuracy"), 0)
    return index, 1.0 if objectives[index].direction == "maximize" else -1.0


class GuidedSampler(optuna.samplers.BaseSampler):
    """Trial ``offset + k`` takes ``points[k]`` (its loss family and parameters); later trials,
    and parameters a point does not name, come from ``refine``. A :class:`BestOf` value is
    decided when the trial starts (:meth:`best`), ranking completed trials by objective
    ``rank[0]`` with sign ``rank[1]`` (:func:`ranking_objective`).

    The point of a trial follows from its number, which the storage hands out once: several
    workers never train the same point twice.
    """

    def __init__(
        self,
        points: list[dict[str, Any]],
        refine: optuna.samplers.BaseSampler,
        offset: int = 0,
        rank: tuple[int, float] = (0, 1.0),
    ) -> None:
        self.points = points
        self.refine = refine
        self.offset = offset
        self.rank = rank

    def best(self, study: optuna.Study, choice: BestOf) -> float:
        """``choice.param`` of the best completed trial whose parameters include
        ``choice.among``: feasible ones first (requirements met), then the larger signed value
        of the ranking objective, then the earlier trial; ``choice.fallback`` when none."""
        index, sign = self.rank
        best_key, value = None, choice.fallback
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            params = trial_params(trial)
            if choice.param not in params or trial.values is None or index >= len(trial.values):
                continue
            if any(params.get(name) != wanted for name, wanted in choice.among):
                continue
            feasible = all(value <= 0 for value in trial.constraints.values())
            key = (feasible, sign * trial.values[index], -trial.number)
            if best_key is None or key > best_key:
                best_key, value = key, float(params[choice.param])
        return value

    def _point(self, trial: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
        index = trial.number - self.offset
        return self.points[index] if 0 <= index < len(self.points) else None

    def reseed_rng(self) -> None:
        self.refine.reseed_rng()

    def infer_relative_search_space(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial
    ) -> dict[str, optuna.distributions.BaseDistribution]:
        if self._point(trial) is not None:
            return {}
        return self.refine.infer_relative_search_space(study, trial)

    def sample_relative(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        search_space: dict[str, optuna.distributions.BaseDistribution],
    ) -> dict[str, Any]:
        if self._point(trial) is not None:
            return {}
        return self.refine.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        param_name: str,
        param_distribution: optuna.distributions.BaseDistribution,
    ) -> Any:
        point = self._point(trial)
        if point is not None and param_name in point:
            value = point[param_name]
            if isinstance(value, BestOf):
                value = self.best(study, value)
            if isinstance(param_distribution, optuna.distributions.CategoricalDistribution):
                return next(c for c in param_distribution.choices if c == value)
            return value
        return self.refine.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.refine.before_trial(study, trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: optuna.trial.TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self.refine.after_trial(study, trial, state, values)
