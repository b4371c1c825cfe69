"""Declarative specs of a trial and of a study, validated with pydantic.

These are the contract between every part of liptune: the service validates a submitted study
with :class:`StudySpec` (nothing is stored when validation fails), the worker rebuilds the study's
sampler and each trial's :class:`TrialSpec` from it, and ``liptune train`` reads a
:class:`TrialSpec` from YAML or JSON. A spec is data, never code: models, losses and data sets are
named from registries.

Conventions of the field (see DESIGN.md): ``alpha_kr`` is the guideline's weight of the hinge term
against the KR term (``inf`` = hinge only), the HKR hinge uses ``relu(margin/2 - y f(x))``,
tau-cross-entropy is ``CE(temperature * logits, y) / temperature``, and offset cross-entropy is
``CE(temperature * (logits - margin * onehot(y)), y) / temperature`` (papers' divisor T = 1 /
temperature).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError

ACTIVATIONS = ("groupsort2", "groupsort", "fullsort", "maxmin", "householder")
#: The convolution families of the zoo's conv nets (see :mod:`worker.trial._models`).
CONV_FAMILIES = ("spectral", "aol", "bcop")
_CONV_DESCRIPTION = (
    "Convolution family: `spectral` (SpectralConv2d, Björck on the reshaped kernel, scaled by "
    "1/sqrt(kernel overlap)), `aol` (AOLConv2d, almost-orthogonal rescaling, no iterations), "
    "`bcop` (BCOPConv2d, exactly orthogonal block convolutions)."
)
_POOLING_DESCRIPTION = (
    "Downsampling after each stage, halving H and W: `invertible` (the default: space-to-depth, "
    "4x the channels: orthogonal, so it keeps the gradient norm the certificates need; measured "
    "in benchmarks/README.md, convolution families), `l2` (L2 norm of each 2x2 window), `avg` "
    "(average times 2)."
)
LOSS_FAMILIES = ("hkr", "soft_hkr", "tau_ce", "offset_ce", "hinge", "kr", "cosine")
#: The hyper-parameters each loss family reads; the search space only suggests these.
FAMILY_PARAMS: dict[str, tuple[str, ...]] = {
    "hkr": ("margin", "alpha_kr"),
    "soft_hkr": ("margin", "alpha_kr", "temperature"),
    "tau_ce": ("temperature",),
    "offset_ce": ("margin", "temperature"),
    "hinge": ("margin",),
    "kr": (),
    "cosine": (),
}
LOSS_PARAMS = ("margin", "alpha_kr", "temperature")
#: Values used when a family needs a parameter the study does not search.
PARAM_DEFAULTS = {"margin": 0.5, "alpha_kr": 50.0, "temperature": 10.0}

OBJECTIVE_METRICS = (
    "accuracy",
    "certified_accuracy",
    "mean_certified_radius",
    "empirical_robust_accuracy",
    "training_time",
)
METRICS_WITH_EPS = ("certified_accuracy", "empirical_robust_accuracy")
DEFAULT_REPORT_EPS = (0.1, 0.25, 0.5, 1.0)


def metric_key(metric: str, eps: float | None = None) -> str:
    """The name a metric is logged and stored under, e.g. ``certified_accuracy_eps_0.3``."""
    if eps is None:
        return metric
    return f"{metric}_eps_{eps:g}"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="strings")


# --------------------------------------------------------------------------- data and model


_Side = Annotated[int, Field(ge=1, le=4096)]


class DatasetSpec(_Spec):
    """A data set from the registry (one liptune ships, ``folder`` or ``npz`` for your own files,
    or an installed plugin's), optionally reduced to a binary or smaller class subset."""

    name: str = Field(
        min_length=1,
        max_length=200,
        description="A name `GET /datasets` lists: a built-in set, `folder` (an image folder), "
        "`npz` (Keras arrays) or an installed plugin's data set.",
    )
    path: str | None = Field(
        default=None,
        max_length=4096,
        description="Relative to (or inside) one of the worker's data roots: the directory of "
        "the files (built-in sets: default, the place the registry knows), the image folder "
        "(`folder`) or the .npz file (`npz`).",
    )
    classes: list[int] | list[str] | None = Field(
        default=None,
        description="Keep only these classes (label indices or class names), relabelled "
        "0..k-1 in this order; two classes make a binary task.",
    )
    size: tuple[_Side, _Side] | None = Field(
        default=None, description="`folder` only: resize every image to [H, W]."
    )
    layout: Literal["nhwc", "nchw"] | None = Field(
        default=None,
        description="`npz` and plugins: how 4-D images are stored, where the shape alone is "
        "ambiguous (e.g. (N, 3, 32, 3)).",
    )
    validation_fraction: float = Field(default=0.1, ge=0.0, lt=0.9)
    n_samples: int | None = Field(
        default=None, ge=16, le=1_000_000, description="Size of a synthetic set, or a subsample."
    )
    noise: float = Field(default=0.05, ge=0.0, le=1.0, description="Noise of synthetic sets.")

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        from worker.trial.datasets._registry import registered_datasets

        known = registered_datasets()
        if name not in known:
            raise PydanticCustomError(
                "literal_error",
                "known here: {known} (a plugin's data set needs its package installed where "
                "the API and the workers run)",
                {"known": ", ".join(sorted(known))},
            )
        return name

    @field_validator("classes")
    @classmethod
    def _distinct_classes(
        cls, classes: list[int] | list[str] | None
    ) -> list[int] | list[str] | None:
        if classes is None:
            return None
        if len(classes) < 2:
            raise ValueError("name at least two classes")
        if len(set(classes)) != len(classes):
            raise ValueError("classes must be distinct")
        if any(isinstance(c, int) and c < 0 for c in classes):
            raise ValueError("classes are non-negative label indices or class names")
        return classes

    @model_validator(mode="after")
    def _fields_of_the_kind(self) -> DatasetSpec:
        from worker.trial.datasets._registry import dataset_info

        kind = dataset_info(self.name).kind
        if kind in ("folder", "npz") and not self.path:
            what = "image folder" if kind == "folder" else ".npz file"
            raise ValueError(f"data set {self.name!r} needs `path`: your {what}, under a data root")
        if self.size is not None and kind != "folder":
            raise ValueError("`size` resizes the images of an image folder (`folder`) only")
        if self.layout is not None and kind not in ("npz", "plugin"):
            raise ValueError("`layout` applies to arrays (`npz` and plugin data sets) only")
        if kind == "plugin" and self.path is not None:
            raise ValueError(f"data set {self.name!r} comes from a plugin and takes no `path`")
        return self


class _ModelBase(_Spec):
    activation: Literal[ACTIVATIONS] = "groupsort2"  # type: ignore[valid-type]
    group_size: int = Field(default=2, ge=2, description="Group size of `groupsort`.")
    head: Literal["global", "classwise"] = Field(
        default="global",
        description="`global`: the whole logit map is 1-Lipschitz (certificate /sqrt(2)); "
        "`classwise`: each logit is (certificate /2). Binary tasks use one output.",
    )
    bjorck_iterations: int = Field(default=15, ge=0, le=100)
    power_iterations: int = Field(default=1, ge=1, le=50)


class MLPSpec(_ModelBase):
    name: Literal["mlp"] = "mlp"
    widths: list[Annotated[int, Field(ge=1, le=65536)]] = Field(default=[128, 128], min_length=1)


class ConvNetSpec(_ModelBase):
    """VGG-like: each stage is convolutions then a Lipschitz pooling, then dense layers."""

    name: Literal["convnet"] = "convnet"
    channels: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default=[16, 32], min_length=1, description="Output channels of each stage."
    )
    convs_per_stage: int = Field(default=1, ge=1, le=8)
    kernel_size: int = Field(default=3, ge=1, le=11)
    conv: Literal[CONV_FAMILIES] = Field(default="spectral", description=_CONV_DESCRIPTION)  # type: ignore[valid-type]
    pooling: Literal["l2", "avg", "invertible"] = Field(
        default="invertible", description=_POOLING_DESCRIPTION
    )
    dense_widths: list[Annotated[int, Field(ge=1, le=65536)]] = Field(default=[64])


