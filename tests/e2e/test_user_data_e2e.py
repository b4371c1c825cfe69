"""Your data and your network, end to end, through a real ``liptune serve`` with workers.

The example plugin package (``examples/liptune-plugin-example``) is really installed (``pip
install --target``) into a directory the server's processes have on their path, and a second
plugin made here brings an unconstrained network. Studies run on an image folder of PNG and
JPEG files in mixed modes, on an ``.npz`` file, and on the plugin's data set with its network;
each completes with certificates checked by the minimal-norm attack. The chosen model is
registered and loaded in a fresh interpreter that has neither plugin on its path. A worker
without the plugin leaves the plugin's study to the others and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.e2e.test_serve_e2e import REPO_ROOT, running_serve, wait_until

pytestmark = pytest.mark.slow
STUDY_TIMEOUT_S = 300
EXAMPLE = REPO_ROOT / "examples" / "liptune-plugin-example"

LOOSE_PLUGIN = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "loose-plugin"
        version = "0.1.0"

        [project.entry-points."liptune.models"]
        loose-net = "loose_plugin:build"

        [tool.setuptools]
        py-modules = ["loose_plugin"]
    """,
    "loose_plugin.py": """
        from torch import nn


        def build(input_shape, num_outputs, width: int = 32):
            features = 1
            for size in input_shape:
                features *= size
            return nn.Sequential(
                nn.Flatten(), nn.Linear(features, width), nn.ReLU(), nn.Linear(width, num_outputs)
            )
    """,
}


def install(source: Path, target: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
    )


