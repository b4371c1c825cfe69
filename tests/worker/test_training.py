"""The training loop without host synchronisation, its divergence checks, the device-resident
data path and the training precision.

Host reads are counted on torch's ``meta`` device, where a tensor has no values: every read of
one (``item``, ``bool``, ``tolist``...) is a read a GPU would have to wait for. A mode counts
those reads and answers them as "all finite", so an epoch runs through; reads of CPU tensors
(Adam's step counters off CUDA) are not device reads and are left alone.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from liptune.export import lipschitz_upper_bound
from worker.spec import TrainingSpec, TrialSpec
from worker.trial._augment import build_augmentation
from worker.trial._losses import build_loss
from worker.trial._models import build_model
from worker.trial._run import LIPSCHITZ_TOLERANCE, _run_params, run_trial
from worker.trial._training import (
    Diverged,
    make_optimizer,
    train,
    train_epoch,
    validation_metrics,
)
from worker.trial.datasets import Split, load_dataset

READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist"}
BATCH = 64


class DeviceReads(TorchFunctionMode):
    """Counts reads of meta tensors and answers each with a tensor of ones of that shape."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            self.count += 1
            return getattr(torch.ones(args[0].shape), name)()
        return func(*args, **(kwargs or {}))


def spec_of(model: dict, loss: dict, classes: list[int] | None = None, **training) -> TrialSpec:
    return TrialSpec.model_validate(
        {
            "name": "training-test",
            "dataset": {"name": "digits", **({"classes": classes} if classes else {})},
            "model": model,
            "training": {"epochs": 1, "batch_size": BATCH, "lr": 3e-3, **training},
            "loss": loss,
            "eps": [0.1, 0.5],
        }
    )


def setup(spec: TrialSpec, device: str = "cpu"):
    splits = load_dataset(spec.dataset, data_roots=[], seed=spec.seed)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, splits.input_shape, splits.num_classes).to(device)
    return model, build_loss(spec.loss, splits.task), splits


CASES = [
    ({"name": "mlp", "widths": [16, 16]}, {"family": "hkr", "alpha_kr": 50, "margin": 0.5}, None),
    ({"name": "mlp", "widths": [32]}, {"family": "tau_ce", "temperature": 10}, None),
    ({"name": "mlp", "widths": [32]}, {"family": "hkr", "alpha_kr": 10, "margin": 0.5}, [0, 1]),
    (
        {"name": "convnet", "channels": [8], "dense_widths": [16]},
        {"family": "hinge", "margin": 0.5},
        None,
    ),
]


@pytest.mark.parametrize(
    ("model", "loss", "classes", "check_every"),
    [(*case, 2) for case in CASES] + [(*CASES[0], 50)],
)
def test_an_epoch_reads_the_device_only_at_its_divergence_checks(model, loss, classes, check_every):
    spec = spec_of(model, loss, classes)
    model, loss_fn, splits = setup(spec, "meta")
    optimizer = make_optimizer(model, spec.training)
    steps = 5
    part = Split(splits.train.x[: steps * BATCH - 3], splits.train.y[: steps * BATCH - 3])
    with DeviceReads() as reads:
        train_epoch(
            model, loss_fn, optimizer, part.to("meta"), BATCH, None, 1, check_every=check_every
        )
    # One read per full window of check_every steps, one at the end of the epoch: none per step.
    assert reads.count == steps // check_every + 1


AUGMENTED = (
    {"name": "convnet", "channels": [8], "dense_widths": [16], "pooling": "l2"},
    {"family": "offset_ce", "margin": 0.5, "temperature": 4.0},
)


@pytest.mark.parametrize("check_every", [2, 50])
def test_an_augmented_epoch_reads_the_device_only_at_its_divergence_checks(check_every):
    spec = spec_of(*AUGMENTED, augment={"random_crop": 2, "horizontal_flip": True})
    model, loss_fn, splits = setup(spec, "meta")
    augment = build_augmentation(spec.training.augment, splits.input_shape)
    optimizer = make_optimizer(model, spec.training)
    steps = 5
    part = Split(splits.train.x[: steps * BATCH - 3], splits.train.y[: steps * BATCH - 3])
    with DeviceReads() as reads:
        train_epoch(
            model,
            loss_fn,
            optimizer,
            part.to("meta"),
            BATCH,
            None,
            1,
            check_every=check_every,
            augment=augment,
        )
    assert reads.count == steps // check_every + 1


def test_augmentation_touches_the_training_batches_only(monkeypatch):
    """Every augmented batch is a training batch: validation, test, certificates and attacks
    see the unaugmented images; the augmentation is logged with the run's parameters."""
    calls = []

    def counting(spec, input_shape):
        inner = build_augmentation(spec, input_shape)

        def augment(x, generator):
            calls.append(len(x))
            return inner(x, generator)

        return augment

    monkeypatch.setattr("worker.trial._training.build_augmentation", counting)
    spec = spec_of(*AUGMENTED, device="cpu", augment={"random_crop": 2, "horizontal_flip": True})
    result = run_trial(spec, tracking=None, data_roots=[])
    assert result.status == "completed"
    splits = load_dataset(spec.dataset, data_roots=[], seed=spec.seed)
    assert sum(calls) == len(splits.train) and len(calls) == math.ceil(len(splits.train) / BATCH)
    params = _run_params(spec)
    assert params["training.augment.random_crop"] == "2"
    assert params["training.augment.horizontal_flip"] == "True"
    assert not any(
        key.startswith("training.augment") for key in _run_params(spec_of(*CASES[0][:2]))
    )