class ResNetSpec(_ModelBase):
    """A small 1-Lipschitz residual network: x -> (x + block(x)) / 2 inside each stage."""

    name: Literal["resnet"] = "resnet"
    channels: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default=[16, 32], min_length=1)
    blocks_per_stage: int = Field(default=1, ge=1, le=8)
    block: Literal["mean", "sll"] = Field(
        default="mean",
        description="Residual block: `mean`, (x + conv(act(conv(x)))) / 2 with the `conv` "
        "family; `sll`, the SLL layer x - 2 A^T T^-1 ReLU(A x + b) (SLLConv2d, odd kernels), "
        "whose skip path keeps its full weight.",
    )
    kernel_size: int = Field(default=3, ge=1, le=11)
    conv: Literal[CONV_FAMILIES] = Field(default="spectral", description=_CONV_DESCRIPTION)  # type: ignore[valid-type]
    pooling: Literal["l2", "avg", "invertible"] = Field(
        default="invertible", description=_POOLING_DESCRIPTION
    )
    dense_widths: list[Annotated[int, Field(ge=1, le=65536)]] = Field(default=[64])


ZOO_MODELS = ("mlp", "convnet", "resnet")


class PluginModelSpec(_Spec):
    """A network from an installed model plugin: ``build(input_shape, num_outputs, **params)``
    of the entry point ``name`` in the group ``liptune.models`` (see :mod:`worker.trial._models`).

    The spec names the plugin and gives its parameters as data; the code is installed by
    whoever runs the API and the workers, never carried in a spec.
    """

    name: str = Field(min_length=1, max_length=200)
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of the plugin's builder (JSON values), checked against "
        "its signature or its parameter model.",
    )

    @model_validator(mode="after")
    def _installed_and_params_fit(self) -> PluginModelSpec:
        from worker.trial._models import model_info

        model_info(self.name).check_params(self.params)  # ValueErrors name what is wrong
        return self


