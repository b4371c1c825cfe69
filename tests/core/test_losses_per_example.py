"""Per-example hyper-parameters of the losses (loss-conditioned training, issue 22): with one
value for every example a loss is exactly the fixed loss, and with one value per example each
example's term is its own loss at its own values."""

from __future__ import annotations

import math

import pytest
import torch

from liptune import losses

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, C = 12, 5
#: (loss class, its per-example keywords with the ranges they are drawn from, binary)
CASES = [
    (losses.TauCrossEntropyLoss, {"temperature": (0.05, 50.0)}, False),
    (losses.TauBCEWithLogitsLoss, {"temperature": (0.05, 50.0)}, True),
    (losses.OffsetCrossEntropyLoss, {"margin": (0.01, 2.0), "temperature": (0.1, 100.0)}, False),
    (losses.OffsetBCEWithLogitsLoss, {"margin": (0.01, 2.0), "temperature": (0.1, 100.0)}, True),
    (losses.MulticlassHKRLoss, {"margin": (0.01, 2.0), "alpha_kr": (0.5, 1000.0)}, False),
    (losses.HKRLoss, {"margin": (0.01, 2.0), "alpha_kr": (0.5, 1000.0)}, True),
]
IDS = [case[0].__name__ for case in CASES]


def batch(binary: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if binary:
        return torch.randn(N, 1, generator=generator, dtype=torch.float64), torch.randint(
            0, 2, (N,), generator=generator
        )
    outputs = torch.randn(N, C, generator=generator, dtype=torch.float64)
    return outputs, torch.randint(0, C, (N,), generator=generator)


def draw(ranges: dict[str, tuple[float, float]], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + seed)
    return {
        name: torch.exp(
            math.log(low) + (math.log(high) - math.log(low)) * torch.rand(N, generator=generator)
        ).double()
        for name, (low, high) in ranges.items()
    }


@pytest.mark.parametrize(("kind", "ranges", "binary"), CASES, ids=IDS)
@pytest.mark.parametrize("seed", range(3))
def test_one_value_for_every_example_is_the_fixed_loss(kind, ranges, binary, seed):
    outputs, target = batch(binary, seed)
    values = {name: float(v[0]) for name, v in draw(ranges, seed).items()}
    fixed = kind(**values, reduction="none")(outputs, target)
    tensors = {name: torch.full((N,), value, dtype=torch.float64) for name, value in values.items()}
    per_example = kind(reduction="none")(outputs, target, **tensors)
    torch.testing.assert_close(per_example, fixed)
    as_numbers = kind(reduction="mean")(outputs, target, **values)
    torch.testing.assert_close(as_numbers, fixed.mean())


@pytest.mark.parametrize(("kind", "ranges", "binary"), CASES, ids=IDS)
@pytest.mark.parametrize("seed", range(3))
def test_each_example_is_at_its_own_values(kind, ranges, binary, seed):
    """The per-example loss of sample i is the fixed loss at sample i's values, computed on the
    whole batch (HKR's KR term is a batch estimate: its per-sample terms are batch-relative)."""
    outputs, target = batch(binary, seed)
    values = draw(ranges, seed)
    per_example = kind(reduction="none")(outputs, target, **values)
    for i in range(N):
        alone = kind(**{name: float(v[i]) for name, v in values.items()}, reduction="none")
        torch.testing.assert_close(per_example[i], alone(outputs, target)[i])


def test_inf_alpha_is_hinge_only_per_example_and_bad_values_are_refused():
    outputs, target = batch(False, 0)
    alpha = torch.full((N,), math.inf, dtype=torch.float64)
    hinge_only = losses.MulticlassHKRLoss(alpha_kr=math.inf, margin=0.5)(outputs, target)
    loss = losses.MulticlassHKRLoss(margin=0.5)(outputs, target, alpha_kr=alpha)
    torch.testing.assert_close(loss, hinge_only)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        losses.TauCrossEntropyLoss()(outputs, target, temperature=-torch.ones(N))
    with pytest.raises(ValueError, match=r"margin must be a number or \(N,\)"):
        losses.OffsetCrossEntropyLoss()(outputs, target, margin=torch.ones(N + 1))
    with pytest.raises(ValueError, match="alpha_kr must be >= 0"):
        losses.MulticlassHKRLoss()(outputs, target, alpha_kr=-torch.ones(N))
