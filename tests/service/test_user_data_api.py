"""A user's data and network at submission: every spec a worker would refuse gets its 422, naming
the field and the file, before anything is stored.

The files are made here (Pillow, numpy) under the API's data root; plugin networks are
registered in-process with :func:`worker.trial._models.register_model`, as an installed entry point
would be (the installed path is tested end to end in ``test_user_data_e2e.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from liptune import nn as lnn
from tests.service.test_api_studies import PROBLEM, changed, make_client, stored
from worker.spec import TrialSpec
from worker.trial import _models as models
from worker.trial._run import run_trial
from worker.trial.datasets import clear_cache, clear_descriptions

SPEC: dict[str, Any] = {
    "name": "own-data",
    "dataset": {"name": "folder", "path": "pets"},
    "model": {"name": "mlp", "widths": [16]},
    "training": {"epochs": 1, "batch_size": 8},
    "search_space": {"loss": ["hkr"]},
    "n_trials": 2,
}


class Doubled(nn.Module):
    """A custom forward the bound cannot see into."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.inner(x)


class SneakyLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * super().forward(x)


def loose_net(input_shape: tuple[int, ...], num_outputs: int, width: int = 16) -> nn.Module:
    """An unconstrained dense network: nothing keeps it 1-Lipschitz."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(int(np.prod(input_shape)), width),
        nn.ReLU(),
        nn.Linear(width, num_outputs),
    )


def doubled_net(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    return Doubled(
        nn.Sequential(nn.Flatten(), lnn.SpectralLinear(int(np.prod(input_shape)), num_outputs))
    )


def sneaky_net(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), SneakyLinear(int(np.prod(input_shape)), num_outputs))


@pytest.fixture(autouse=True)
def _plugins_and_caches():
    clear_cache()
    clear_descriptions()
    added = [
        models.register_model("test-loose", loose_net, source="test"),
        models.register_model("test-doubled", doubled_net, source="test"),
        models.register_model("test-sneaky", sneaky_net, source="test"),
    ]
    yield
    for info in added:
        models.MODELS.pop(info.name)
    clear_cache()
    clear_descriptions()


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "home" / "datasets"
    for split, count in (("train", 6), ("test", 3)):
        for label, name in enumerate(("cat", "dog")):
            folder = root / "pets" / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = np.full((8, 8), 40 + 150 * label + index, dtype=np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{index}.png")
    return root


@pytest.fixture
def client(tmp_path: Path, data_root: Path, sqlite_url: str) -> TestClient:
    return make_client(tmp_path / "home", sqlite_url, max_trials=100, max_epochs=50)


def spec_with(**changes: Any) -> dict[str, Any]:
    return changed(SPEC, **changes)


def assert_refused(client: TestClient, spec: dict[str, Any], field: str, *fragments: str):
    before = stored(client)
    response = client.post("/studies", json=spec)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    errors = response.json()["errors"]
    entry = next((e for e in errors if e["field"] == field), None)
    assert entry is not None, errors
    for fragment in fragments:
        assert fragment in entry["reason"], entry
    assert str(client.app.state.resources.settings.resolved_home()) not in response.text
    assert stored(client) == before


def test_a_folder_study_is_accepted_and_the_catalog_describes_the_folder(client: TestClient):
    described = client.post("/datasets/inspect", json={"dataset": SPEC["dataset"]})
    assert described.status_code == 200, described.text
    assert described.json() | {"decoded_bytes": 0} == {
        "name": "folder",
        "kind": "folder",
        "task": "binary",
        "input_shape": [1, 8, 8],
        "num_classes": 2,
        "class_names": ["cat", "dog"],
        "train_examples": 12,
        "decoded_bytes": 0,
    }
    outside = client.post("/datasets/inspect", json={"dataset": {"name": "folder", "path": "../x"}})
    assert outside.status_code == 422 and "inside the data roots" in outside.text
    created = client.post("/studies", json=SPEC)
    assert created.status_code == 201, created.text
    names = {item["name"]: item for item in client.get("/datasets").json()["items"]}
    assert names["folder"]["kind"] == "folder" and names["npz"]["kind"] == "npz"
    plugin_models = {item["name"]: item for item in client.get("/models").json()["items"]}
    assert plugin_models["test-loose"]["params"]["width"]["default"] == 16
    assert plugin_models["test-loose"]["fields"]["params"]["default"] == {"width": 16}
    assert plugin_models["mlp"]["kind"] == "zoo"


def test_each_folder_that_cannot_run_is_a_422_naming_the_file(client: TestClient, data_root: Path):
    (data_root / "halves" / "train" / "a").mkdir(parents=True)
    Image.new("L", (8, 8)).save(data_root / "halves/train/a/0.png")
    assert_refused(
        client,
        spec_with(**{"dataset.path": "halves"}),
        "body.dataset.path",
        "halves",
        "no 'test' folder",
    )
    (data_root / "solo" / "a").mkdir(parents=True)
    Image.new("L", (8, 8)).save(data_root / "solo/a/0.png")
    assert_refused(
        client, spec_with(**{"dataset.path": "solo"}), "body.dataset.path", "solo", "at least two"
    )
    Image.new("L", (9, 8)).save(data_root / "pets/test/dog/odd.png")
    assert_refused(
        client, SPEC, "body.dataset.path", "pets/test/dog/odd.png is 9x8", "dataset.size"
    )
    resized = spec_with(**{"dataset.size": [8, 8]})
    assert client.post("/studies", json=resized).status_code == 201
    (data_root / "pets/test/dog/odd.png").unlink()
    assert_refused(
        client,
        spec_with(**{"dataset.classes": ["cat", "cow"]}),
        "body.dataset.classes",
        "['cow'] do not exist",
    )
    assert_refused(
        client,
        spec_with(**{"dataset.path": "../elsewhere"}),
        "body.dataset.path",
        "inside the data roots",
    )
    assert_refused(
        client,
        spec_with(**{"dataset.path": "nowhere"}),
        "body.dataset.path",
        "'nowhere' is not a directory",
    )
    outside = data_root.parent.parent / "outside"
    (outside / "a").mkdir(parents=True)
    (data_root / "linked").symlink_to(outside)
    assert_refused(
        client, spec_with(**{"dataset.path": "linked"}), "body.dataset.path", "symbolic link"
    )


def test_each_npz_that_cannot_run_is_a_422_naming_the_file(client: TestClient, data_root: Path):
    rng = np.random.default_rng(0)
    good = {
        "x_train": rng.integers(0, 256, (30, 8, 8)).astype(np.uint8),
        "y_train": np.arange(30) % 3,
        "x_test": rng.integers(0, 256, (9, 8, 8)).astype(np.uint8),
        "y_test": np.arange(9) % 3,
    }
    cases = {
        "lengths.npz": (
            {"y_train": np.arange(29) % 3},
            "x_train has 30 examples but y_train has 29",
        ),
        "range.npz": (
            {"x_train": np.full((30, 8, 8), 2.0), "x_test": np.zeros((9, 8, 8))},
            "must lie in [0, 1]",
        ),
        "labels.npz": ({"y_test": np.arange(9) % 3 - 1}, "labels are 0..K-1"),
        "missing.npz": ({"x_test": None}, "no array 'x_test'"),
    }
    for name, (change, fragment) in cases.items():
        arrays = {k: v for k, v in (good | change).items() if v is not None}
        np.savez(data_root / name, **arrays)
        spec = spec_with(**{"dataset": {"name": "npz", "path": name}})
        assert_refused(client, spec, "body.dataset.path", name, fragment)
    np.savez(data_root / "good.npz", **good)
    spec = spec_with(**{"dataset": {"name": "npz", "path": "good.npz", "classes": [0, 7]}})
    assert_refused(client, spec, "body.dataset.classes", "[7] do not exist")
    spec = spec_with(**{"dataset": {"name": "npz", "path": "good.npz"}})
    assert client.post("/studies", json=spec).status_code == 201
    spec = spec_with(**{"dataset": {"name": "npz", "path": "good.npz", "size": [4, 4]}})
    assert_refused(client, spec, "body.dataset", "image folder")


def test_margins_no_training_can_meet_are_refused_with_the_limit(
    client: TestClient, data_root: Path
):
    rng = np.random.default_rng(0)
    arrays = {  # six features in [0, 1]: a global head meets a logit gap of at most sqrt(3)
        "x_train": rng.random((30, 6)),
        "y_train": np.arange(30) % 3,
        "x_test": rng.random((9, 6)),
        "y_test": np.arange(9) % 3,
    }
    np.savez(data_root / "features.npz", **arrays)
    base = {"dataset": {"name": "npz", "path": "features.npz"}, "search_space": {"loss": ["hkr"]}}
    too_far = spec_with(**base, **{"search_space.margin": {"low": 0.1, "high": 2.0}})
    assert_refused(client, too_far, "body.search_space.margin", "margin 2 of 'hkr'", "1.732")
    fits = spec_with(**base, **{"search_space.margin": {"low": 0.1, "high": 1.7}})
    assert client.post("/studies", json=fits).status_code == 201
    baseline = spec_with(**base, baselines=[{"loss": "hkr", "margin": 1.8}])
    assert_refused(client, baseline, "body.baselines.0", "margin 1.8")
    losses = {item["name"]: item for item in client.get("/losses").json()["items"]}
    assert "sqrt(D/2)" in losses["hkr"]["params"]["margin"]["limit"]
    assert "sqrt(D)/2 (binary)" in losses["offset_ce"]["params"]["margin"]["limit"]


def test_a_plugin_network_the_bound_cannot_see_into_is_refused_naming_the_module(
    client: TestClient,
):
    assert_refused(
        client,
        spec_with(model={"name": "test-doubled"}),
        "body.model",
        "test_user_data_api.Doubled",
        "cannot be certified",
    )
    assert_refused(
        client,
        spec_with(model={"name": "test-sneaky"}),
        "body.model",
        "test_user_data_api.SneakyLinear",
    )
    response = client.post(
        "/studies", json=spec_with(model={"name": "test-loose", "params": {"depth": 2}})
    )
    assert response.status_code == 422 and "params.depth" in response.text
    response = client.post("/studies", json=spec_with(model={"name": "resnet50"}))
    assert response.status_code == 422 and "GET /models" in response.text
    # An unconstrained nn.Linear is a layer the bound knows: accepted, and its trials fail.
    assert client.post("/studies", json=spec_with(model={"name": "test-loose"})).status_code == 201


def test_an_unconstrained_network_never_completes_a_trial_with_certificates(data_root: Path):
    trial = TrialSpec.model_validate(
        {
            "dataset": {"name": "folder", "path": "pets"},
            "model": {"name": "test-loose", "params": {"width": 32}},
            "training": {"epochs": 2, "batch_size": 4, "lr": 0.05},
            "loss": {"family": "hkr"},
        }
    )
    result = run_trial(trial, tracking=None, data_roots=[data_root])
    assert result.status == "failed"
    assert "guaranteed Lipschitz bound" in result.failure_reason
    assert "> 1 + 0.01" in result.failure_reason
    assert not result.metrics.get("certified_accuracy_eps_0.1")
