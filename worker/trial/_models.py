"""The model zoo: 1-Lipschitz networks built from a declarative :mod:`worker.spec` model spec.

Every model is a :class:`liptune.nn.LipschitzSequential` whose head decides the certificate:

- a binary task (two classes): one output, ``FrobeniusLinear(width, 1)``, mode ``"binary"``;
- ``head="global"``: ``SpectralLinear(width, C)``, the logit map is 1-Lipschitz, ``"global"``;
- ``head="classwise"``: ``FrobeniusLinear(width, C, disjoint=True)``, each logit is 1-Lipschitz,
  ``"classwise"``.

The defaults follow the guidelines for 1-Lipschitz networks: GroupSort2 activations, L2-norm
pooling, orthogonally initialised layers (liptune's layers initialise so), Björck
orthonormalisation.

The conv nets' convolutions are of the spec's ``conv`` family, all with ``"same"`` zero padding:
``spectral`` (:class:`~liptune.nn.SpectralConv2d`), ``aol`` (:class:`~liptune.nn.AOLConv2d`)
or ``bcop`` (:class:`~liptune.nn.BCOPConv2d`). All export to plain ``nn.Conv2d``.

Networks a team already has come from model plugins: packages that declare an entry point in
the group ``liptune.models``::

    [project.entry-points."liptune.models"]
    my-net = "my_package.nets:build"

with ``build(input_shape: tuple[int, ...], num_outputs: int, **params) -> torch.nn.Module``
(``num_outputs`` is 1 for a binary task, else the class count). Its keyword parameters (their
annotations and defaults) are what a spec's ``params`` may set, or the pydantic model the
builder names as ``build.params_model``. The network's certificate mode is its
``certificate_mode`` attribute (e.g. a :class:`~liptune.nn.LipschitzSequential`'s), else
``"binary"`` for one output and ``"global"`` otherwise; the worker checks it through the
guaranteed bound of the exported weights, as for the zoo. :func:`register_model` adds a
builder from Python code.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from torch import nn

from liptune.certify import CertificateMode
from liptune.certify import certificate_mode as declared_certificate_mode
from liptune.nn import (
    AOLConv2d,
    BCOPConv2d,
    FrobeniusLinear,
    FullSort,
    GroupSort,
    GroupSort2,
    HouseHolder,
    InvertibleDownSampling,
    LipschitzResidual,
    LipschitzSequential,
    MaxMin,
    ScaledAvgPool2d,
    ScaledL2NormPool2d,
    SLLConv2d,
    SpectralConv2d,
    SpectralLinear,
)
from liptune.nn.containers import CERTIFICATE_MODES
from worker.common._plugins import EntryPoints
from worker.spec import ConvNetSpec, MLPSpec, ModelSpec, PluginModelSpec, ResNetSpec

#: The zoo's specs: the ones that carry activation, head and layer options (a plugin's do not).
ZooModelSpec = MLPSpec | ConvNetSpec | ResNetSpec

#: The entry-point group of model plugins.
ENTRY_POINT_GROUP = "liptune.models"
#: The builder's positional parameters, which a spec's ``params`` may not set.
_BUILDER_ARGUMENTS = ("input_shape", "num_outputs")


@dataclass(frozen=True)
class ModelInfo:
    """A registry entry: what the network is, the spec class that configures it, and for a
    plugin its builder, its parameter model and where it comes from.

    ``params_model`` validates a plugin spec's ``params`` (built from the builder's signature
    when the plugin names none); ``package`` is the top-level package that holds the builder,
    which travels with the logged model.
    """

    name: str
    description: str
    spec_class: type[BaseModel]
    builder: Callable[..., nn.Module] | None = None
    params_model: type[BaseModel] | None = None
    source: str = "liptune"
    package: str | None = None

    @property
    def is_plugin(self) -> bool:
        return self.builder is not None

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` validated by the parameter model (defaults filled in); ``ValueError``
        naming each wrong parameter."""
        if self.params_model is None:
            return dict(params)
        try:
            validated = self.params_model.model_validate(params)
        except ValidationError as error:
            problems = "; ".join(
                f"params.{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
                for item in error.errors()
            )
            raise ValueError(f"model {self.name!r}: {problems}") from None
        return validated.model_dump()


