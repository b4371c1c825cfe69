"""What a study spec must pass on this server before anything is stored or run.

The schema (:class:`worker.spec.StudySpec`) checks a spec on its own; this module checks it
against the server: its limits (trials, epochs, model size and training memory from
:func:`worker.costs.study_cost`), its data roots (``dataset.path`` must stay inside them,
through ``..`` or symlinks alike), the data set's classes and input shape (the architecture
must fit it, and augmentation needs images), and the training devices the workers have.
:func:`check_study` raises a 422 problem listing every field that fails; reasons name the field
and the figure, never a server path.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from service.config import Settings
from service.problems import field_error, invalid_input
from worker.augment import augmentation_error
from worker.costs import study_cost
from worker.datasets.locate import resolved_roots
from worker.datasets.registry import dataset_info
from worker.spec import StudySpec


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def local_devices() -> list[str]:
    """The devices this machine can train on besides ``auto`` and ``cpu``."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return (["cuda"] if count else []) + [f"cuda:{index}" for index in range(count)]


def _path_errors(path: str, roots: list[Path]) -> list[dict[str, str]]:
    field = "body.dataset.path"
    pure = PurePosixPath(path)
    if pure.is_absolute() or PureWindowsPath(path).is_absolute() or path.startswith("~"):
        return [field_error(field, "must be relative to a data root, not absolute")]
    if ".." in pure.parts:
        return [field_error(field, "must stay inside the data roots: no `..` component")]
    for root in roots:
        candidate = root / pure
        if candidate.exists() and not candidate.resolve().is_relative_to(root):
            return [field_error(field, "leaves the data roots through a symbolic link")]
    return []


def check_study(spec: StudySpec, settings: Settings) -> None:
    """Raise a 422 problem naming every field of ``spec`` this server refuses."""
    errors = []
    if spec.n_trials > settings.max_trials:
        errors.append(
            field_error(
                "body.n_trials",
                f"{spec.n_trials} trials exceed this server's limit of {settings.max_trials}",
                "limit",
            )
        )
    if spec.training.epochs > settings.max_epochs:
        errors.append(
            field_error(
                "body.training.epochs",
                f"{spec.training.epochs} epochs exceed this server's limit of "
                f"{settings.max_epochs}",
                "limit",
            )
        )
    info = dataset_info(spec.dataset.name)
    if spec.dataset.path is not None:
        errors += _path_errors(spec.dataset.path, resolved_roots(settings.resolved_data_roots()))
    unknown = [c for c in spec.dataset.classes or [] if c >= info.num_classes]
    if unknown:
        errors.append(
            field_error(
                "body.dataset.classes",
                f"classes {unknown} do not exist in {info.name!r}: its labels are "
                f"0..{info.num_classes - 1}",
            )
        )
    augment_error = augmentation_error(spec.training.augment, info.input_shape)
    if augment_error is not None:
        errors.append(field_error("body.training.augment", augment_error))
    device = spec.training.device
    devices = settings.devices if settings.devices is not None else local_devices()
    if device not in ("auto", "cpu", *devices):
        offered = ", ".join(["auto", "cpu", *devices])
        errors.append(
            field_error("body.training.device", f"no device {device!r} here; known: {offered}")
        )
    if not errors:  # the cost needs a model that fits the data set
        errors += _cost_errors(spec, settings)
    if errors:
        raise invalid_input(errors)


def _cost_errors(spec: StudySpec, settings: Settings) -> list[dict[str, str]]:
    try:
        cost = study_cost(spec)
    except ValueError as error:
        return [field_error("body.model", str(error))]
    errors = []
    if cost.parameters > settings.max_parameters:
        errors.append(
            field_error(
                "body.model",
                f"the model has {cost.parameters:,} parameters, over this server's limit of "
                f"{settings.max_parameters:,}",
                "limit",
            )
        )
    step_bytes = cost.activation_bytes + cost.constraint_bytes
    if step_bytes > settings.max_activation_bytes:
        errors.append(
            field_error(
                "body.training.batch_size",
                f"a training step needs {_gib(step_bytes)} of activations and constrained "
                f"weights at batch size {cost.batch_size}, over this server's limit of "
                f"{_gib(settings.max_activation_bytes)}: use a smaller batch or model",
                "limit",
            )
        )
    return errors
