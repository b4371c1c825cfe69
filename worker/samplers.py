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

Requirements are recorded with ``trial.set_constraint`` before ``tell`` (Optuna 5 deprecates
samplers' ``constraints_func``); every sampler here reads them from the finished trials.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Sequence

import numpy as np
import optuna

from worker.search_space import grid
from worker.spec import Range, StudySpec

#: Above this many trials ``auto`` uses NSGA-II.
LARGE_BUDGET = 300
#: At most this many trials for ``auto`` to use the Gaussian-process sampler.
GP_MAX_TRIALS = 100


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
    """The sampler a study uses: ``spec.sampler``, with ``auto`` resolved to a name."""
    if spec.sampler != "auto":
        return spec.sampler
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
    raise ValueError(f"unknown sampler {name!r}; choose one of auto, tpe, gp, nsga2, random, grid")
