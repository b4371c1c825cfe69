"""Non-dominance, for the pruner's rungs and the API's Pareto fronts alike.

One convention, Optuna's and moocore's: every objective is minimised. :func:`as_losses` turns values
measured in the study's directions into that form; a point dominates another when it is no larger
in every objective and smaller in one. Equal points dominate neither: both stay on their front.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: A direction per objective, Optuna's spelling (``"minimize"`` or ``"maximize"``).
Direction = str


def as_losses(values: Sequence[Sequence[float]], directions: Sequence[Direction]) -> np.ndarray:
    """``values`` (one row per point, one column per direction) as an (N, M) array in which
    smaller is better in every column: maximised objectives negated, NaN the worst (+inf)."""
    array = np.array(values, dtype=np.float64).reshape(len(values), len(directions))
    signs = np.array([-1.0 if direction == "maximize" else 1.0 for direction in directions])
    array = array * signs
    array[np.isnan(array)] = np.inf
    return array


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Boolean mask (N,) of the rows of ``points`` (minimised) that no other row dominates.

    O(N^2 M) time, O(N M) memory. Infinite values compare as numbers (moocore's
    ``is_nondominated`` and ``pareto_rank`` mis-rank points holding them, so they are not used).
    """
    mask = np.ones(len(points), dtype=bool)
    for index in range(len(points)):
        if not mask[index]:
            continue  # whatever it dominates, what dominates it dominates too
        point = points[index]
        mask &= ~(np.all(point <= points, axis=1) & np.any(point < points, axis=1))
    return mask


def non_dominated_fronts(points: np.ndarray | Sequence[Sequence[float]]) -> list[list[int]]:
    """Indices of ``points`` (minimised) grouped into fronts, each in increasing order; front 0
    holds the non-dominated points, front k those dominated only by points of earlier fronts."""
    array = np.asarray(points, dtype=np.float64)
    remaining = np.arange(len(array))
    fronts = []
    while len(remaining):
        mask = non_dominated(array[remaining])
        fronts.append(remaining[mask].tolist())
        remaining = remaining[~mask]
    return fronts