def _model_kind(value: Any) -> str:
    """The zoo's own spec class for a zoo name, the plugin spec for an installed plugin's; any
    other name is no tag, and the error lists the names this process knows."""
    name = value.get("name", "mlp") if isinstance(value, dict) else getattr(value, "name", "mlp")
    if name in ZOO_MODELS:
        return name
    from worker.trial._models import registered_models

    if name in registered_models():
        return "plugin"
    return name  # not a tag: the error names it with the tags known


ModelSpec = Annotated[
    Annotated[MLPSpec, Tag("mlp")]
    | Annotated[ConvNetSpec, Tag("convnet")]
    | Annotated[ResNetSpec, Tag("resnet")]
    | Annotated[PluginModelSpec, Tag("plugin")],
    Discriminator(
        _model_kind,
        custom_error_type="unknown_model",
        custom_error_message="model.name is neither a zoo network (mlp, convnet, resnet) nor an "
        "installed model plugin; GET /models lists those this server has",
        custom_error_context={"discriminator": "name"},
    ),
]


# --------------------------------------------------------------------------- training and loss


Precision = Literal["float32", "tf32", "bf16"]


class AugmentSpec(_Spec):
    """Training augmentation of image batches (see :mod:`worker.trial._augment`): drawn per batch on
    the trial's device; validation, test, certificates and every metric use the unaugmented
    images. Only for image data (inputs shaped (C, H, W))."""

    random_crop: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Pad each side with this many zero pixels and crop back to the image size "
        "at a random offset per image (CIFAR-10's recipe: 4); 0: no crop. Below the image's "
        "height and width.",
    )
    horizontal_flip: bool = Field(
        default=False, description="Flip each image left-right with probability 1/2."
    )

    @property
    def active(self) -> bool:
        """Whether this changes any image."""
        return self.random_crop > 0 or self.horizontal_flip


