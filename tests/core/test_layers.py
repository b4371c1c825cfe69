"""The one registry of layer types (liptune.layers): each type's bound rule and ONNX emitter in
one entry, the exact-forward test that keeps a subclass from borrowing its parent's bound, and
registration of a new type, checked against the bound it composes into."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

import liptune.onnx  # noqa: F401  (sets the emitters on the registry's entries)
from liptune.bounds import check_boundable, lipschitz_bound
from liptune.layers import LAYER_TYPES, BoundRule, layer_type, register_layer


def test_every_registered_type_but_two_has_an_onnx_emitter() -> None:
    without = {t for t, entry in LAYER_TYPES.items() if entry.emitter is None}
    assert without == {nn.Unflatten, nn.AvgPool2d}


class _ReLUWithAnotherForward(nn.ReLU):
    def forward(self, input: Tensor) -> Tensor:
        return 3.0 * input


class _PlainSubclass(nn.ReLU):
    pass


def test_a_subclass_is_its_parents_type_only_with_its_parents_forward() -> None:
    assert layer_type(_PlainSubclass()) is LAYER_TYPES[nn.ReLU]
    assert layer_type(_ReLUWithAnotherForward()) is None
    with pytest.raises(TypeError, match="_ReLUWithAnotherForward"):
        check_boundable(nn.Sequential(nn.Linear(2, 2), _ReLUWithAnotherForward()))


class _Halve(nn.Module):
    """x / 2: 1/2-Lipschitz, so registering it as 1-Lipschitz is sound (not tight)."""

    def forward(self, input: Tensor) -> Tensor:
        return input / 2


@pytest.fixture
def halve_registered() -> Iterator[None]:
    register_layer(_Halve, BoundRule.ONE_LIPSCHITZ)
    try:
        yield
    finally:
        del LAYER_TYPES[_Halve]


def test_a_registered_type_is_bounded_by_its_rule(halve_registered: None) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(3, 4)
    exact = torch.linalg.matrix_norm(linear.weight.detach().double(), 2).item()
    bound = lipschitz_bound(nn.Sequential(linear, _Halve()), (3,))
    assert exact <= bound <= exact * (1 + 1e-9)
    with pytest.raises(ValueError, match="already a registered layer type"):
        register_layer(_Halve, BoundRule.ONE_LIPSCHITZ)


def test_an_unregistered_type_is_refused_by_the_bound() -> None:
    with pytest.raises(TypeError, match="_Halve"):
        lipschitz_bound(nn.Sequential(nn.Linear(3, 3), _Halve()), (3,))
