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

from service.dependencies import Resources, get_resources, require_read_key
from worker.datasets import DATASETS
from worker.losses import LOSSES
from worker.models import MODELS
from worker.samplers import SAMPLER_DESCRIPTIONS
from worker.spec import DatasetSpec, PrunerSpec, TrainingSpec

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


@router.get("/datasets", summary="Data sets a spec may name, and whether this server has them")
def list_datasets(resources: Resources = Depends(get_resources)) -> dict[str, Any]:
    roots = resources.settings.resolved_data_roots()
    items = [
        {
            "name": name,
            "description": info.description,
            "task": info.task,
            "input_shape": list(info.input_shape),
            "num_classes": info.num_classes,
            "class_names": list(info.class_names),
            "kind": info.kind,
            "available": info.available(roots),
            "install_hint": info.install_hint or None,
        }
        for name, info in DATASETS.items()
    ]
    return {"items": items, "fields": spec_fields(DatasetSpec, exclude=("name",))}


@router.get("/models", summary="Models of the zoo and their settings")
def list_models() -> dict[str, Any]:
    items = [
        {
            "name": name,
            "description": info.description,
            "fields": spec_fields(info.spec_class, exclude=("name",)),
        }
        for name, info in MODELS.items()
    ]
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
