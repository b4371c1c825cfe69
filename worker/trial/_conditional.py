"""One loss-conditioned network per study (``strategy: conditional``): its condition space, its
training view and its stored form.

A conditional study (:attr:`worker.spec.StudySpec.strategy`) searches one loss family whose
searched parameters are ranges. Its worker trains ONE network conditioned on those parameters
(:func:`liptune.nn.conditioned`: a FiLM layer with ``|gamma| <= 1`` and a free shift after each
top-level constrained layer, fed by a small network of the condition), then every trial of the
study evaluates it at the parameters the sampler suggests, exported at that condition
(:func:`liptune.export.vanilla_export_at`): for each fixed condition the exported network is a
plain 1-Lipschitz network whose guaranteed bound is checked as any trial's.

:class:`ConditionSpace` says what the condition is: the family's parameters given as a
:class:`~worker.spec.Range`, in the family's order, each normalised to ``[-1, 1]`` by a
:class:`~liptune.nn.LogRange` (log ranges) or :class:`~liptune.nn.LinearRange`; the family's other
parameters keep one value (the space's fixed value, or the default). Training draws each
example's parameters from the ranges (log-uniform for log ranges) and its loss is the family's
loss at those values (the per-example keywords of :mod:`liptune.losses`): :func:`training_view`
wraps the network and the loss so that :func:`worker.trial._training.train` runs the training as any
trial's (devices, precision, augmentation, divergence guard, cancellation). Its per-epoch
validation records are those of the network at the :meth:`ConditionSpace.reference` condition
(the middle of each range).

The trained network is stored as a state dict with the description needed to rebuild it
(:func:`network_files`, :func:`read_network`): the MLflow run of the study's conditional
training carries both (:mod:`worker.trial._run`).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from liptune.nn import (
    ConditionedSequential,
    LinearRange,
    LipschitzSequential,
    LogRange,
    conditioned,
)
from worker.spec import FAMILY_PARAMS, PARAM_DEFAULTS, LossSpec, Range, StudySpec
from worker.tracking import _mlflow as tracking
from worker.trial._models import build_model
from worker.trial._training import TrainingRun

#: The FiLM layers' condition network: one hidden layer of this width (benchmarks/README.md,
#: "Loss-conditioned network": 32 units, a sigmoid scale in [1e-3, 1]).
FILM_HIDDEN = 32
FILM_SCALE = "sigmoid"
#: Artifact paths of the conditional training's MLflow run.
STATE_ARTIFACT = "conditioned/network.pt"
DESCRIPTION_ARTIFACT = "conditioned/network.json"
#: Tag of the MLflow run that holds a study's conditioned network.
TRAINING_TAG = "liptune.conditional_training"
#: Tag of an evaluation trial's MLflow run: the run id of the network it evaluated.
NETWORK_RUN_TAG = "liptune.conditioned_network_run_id"


@dataclass(frozen=True)
class ConditionSpace:
    """The condition of a conditional study: its family, the ranged parameters (in the family's
    order) with their normalisation, and the family's other parameters' one value."""

    family: str
    ranges: dict[str, LogRange | LinearRange]
    fixed: dict[str, float]

    @classmethod
    def of(cls, spec: StudySpec) -> ConditionSpace:
        if not spec.conditional:
            raise ValueError(f"study {spec.name!r} is not conditional (strategy {spec.strategy!r})")
        family = spec.search_space.families[0]
        ranges: dict[str, LogRange | LinearRange] = {}
        fixed: dict[str, float] = {}
        for name in FAMILY_PARAMS[family]:
            values = getattr(spec.search_space, name)
            if isinstance(values, Range):
                kind = LogRange if values.log else LinearRange
                ranges[name] = kind(values.low, values.high)
            elif isinstance(values, list):
                fixed[name] = float(values[0])
            else:
                fixed[name] = PARAM_DEFAULTS[name] if values is None else float(values)
        return cls(family, ranges, fixed)

    @property
    def features(self) -> int:
        """The size of one condition."""
        return len(self.ranges)

    def reference(self) -> dict[str, float]:
        """The parameters at the middle of each range (normalised condition 0): the geometric
        mean of a log range, the midpoint of a linear one; the fixed ones as they are."""
        middle = {
            name: math.sqrt(r.low * r.high) if isinstance(r, LogRange) else (r.low + r.high) / 2
            for name, r in self.ranges.items()
        }
        return {**middle, **self.fixed}

    def loss_spec(self) -> LossSpec:
        """The family's loss at :meth:`reference` (per-example values replace the ranged
        ones during training)."""
        return LossSpec(family=self.family, **self.reference())

    def condition(self, params: dict[str, Any]) -> Tensor:
        """The condition ``(k,)`` of a trial's parameters; ``ValueError`` naming what lies
        outside the space (another family, a value off a range or off a fixed value)."""
        if params.get("loss") != self.family:
            raise ValueError(
                f"the conditioned network was trained for loss {self.family!r}, not "
                f"{params.get('loss')!r}"
            )
        values = []
        for name, normaliser in self.ranges.items():
            value = float(params[name])
            if not normaliser.low <= value <= normaliser.high:
                raise ValueError(
                    f"{name}={value:g} lies outside the range [{normaliser.low:g}, "
                    f"{normaliser.high:g}] the conditioned network was trained on"
                )
            values.append(normaliser.normalise(torch.tensor(value, dtype=torch.float64)))
        for name, fixed in self.fixed.items():
            if name in params and float(params[name]) != fixed:
                raise ValueError(
                    f"{name} is {fixed:g} in the conditioned network's training, not "
                    f"{float(params[name]):g}"
                )
        return torch.stack(values).to(torch.get_default_dtype())

    def sample(
        self, n: int, *, generator: torch.Generator | None, device: torch.device
    ) -> tuple[dict[str, Tensor], Tensor]:
        """``n`` examples' parameters (each ``(n,)``, drawn from its range) and their
        conditions ``(n, k)``."""
        values = {
            name: r.sample(n, generator=generator, device=device) for name, r in self.ranges.items()
        }
        condition = torch.stack(
            [r.normalise(values[name]).to(device) for name, r in self.ranges.items()], dim=1
        )
        return values, condition

    def describe(self) -> dict[str, Any]:
        """JSON data of the space (the stored network's description)."""
        return {
            "family": self.family,
            "ranges": {
                name: {"low": r.low, "high": r.high, "log": isinstance(r, LogRange)}
                for name, r in self.ranges.items()
            },
            "fixed": self.fixed,
        }


def build_network(
    spec: StudySpec, input_shape: tuple[int, ...], num_classes: int
) -> ConditionedSequential:
    """The study's zoo network with a FiLM layer after each top-level constrained layer, fed by
    a condition of :attr:`ConditionSpace.features` values (initialised from torch's global
    generator: seed it first)."""
    base = build_model(spec.model, input_shape, num_classes)
    # The strategy admits only the zoo's mlp and convnet, both a LipschitzSequential.
    assert isinstance(base, LipschitzSequential), type(base).__name__
    features = ConditionSpace.of(spec).features
    return conditioned(base, features, hidden=FILM_HIDDEN, scale=FILM_SCALE)


class SampledConditions(nn.Module):
    """The training view of a conditioned network: in training mode ``forward(x)`` draws each
    example's parameters (:meth:`ConditionSpace.sample`, from ``generator``) and runs the
    network at their conditions, keeping the values for :class:`PerExampleLoss`; in eval mode
    (validation) it runs the network at the reference condition."""

    def __init__(
        self, network: ConditionedSequential, space: ConditionSpace, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.network = network
        self.space = space
        self.generator = generator
        self.certificate_mode = network.certificate_mode
        reference = space.reference()
        self.register_buffer(
            "reference", space.condition({"loss": space.family, **reference}), persistent=False
        )
        self.values: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.network(x, self.reference.to(x.dtype))
        self.values, condition = self.space.sample(
            x.shape[0], generator=self.generator, device=x.device
        )
        return self.network(x, condition.to(x.dtype))


class PerExampleLoss(nn.Module):
    """The family's loss with each example at the parameters :class:`SampledConditions` drew
    for it (the per-example keywords of :mod:`liptune.losses`)."""

    def __init__(self, loss: nn.Module, sampled: SampledConditions) -> None:
        super().__init__()
        self.loss = loss
        self.sampled = sampled

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        return self.loss(outputs, target, **self.sampled.values)


def training_view(
    network: ConditionedSequential,
    space: ConditionSpace,
    loss: nn.Module,
    *,
    seed: int,
    device: torch.device,
) -> tuple[SampledConditions, PerExampleLoss]:
    """The model and loss to hand :func:`worker.trial._training.train` (the parameters' draws come
    from a generator of ``device`` seeded from ``seed``, apart from the batches' order)."""
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    sampled = SampledConditions(network, space, generator).to(device)
    return sampled, PerExampleLoss(loss, sampled)


def network_files(
    network: ConditionedSequential,
    space: ConditionSpace,
    input_shape: tuple[int, ...],
    num_classes: int,
) -> dict[str, bytes]:
    """The stored form of a trained network: its state dict and its description (the space,
    the FiLM layers, the input shape and classes), by artifact path."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, buffer)
    description = {
        "space": space.describe(),
        "film": {"hidden": FILM_HIDDEN, "scale": FILM_SCALE},
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "certificate_mode": network.certificate_mode,
    }
    return {
        STATE_ARTIFACT: buffer.getvalue(),
        DESCRIPTION_ARTIFACT: json.dumps(description, indent=1).encode(),
    }


def read_network(spec: StudySpec, files: dict[str, bytes]) -> ConditionedSequential:
    """The network :func:`network_files` stored, rebuilt from ``spec`` and loaded (strict: a
    spec that does not describe it is a ``RuntimeError``), in eval mode on the CPU."""
    description = json.loads(files[DESCRIPTION_ARTIFACT])
    space = ConditionSpace.of(spec)
    if description["space"] != json.loads(json.dumps(space.describe())):
        raise ValueError(
            f"the stored conditioned network was trained on {description['space']}, the "
            f"study's space is {space.describe()}"
        )
    network = build_network(
        spec, tuple(description["input_shape"]), int(description["num_classes"])
    )
    state = torch.load(io.BytesIO(files[STATE_ARTIFACT]), map_location="cpu", weights_only=True)
    network.load_state_dict(state)
    return network.eval()


def log_network(
    config: tracking.TrackingConfig,
    *,
    experiment: str,
    spec: StudySpec,
    study_id: str,
    network: ConditionedSequential,
    run: TrainingRun,
    input_shape: tuple[int, ...],
    num_classes: int,
    worker_id: str,
    started_at: float,
) -> str:
    """Log a study's trained conditioned network as an MLflow run of the study's experiment
    (tag :data:`TRAINING_TAG`): the data, model, training and condition space as parameters, the
    per-epoch records and ``training_time`` as metrics, the network as :func:`network_files`
    artifacts. The run id."""
    space = ConditionSpace.of(spec)
    params = tracking.flatten_params(
        spec.model_dump(mode="json", include={"dataset", "model", "training", "seed", "strategy"})
    )
    params.update(
        tracking.flatten_params(
            {"condition": space.describe(), "film": {"hidden": FILM_HIDDEN, "scale": FILM_SCALE}}
        )
    )
    tags = {
        "liptune.study_id": study_id,
        TRAINING_TAG: "true",
        "liptune.loss_family": space.family,
        "liptune.dataset": spec.dataset.name,
        "liptune.certificate_mode": network.certificate_mode,
        "liptune.status": "completed",
        "liptune.worker": worker_id,
    }
    run_id = tracking.start_run(
        config,
        experiment=experiment,
        run_name=f"{spec.name}-conditioned",
        params=params,
        tags=tags,
        start_time=started_at,
    )
    try:
        tracking.log_metrics(
            config,
            run_id,
            {"training_time": run.seconds, "epochs": float(len(run.epochs))},
            epochs=run.epochs,
            end_times=run.end_times,
        )
        tracking.log_files(config, run_id, network_files(network, space, input_shape, num_classes))
        tracking.end_run(config, run_id, "FINISHED")
    except tracking.TrackingUnavailable:
        tracking.abandon_run(config, run_id)  # ended as FAILED once MLflow is back
        raise
    return run_id


def load_network(
    config: tracking.TrackingConfig, run_id: str, spec: StudySpec
) -> ConditionedSequential:
    """The conditioned network :func:`log_network` logged in ``run_id``, on the CPU."""
    return read_network(
        spec, tracking.read_files(config, run_id, [STATE_ARTIFACT, DESCRIPTION_ARTIFACT])
    )
