"""L2 PGD and the soundness of certificates of trained 1-Lipschitz models.

Soundness: small 1-Lipschitz networks (liptune.nn SpectralLinear + GroupSort2) are trained for a
second or two on two moons (binary) and on scikit-learn's digits (10 classes, global head); every
test point is attacked with L2 PGD at 0.99 times its own certificate and no prediction may flip.
The same attack at radii well above the certificates must flip many points, so the attack is
strong enough for the first assertion to mean something.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from sklearn.datasets import load_digits, make_moons
from torch import nn

from liptune import attacks, certify, losses
from liptune import nn as lnn

torch.set_num_threads(1)


@dataclass
class Trained:
    model: nn.Module
    x_test: torch.Tensor
    y_test: torch.Tensor


def train(model: nn.Module, loss: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int):
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        index = torch.randint(0, x.shape[0], (128,), generator=generator)
        optimizer.zero_grad()
        loss(model(x[index]), y[index]).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def moons() -> Trained:
    torch.manual_seed(0)
    points, labels = make_moons(600, noise=0.1, random_state=0)
    points = (points - points.min(0)) / (points.max(0) - points.min(0))
    x, y = torch.tensor(points, dtype=torch.float32), torch.tensor(labels)
    model = lnn.LipschitzSequential(
        lnn.SpectralLinear(2, 32),
        lnn.GroupSort2(),
        lnn.SpectralLinear(32, 32),
        lnn.GroupSort2(),
        lnn.SpectralLinear(32, 1),
    )
    train(model, losses.HKRLoss(alpha_kr=10.0, margin=0.1), x[:400], y[:400], steps=200)
    return Trained(model, x[400:], y[400:])


@pytest.fixture(scope="module")
def digits() -> Trained:
    torch.manual_seed(0)
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target)
    model = lnn.LipschitzSequential(
        lnn.SpectralLinear(64, 128), lnn.GroupSort2(), lnn.SpectralLinear(128, 10)
    )
    train(model, losses.MulticlassHKRLoss(alpha_kr=50.0, margin=0.5), x[:1400], y[:1400], 150)
    return Trained(model, x[1400:], y[1400:])


@pytest.fixture(scope="module")
def digits_classwise(digits) -> Trained:
    """Each logit separately 1-Lipschitz (row-normalised head): certificates use gap / 2."""
    torch.manual_seed(0)
    model = lnn.LipschitzSequential(
        lnn.SpectralLinear(64, 128),
        lnn.GroupSort2(),
        lnn.FrobeniusLinear(128, 10, disjoint=True),
    )
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target)
    train(model, losses.MulticlassHKRLoss(alpha_kr=50.0, margin=0.5), x[:1400], y[:1400], 150)
    return Trained(model, digits.x_test, digits.y_test)


@pytest.mark.parametrize(
    ("name", "mode"),
    [("moons", "binary"), ("digits", "global"), ("digits_classwise", "classwise")],
)
def test_certificates_are_sound_under_attack(request, name, mode):
    trained: Trained = request.getfixturevalue(name)
    model, x, y = trained.model, trained.x_test, trained.y_test
    assert certify.certificate_mode(model) == mode
    logits, predictions, radii = certify.predict_with_certificates(model, x)
    correct = certify.certified_robust_accuracy(logits, y, 0.0, mode).item()
    assert correct > 0.85, "the model must learn the task for the check to be meaningful"

    x_under = attacks.l2_pgd_attack(model, x, y, 0.99 * radii, steps=40)
    _, under, _ = certify.predict_with_certificates(model, x_under)
    flipped = (under != predictions).sum().item()
    assert flipped == 0, f"{flipped} predictions flipped inside their certified radius"

    x_over = attacks.l2_pgd_attack(model, x, y, 3.0 * radii + 0.1, steps=40)
    _, over, _ = certify.predict_with_certificates(model, x_over)
    right = predictions == y
    flipped_over = ((over != predictions) & right).double().mean().item()
    assert flipped_over > 0.5, f"only {flipped_over:.0%} flipped well above the certificates"


def test_empirical_robust_accuracy_bounds_certified_accuracy(digits):
    """Certified accuracy <= empirical robust accuracy <= clean accuracy, at every eps."""
    model, x, y = digits.model, digits.x_test[:200], digits.y_test[:200]
    eps = [0.0, 0.1, 0.3, 0.6]
    empirical = attacks.empirical_robust_accuracy(model, x, y, eps, steps=20, batch_size=64)
    logits, _, _ = certify.predict_with_certificates(model, x)
    certified = certify.certified_robust_accuracy(logits, y, eps, "global")
    assert empirical.shape == (4,)
    clean = (logits.argmax(dim=1) == y).float().mean()
    torch.testing.assert_close(empirical[0], clean)
    assert bool((certified <= empirical + 1e-6).all())
    assert bool((empirical <= clean + 1e-6).all())
    assert empirical[-1] < clean, "eps = 0.6 on digits must break some points"


def test_attack_finds_the_exact_boundary_of_a_linear_model():
    """f(x) = w.x + b with ||w|| = 1: the boundary is exactly |f(x)| away; the box is not hit."""
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.6, 0.0, -0.8]]))
        model.bias.fill_(0.0)
    x = torch.tensor([[0.6, 0.5, 0.3], [0.3, 0.5, 0.5], [0.55, 0.2, 0.4]])
    y = torch.tensor([1, 0, 1])
    distance = model(x).detach().abs()[:, 0]  # 0.12, 0.22, 0.01
    below = attacks.l2_pgd_attack(model, x, y, 0.98 * distance, steps=10)
    above = attacks.l2_pgd_attack(model, x, y, 1.02 * distance, steps=10)
    signs = 2 * y - 1
    assert bool((signs * model(below).detach()[:, 0] > 0).all())
    assert bool((signs * model(above).detach()[:, 0] <= 0).all())


@pytest.mark.parametrize("random_start", [False, True])
def test_attack_stays_in_the_ball_and_the_box(digits, random_start):
    x, y = digits.x_test[:64], digits.y_test[:64]
    eps = torch.linspace(0.0, 2.0, 64)
    x_adv = attacks.l2_pgd_attack(
        digits.model,
        x,
        y,
        eps,
        steps=10,
        random_start=random_start,
        generator=torch.Generator().manual_seed(0),
    )
    assert x_adv.shape == x.shape
    assert float(x_adv.min()) >= 0.0
    assert float(x_adv.max()) <= 1.0
    assert bool(((x_adv - x).norm(dim=1) <= eps * (1 + 1e-5) + 1e-6).all())
    assert bool((x_adv[0] == x[0]).all()), "eps = 0 leaves the point unchanged"


def test_attack_leaves_the_model_as_it_found_it():
    model = lnn.LipschitzSequential(
        lnn.SpectralLinear(4, 8), lnn.GroupSort2(), lnn.SpectralLinear(8, 3)
    )
    model.train()
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    flags = [parameter.requires_grad for parameter in model.parameters()]
    x, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
    attacks.l2_pgd_attack(model, x, y, 0.3, steps=3)
    attacks.empirical_robust_accuracy(model, x, y, [0.1, 0.2], steps=3)
    assert model.training
    assert [parameter.requires_grad for parameter in model.parameters()] == flags
    assert all(parameter.grad is None for parameter in model.parameters())
    with torch.no_grad():
        adversarial = attacks.l2_pgd_attack(model, x, y, 0.3, steps=3)
    assert not torch.equal(adversarial, x), "the attack runs even under the caller's no_grad"


def test_bad_inputs_are_rejected(digits):
    model, x, y = digits.model, digits.x_test[:4], digits.y_test[:4]
    with pytest.raises(ValueError, match=r"scaled to \[0, 1\]"):
        attacks.l2_pgd_attack(model, x + 2.0, y, 0.1)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        attacks.l2_pgd_attack(model, x, y, -0.1)
    with pytest.raises(ValueError, match=r"eps must be a number or a tensor of shape \(4,\)"):
        attacks.l2_pgd_attack(model, x, y, torch.ones(3))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        attacks.l2_pgd_attack(model, x, y, 0.1, steps=0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 9\]"):
        attacks.l2_pgd_attack(model, x, torch.tensor([0, 1, 2, 10]), 0.1)
