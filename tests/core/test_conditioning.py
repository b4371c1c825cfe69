"""Property tests of loss-conditioned networks (liptune.nn.conditioning, vanilla_export_at).

For every fixed condition the network must be 1-Lipschitz in x: checked independently of the
layers' bookkeeping with the spectral norm of the dense Jacobian of small maps (exact for these
piecewise-linear networks at a point) and difference quotients between random pairs, and with
the guaranteed bound of the plain network that the export at that condition gives.
"""

import math

import pytest
import torch
from torch import nn

from liptune.bounds import head_bound, lipschitz_bound
from liptune.export import export_onnx, vanilla_export, vanilla_export_at
from liptune.losses import TauCrossEntropyLoss
from liptune.nn import (
    ConditionedSequential,
    FiLM,
    FrobeniusLinear,
    GroupSort2,
    LipschitzSequential,
    LogRange,
    OrthoLinear,
    SpectralConv2d,
    SpectralLinear,
    conditioned,
)
from worker.spec import ConvNetSpec, MLPSpec
from worker.trial._models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEEDS = range(6)


def jacobian_norm(function, x: torch.Tensor) -> float:
    """Spectral norm of the Jacobian of ``function`` at one example ``x`` (no batch dim)."""
    jacobian = torch.autograd.functional.jacobian(lambda z: function(z.unsqueeze(0)), x)
    return torch.linalg.matrix_norm(jacobian.reshape(-1, x.numel()).double(), 2).item()


