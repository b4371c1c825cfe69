"""1-Lipschitz building blocks: constrained layers, GNP activations, pooling, merges, and the
FiLM layers of loss-conditioned networks."""

from liptune.nn.activations import FullSort, GroupSort, GroupSort2, HouseHolder, MaxMin
from liptune.nn.aol import AOLConv2d, AOLRescaled, aol_scales
from liptune.nn.conditioning import (
    ConditionedSequential,
    FiLM,
    FixedCondition,
    LinearRange,
    LogRange,
    conditioned,
)
from liptune.nn.containers import CERTIFICATE_MODES, LipschitzSequential, infer_certificate_mode
from liptune.nn.conv import SpectralConv2d
from liptune.nn.linear import FrobeniusLinear, OrthoLinear, SpectralLinear
from liptune.nn.merge import LipschitzResidual, ScaledConcat
from liptune.nn.orthogonal_conv import BCOPConv2d, BlockOrthogonal, compose_kernels
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
from liptune.nn.sll import SLLConv2d, SLLResidual, SLLScaled, sll_gram_row_sums

__all__ = [
    "CERTIFICATE_MODES",
    "AOLConv2d",
    "AOLRescaled",
    "BCOPConv2d",
    "BjorckSpectral",
    "BlockOrthogonal",
    "CachedParametrization",
    "ConditionedSequential",
    "FiLM",
    "FixedCondition",
    "FrobeniusLinear",
    "FrobeniusNormalized",
    "FullSort",
    "GroupSort",
    "GroupSort2",
    "HouseHolder",
    "InvertibleDownSampling",
    "LinearRange",
    "LipschitzResidual",
    "LipschitzSequential",
    "LogRange",
    "MaxMin",
    "OrthoLinear",
    "QROrthogonal",
    "SLLConv2d",
    "SLLResidual",
    "SLLScaled",
    "ScaledAvgPool2d",
    "ScaledConcat",
    "ScaledGlobalAvgPool2d",
    "ScaledGlobalL2NormPool2d",
    "ScaledL2NormPool2d",
    "SpectralConv2d",
    "SpectralLinear",
    "aol_scales",
    "bjorck_orthonormalize",
    "compose_kernels",
    "conditioned",
    "infer_certificate_mode",
    "sll_gram_row_sums",
]