class TrainingSpec(_Spec):
    epochs: int = Field(default=10, ge=1, le=10_000)
    batch_size: int = Field(default=128, ge=1, le=65_536)
    lr: float = Field(default=1e-3, gt=0.0, le=10.0)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="SGD only.")
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    schedule: Literal["none", "cosine", "step"] = "none"
    step_size: int = Field(default=10, ge=1, description="Epochs between decays (`step`).")
    gamma: float = Field(default=0.1, gt=0.0, le=1.0, description="Decay factor (`step`).")
    device: str = Field(default="auto", description="`auto`, `cpu`, `cuda` or `cuda:N`.")
    threads: int | None = Field(default=None, ge=1, le=1024, description="CPU threads.")
    precision: Precision = Field(
        default="float32",
        description="Training steps' arithmetic: `float32`, `tf32` (CUDA matmuls and "
        "convolutions) or `bf16` (autocast forward passes). Validation, export, bounds and "
        "certificates always run in float32 or float64.",
    )
    augment: AugmentSpec | None = Field(
        default=None,
        description="Training augmentation of image batches, e.g. "
        '{"random_crop": 4, "horizontal_flip": true}; off by default. Refused for data that are '
        "not images.",
    )

    @field_validator("lr")
    @classmethod
    def _finite_lr(cls, lr: float) -> float:
        if not math.isfinite(lr):
            raise ValueError("lr must be finite")
        return lr

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        base, _, index = device.partition(":")
        if base not in ("auto", "cpu", "cuda") or (
            index and (base != "cuda" or not index.isdigit())
        ):
            raise ValueError("device must be `auto`, `cpu`, `cuda` or `cuda:N`")
        return device


class LossSpec(_Spec):
    """One loss family and the values of its hyper-parameters."""

    family: Literal[LOSS_FAMILIES]  # type: ignore[valid-type]
    margin: float | None = None
    alpha_kr: float | None = None
    temperature: float | None = None

    @model_validator(mode="after")
    def _check_params(self) -> LossSpec:
        used = FAMILY_PARAMS[self.family]
        for param in LOSS_PARAMS:
            value = getattr(self, param)
            if value is None:
                continue
            if param not in used:
                raise ValueError(f"loss family {self.family!r} takes no {param}")
            _check_param_value(param, value)
        return self

    def value(self, param: str) -> float:
        """The value of ``param``, or its default when the spec leaves it out."""
        value = getattr(self, param)
        return PARAM_DEFAULTS[param] if value is None else value


def _check_param_value(param: str, value: float) -> None:
    if math.isnan(value):
        raise ValueError(f"{param} must be a number, got NaN")
    if param == "alpha_kr":
        if value < 0:
            raise ValueError("alpha_kr must be >= 0 (inf means hinge only)")
    elif not math.isfinite(value) or value <= 0:
        raise ValueError(f"{param} must be a finite number > 0, got {value}")


class PGDSpec(_Spec):
    """Empirical robust accuracy by an L2 PGD attack on a sample of the test split."""

    eps: list[Annotated[float, Field(gt=0.0, le=100.0)]] = Field(default=[0.25, 0.5], min_length=1)
    steps: int = Field(default=20, ge=1, le=1000)
    n_samples: int = Field(default=256, ge=1, le=100_000)


