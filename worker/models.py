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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

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
from worker.spec import ConvNetSpec, MLPSpec, ModelSpec, ResNetSpec


@dataclass(frozen=True)
class ModelInfo:
    """A zoo entry: the spec class that configures it and what it is."""

    spec_class: type
    description: str


MODELS: dict[str, ModelInfo] = {
    "mlp": ModelInfo(
        MLPSpec,
        "Dense 1-Lipschitz network: SpectralLinear layers of `widths` with the activation; "
        "images are flattened.",
    ),
    "convnet": ModelInfo(
        ConvNetSpec,
        "VGG-like: per stage `convs_per_stage` convolutions of the `conv` family (same "
        "padding) with the activation, then a Lipschitz pooling; then dense layers of "
        "`dense_widths`.",
    ),
    "resnet": ModelInfo(
        ResNetSpec,
        "Small residual network: per stage a convolution of the `conv` family then "
        "`blocks_per_stage` residual blocks (`block`: x -> (x + conv(act(conv(x)))) / 2, or "
        "SLL layers), then a Lipschitz pooling; then dense layers.",
    ),
}


class _Activations:
    """Builds the spec's activation and tracks what it does to the channel count."""

    def __init__(self, spec: ModelSpec) -> None:
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


def _linear_options(spec: ModelSpec) -> dict[str, int]:
    return {
        "power_iterations": spec.power_iterations,
        "bjorck_iterations": spec.bjorck_iterations,
    }


def _dense_layers(
    spec: ModelSpec, in_features: int, widths: Sequence[int], field: str
) -> tuple[list[nn.Module], int]:
    activation = _Activations(spec)
    layers: list[nn.Module] = []
    for index, width in enumerate(widths):
        layers.append(SpectralLinear(in_features, width, **_linear_options(spec)))
        act, in_features = activation(width, f"{field}[{index}]")
        layers.append(act)
    return layers, in_features


def _head(spec: ModelSpec, in_features: int, num_classes: int) -> nn.Module:
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


def _pool(kind: str, channels: int, height: int, width: int, stage: int):
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
    layers.append(nn.Flatten())
    dense, features = _dense_layers(
        spec, channels * height * width, spec.dense_widths, "dense_widths"
    )
    return [*layers, *dense, _head(spec, features, num_classes)]


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
    layers.append(nn.Flatten())
    dense, features = _dense_layers(
        spec, channels * height * width, spec.dense_widths, "dense_widths"
    )
    return [*layers, *dense, _head(spec, features, num_classes)]


_BUILDERS = {"mlp": _mlp, "convnet": _convnet, "resnet": _resnet}


def build_model(
    spec: ModelSpec, input_shape: Sequence[int], num_classes: int
) -> LipschitzSequential:
    """The 1-Lipschitz network ``spec`` describes, for inputs of ``input_shape`` (one example:
    ``(C, H, W)`` or ``(D,)``) and ``num_classes`` classes (2 means a binary task, one output).

    Raises ``ValueError`` naming the spec field when the architecture does not fit the input
    (e.g. too many pooling stages) or the activation (e.g. an odd width for GroupSort2).
    """
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    layers = _BUILDERS[spec.name](spec, input_shape, num_classes)
    mode = "binary" if num_classes == 2 else spec.head
    return LipschitzSequential(*layers, certificate_mode=mode)