MODELS: dict[str, ModelInfo] = {
    "mlp": ModelInfo(
        "mlp",
        "Dense 1-Lipschitz network: SpectralLinear layers of `widths` with the activation; "
        "images are flattened.",
        MLPSpec,
    ),
    "convnet": ModelInfo(
        "convnet",
        "VGG-like: per stage `convs_per_stage` convolutions of the `conv` family (same "
        "padding) with the activation, then a Lipschitz pooling; then dense layers of "
        "`dense_widths`.",
        ConvNetSpec,
    ),
    "resnet": ModelInfo(
        "resnet",
        "Small residual network: per stage a convolution of the `conv` family then "
        "`blocks_per_stage` residual blocks (`block`: x -> (x + conv(act(conv(x)))) / 2, or "
        "SLL layers), then a Lipschitz pooling; then dense layers.",
        ResNetSpec,
    ),
}


def _params_from_signature(name: str, builder: Callable[..., nn.Module]) -> type[BaseModel]:
    """A pydantic model of the builder's keyword parameters (annotation and default each)."""
    fields: dict[str, Any] = {}
    for parameter in list(inspect.signature(builder).parameters.values())[2:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        annotation = Any if parameter.annotation is parameter.empty else parameter.annotation
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[parameter.name] = (annotation, default)
    return create_model(
        f"{name.title().replace('-', '').replace('_', '')}Params",
        __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
        **fields,
    )


def register_model(
    name: str,
    build: Callable[..., nn.Module],
    *,
    description: str | None = None,
    params_model: type[BaseModel] | None = None,
    source: str = "python",
) -> ModelInfo:
    """Register the plugin builder ``build(input_shape, num_outputs, **params)`` as ``name``.

    ``params_model`` (default: ``build.params_model`` if it has one, else a model of the
    builder's signature) checks a spec's ``params``. A taken name raises ``ValueError``.
    """
    _PLUGINS.load()
    return _register(name, build, description, params_model, source)


def _register(
    name: str,
    build: Callable[..., nn.Module],
    description: str | None,
    params_model: type[BaseModel] | None,
    source: str,
) -> ModelInfo:
    if name in MODELS:
        raise ValueError(f"model {name!r} is registered already ({MODELS[name].source})")
    if not callable(build):
        raise TypeError(f"model {name!r}: the builder must be callable, got {build!r}")
    positional = list(inspect.signature(build).parameters)[:2]
    if positional != list(_BUILDER_ARGUMENTS):
        raise TypeError(
            f"model {name!r}: the builder must take (input_shape, num_outputs, **params), "
            f"takes {positional}"
        )
    params_model = params_model or getattr(build, "params_model", None)
    doc = (description or inspect.getdoc(build) or f"Network from {source}.").strip()
    info = ModelInfo(
        name=name,
        description=doc.split("\n\n")[0].replace("\n", " "),
        spec_class=PluginModelSpec,
        builder=build,
        params_model=params_model or _params_from_signature(name, build),
        source=source,
        package=(getattr(build, "__module__", None) or "").split(".")[0] or None,
    )
    MODELS[name] = info
    return info


def _register_entry(name: str, loaded: object, source: str) -> None:
    if not callable(loaded):
        raise TypeError(f"{type(loaded).__name__} is not a builder function")
    _register(name, loaded, None, None, source)


_PLUGINS = EntryPoints(ENTRY_POINT_GROUP, "model plugin", _register_entry)


def registered_models() -> dict[str, ModelInfo]:
    """Every model a spec may name: the zoo and the installed plugins."""
    _PLUGINS.load()
    return dict(MODELS)


def model_info(name: str) -> ModelInfo:
    """The registry entry of ``name``; ``ValueError`` lists the known names otherwise."""
    _PLUGINS.load()
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known here: {sorted(MODELS)} (a plugin's model needs its "
            "package installed where the API and the workers run)"
        ) from None


class _Activations:
    """Builds the spec's activation and tracks what it does to the channel count."""

    def __init__(self, spec: ZooModelSpec) -> None:
        self.spec = spec
        self.divisor = {"groupsort2": 2, "groupsort": spec.group_size, "householder": 2}.get(
            spec.activation, 1
        )

    def __call__(self, channels: int, field: str) -> tuple[nn.Module, int]:
        """The activation after a layer with ``channels`` outputs (named ``field`` in the spec),
        and the channel count after it."""
        if channels % self.divisor:
            raise ValueError(
                f"model.{field} = {channels}: activation {self.spec.activation!r} needs a "
                f"multiple of {self.divisor} channels"
            )
        factories: dict[str, Callable[[], nn.Module]] = {
            "groupsort2": GroupSort2,
            "groupsort": lambda: GroupSort(self.spec.group_size),
            "fullsort": FullSort,
            "maxmin": MaxMin,
            "householder": lambda: HouseHolder(channels),
        }
        activation = factories[self.spec.activation]()
        return activation, 2 * channels if self.spec.activation == "maxmin" else channels


class _LinearOptions(TypedDict):
    power_iterations: int
    bjorck_iterations: int


def _linear_options(spec: ZooModelSpec) -> _LinearOptions:
    return {
        "power_iterations": spec.power_iterations,
        "bjorck_iterations": spec.bjorck_iterations,
    }


def _dense_layers(
    spec: ZooModelSpec, in_features: int, widths: Sequence[int], field: str
) -> tuple[list[nn.Module], int]:
    activation = _Activations(spec)
    layers: list[nn.Module] = []
    for index, width in enumerate(widths):
        layers.append(SpectralLinear(in_features, width, **_linear_options(spec)))
        act, in_features = activation(width, f"{field}[{index}]")
        layers.append(act)
    return layers, in_features


def _classifier(spec: ConvNetSpec | ResNetSpec, features: int, num_classes: int) -> list[nn.Module]:
    """After the last stage: flatten the ``features`` values, the dense layers, the head."""
    dense, width = _dense_layers(spec, features, spec.dense_widths, "dense_widths")
    return [nn.Flatten(), *dense, _head(spec, width, num_classes)]


def _head(spec: ZooModelSpec, in_features: int, num_classes: int) -> nn.Module:
    if num_classes == 2:
        return FrobeniusLinear(in_features, 1)
    if spec.head == "classwise":
        return FrobeniusLinear(in_features, num_classes, disjoint=True)
    return SpectralLinear(in_features, num_classes, **_linear_options(spec))


def _conv(spec: ConvNetSpec | ResNetSpec, in_channels: int, out_channels: int) -> nn.Conv2d:
    if spec.conv == "aol":
        return AOLConv2d(in_channels, out_channels, spec.kernel_size, padding="same")
    if spec.conv == "bcop":
        return BCOPConv2d(in_channels, out_channels, spec.kernel_size, padding="same")
    return SpectralConv2d(
        in_channels, out_channels, spec.kernel_size, padding="same", **_linear_options(spec)
    )


def _image_shape(spec: ModelSpec, input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(
            f"model {spec.name!r} needs images (C, H, W), the data set gives inputs of shape "
            f"{tuple(input_shape)}; use model `mlp`"
        )
    channels, height, width = input_shape
    return channels, height, width


def _pool(
    kind: str, channels: int, height: int, width: int, stage: int
) -> tuple[nn.Module, int, int, int]:
    """(pooling layer, channels, height, width) after a stage; halves H and W."""
    if height < 2 or width < 2:
        raise ValueError(
            f"stage {stage} receives {height}x{width} feature maps, too small to pool: use "
            "fewer `channels` stages for this input size"
        )
    if kind == "invertible":
        if height % 2 or width % 2:
            raise ValueError(
                f"pooling 'invertible' needs even feature maps, stage {stage} gets "
                f"{height}x{width}: use fewer stages or pooling 'l2'"
            )
        return InvertibleDownSampling(2), 4 * channels, height // 2, width // 2
    layer = ScaledL2NormPool2d(2) if kind == "l2" else ScaledAvgPool2d(2)
    return layer, channels, height // 2, width // 2


def _mlp(spec: MLPSpec, input_shape: Sequence[int], num_classes: int) -> list[nn.Module]:
    in_features = 1
    for size in input_shape:
        in_features *= size
    layers: list[nn.Module] = [nn.Flatten()] if len(input_shape) > 1 else []
    dense, in_features = _dense_layers(spec, in_features, spec.widths, "widths")
    return [*layers, *dense, _head(spec, in_features, num_classes)]


def _convnet(spec: ConvNetSpec, input_shape: Sequence[int], num_classes: int) -> list[nn.Module]:
    channels, height, width = _image_shape(spec, input_shape)
    activation = _Activations(spec)
    layers: list[nn.Module] = []
    for stage, out_channels in enumerate(spec.channels):
        for _ in range(spec.convs_per_stage):
            layers.append(_conv(spec, channels, out_channels))
            act, channels = activation(out_channels, f"channels[{stage}]")
            layers.append(act)
        pool, channels, height, width = _pool(spec.pooling, channels, height, width, stage)
        layers.append(pool)
    return [*layers, *_classifier(spec, channels * height * width, num_classes)]


def _resnet(spec: ResNetSpec, input_shape: Sequence[int], num_classes: int) -> list[nn.Module]:
    channels, height, width = _image_shape(spec, input_shape)
    if spec.block == "sll" and spec.kernel_size % 2 == 0:
        raise ValueError(
            f"model.kernel_size = {spec.kernel_size}: block 'sll' keeps the map's size with "
            "'same' padding, which needs an odd kernel size"
        )
    activation = _Activations(spec)
    layers: list[nn.Module] = []
    for stage, out_channels in enumerate(spec.channels):
        field = f"channels[{stage}]"
        layers.append(_conv(spec, channels, out_channels))
        act, channels = activation(out_channels, field)
        layers.append(act)
        for _ in range(spec.blocks_per_stage):
            if spec.block == "sll":
                layers.append(SLLConv2d(channels, channels, spec.kernel_size))
                continue
            inner_act, inner_channels = activation(channels, field)
            block = nn.Sequential(
                _conv(spec, channels, channels),
                inner_act,
                _conv(spec, inner_channels, channels),
            )
            layers.append(LipschitzResidual(block, mode="mean"))
        pool, channels, height, width = _pool(spec.pooling, channels, height, width, stage)
        layers.append(pool)
    return [*layers, *_classifier(spec, channels * height * width, num_classes)]


def num_outputs(num_classes: int) -> int:
    """Outputs of a classifier of ``num_classes``: one for a binary task."""
    return 1 if num_classes == 2 else num_classes


def _plugin_network(
    spec: PluginModelSpec, input_shape: Sequence[int], num_classes: int
) -> nn.Module:
    info = model_info(spec.name)
    assert info.builder is not None
    outputs = num_outputs(num_classes)
    network = info.builder(tuple(input_shape), outputs, **info.check_params(spec.params))
    if not isinstance(network, nn.Module):
        raise TypeError(
            f"model {spec.name!r} ({info.source}) returned {type(network).__name__}, not a "
            "torch.nn.Module"
        )
    mode: object = getattr(network, "certificate_mode", None)
    if mode is None:
        mode = "binary" if outputs == 1 else "global"
    if mode not in CERTIFICATE_MODES or (mode == "binary") != (outputs == 1):
        raise ValueError(
            f"model {spec.name!r}: certificate_mode {mode!r} does not fit {outputs} output(s) "
            "(binary needs one output; global and classwise one per class)"
        )
    # nn.Module.__setattr__ is annotated for tensors and modules only; any other value (this
    # str) is stored as a plain attribute, which is what liptune.certify.certificate_mode reads.
    network.certificate_mode = mode  # type: ignore[assignment]
    return network


def build_model(spec: ModelSpec, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The 1-Lipschitz network ``spec`` describes, for inputs of ``input_shape`` (one example:
    ``(C, H, W)`` or ``(D,)``) and ``num_classes`` classes (2 means a binary task, one output).

    Zoo networks are :class:`~liptune.nn.LipschitzSequential`; a plugin's is what its builder
    returns, with ``certificate_mode`` set. Raises ``ValueError`` naming the spec field when the
    architecture does not fit the input (e.g. too many pooling stages) or the activation (e.g.
    an odd width for GroupSort2).
    """
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    if isinstance(spec, PluginModelSpec):
        return _plugin_network(spec, input_shape, num_classes)
    if isinstance(spec, MLPSpec):
        layers = _mlp(spec, input_shape, num_classes)
    elif isinstance(spec, ConvNetSpec):
        layers = _convnet(spec, input_shape, num_classes)
    else:
        layers = _resnet(spec, input_shape, num_classes)
    mode = "binary" if num_classes == 2 else spec.head
    return LipschitzSequential(*layers, certificate_mode=mode)


def certificate_mode(
    spec: ModelSpec, input_shape: Sequence[int], num_classes: int
) -> CertificateMode:
    """The certificate mode the network of ``spec`` will have (a plugin's is read from its
    network, built on the ``meta`` device)."""
    if num_classes == 2:
        return "binary"
    if not isinstance(spec, PluginModelSpec):
        return spec.head
    with torch.device("meta"):
        return declared_certificate_mode(build_model(spec, input_shape, num_classes))


def check_model(spec: ModelSpec, input_shape: Sequence[int], num_classes: int) -> None:
    """Build the network on the ``meta`` device (no memory, no weights) and check that the
    guaranteed bound knows each of its modules once exported; ``ValueError`` naming the module
    type otherwise, or naming the plugin's own error."""
    from liptune.bounds import check_boundable
    from liptune.export import vanilla_export

    try:
        with torch.device("meta"):
            network = build_model(spec, input_shape, num_classes)
    except (TypeError, ValueError) as error:
        raise ValueError(str(error)) from None
    try:
        check_boundable(vanilla_export(network))
    except TypeError as error:
        raise ValueError(
            f"model {spec.name!r} cannot be certified: {error}. Build the network from "
            "liptune.nn's layers (constrained linear and convolution layers, 1-Lipschitz "
            "activations and pooling) in an nn.Sequential or LipschitzSequential"
        ) from None