def randomize_films(network: nn.Module, seed: int, std: float = 3.0) -> None:
    """Condition networks far from their near-identity start: gammas spread over (0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for film in network.modules():
            if isinstance(film, FiLM):
                for parameter in film.generator.parameters():
                    parameter.copy_(std * torch.randn(parameter.shape, generator=generator))


def ortho_mlp(seed: int, scale: str = "sigmoid") -> ConditionedSequential:
    torch.manual_seed(seed)
    base = LipschitzSequential(
        OrthoLinear(6, 8), GroupSort2(), OrthoLinear(8, 8), GroupSort2(), OrthoLinear(8, 3)
    )
    network = conditioned(base, 2, hidden=8, scale=scale).double()
    randomize_films(network, seed)
    return network.eval()


def conditions(seed: int, n: int = 4, k: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + seed)
    return 4 * torch.rand((n, k), generator=generator, dtype=torch.float64) - 2


@pytest.mark.parametrize("scale", ["sigmoid", "tanh", "none"])
@pytest.mark.parametrize("seed", SEEDS)
def test_conditioned_mlp_is_1_lipschitz_at_every_condition(seed, scale):
    network = ortho_mlp(seed, scale)
    generator = torch.Generator().manual_seed(seed)
    for t in conditions(seed):
        for _ in range(3):
            x = torch.randn(6, generator=generator, dtype=torch.float64)
            assert jacobian_norm(lambda z, t=t: network(z, t), x) <= 1 + 1e-6
        x = torch.randn((32, 6), generator=generator, dtype=torch.float64)
        y = x + 0.3 * torch.randn((32, 6), generator=generator, dtype=torch.float64)
        with torch.no_grad():
            ratio = (network(x, t) - network(y, t)).norm(dim=1) / (x - y).norm(dim=1)
        assert ratio.max().item() <= 1 + 1e-9
        exported = vanilla_export_at(network, t)
        assert lipschitz_bound(exported, (6,)) <= 1 + 1e-6
        assert head_bound(exported, (6,)) <= 1 + 1e-6


@pytest.mark.parametrize("seed", SEEDS)
def test_film_folded_into_a_layer_is_an_exact_contraction_of_it(seed):
    """The linear map layer -> FiLM at a condition, as a dense matrix: diag(gamma) W."""
    network = ortho_mlp(seed)
    layer, film = network[0], network[1]
    for t in conditions(seed):
        gamma, beta = film.modulation(t)
        x = torch.zeros(6, dtype=torch.float64)
        matrix = torch.autograd.functional.jacobian(lambda z, t=t: film(layer(z[None]), t)[0], x)
        assert torch.allclose(matrix, gamma[:, None] * layer.weight, atol=1e-12)
        assert torch.linalg.matrix_norm(matrix, 2).item() <= gamma.abs().max().item() + 1e-9
        assert torch.allclose(film(layer(x[None]), t)[0], gamma * layer.bias + beta)


@pytest.mark.parametrize("seed", SEEDS)
def test_export_at_a_condition_equals_the_conditioned_forward_pass(seed):
    network = ortho_mlp(seed)
    x = torch.randn((64, 6), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for t in conditions(seed):
        exported = vanilla_export_at(network, t)
        assert not any(isinstance(m, FiLM) for m in exported.modules())
        assert all(type(m) in (nn.Linear, GroupSort2) for m in exported)
        assert exported.certificate_mode == network.certificate_mode == "global"
        with torch.no_grad():
            assert (exported(x) - network(x, t)).abs().max().item() <= 1e-6
            assert torch.allclose(network.at(t)(x), network(x, t))
    with torch.no_grad():  # one condition per example: each row at its own condition
        ts = conditions(seed, n=64)
        rows = torch.stack(
            [vanilla_export_at(network, t)(x[i : i + 1])[0] for i, t in enumerate(ts)]
        )
        assert (network(x, ts) - rows).abs().max().item() <= 1e-6


def zoo(spec, seed: int) -> tuple[ConditionedSequential, nn.Module]:
    torch.manual_seed(seed)
    base = build_model(spec, (1, 8, 8), 10)
    network = conditioned(base, 1, hidden=4).double()
    randomize_films(network, seed)
    # settle the power iterations, then compare in eval mode
    network.train()
    with torch.no_grad():
        network(torch.rand(2, 1, 8, 8, dtype=torch.float64), torch.zeros(1))
    return network.eval(), base.eval()


@pytest.mark.parametrize(
    "spec",
    [
        MLPSpec(widths=[16, 16]),
        ConvNetSpec(channels=[4, 8], dense_widths=[16]),
        ConvNetSpec(channels=[4], dense_widths=[8], conv="aol", head="classwise"),
        ConvNetSpec(channels=[4], dense_widths=[8], conv="bcop", convs_per_stage=2),
    ],
    ids=["mlp", "convnet", "convnet-aol-classwise", "convnet-bcop"],
)
@pytest.mark.parametrize("seed", range(3))
def test_zoo_networks_conditioned_after_each_constrained_layer(spec, seed):
    network, base = zoo(spec, seed)
    films = [i for i, m in enumerate(network) if isinstance(m, FiLM)]
    constrained = [i for i, m in enumerate(base) if isinstance(m, nn.Linear | nn.Conv2d)]
    assert len(films) == len(constrained) - 1  # all but the head
    assert all(isinstance(network[i - 1], nn.Linear | nn.Conv2d) for i in films)
    assert network.certificate_mode == base.certificate_mode
    unconditioned = lipschitz_bound(vanilla_export(base), (1, 8, 8))
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((16, 1, 8, 8), generator=generator, dtype=torch.float64)
    for t in (-1.0, 0.0, 0.7, 1.0):
        condition = torch.tensor([t], dtype=torch.float64)
        exported = vanilla_export_at(network, condition)
        with torch.no_grad():
            assert (exported(x) - network(x, condition)).abs().max().item() <= 1e-6
        # scaling rows by |gamma| <= 1 never raises the guaranteed bound
        bound = lipschitz_bound(exported, (1, 8, 8))
        assert bound <= unconditioned * (1 + 1e-6)
        assert head_bound(exported, (1, 8, 8)) <= head_bound(vanilla_export(base), (1, 8, 8)) * (
            1 + 1e-6
        )
        assert jacobian_norm(lambda z, c=condition: network(z, c), x[0]) <= bound * (1 + 1e-5)


def test_export_at_a_condition_writes_onnx(tmp_path):
    onnx = pytest.importorskip("onnxruntime")
    network, _ = zoo(ConvNetSpec(channels=[4], dense_widths=[8]), 0)
    network.float()
    condition = torch.tensor([0.25])
    exported = vanilla_export_at(network, condition)
    path = export_onnx(exported, tmp_path / "model.onnx", (1, 8, 8))
    x = torch.rand((3, 1, 8, 8))
    session = onnx.InferenceSession(str(path))
    (output,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = network(x, condition)
    assert (torch.from_numpy(output) - expected).abs().max().item() <= 1e-5 * (
        1 + expected.abs().max().item()
    )


@pytest.mark.parametrize("scale", ["sigmoid", "tanh"])
def test_gamma_stays_bounded_for_extreme_condition_network_outputs(scale):
    film = FiLM(5, 1, hidden=0, scale=scale, eps=1e-3)
    with torch.no_grad():
        film.generator[0].weight.fill_(1e30)
        film.generator[0].bias.copy_(torch.tensor([1e30, -1e30, 0.0, 1e6, -1e6] + [1e30] * 5))
    for t in (torch.tensor([1.0]), torch.tensor([-1.0]), torch.tensor([1e10])):
        gamma, _ = film.modulation(t)
        assert torch.isfinite(gamma).all()
        assert gamma.abs().max().item() <= 1.0
        if scale == "sigmoid":
            assert gamma.min().item() >= 1e-3 - 1e-9
    film64 = FiLM(3, 1, hidden=0, scale=scale).double()
    with torch.no_grad():
        film64.generator[0].bias.fill_(40.0)  # sigmoid(40) and tanh(40) round to exactly 1
    assert film64.modulation(torch.zeros(1, dtype=torch.float64))[0].max().item() <= 1.0


def test_gradients_flow_to_the_condition_networks():
    network = ortho_mlp(0).float().train()
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    temperatures = LogRange(0.03, 100.0).sample(32, generator=torch.Generator().manual_seed(0))
    t = LogRange(0.03, 100.0).normalise(temperatures)[:, None].expand(32, 2)
    loss = TauCrossEntropyLoss()(network(x, t), y, temperature=temperatures)
    loss.backward()
    for film in (m for m in network if isinstance(m, FiLM)):
        for parameter in film.generator.parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert network[0].parametrizations.weight.original.grad.abs().sum() > 0


def test_per_example_temperature_matches_the_fixed_loss():
    outputs, target = torch.randn(8, 4), torch.randint(0, 4, (8,))
    taus = torch.tensor([0.03, 0.1, 1.0, 3.0, 10.0, 30.0, 100.0, 0.5])
    per_example = TauCrossEntropyLoss(reduction="none")(outputs, target, temperature=taus)
    for i, tau in enumerate(taus.tolist()):
        fixed = TauCrossEntropyLoss(tau, reduction="none")(outputs, target)[i]
        assert torch.allclose(per_example[i], fixed, rtol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        TauCrossEntropyLoss()(outputs, target, temperature=taus[:3])


def test_log_range():
    taus = LogRange(0.03, 100.0)
    assert torch.allclose(
        taus.normalise(torch.tensor([0.03, math.sqrt(3.0), 100.0])),
        torch.tensor([-1.0, 0.0, 1.0]),
        atol=1e-6,
    )
    sample = taus.sample(1000, generator=torch.Generator().manual_seed(0))
    assert sample.min() >= 0.03 and sample.max() <= 100.0
    assert abs(taus.normalise(sample).mean().item()) < 0.1
    with pytest.raises(ValueError):
        LogRange(1.0, 0.5)


def test_misplaced_or_mismatched_film_is_refused():
    with pytest.raises(ValueError, match=r"must follow an nn\.Linear or nn\.Conv2d"):
        ConditionedSequential(SpectralLinear(4, 4), GroupSort2(), FiLM(4, 1), FrobeniusLinear(4, 2))
    with pytest.raises(ValueError, match="channels"):
        ConditionedSequential(SpectralConv2d(1, 4, 3), FiLM(6, 1))
    with pytest.raises(ValueError, match="at least one FiLM"):
        ConditionedSequential(SpectralLinear(4, 4))
    network = ConditionedSequential(SpectralLinear(4, 4), FiLM(4, 2), FrobeniusLinear(4, 2))
    with pytest.raises(ValueError, match="condition"):
        network(torch.rand(3, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="rows"):
        network(torch.rand(3, 4), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="one condition"):
        vanilla_export_at(network, torch.zeros(3, 2))
