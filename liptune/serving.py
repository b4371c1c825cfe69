"""The served model: each input answered with its label, its certified L2 radius and its logits.

A trial's registered model carries two MLflow flavors over one pickled network: ``pytorch``
(``mlflow.pytorch.load_model`` gives the raw network) and ``python_function``, whose loader
module is this one (``mlflow.pyfunc.load_model`` and ``mlflow models serve`` give a
:class:`CertifiedClassifier`). The model's folder holds, beside the network, the
:class:`Certificate` its radii come from: the head's certificate mode and the guaranteed bound L
the trial certified with, so the served radius is margin / (c L), what the trial reported
(:func:`liptune.certify.predict_with_certificates`, the same code).

This module travels with the model (the core is its ``code_paths``): it imports torch and numpy
only; MLflow and pandas, which any pyfunc host has, are imported where a pyfunc call needs them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from liptune.certify import (
    MARGIN_DIVISORS,
    CertificateMode,
    _check_mode,
    predict_with_certificates,
)

__all__ = [
    "CERTIFICATE_FILE",
    "LOADER_MODULE",
    "Certificate",
    "CertifiedClassifier",
    "InvalidInput",
]

#: The file, in the model's ``data`` folder, that holds its :class:`Certificate`.
CERTIFICATE_FILE = "certificate.json"
#: The ``loader_module`` of the model's ``python_function`` flavor.
LOADER_MODULE = __name__
#: c of margin / (c L), per certificate mode.


class InvalidInput(ValueError):
    """An input the model cannot answer: wrong shape, not numbers, or outside [0, 1]."""


@dataclass(frozen=True)
class Certificate:
    """What a network's radii are computed from: radius = margin / (c L).

    ``mode`` is the head's certificate mode (c = 1 for ``"binary"``, sqrt(2) for ``"global"``,
    2 for ``"classwise"``), ``lipschitz`` the trial's guaranteed bound L of what the head
    promises, ``input_shape`` the shape of one input (no batch dimension).
    """

    mode: CertificateMode
    lipschitz: float
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_mode(self.mode)
        if not (math.isfinite(self.lipschitz) and self.lipschitz > 0):
            raise ValueError(f"lipschitz must be a finite bound > 0, got {self.lipschitz!r}")
        shape = tuple(int(size) for size in self.input_shape)
        if not shape or min(shape) < 1:
            raise ValueError(f"input_shape must be positive sizes, got {self.input_shape!r}")
        object.__setattr__(self, "input_shape", shape)

    @property
    def constant(self) -> float:
        """c of margin / (c L)."""
        return MARGIN_DIVISORS[self.mode]

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "lipschitz": self.lipschitz,
            "input_shape": list(self.input_shape),
            "c": self.constant,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Certificate:
        mode = cast(CertificateMode, str(data["mode"]))  # checked in __post_init__
        return cls(mode, float(data["lipschitz"]), tuple(data["input_shape"]))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CERTIFICATE_FILE
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Certificate:
        return cls.from_json(json.loads((Path(folder) / CERTIFICATE_FILE).read_text()))


class CertifiedClassifier:
    """A 1-Lipschitz network and its :class:`Certificate`: an abstaining classifier.

    :meth:`certify` answers arrays; :meth:`predict` is the pyfunc interface (a pandas frame
    with one row per input, ``params={"eps": E}`` adding ``certified``); :meth:`get_raw_model`
    gives the network.
    """

    def __init__(
        self,
        network: nn.Module,
        certificate: Certificate,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 1024,
    ) -> None:
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.certificate = certificate
        self.batch_size = batch_size
        parameter = next(self.network.parameters(), None)
        self.dtype = torch.float32 if parameter is None else parameter.dtype

    def get_raw_model(self) -> nn.Module:
        """The network (what ``mlflow.pytorch.load_model`` of the same model gives)."""
        return self.network

    def inputs(self, data: Any) -> torch.Tensor:
        """``data`` as a batch of inputs, checked: shape ``(N, *input_shape)``, finite numbers
        in [0, 1]. Raises :class:`InvalidInput` with what is wrong."""
        if hasattr(data, "to_numpy"):  # a pandas frame of vector inputs
            data = data.to_numpy()
        if isinstance(data, torch.Tensor):
            data = data.detach().cpu().numpy()
        try:
            array = np.asarray(data)
        except (TypeError, ValueError) as error:
            raise InvalidInput(f"the input is not an array of numbers: {error}") from None
        expected = self.certificate.input_shape
        if array.dtype == object or not (
            np.issubdtype(array.dtype, np.number) or array.dtype == bool
        ):
            raise InvalidInput(f"the input must hold numbers, got dtype {array.dtype}")
        if array.ndim != 1 + len(expected) or tuple(array.shape[1:]) != expected:
            hint = " (add the batch dimension)" if tuple(array.shape) == expected else ""
            raise InvalidInput(
                f"the input must have shape (N, {', '.join(map(str, expected))}), "
                f"got {tuple(array.shape)}{hint}"
            )
        array = array.astype(np.float64, copy=False)
        if array.size and not np.isfinite(array).all():
            raise InvalidInput("the input holds NaN or infinite values")
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise InvalidInput(
                f"inputs must be scaled to [0, 1] (certificates are radii in that space); got "
                f"values from {array.min():g} to {array.max():g} (divide 8-bit images by 255)"
            )
        return torch.from_numpy(array).to(self.dtype)

    def certify(self, data: Any, eps: float | None = None) -> dict[str, np.ndarray]:
        """``label`` (N,) int64, ``radius`` (N,), ``logits`` (N, C) and, with ``eps``,
        ``certified`` (N,) bool (radius >= eps) of the inputs ``data``."""
        if eps is not None and not (math.isfinite(eps) and eps >= 0):
            raise InvalidInput(f"eps must be a finite radius >= 0, got {eps!r}")
        x = self.inputs(data)
        if x.shape[0] == 0:
            logits = np.zeros((0, *self._logit_shape()), dtype=np.float32)
            label, radius = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        else:
            outputs, predicted, radii = predict_with_certificates(
                self.network,
                x,
                batch_size=self.batch_size,
                mode=self.certificate.mode,
                lipschitz=self.certificate.lipschitz,
            )
            logits = outputs.reshape(len(x), -1).cpu().numpy()
            label, radius = predicted.cpu().numpy(), radii.cpu().numpy()
        answer: dict[str, np.ndarray] = {"label": label, "radius": radius, "logits": logits}
        if eps is not None:
            answer["certified"] = radius >= eps
        return answer

    def _logit_shape(self) -> tuple[int, ...]:
        with torch.no_grad():
            probe = torch.zeros((1, *self.certificate.input_shape), dtype=self.dtype)
            return tuple(self.network(probe.to(self.device)).reshape(1, -1).shape[1:])

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        """The pyfunc answer: a pandas frame with columns ``label``, ``radius``, ``logits``
        (one list per row) and, with ``params={"eps": E}``, ``certified``. An input the model
        cannot answer raises MLflow's invalid-parameter error (a 400 from the scoring
        server)."""
        import pandas as pd  # type: ignore[import-untyped]  # MLflow's pyfunc answers frames

        eps = (params or {}).get("eps")
        try:
            answer = self.certify(model_input, None if eps is None else float(eps))
        except InvalidInput as error:
            from mlflow.exceptions import MlflowException

            raise MlflowException.invalid_parameter_value(str(error)) from None
        frame = pd.DataFrame(
            {
                "label": answer["label"],
                "radius": answer["radius"].astype(np.float64),
                "logits": answer["logits"].astype(np.float64).tolist(),
            }
        )
        if "certified" in answer:
            frame["certified"] = answer["certified"]
        return frame


def _device(model_config: Mapping[str, Any] | None) -> str:
    configured = (model_config or {}).get("device")
    return configured or os.environ.get("MLFLOW_DEFAULT_PREDICTION_DEVICE") or "cpu"


def _load_pyfunc(
    data_path: str, model_config: Mapping[str, Any] | None = None
) -> CertifiedClassifier:
    """MLflow's pyfunc loader: ``data_path`` is the model's ``data`` folder (the pickled
    network and :data:`CERTIFICATE_FILE`)."""
    import mlflow.pytorch

    device = _device(model_config)
    network = mlflow.pytorch.load_model(str(Path(data_path).parent), map_location=device)
    return CertifiedClassifier(network, Certificate.load(data_path), device=device)
