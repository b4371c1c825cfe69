"""Guaranteed bound against power-iteration estimate, per layer of the zoo's models.

    nice -n 10 .venv/bin/python benchmarks/bound_tightness.py

For each model (default specs) at its data set's real feature-map sizes: every weighted
layer's guaranteed bound, its power-iteration estimate (a lower estimate of the exact norm)
and the method that gave the bound ("dense" is exact up to ~1e-12; "circulant" is exact for
circular padding, an upper bound for zero padding), and the seconds the whole-model bound took.
The gap bound / estimate - 1 bounds how far each bound is above the exact norm.
"""

import time

import torch

from liptune.bounds import layer_bounds, lipschitz_bound
from worker.spec import ConvNetSpec, MLPSpec, ResNetSpec
from worker.trial._models import build_model

# L2 pooling as when the recorded figures were measured (the zoo's default is now invertible).
MODELS = [
    ("mlp / digits", MLPSpec(), (1, 8, 8)),
    ("convnet / digits", ConvNetSpec(pooling="l2"), (1, 8, 8)),
    ("resnet / digits", ResNetSpec(pooling="l2"), (1, 8, 8)),
    ("convnet / fashion-mnist", ConvNetSpec(pooling="l2"), (1, 28, 28)),
    ("resnet / fashion-mnist", ResNetSpec(pooling="l2"), (1, 28, 28)),
]


def main() -> None:
    torch.manual_seed(0)
    for name, spec, shape in MODELS:
        model = build_model(spec, shape, 10)
        started = time.perf_counter()
        bound = lipschitz_bound(model, shape)
        seconds = time.perf_counter() - started
        print(f"{name}: bound {bound:.5f} in {seconds:.1f} s")
        for layer in layer_bounds(model, shape, iterations=200):
            gap = layer.bound / layer.estimate - 1
            print(
                f"  {layer.name:12s} {layer.kind:7s} {layer.input_shape!s:14s} "
                f"bound {layer.bound:.6f} estimate {layer.estimate:.6f} gap {gap:.2%} "
                f"{layer.method}"
            )


if __name__ == "__main__":
    main()
