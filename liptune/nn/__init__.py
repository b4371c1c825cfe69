"""1-Lipschitz building blocks: constrained layers, GNP activations, pooling, merges."""

from liptune.nn.activations import FullSort, GroupSort, GroupSort2, HouseHolder, MaxMin
from liptune.nn.containers import CERTIFICATE_MODES, LipschitzSequential, infer_certificate_mode
from liptune.nn.conv import SpectralConv2d
from liptune.nn.linear import FrobeniusLinear, OrthoLinear, SpectralLinear
from liptune.nn.merge import LipschitzResidual, ScaledConcat
from liptune.nn.parametrizations import (
    BjorckSpectral,
    CachedParametrization,
    FrobeniusNormalized,
    QROrthogonal,
    bjorck_orthonormalize,
)
from liptune.nn.pooling import (
    InvertibleDownSampling,
    ScaledAvgPool2d,
    ScaledGlobalAvgPool2d,
    ScaledGlobalL2NormPool2d,
    ScaledL2NormPool2d,
)

__all__ = [
    "CERTIFICATE_MODES",
    "BjorckSpectral",
    "CachedParametrization",
    "FrobeniusLinear",
    "FrobeniusNormalized",
    "FullSort",
    "GroupSort",
    "GroupSort2",
    "HouseHolder",
    "InvertibleDownSampling",
    "LipschitzResidual",
    "LipschitzSequential",
    "MaxMin",
    "OrthoLinear",
    "QROrthogonal",
    "ScaledAvgPool2d",
    "ScaledConcat",
    "ScaledGlobalAvgPool2d",
    "ScaledGlobalL2NormPool2d",
    "ScaledL2NormPool2d",
    "SpectralConv2d",
    "SpectralLinear",
    "bjorck_orthonormalize",
    "infer_certificate_mode",
]
