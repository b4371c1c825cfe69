"""Submission refuses every spec the server cannot run, before anything is stored.

Costs are checked against an independent truth (the parameters of the model really built on the
CPU, the bytes the CPU allocator really holds for the autograd graph); each refusal is a 422
naming the field, with nothing in the service table or Optuna's storage, and no server path in
the reason.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from tests.conftest import REPO_ROOT
from tests.service.test_api_studies import DIGITS_SPEC, make_client, stored
from worker.spec import StudySpec, TrialSpec
from worker.trial._costs import estimate, study_cost
from worker.trial._models import build_model


@pytest.fixture
def client(tmp_path: Path, sqlite_url: str) -> TestClient:
    (tmp_path / "datasets").mkdir()
    return make_client(tmp_path, sqlite_url, data_roots=[tmp_path / "datasets"])


def spec_with(**changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(DIGITS_SPEC)
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = spec
        for part in parents:
            node = node[part]
        node[leaf] = value
    return spec


def refused(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/studies", json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert stored(client) == (0, 0)
    return response.json()


@pytest.mark.parametrize(
    "model",
    [
        {"name": "mlp", "widths": [96, 64]},
        {"name": "convnet", "channels": [8, 16], "conv": "bcop"},
        {"name": "convnet", "channels": [8], "conv": "aol", "dense_widths": [32]},
        {"name": "resnet", "channels": [8, 8]},
    ],
)
def test_the_parameter_count_is_the_built_models(model: dict[str, Any]):
    spec = TrialSpec(dataset={"name": "digits"}, model=model, loss={"family": "hkr"})
    real = build_model(spec.model, (1, 8, 8), 10)
    assert estimate(spec).parameters == sum(p.numel() for p in real.parameters())


# Run in a fresh interpreter with a fixed mmap threshold: glibc raises its threshold after
# large blocks are freed, so in a process that already ran other tests the graph's tensors
# would come from reused heap pages and the resident size would not grow.
_MEASURE_FORWARD = """
import gc, os, torch
from worker.trial._models import build_model
from worker.spec import TrialSpec

def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

torch.set_num_threads(1)
spec = TrialSpec.model_validate_json(os.environ["SPEC"])
model = build_model(spec.model, (1, 28, 28), 10).train()
x = torch.rand(spec.training.batch_size, 1, 28, 28)
gc.collect()
before = rss()
logits = model(x)
assert logits.requires_grad
print(rss() - before)
"""


def test_activation_memory_matches_what_one_training_step_really_holds():
    """The resident memory a real forward pass adds while its autograd graph is alive (large
    blocks come from mmap and go back at free, so RSS sees them) is the estimate, within 2x."""
    spec = TrialSpec(
        dataset={"name": "fashion-mnist"},
        model={"name": "convnet", "channels": [16, 32]},
        training={"batch_size": 512},
        loss={"family": "hkr"},
    )
    cost = estimate(spec)
    measured = subprocess.run(
        [sys.executable, "-c", _MEASURE_FORWARD],
        env={**os.environ, "SPEC": spec.model_dump_json(), "MALLOC_MMAP_THRESHOLD_": "65536"},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    held = int(measured.stdout.split()[-1])
    assert 0.5 * held <= cost.activation_bytes + cost.constraint_bytes <= 2 * held, (held, cost)
    batch = spec.training.model_copy(update={"batch_size": 1024})
    assert estimate(spec.model_copy(update={"training": batch})).activation_bytes > 1.8 * (
        cost.activation_bytes
    )


@pytest.mark.parametrize(
    ("dataset", "model", "field", "words"),
    [
        # two hidden layers of 65,536 units
        ("fashion-mnist", {"name": "mlp", "widths": [65536, 65536]}, "body.model", "parameters"),
        # eight stages of 4,096 channels do not even fit a 32x32 image; five do, and are huge
        (
            "cifar10",
            {"name": "convnet", "channels": [4096] * 5, "dense_widths": [64]},
            "body.model",
            "parameters",
        ),
        ("fashion-mnist", {"name": "convnet", "channels": [4096] * 8}, "body.model", "stage"),
        ("digits", {"name": "convnet", "channels": [8, 8, 8, 8]}, "body.model", "too small"),
    ],
)
def test_a_spec_too_large_for_the_machine_is_refused_with_its_estimate(
    client: TestClient, dataset: str, model: dict[str, Any], field: str, words: str
):
    body = refused(client, spec_with(**{"dataset": {"name": dataset}, "model": model}))
    assert body["errors"][0]["field"] == field
    assert words in body["errors"][0]["reason"]
    if words == "parameters":
        expected = study_cost(
            StudySpec.model_validate(spec_with(dataset={"name": dataset}, model=model))
        )
        assert f"{expected.parameters:,}" in body["detail"]


def test_the_activation_limit_is_configurable_and_names_the_batch(tmp_path: Path, sqlite_url: str):
    client = make_client(tmp_path, sqlite_url, max_activation_bytes=8 * 2**20)
    body = refused(
        client,
        spec_with(
            **{
                "dataset": {"name": "fashion-mnist"},
                "model": {"name": "convnet", "channels": [64, 64]},
            }
        ),
    )
    assert body["errors"][0]["field"] == "body.training.batch_size"
    assert "GiB" in body["errors"][0]["reason"] and "batch size 128" in body["errors"][0]["reason"]
    assert client.post("/studies", json=DIGITS_SPEC).status_code == 201


def test_dataset_paths_leaving_the_data_roots_are_refused_without_revealing_paths(
    client: TestClient, tmp_path: Path
):
    outside = tmp_path / "secret-place"
    outside.mkdir()
    (tmp_path / "datasets" / "escape").symlink_to(outside)
    for path in ("../secret-place", str(outside), "escape", "fashion/../../x"):
        body = refused(client, spec_with(dataset={"name": "fashion-mnist", "path": path}))
        assert body["errors"][0]["field"] == "body.dataset.path"
        assert str(tmp_path) not in str(body) and "secret-place" not in body["detail"]


def test_classes_the_dataset_lacks_and_unknown_devices_are_refused(client: TestClient):
    body = refused(client, spec_with(dataset={"name": "digits", "classes": [0, 12]}))
    assert body["errors"][0]["field"] == "body.dataset.classes" and "12" in body["detail"]
    if torch.cuda.device_count() < 8:
        body = refused(client, spec_with(**{"training.device": "cuda:7"}))
        assert body["errors"][0]["field"] == "body.training.device"


def test_an_empty_eps_list_is_refused(client: TestClient):
    body = refused(client, spec_with(eps=[]))
    assert body["errors"][0]["field"] == "body.eps"


@pytest.mark.parametrize("field", ["name", "aliases"])
def test_registry_names_and_aliases_are_matched_whole(client: TestClient, field: str):
    from service.schemas import RegisterRequest

    value = {"name": "digits-robust\n"} if field == "name" else {"name": "m", "aliases": ["best\n"]}
    with pytest.raises(ValueError):
        RegisterRequest(**value)
