"""What a trial's certificates came to: the certified radii of its test split, kept compactly
(:class:`RadiiSummary`), and their check by a minimal-norm attack (:class:`AttackSummary`).

The radii summary is a compact, exact-enough record of the certificates.

Certified robust accuracy at any eps is ``#{i : correct_i and radius_i > eps} / n``. Storing the
sorted radii of the correctly classified test points lets the service recompute it at any eps
without retraining. Radii are floored to multiples of :data:`RESOLUTION` (so a recomputed
certificate is never larger than the true one), delta-encoded, compressed and base64-encoded:
a 10,000-point test set takes a few kilobytes.
"""

from __future__ import annotations

import base64
import dataclasses
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

RESOLUTION = 1e-5


@dataclass(frozen=True)
class RadiiSummary:
    """The sorted (floored) radii of the correctly classified points, out of ``n`` points."""

    n: int
    radii: np.ndarray  # float64, sorted ascending, only correctly classified points

    @classmethod
    def from_arrays(cls, radii: np.ndarray, correct: np.ndarray) -> RadiiSummary:
        """From the per-point certificate ``radii`` (shape (N,)) and ``correct`` (bool, (N,))."""
        radii = np.asarray(radii, dtype=np.float64).reshape(-1)
        correct = np.asarray(correct, dtype=bool).reshape(-1)
        if radii.shape != correct.shape:
            raise ValueError(f"radii {radii.shape} and correct {correct.shape} differ in shape")
        kept = np.floor(np.clip(radii[correct], 0.0, None) / RESOLUTION) * RESOLUTION
        return cls(n=int(radii.size), radii=np.sort(kept))

    def certified_accuracy(self, eps: float | Sequence[float]) -> np.ndarray:
        """Certified robust accuracy at each eps (shape of ``eps``); eps = 0 gives the points
        correctly classified with a non-zero margin."""
        eps_array = np.asarray(eps, dtype=np.float64)
        if self.n == 0:
            return np.zeros_like(eps_array)
        not_above = np.searchsorted(self.radii, eps_array, side="right")
        return (self.radii.size - not_above) / self.n

    def encode(self) -> str:
        """A short ASCII string, e.g. to store in an Optuna trial's user attributes."""
        ticks = np.rint(self.radii / RESOLUTION).astype(np.int64)
        deltas = np.diff(ticks, prepend=0).astype(np.uint32)
        payload = np.int64(self.n).tobytes() + deltas.tobytes()
        return base64.b64encode(zlib.compress(payload, 9)).decode("ascii")

    @classmethod
    def decode(cls, text: str) -> RadiiSummary:
        payload = zlib.decompress(base64.b64decode(text))
        n = int(np.frombuffer(payload[:8], dtype=np.int64)[0])
        ticks = np.cumsum(np.frombuffer(payload[8:], dtype=np.uint32).astype(np.int64))
        return cls(n=n, radii=ticks * RESOLUTION)


@dataclass(frozen=True)
class AttackSummary:
    """The empirical check of a trial's certificates by a minimal-norm L2 attack.

    ``points`` test points were attacked; ``violations`` of them were broken at a distance
    below their certified radius (must be 0); ``tightness_*`` are quantiles of
    radius / adversarial distance over the attacked points (``None`` when none was broken).
    ``pairs`` holds ``(certified radius, adversarial distance)`` of each attacked point
    (distance ``None`` where the attack found no adversarial example), what the trial page
    plots; a record written before pairs were kept has none.
    """

    points: int
    violations: int
    tightness_median: float | None = None
    tightness_p10: float | None = None
    tightness_p90: float | None = None
    pairs: tuple[tuple[float, float | None], ...] = ()

    def summary(self) -> dict[str, Any]:
        """Every field but ``pairs``: what a list of trials shows."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "pairs"}

    def to_json(self) -> dict[str, Any]:
        return {**self.summary(), "pairs": [list(pair) for pair in self.pairs]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AttackSummary:
        def quantile(name: str) -> float | None:
            value = data.get(name)
            return None if value is None else float(value)

        return cls(
            points=int(data["points"]),
            violations=int(data["violations"]),
            tightness_median=quantile("tightness_median"),
            tightness_p10=quantile("tightness_p10"),
            tightness_p90=quantile("tightness_p90"),
            pairs=tuple(
                (float(radius), None if distance is None else float(distance))
                for radius, distance in data.get("pairs", ())
            ),
        )
