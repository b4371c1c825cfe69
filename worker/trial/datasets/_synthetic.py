"""Two-dimensional binary problems generated in code, scaled into the unit square.

Each generator returns points (N, 2) ``float32`` in [0, 1] and labels (N,) int64 in {0, 1}.
The scaling is a fixed isotropic map (the same for every seed), so distances, and therefore
certificates, mean the same thing across runs; ``noise`` is the standard deviation of a Gaussian
jitter in the problem's own units, added after labelling as scikit-learn's generators do.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import make_circles, make_moons

#: Depth of the Von Koch construction: 3 * 4**4 edges, the shortest 1/81 of the triangle side.
SNOWFLAKE_DEPTH = 4


def _to_unit_square(
    points: np.ndarray, center: tuple[float, float], half_width: float
) -> np.ndarray:
    scaled = (points - np.asarray(center)) / (2.0 * half_width) + 0.5
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def two_moons(n_samples: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's interleaving half circles (x in [-1, 2], y in [-0.5, 1])."""
    points, labels = make_moons(n_samples=n_samples, noise=noise, random_state=seed)
    return _to_unit_square(points, (0.5, 0.25), 2.0), labels.astype(np.int64)


def spheres(n_samples: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Concentric spheres in the plane: label 0 on radius 1, label 1 on radius 0.5."""
    points, labels = make_circles(n_samples=n_samples, noise=noise, factor=0.5, random_state=seed)
    return _to_unit_square(points, (0.0, 0.0), 1.25), labels.astype(np.int64)


def koch_snowflake(depth: int = SNOWFLAKE_DEPTH) -> np.ndarray:
    """Vertices (3 * 4**depth, 2) of the Von Koch snowflake inscribed in the unit circle.

    Each edge a -> b becomes a -> a + d -> apex -> b - d with d = (b - a) / 3 and the apex
    d rotated by -60 degrees (outwards for a counter-clockwise polygon) past a + d.
    """
    angles = np.pi / 2 + 2 * np.pi * np.arange(3) / 3
    vertices = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    rotation = np.array([[0.5, np.sqrt(3) / 2], [-np.sqrt(3) / 2, 0.5]])
    for _ in range(depth):
        starts = vertices
        ends = np.roll(vertices, -1, axis=0)
        third = (ends - starts) / 3
        first, second = starts + third, starts + 2 * third
        apex = first + third @ rotation.T
        vertices = np.stack([starts, first, apex, second], axis=1).reshape(-1, 2)
    return vertices


def inside_polygon(points: np.ndarray, vertices: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Even-odd ray casting: bool (N,) telling which ``points`` lie inside the polygon."""
    x1, y1 = vertices[:, 0], vertices[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    inside = np.empty(len(points), dtype=bool)
    for start in range(0, len(points), chunk):
        px = points[start : start + chunk, 0:1]
        py = points[start : start + chunk, 1:2]
        spans = (y1 > py) != (y2 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            crossing_x = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside[start : start + chunk] = np.logical_xor.reduce(spans & (px < crossing_x), axis=1)
    return inside


def snowflake(n_samples: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform points of [-1.2, 1.2]^2 labelled 1 inside the Von Koch snowflake, 0 outside."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(-1.2, 1.2, size=(n_samples, 2))
    labels = inside_polygon(points, koch_snowflake()).astype(np.int64)
    if noise > 0:
        points = points + rng.normal(scale=noise, size=points.shape)
    return _to_unit_square(points, (0.0, 0.0), 1.2), labels
