"""The search: the space of loss hyper-parameters a study explores, the samplers that propose
the next trial (the guided ladders first), the multi-objective pruner, and the one
non-dominance test that the pruner and the service's fronts share."""

from worker.search._front import Direction, as_losses, non_dominated, non_dominated_fronts
from worker.search._pruning import MOASHA
from worker.search._samplers import (
    SAMPLER_DESCRIPTIONS,
    build_sampler,
    guideline_points,
    resolve_sampler,
    worker_seed,
)
from worker.search._space import PARAMS_ATTR, enqueue, grid, suggest_params, trial_params

__all__ = [
    "MOASHA",
    "PARAMS_ATTR",
    "SAMPLER_DESCRIPTIONS",
    "Direction",
    "as_losses",
    "build_sampler",
    "enqueue",
    "grid",
    "guideline_points",
    "non_dominated",
    "non_dominated_fronts",
    "resolve_sampler",
    "suggest_params",
    "trial_params",
    "worker_seed",
]
