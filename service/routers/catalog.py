"""``/datasets``, ``/models``, ``/losses``, ``/samplers``: what a study spec may name, with
defaults and ranges.

Each entry comes from the worker's registries; ``fields`` lists the spec fields that configure
it as ``{name: {"type", "default", "minimum", "maximum", "choices", "description"}}`` (only the
keys that apply), read from the spec's own JSON schema so that it never disagrees with what
``POST /studies`` accepts.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from service.admission import check_dataset
from service.dependencies import Resources, get_resources, require_read_key
from worker.search import SAMPLER_DESCRIPTIONS
from worker.spec import DatasetSpec, PrunerSpec, TrainingSpec
from worker.trial import LOSSES, ModelInfo, registered_models
from worker.trial.datasets import DatasetError, DatasetInfo, describe_dataset, registered_datasets

router = APIRouter(tags=["catalog"], dependencies=[Depends(require_read_key)])

_BOUNDS = {
    "minimum": "minimum",
    "exclusiveMinimum": "exclusive_minimum",
    "maximum": "maximum",
    "exclusiveMaximum": "exclusive_maximum",
}


def _describe(schema: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        schema = definitions[schema["$ref"].rsplit("/", 1)[-1]]
    options = schema.get("anyOf", [schema])
    entry: dict[str, Any] = {}
    types = []
    for option in options:
        if "$ref" in option:
            option = definitions[option["$ref"].rsplit("/", 1)[-1]]
        if "enum" in option:
            entry["choices"] = option["enum"]
        if "const" in option:
            entry.setdefault("choices", []).append(option["const"])
        if option.get("type") == "array" and "enum" in option.get("items", {}):
            entry["choices"] = option["items"]["enum"]
        for key, name in _BOUNDS.items():
            for source in (option, option.get("items", {})):
                if key in source:
                    entry[name] = source[key]
        if "type" in option:
            types.append(option["type"])
    entry["type"] = " | ".join(types) if types else "object"
    if "default" in schema:
        entry["default"] = schema["default"]
    if "description" in schema:
        entry["description"] = schema["description"]
    return entry


def spec_fields(model: type[BaseModel], exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of a spec class with their type, default, bounds, choices and description."""
    schema = model.model_json_schema()
    definitions = schema.get("$defs", {})
    return {
        name: _describe(field, definitions)
        for name, field in schema["properties"].items()
        if name not in exclude
    }


def _dataset_item(name: str, info: DatasetInfo, roots: list) -> dict[str, Any]:
    item = {
        "name": name,
        "description": info.description,
        "task": info.task,
        "input_shape": list(info.input_shape),
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
        "kind": info.kind,
        "source": info.source,
        "available": info.available(roots),
        "install_hint": info.install_hint or None,
    }
    if info.kind == "plugin":  # a plugin's arrays say its shape and classes
        try:
            described = describe_dataset(DatasetSpec(name=name), roots)
        except DatasetError as error:
            item |= {"available": False, "install_hint": str(error)}
        else:
            item |= {
                "task": described.task,
                "input_shape": list(described.input_shape),
                "num_classes": described.num_classes,
                "class_names": list(described.class_names),
            }
    elif info.kind in ("folder", "npz"):  # known once a spec names the files
        item |= {"task": None, "input_shape": None, "num_classes": None, "class_names": None}
    return item


@router.get("/datasets", summary="Data sets a spec may name, and whether this server has them")
def list_datasets(resources: Resources = Depends(get_resources)) -> dict[str, Any]:
    roots = resources.settings.resolved_data_roots()
    items = [_dataset_item(name, info, roots) for name, info in registered_datasets().items()]
    return {"items": items, "fields": spec_fields(DatasetSpec, exclude=("name",))}


class _DatasetQuery(BaseModel):
    model_config = {"extra": "forbid"}
    dataset: DatasetSpec


@router.post(
    "/datasets/inspect",
    summary="Describe a data set as a spec names it: a user's folder or .npz from its headers",
)
def inspect_dataset(
    query: _DatasetQuery, resources: Resources = Depends(get_resources)
) -> dict[str, Any]:
    """The task, input shape, classes and training-set size of ``query.dataset``, read from
    the files' structure and headers (nothing is decoded or stored); a 422 names what a study
    on it would be refused for."""
    described = check_dataset(query.dataset, resources.settings)
    return {
        "name": described.name,
        "kind": described.kind,
        "task": described.task,
        "input_shape": list(described.input_shape),
        "num_classes": described.num_classes,
        "class_names": list(described.class_names),
        "train_examples": described.train_examples,
        "decoded_bytes": described.cache_bytes,
    }


def _model_item(name: str, info: ModelInfo) -> dict[str, Any]:
    item: dict[str, Any] = {
        "name": name,
        "description": info.description,
        "source": info.source,
        "kind": "plugin" if info.is_plugin else "zoo",
    }
    if info.params_model is None:
        return item | {"fields": spec_fields(info.spec_class, exclude=("name",))}
    params = spec_fields(info.params_model)
    defaults = {key: value["default"] for key, value in params.items() if "default" in value}
    return item | {
        "params": params,
        "fields": {
            "params": {
                "type": "object",
                "default": defaults,
                "description": "The plugin builder's keyword parameters: " + ", ".join(params),
            }
        },
    }


@router.get("/models", summary="Models of the zoo and installed model plugins, with settings")
def list_models() -> dict[str, Any]:
    items = [_model_item(name, info) for name, info in registered_models().items()]
    return {"items": items, "training": spec_fields(TrainingSpec)}


@router.get("/samplers", summary="Samplers a study may use, and the pruner's settings")
def list_samplers() -> dict[str, Any]:
    items = [
        {"name": name, "description": description}
        for name, description in SAMPLER_DESCRIPTIONS.items()
    ]
    return {"items": items, "pruner": spec_fields(PrunerSpec)}


@router.get("/losses", summary="Loss families, their hyper-parameters, defaults and ranges")
def list_losses() -> dict[str, Any]:
    items = [
        {
            "name": name,
            "description": info.description,
            "tasks": list(info.tasks),
            "params": {param: asdict(param_info) for param, param_info in info.params.items()},
        }
        for name, info in LOSSES.items()
    ]
    return {"items": items}