class TrialSpec(_Spec):
    """Everything one training needs; ``liptune train SPEC`` reads this."""

    name: str = Field(default="trial", min_length=1, max_length=200)
    dataset: DatasetSpec
    model: ModelSpec = Field(default_factory=MLPSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    loss: LossSpec
    eps: list[Annotated[float, Field(gt=0.0, le=100.0)]] = Field(
        default=list(DEFAULT_REPORT_EPS),
        min_length=1,
        description="Certified accuracy is reported at these.",
    )
    pgd: PGDSpec | None = None
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


# --------------------------------------------------------------------------- study


class Range(_Spec):
    """A numeric interval to search, linear or logarithmic."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite (use a list to include inf)")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


def _param_space_kind(value: Any) -> str:
    if isinstance(value, dict | Range):
        return "range"
    return "choices" if isinstance(value, list) else "fixed"


ParamSpace = Annotated[
    Annotated[Range, Tag("range")]
    | Annotated[list[float], Tag("choices")]
    | Annotated[float, Tag("fixed")],
    Discriminator(_param_space_kind),
]


class SearchSpace(_Spec):
    """The loss families to try and the values of their hyper-parameters.

    Each parameter is a :class:`Range`, a list of choices, or a fixed value; it is suggested only
    in trials whose family uses it (the space is conditional).
    """

    loss: list[Literal[LOSS_FAMILIES]] | Literal[LOSS_FAMILIES] = Field(  # type: ignore[valid-type]
        default=["hkr"]
    )
    margin: ParamSpace | None = None
    alpha_kr: ParamSpace | None = None
    temperature: ParamSpace | None = None
    conv: list[Literal[CONV_FAMILIES]] | None = Field(  # type: ignore[valid-type]
        default=None,
        description="Convolution families to search (convnet and resnet models), a categorical "
        "next to `loss`; absent: the model's own `conv`.",
    )

    @field_validator("conv")
    @classmethod
    def _conv_families(cls, conv: list[str] | None) -> list[str] | None:
        if conv is not None:
            if not conv:
                raise ValueError("name at least one convolution family, or leave `conv` out")
            if len(set(conv)) != len(conv):
                raise ValueError("convolution families must be distinct")
        return conv

    @field_validator("loss")
    @classmethod
    def _families_list(cls, loss: list[str] | str) -> list[str]:
        families = [loss] if isinstance(loss, str) else list(loss)
        if not families:
            raise ValueError("name at least one loss family")
        if len(set(families)) != len(families):
            raise ValueError("loss families must be distinct")
        return families

    @model_validator(mode="after")
    def _params_used_and_valid(self) -> SearchSpace:
        used = {p for family in self.families for p in FAMILY_PARAMS[family]}
        for param in LOSS_PARAMS:
            space = getattr(self, param)
            if space is None:
                continue
            if param not in used:
                raise ValueError(
                    f"{param} is searched but none of the loss families {self.families} uses it"
                )
            if isinstance(space, Range):
                _check_param_value(param, space.low)
                _check_param_value(param, space.high)
            elif isinstance(space, list):
                if not space:
                    raise ValueError(f"{param}: a list of choices needs at least one value")
                for value in space:
                    _check_param_value(param, value)
            else:
                _check_param_value(param, space)
        return self

    @property
    def families(self) -> list[str]:
        return list(self.loss)  # normalised to a list by the validator


class Objective(_Spec):
    metric: Literal[OBJECTIVE_METRICS]  # type: ignore[valid-type]
    eps: float | None = Field(default=None, gt=0.0, le=100.0)

    @model_validator(mode="after")
    def _eps_where_needed(self) -> Objective:
        if self.metric in METRICS_WITH_EPS and self.eps is None:
            raise ValueError(f"{self.metric} needs an eps")
        if self.metric not in METRICS_WITH_EPS and self.eps is not None:
            raise ValueError(f"{self.metric} takes no eps")
        return self

    @property
    def key(self) -> str:
        return metric_key(self.metric, self.eps)

    @property
    def direction(self) -> Literal["maximize", "minimize"]:
        return "minimize" if self.metric == "training_time" else "maximize"


class Requirement(Objective):
    """A constraint on a trial's metric; the front shows only trials that meet all of them."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> Requirement:
        if (self.min is None) == (self.max is None):
            raise ValueError("a requirement takes exactly one of min or max")
        return self

    def violation(self, value: float) -> float:
        """Optuna's convention: <= 0 when the requirement is met."""
        return self.min - value if self.min is not None else value - self.max  # type: ignore[operator]


SAMPLERS = ("auto", "guided", "tpe", "gp", "nsga2", "random", "grid", "qmc")
#: How a study spends its epochs: ``train`` one network per trial, or ``conditional`` one
#: loss-conditioned network per study, evaluated by every trial (:mod:`worker.trial._conditional`).
STRATEGIES = ("train", "conditional")
#: The loss families a conditional study conditions on (continuous parameters, per-example
#: losses in :mod:`liptune.losses`) and the zoo networks it conditions (a FiLM layer after each
#: top-level constrained layer, :func:`liptune.nn.conditioned`).
CONDITIONAL_FAMILIES = ("tau_ce", "hkr", "offset_ce")
CONDITIONAL_MODELS = ("mlp", "convnet")
_STRATEGY_DESCRIPTION = (
    "`train` (default): each trial trains its own network. `conditional`: the study trains ONE "
    "network conditioned on the loss parameters (a FiLM layer with |scale| <= 1 after each "
    "constrained layer; each training example at its own parameters, drawn from the search "
    "space's ranges, log-uniform for log ranges) for `training.epochs` epochs, and every trial "
    "evaluates it at the parameters the sampler suggests (exported at that condition, the same "
    "bound check, certificates, attack check, MLflow run and registrable model as a trained "
    "trial). Needs one loss family of tau_ce, hkr, offset_ce with at least one parameter given "
    "as a range, the model mlp or convnet, no pruner and no search_space.conv."
)
PRUNERS = ("none", "mo-asha")


class PrunerSpec(_Spec):
    """Early stopping of a study's trials (see :mod:`worker.search._pruning`).

    ``mo-asha``: at the rungs ``min_epochs * reduction_factor**k`` epochs, a trial whose
    validation objectives rank outside the top 1/``reduction_factor`` of the trials that reached
    the same rung (non-dominated sorting, then crowding distance; infeasible last) stops and
    ends PRUNED. ``none``: every trial trains all its epochs.
    """

    name: Literal[PRUNERS] = Field(default="none")  # type: ignore[valid-type]
    min_epochs: int = Field(default=1, ge=1, le=10_000, description="The first rung (epochs).")
    reduction_factor: int = Field(
        default=3, ge=2, le=100, description="Rungs grow by this factor; 1/this continues."
    )


class StudySpec(_Spec):
    """A study: which model on which data, which loss hyper-parameters to search, for what."""

    name: str = Field(min_length=1, max_length=200)
    dataset: DatasetSpec
    model: ModelSpec = Field(default_factory=MLPSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    search_space: SearchSpace = Field(default_factory=SearchSpace)
    objectives: list[Objective] = Field(
        default_factory=lambda: [
            Objective(metric="accuracy"),
            Objective(metric="certified_accuracy", eps=0.5),
        ],
        min_length=1,
        max_length=4,
    )
    requirements: list[Requirement] = Field(default_factory=list, max_length=8)
    eps: list[Annotated[float, Field(gt=0.0, le=100.0)]] = Field(
        default=list(DEFAULT_REPORT_EPS),
        min_length=1,
        description="Certified accuracy is logged at these too.",
    )
    pgd: PGDSpec | None = None
    n_trials: int = Field(default=20, ge=1, le=100_000)
    sampler: Literal[SAMPLERS] = Field(  # type: ignore[valid-type]
        default="guided",
        description="`guided` (default): the guidelines' trade-off ladders first, then what "
        "`auto` picks; fastest to a good front in benchmarks/study_efficiency.py.",
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    baselines: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Parameter sets enqueued before the search, e.g. "
        '{"loss": "cosine"} or {"loss": "hkr", "margin": 0.5, "alpha_kr": 100}.',
    )
    max_retries: int = Field(
        default=2, ge=0, le=10, description="Retries of a dead worker's trial."
    )
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    # Left out of dumps at its default: the specs of `train` studies stay as they were.
    strategy: Literal[STRATEGIES] = Field(  # type: ignore[valid-type]
        default="train", description=_STRATEGY_DESCRIPTION, exclude_if=lambda v: v == "train"
    )

    @property
    def conditional(self) -> bool:
        """Whether the study trains one loss-conditioned network (``strategy: conditional``)."""
        return self.strategy == "conditional"

    @model_validator(mode="after")
    def _consistent(self) -> StudySpec:
        keys = [objective.key for objective in self.objectives]
        if len(set(keys)) != len(keys):
            raise ValueError("objectives must be distinct")
        needs_pgd = any(o.metric == "empirical_robust_accuracy" for o in self.objectives)
        needs_pgd |= any(r.metric == "empirical_robust_accuracy" for r in self.requirements)
        if needs_pgd and self.pgd is None:
            raise ValueError("empirical_robust_accuracy needs a `pgd` section")
        if self.pruner.name != "none":
            if needs_pgd:
                raise ValueError(
                    "pruner: empirical_robust_accuracy is not measured after each epoch (one "
                    "PGD attack per epoch); use the pruner `none` with it"
                )
            if self.pruner.min_epochs >= self.training.epochs:
                raise ValueError(
                    f"pruner.min_epochs ({self.pruner.min_epochs}) must be below "
                    f"training.epochs ({self.training.epochs}), or no trial is ever ranked"
                )
        for index, baseline in enumerate(self.baselines):
            try:
                loss_spec_from_params(baseline)
            except ValueError as error:
                raise ValueError(f"baselines[{index}]: {error}") from None
        if self.search_space.conv is not None and not hasattr(self.model, "conv"):
            raise ValueError(
                f"search_space.conv searches convolution families, but model {self.model.name!r} "
                "has no convolutions; use model `convnet` or `resnet`, or drop search_space.conv"
            )
        if self.conditional:
            errors = self._conditional_errors()
            if errors:
                raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self

    def _conditional_errors(self) -> list[InitErrorDetails]:
        """What a ``conditional`` study cannot have, each error at the field it names."""
        errors: list[InitErrorDetails] = []

        def error(loc: tuple[str | int, ...], value: Any, reason: str) -> None:
            why = PydanticCustomError("conditional_strategy", "{reason}", {"reason": reason})
            errors.append(InitErrorDetails(type=why, loc=loc, input=value))

        prefix = "strategy `conditional` trains one network conditioned on the loss parameters"
        families = self.search_space.families
        if len(families) != 1 or families[0] not in CONDITIONAL_FAMILIES:
            error(
                ("search_space", "loss"),
                families,
                f"{prefix} of ONE loss family, one of {', '.join(CONDITIONAL_FAMILIES)}; got "
                f"{families}: submit one conditional study per family, or use strategy `train`",
            )
        else:
            family = families[0]
            ranged = []
            for name in FAMILY_PARAMS[family]:
                values = getattr(self.search_space, name)
                if isinstance(values, Range):
                    ranged.append(name)
                elif isinstance(values, list) and len(set(values)) > 1:
                    error(
                        ("search_space", name),
                        values,
                        f"{prefix}, which must be continuous: give {name} as a range "
                        '{"low": ..., "high": ..., "log": ...} (or one fixed value), not a list '
                        "of choices",
                    )
            if not ranged and not errors:
                error(
                    ("search_space", FAMILY_PARAMS[family][0]),
                    getattr(self.search_space, FAMILY_PARAMS[family][0]),
                    f"{prefix}: give at least one of {family}'s parameters "
                    f"({', '.join(FAMILY_PARAMS[family])}) as a range "
                    '{"low": ..., "high": ..., "log": ...}',
                )
            for index, baseline in enumerate(self.baselines):
                reason = _outside_space(baseline, family, self.search_space)
                if reason is not None:
                    error(
                        ("baselines", index),
                        baseline,
                        f"{prefix}: a baseline is evaluated on that network, so {reason}",
                    )
        if self.model.name not in CONDITIONAL_MODELS:
            error(
                ("model", "name"),
                self.model.name,
                f"{prefix}, with a FiLM layer after each top-level constrained layer of the zoo's "
                f"{' and '.join(CONDITIONAL_MODELS)}; model {self.model.name!r} is not supported",
            )
        if self.pruner.name != "none":
            error(
                ("pruner", "name"),
                self.pruner.name,
                f"{prefix}: its trials are evaluations that train no epochs, there is nothing to "
                "prune; use the pruner `none`",
            )
        if self.search_space.conv is not None:
            error(
                ("search_space", "conv"),
                self.search_space.conv,
                f"{prefix} and one architecture; a convolution family is not a loss parameter, "
                "drop search_space.conv (the model's own `conv` is used)",
            )
        for kind, items in (("objectives", self.objectives), ("requirements", self.requirements)):
            for index, item in enumerate(items):
                if item.metric == "training_time":
                    error(
                        (kind, index, "metric"),
                        item.metric,
                        f"{prefix}: every trial is the same network and reports its training "
                        "time, so training_time cannot be searched",
                    )
        return errors

    def report_eps(self) -> list[float]:
        """Every eps at which certified accuracy is computed: the reporting list, objectives'
        and requirements'."""
        wanted = set(self.eps)
        for item in (*self.objectives, *self.requirements):
            if item.metric == "certified_accuracy" and item.eps is not None:
                wanted.add(item.eps)
        return sorted(wanted)

    def trial_seed(self, number: int) -> int:
        """The seed of trial ``number``: its data split, initialisation and attacked points."""
        return (self.seed + number) % 2**31

    def evaluation_seed(self, number: int) -> int:
        """The seed trial ``number`` is evaluated with (data split, attacked points): its own
        (:meth:`trial_seed`), or in a conditional study the study's, whose data split the one
        network was trained on."""
        return self.seed if self.conditional else self.trial_seed(number)

    def trial_spec(self, params: dict[str, Any], *, seed: int) -> TrialSpec:
        """The trial that a set of suggested parameters stands for."""
        pgd = self.pgd
        pgd_eps = {
            item.eps
            for item in (*self.objectives, *self.requirements)
            if item.metric == "empirical_robust_accuracy"
        }
        if pgd is not None and pgd_eps - set(pgd.eps):
            pgd = pgd.model_copy(update={"eps": sorted(set(pgd.eps) | pgd_eps)})
        params = dict(params)
        conv = params.pop("conv", None)
        model = self.model if conv is None else self.model.model_copy(update={"conv": conv})
        return TrialSpec(
            name=self.name,
            dataset=self.dataset,
            model=model,
            training=self.training,
            loss=loss_spec_from_params(params),
            eps=self.report_eps(),
            pgd=pgd,
            seed=seed,
        )


def _outside_space(params: dict[str, Any], family: str, space: SearchSpace) -> str | None:
    """Why ``params`` (a baseline) lies outside the conditional study's space, or None."""
    if params.get("loss") != family:
        return f"its loss must be {family!r}, got {params.get('loss')!r}"
    for name in FAMILY_PARAMS[family]:
        if name not in params or params[name] is None:
            continue
        value, values = float(params[name]), getattr(space, name)
        if isinstance(values, Range):
            if not values.low <= value <= values.high:
                return f"{name} must lie in [{values.low:g}, {values.high:g}], got {value:g}"
        else:
            fixed = (
                PARAM_DEFAULTS[name]
                if values is None
                else (values[0] if isinstance(values, list) else values)
            )
            if value != float(fixed):
                return f"{name} is fixed at {fixed:g} in the space, got {value:g}"
    return None


def loss_spec_from_params(params: dict[str, Any]) -> LossSpec:
    """A :class:`LossSpec` from Optuna-style parameters ``{"loss": ..., "margin": ...}``."""
    if "loss" not in params:
        raise ValueError("parameters must name the loss family under `loss`")
    unknown = set(params) - {"loss", *LOSS_PARAMS}
    if unknown:
        raise ValueError(f"unknown parameters {sorted(unknown)}")
    values = {k: float(v) for k, v in params.items() if k != "loss" and v is not None}
    return LossSpec(family=params["loss"], **values)
