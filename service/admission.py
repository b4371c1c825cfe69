"""What a study spec must pass on this server before anything is stored or run.

The schema (:class:`worker.spec.StudySpec`) checks a spec on its own; this module checks it
against the server: its limits (trials, epochs, model size and training memory from
:func:`worker.trial._costs.study_cost`), its data roots (``dataset.path`` must stay inside them,
through ``..`` or symlinks alike), the data set as its files' structure and headers describe it
(:func:`worker.trial.datasets.describe_dataset`: a user's folder or ``.npz`` is refused here, naming
the file, for what a worker would refuse), its classes and input shape (the architecture must
fit it, and augmentation needs images), a plugin network's modules (the guaranteed bound must
know each, checked on the ``meta`` device), and the training devices the workers have.
:func:`check_study` raises a 422 problem listing every field that fails; reasons name the field
and the figure, and a user's file relative to its data root.
"""

from __future__ import annotations

import math
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

from service.config import Settings
from service.problems import field_error, invalid_input
from worker.spec import FAMILY_PARAMS, DatasetSpec, PluginModelSpec, Range, StudySpec
from worker.trial import (
    LOSSES,
    augmentation_error,
    certificate_mode,
    check_model,
    margin_limit,
    study_cost,
)
from worker.trial.datasets import DatasetDescription, DatasetError, describe_dataset, resolved_roots


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
    description, dataset_errors = _describe(spec.dataset, settings)
    errors += dataset_errors
    if description is not None:
        errors += _data_errors(spec, description, settings)
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


def relative_to_roots(message: str, roots: list[Path]) -> str:
    """``message`` with the data roots' absolute paths cut off: a user's files are named as the
    spec names them, the server's directories are not shown."""
    for root in sorted(roots, key=lambda root: len(str(root)), reverse=True):
        message = message.replace(f"{root}/", "").replace(str(root), "<data root>")
    return message


def check_dataset(dataset: DatasetSpec, settings: Settings) -> DatasetDescription:
    """The data set ``dataset`` names, described from its files' headers, or a 422 problem naming
    the field and the file (a path that leaves the data roots is refused before anything is
    read)."""
    description, errors = _describe(dataset, settings)
    if errors:
        raise invalid_input(errors)
    assert description is not None
    return description


def _describe(
    dataset: DatasetSpec, settings: Settings
) -> tuple[DatasetDescription | None, list[dict[str, str]]]:
    roots = resolved_roots(settings.resolved_data_roots())
    if dataset.path is not None:
        path_errors = _path_errors(dataset.path, roots)
        if path_errors:
            return None, path_errors
    try:
        return describe_dataset(dataset, roots), []
    except DatasetError as error:
        return None, [dataset_field_error(error, dataset, roots)]


def dataset_field_error(
    error: DatasetError, dataset: DatasetSpec, roots: list[Path]
) -> dict[str, str]:
    """The 422 entry of a data set that cannot run: the field at fault and the reason, with
    the user's files named relative to their data root."""
    field = error.field or ("path" if dataset.path else "name")
    return field_error(f"body.dataset.{field}", relative_to_roots(str(error), roots))


def _data_errors(
    spec: StudySpec, description: DatasetDescription, settings: Settings
) -> list[dict[str, str]]:
    errors = []
    if description.cache_bytes > settings.max_dataset_bytes:
        errors.append(
            field_error(
                "body.dataset",
                f"the data set decodes to {_gib(description.cache_bytes)}, over this server's "
                f"limit of {_gib(settings.max_dataset_bytes)} per study",
                "limit",
            )
        )
    augment_error = augmentation_error(spec.training.augment, description.input_shape)
    if augment_error is not None:
        errors.append(field_error("body.training.augment", augment_error))
    if isinstance(spec.model, PluginModelSpec):
        try:
            check_model(spec.model, description.input_shape, description.num_classes)
        except ValueError as error:
            errors.append(field_error("body.model", str(error)))
    return errors + _task_errors(spec, description) + _margin_errors(spec, description)


def _margin_values(space: object) -> list[float]:
    if isinstance(space, Range):
        return [space.high]
    if isinstance(space, list):
        return [float(value) for value in space]
    return [] if space is None else [float(space)]


def _margin_errors(spec: StudySpec, description: DatasetDescription) -> list[dict[str, str]]:
    """Margins no training can meet on inputs in [0, 1]^D
    (:func:`worker.trial._losses.margin_limit`); synthetic sets are not in the unit cube, so they
    are not checked."""
    if description.kind == "synthetic" or description.num_classes < 2:
        return []
    try:
        mode = certificate_mode(spec.model, description.input_shape, description.num_classes)
    except (TypeError, ValueError):
        return []  # the model's own error is reported by the cost check
    size = math.prod(description.input_shape)
    errors = []
    wanted = [
        ("body.search_space.margin", f, _margin_values(spec.search_space.margin))
        for f in spec.search_space.families
        if "margin" in FAMILY_PARAMS[f]
    ]
    wanted += [
        (f"body.baselines.{index}", baseline.get("loss"), _margin_values(baseline.get("margin")))
        for index, baseline in enumerate(spec.baselines)
        if baseline.get("loss") in FAMILY_PARAMS and "margin" in FAMILY_PARAMS[baseline["loss"]]
    ]
    for field, family, values in wanted:
        limit = margin_limit(family, mode, size)
        too_large = [value for value in values if value > limit]
        if too_large:
            errors.append(
                field_error(
                    field,
                    f"margin {max(too_large):g} of {family!r} cannot be met by any training: "
                    f"on inputs of {size} values in [0, 1] a {mode} head meets at most "
                    f"{limit:.4g} (GET /losses: the margin's limit); lower it",
                )
            )
    return errors


def _task_errors(spec: StudySpec, description: DatasetDescription) -> list[dict[str, str]]:
    """Loss families (searched or in a baseline) without a variant for the data's task: the
    worker's ``build_loss`` would fail each such trial."""
    task = description.task
    usable = sorted(name for name, info in LOSSES.items() if task in info.tasks)
    reason = (
        "loss family {family!r} has no {task} variant, and the data set "
        f"({description.num_classes} classes) makes a {task} task; use one of {usable}"
    )
    errors = [
        field_error("body.search_space.loss", reason.format(family=family, task=task))
        for family in spec.search_space.families
        if task not in LOSSES[family].tasks
    ]
    for index, baseline in enumerate(spec.baselines):
        family = baseline.get("loss")
        if family in LOSSES and task not in LOSSES[family].tasks:
            errors.append(
                field_error(f"body.baselines.{index}", reason.format(family=family, task=task))
            )
    return errors


def _cost_errors(spec: StudySpec, settings: Settings) -> list[dict[str, str]]:
    try:
        cost = study_cost(spec, resolved_roots(settings.resolved_data_roots()))
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