def test_augmenting_data_that_are_not_images_fails_before_training():
    spec = TrialSpec.model_validate(
        {
            "dataset": {"name": "two-moons", "n_samples": 64},
            "training": {"epochs": 1, "device": "cpu", "augment": {"horizontal_flip": True}},
            "loss": {"family": "offset_ce"},
        }
    )
    with pytest.raises(ValueError, match=r"training\.augment: .*shape \(2,\)"):
        run_trial(spec, tracking=None, data_roots=[])


def test_the_validation_pass_reads_the_device_once():
    spec = spec_of(*CASES[0][:2])
    model, _, splits = setup(spec, "meta")
    with DeviceReads() as reads:
        record = validation_metrics(model, splits.val.to("meta"), spec.eps, "global")
    assert reads.count == 1
    assert set(record) == {
        "val_accuracy",
        "val_certified_accuracy_eps_0.1",
        "val_certified_accuracy_eps_0.5",
        "val_mean_certified_radius",
    }


class NaNAt(nn.Module):
    """A loss that turns NaN at its ``at``-th call (a real fault: the step's loss and its
    gradients are NaN from there on)."""

    def __init__(self, loss: nn.Module, at: int) -> None:
        super().__init__()
        self.loss, self.at, self.calls = loss, at, 0

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        value = self.loss(outputs, target)
        return value * float("nan") if self.calls >= self.at else value


@pytest.mark.parametrize(
    ("at", "expected"),
    [(7, "epoch 1, step 7 (found by the divergence check of steps 6-10)"), (21, None)],
)
def test_divergence_names_the_first_bad_step_and_the_checked_range(at, expected):
    spec = spec_of(*CASES[0][:2])
    model, loss_fn, splits = setup(spec)
    steps = math.ceil(len(splits.train) / BATCH)
    assert steps == 21
    optimizer = make_optimizer(model, spec.training)
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(Diverged) as error:
        train_epoch(
            model, NaNAt(loss_fn, at), optimizer, splits.train, BATCH, generator, 1, check_every=5
        )
    expected = expected or "epoch 1, step 21 (found by the divergence check of steps 21-21)"
    assert str(error.value) == f"the training loss became nan at {expected}"


def test_a_divergence_in_a_later_epoch_fails_the_run_after_the_good_epochs():
    spec = spec_of(*CASES[0][:2], epochs=3)
    model, loss_fn, splits = setup(spec)
    run = train(
        model,
        NaNAt(loss_fn, 21 + 4),
        splits,
        spec.training,
        eps=spec.eps,
        mode="global",
        device=torch.device("cpu"),
        seed=0,
    )
    assert [record["epoch"] for record in run.epochs] == [1]
    assert run.failure_reason.startswith("the training loss became nan at epoch 2, step 4 ")
    assert all(math.isfinite(record["train_loss"]) for record in run.epochs)


def test_the_device_loop_trains_the_model_the_per_step_loop_trained():
    """The CPU path is the old loop's: same permutation, same steps, same weights."""
    spec = spec_of(*CASES[0][:2])
    model, loss_fn, splits = setup(spec)
    reference, _, _ = setup(spec)
    optimizer = make_optimizer(model, spec.training)
    mean = train_epoch(
        model, loss_fn, optimizer, splits.train, BATCH, torch.Generator().manual_seed(3), 1
    )
    # The loop as it was: a CPU permutation, the loss read after every step.
    reference_optimizer = make_optimizer(reference, spec.training)
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(3))
    total = 0.0
    reference.train()
    for batch in order.split(BATCH):
        loss = loss_fn(reference(splits.train.x[batch]), splits.train.y[batch])
        reference_optimizer.zero_grad()
        loss.backward()
        reference_optimizer.step()
        total += loss.item() * len(batch)
    for mine, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    assert mean == pytest.approx(total / len(splits.train), rel=1e-5)


def test_split_to_device_keeps_the_values_and_is_a_no_op_in_place():
    splits = load_dataset(spec_of(*CASES[0][:2]).dataset, data_roots=[], seed=0)
    moved = splits.train.to("cpu")
    assert moved.x is splits.train.x and moved.y is splits.train.y
    meta = splits.train.to("meta")
    assert (
        meta.x.is_meta and meta.x.shape == splits.train.x.shape and len(meta) == len(splits.train)
    )


def test_precision_is_float32_by_default_and_named_when_unknown():
    assert TrainingSpec().precision == "float32"
    with pytest.raises(ValueError, match="precision"):
        TrainingSpec.model_validate({"precision": "fp8"})


def test_a_bf16_trained_trial_exports_float32_weights_with_a_sound_bound():
    float32 = run_trial(spec_of(*CASES[1][:2], device="cpu"), tracking=None, data_roots=[])
    bf16 = run_trial(
        spec_of(*CASES[1][:2], device="cpu", precision="bf16"),
        tracking=None,
        data_roots=[],
    )
    assert float32.status == bf16.status == "completed"
    # bf16 really trained differently (autocast was on), and still learnt.
    assert bf16.epochs[-1]["train_loss"] != float32.epochs[-1]["train_loss"]
    assert bf16.metrics["accuracy"] > 0.5
    weights = [p for p in bf16.model.parameters()]
    assert weights and all(p.dtype == torch.float32 for p in weights)
    # Independent truth: the product of the dense layers' spectral norms in float64.
    product = 1.0
    for module in bf16.model.modules():
        if isinstance(module, nn.Linear):
            product *= torch.linalg.matrix_norm(module.weight.double(), 2).item()
    assert product <= 1.0 + LIPSCHITZ_TOLERANCE
    assert bf16.metrics["lipschitz_bound"] <= 1.0 + LIPSCHITZ_TOLERANCE
    assert lipschitz_upper_bound(bf16.model, (1, 8, 8)) == pytest.approx(
        bf16.metrics["lipschitz_bound"]
    )
    assert bf16.radii.n == float32.radii.n
