"""Argument checks shared by the layers: each error names the argument and what is allowed."""

import math

__all__ = [
    "check_channels_divisible",
    "check_input_dims",
    "pair",
    "positive_finite",
    "positive_int",
]


def positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an ``int`` >= ``minimum``, else raise a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def positive_finite(name: str, value: object) -> float:
    """Return ``value`` as a float if it is finite and > 0, else raise a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def pair(name: str, value: object) -> tuple[int, int]:
    """Expand an int or a pair of ints into a pair of positive ints."""
    values = (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[arg-type]
    if len(values) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return positive_int(name, values[0]), positive_int(name, values[1])


def check_input_dims(
    layer: str, shape: tuple[int, ...], allowed: tuple[int, ...], what: str
) -> None:
    """Raise a ``ValueError`` if ``len(shape)`` is not in ``allowed``.

    ``what`` describes the expected layout, e.g. ``"(N, C, H, W)"``.
    """
    if len(shape) not in allowed:
        raise ValueError(
            f"{layer} expects a {what} input, got a {len(shape)}-D tensor of shape {tuple(shape)}"
        )


def check_channels_divisible(layer: str, channels: int, group_size: int) -> None:
    """Raise a ``ValueError`` if ``group_size`` does not divide ``channels``."""
    if channels % group_size != 0:
        raise ValueError(
            f"{layer} sorts groups of {group_size} channels, but the input has {channels} "
            f"channels, which is not a multiple of {group_size}; change the layer's width "
            f"or the group size"
        )