def make_image_folder(root: Path) -> None:
    """Two classes of 10x10 images, bright and dark, in PNG (L, RGB, P) and JPEG files."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("test", 12)):
        for label, name in enumerate(("dark", "bright")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                base = 40 if label == 0 else 200
                pixels = np.clip(base + rng.normal(0, 20, (10, 10)), 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels, mode="L")
                if index % 4 == 1:
                    image.convert("RGB").save(folder / f"{index}.jpg", quality=95)
                elif index % 4 == 2:
                    image.convert("P").save(folder / f"{index}.png")
                else:
                    image.save(folder / f"{index}.png")


@pytest.fixture
def served(tmp_path: Path):
    plugins = tmp_path / "plugins"
    install(EXAMPLE, plugins)
    loose = tmp_path / "loose-src"
    loose.mkdir()
    for name, text in LOOSE_PLUGIN.items():
        (loose / name).write_text(textwrap.dedent(text))
    install(loose, plugins)
    home = tmp_path / "home"
    make_image_folder(home / "datasets" / "shades")
    rng = np.random.default_rng(1)
    y_train, y_test = np.arange(120) % 3, np.arange(30) % 3
    np.savez(
        home / "datasets" / "blobs.npz",
        x_train=(rng.random((120, 6)) * 0.3 + y_train[:, None] * 0.3).astype(np.float32),
        y_train=y_train,
        x_test=(rng.random((30, 6)) * 0.3 + y_test[:, None] * 0.3).astype(np.float32),
        y_test=y_test,
    )
    log = tmp_path / "serve.log"
    path = {"PYTHONPATH": os.pathsep.join([str(plugins), str(REPO_ROOT)])}
    with running_serve(home, log, "--workers", "2", env=path) as client:
        yield client, home, log


def study(name: str, dataset: dict, model: dict, n_trials: int = 2) -> dict:
    return {
        "name": name,
        "dataset": dataset,
        "model": model,
        "training": {"epochs": 3, "batch_size": 16, "lr": 0.01},
        "search_space": {"loss": ["hkr"], "margin": [0.5], "alpha_kr": [10.0, 100.0]},
        "objectives": [{"metric": "accuracy"}, {"metric": "certified_accuracy", "eps": 0.1}],
        "n_trials": n_trials,
        "seed": 0,
    }


def test_your_data_and_your_network_end_to_end(served, tmp_path: Path):
    client, home, log = served
    datasets = {item["name"]: item for item in client.get("/datasets").json()["items"]}
    assert datasets["bars"]["input_shape"] == [1, 12, 12]
    assert datasets["bars"]["class_names"] == ["horizontal", "vertical", "diagonal"]
    assert "liptune-example-plugin" in datasets["bars"]["source"]
    model_items = {item["name"]: item for item in client.get("/models").json()["items"]}
    assert model_items["bar-net"]["params"]["channels"]["default"] == 8
    assert model_items["bar-net"]["kind"] == "plugin"

    specs = {
        "folder": study(
            "shades",
            {"name": "folder", "path": "shades"},
            {"name": "convnet", "channels": [4], "dense_widths": [8]},
        ),
        "npz": study(
            "blobs", {"name": "npz", "path": "blobs.npz"}, {"name": "mlp", "widths": [16]}
        ),
        "plugin": study(
            "bars", {"name": "bars"}, {"name": "bar-net", "params": {"channels": 4, "width": 16}}
        ),
        "loose": study(
            "loose", {"name": "npz", "path": "blobs.npz"}, {"name": "loose-net"}, n_trials=1
        ),
    }
    ids = {}
    for key, spec in specs.items():
        created = client.post("/studies", json=spec)
        assert created.status_code == 201, (key, created.text, log.read_text()[-4000:])
        ids[key] = created.json()["id"]

    def finished(study_id: str):
        body = client.get(f"/studies/{study_id}").json()
        return body if body["status"] != "running" else None

    details = {
        key: wait_until(
            lambda i=study_id: finished(i), STUDY_TIMEOUT_S, f"{key} did not finish", log
        )
        for key, study_id in ids.items()
    }
    assert details["folder"]["class_names"] == ["bright", "dark"]
    for key in ("folder", "npz", "plugin"):
        assert details[key]["status"] == "completed", details[key]
        trials = client.get(f"/studies/{ids[key]}/trials", params={"size": 10}).json()["items"]
        assert [t["state"] for t in trials] == ["COMPLETE"] * 2, trials
        for trial in trials:
            assert 0 < trial["metrics"]["lipschitz_bound"] <= 1.01
            assert "certified_accuracy_eps_0.1" in trial["values"]
            assert trial["attack"]["violations"] == 0 and trial["attack"]["points"] > 0
    loose_trials = client.get(f"/studies/{ids['loose']}/trials").json()["items"]
    assert loose_trials and all(t["state"] != "COMPLETE" for t in loose_trials)
    assert "guaranteed Lipschitz bound" in loose_trials[0]["failure_reason"]

    front = client.get(f"/studies/{ids['plugin']}/pareto").json()["trials"]
    registered = client.post(
        f"/studies/{ids['plugin']}/trials/{front[0]['number']}/register",
        json={"name": "bars-net", "aliases": ["champion"]},
    )
    assert registered.status_code == 201, registered.text

    # A fresh interpreter without the plugin on its path loads the registered model: the
    # plugin's module (BarNet) travelled with it.
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        import mlflow, mlflow.pytorch, torch
        assert importlib.util.find_spec("liptune_example_plugin") is None
        mlflow.set_tracking_uri("sqlite:///{home / "mlflow.db"}")
        model = mlflow.pytorch.load_model("models:/bars-net@champion").eval()
        x = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(0))
        print(json.dumps({{"class": type(model).__name__, "mode": model.certificate_mode,
                          "out": model(x).detach().tolist()}}))
    """)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    loaded = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    answer = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert answer["class"] == "BarNet" and answer["mode"] == "global"
    assert np.array(answer["out"]).shape == (4, 3)


def test_a_worker_without_the_plugin_leaves_its_study_to_others(served, tmp_path: Path):
    client, home, _log = served
    created = client.post(
        "/studies",
        json=study(
            "bars-only",
            {"name": "bars"},
            {"name": "bar-net", "params": {"channels": 4, "width": 16}},
            n_trials=1,
        ),
    )
    assert created.status_code == 201
    worker_log = tmp_path / "plain-worker.log"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env |= {"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    with open(worker_log, "wb") as output:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "worker",
                "--data-dir",
                str(home),
                "--id",
                "plain",
                "--once",
            ],
            cwd=tmp_path,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        assert worker.wait(timeout=120) == 0, worker_log.read_text()[-3000:]
    finally:
        if worker.poll() is None:
            worker.kill()
    text = worker_log.read_text()
    assert "left to other workers" in text and "bar-net" in text, text[-3000:]
