"""The registered model answers with its certificate: the real ``mlflow models serve`` (where
liptune is not importable), ``mlflow.pyfunc.load_model``, the ONNX graph's radius and
``liptune predict``, each checked against :mod:`liptune.certify` on the same inputs."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime
import pytest
import requests
import torch
from PIL import Image

from liptune.certify import predict_with_certificates
from liptune.serving import Certificate, CertifiedClassifier, InvalidInput
from service.cli import main
from service.commands.train import certificate_check_line
from worker.spec import TrialSpec
from worker.tracking._mlflow import TrackingConfig, register_model
from worker.trial._certificates import AttackSummary
from worker.trial._run import run_trial
from worker.trial.datasets import load_dataset

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
NAME, ALIAS = "served-digits", "prod"
EPS = 0.1
SPEC = {
    "name": "served",
    "dataset": {"name": "digits"},
    "model": {"name": "mlp", "widths": [32, 32]},
    "training": {"epochs": 2, "batch_size": 64, "lr": 3e-3},
    "loss": {"family": "hkr", "margin": 0.4},
    "eps": [EPS],
}

# Put first on PYTHONPATH of `mlflow models serve` (and so of its uvicorn worker): after the
# site-packages' .pth files ran, it removes the editable install's finder and the checkout, and
# records whether liptune is importable before MLflow adds the model's code_paths.
SITECUSTOMIZE = """
import importlib.util, os, sys
def _editable(hook):
    return "__editable__" in (getattr(hook, "__module__", None) or type(hook).__module__)
sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) != {repo!r}]
sys.meta_path[:] = [finder for finder in sys.meta_path if not _editable(finder)]
sys.path_hooks[:] = [hook for hook in sys.path_hooks if not _editable(hook)]
sys.path_importer_cache.clear()
with open({marker!r}, "a") as marker:
    marker.write(f"{{os.getpid()}} {{importlib.util.find_spec('liptune')}}\\n")
"""


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    config = TrackingConfig.for_home(home)
    result = run_trial(TrialSpec.model_validate(SPEC), tracking=config, data_roots=[])
    assert result.status == "completed"
    uri = register_model(config.tracking_uri, result.run_id, NAME, [ALIAS])
    x = load_dataset(TrialSpec.model_validate(SPEC).dataset, data_roots=[], seed=0).test.x[:40]
    return config, result, uri, x


def expected(result, x: torch.Tensor):
    """What liptune.certify says of ``x``: logits, labels and radii with the trial's bound."""
    return predict_with_certificates(
        result.model, x, mode="global", lipschitz=result.metrics["lipschitz_bound"]
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(registered, tmp_path_factory):
    """``mlflow models serve -m models:/NAME@ALIAS --env-manager local`` in a subprocess where
    liptune is not importable; its base URL and the marker of what its processes could import."""
    config, _, uri, _ = registered
    folder = tmp_path_factory.mktemp("serve")
    marker = folder / "importable.txt"
    site = folder / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(repo=str(REPO), marker=str(marker)))
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": config.tracking_uri,
    }
    log = (folder / "serve.log").open("w")
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    server = subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow models serve exited: {(folder / 'serve.log').read_text()}")
            try:
                if requests.get(f"{base}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no answer in 180 s: {(folder / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, marker
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def invoke(base: str, body: dict) -> requests.Response:
    return requests.post(f"{base}/invocations", json=body, timeout=60)


def test_served_model_answers_labels_and_radii_without_liptune(registered, served, tmp_path):
    config, result, _, x = registered
    base, marker = served
    response = invoke(base, {"inputs": x.numpy().tolist()})
    assert response.status_code == 200, response.text
    answers = response.json()["predictions"]
    logits, labels, radii = expected(result, x)
    assert [answer["label"] for answer in answers] == labels.tolist()
    np.testing.assert_allclose([a["radius"] for a in answers], radii.numpy(), atol=1e-5)
    np.testing.assert_allclose([a["logits"] for a in answers], logits.numpy(), atol=1e-5)
    assert all("certified" not in answer for answer in answers)
    # Exactly what the trial reported: the radii it logged for the same test points.
    path = config.client.download_artifacts(result.run_id, "certificates/radii.npz", str(tmp_path))
    with np.load(path) as logged:
        np.testing.assert_allclose(
            [a["radius"] for a in answers], logged["radii"][: len(x)], atol=1e-5
        )
    # The server and its worker ran without liptune: only the model's code_paths had it.
    lines = marker.read_text().splitlines()
    assert len(lines) >= 2 and all(line.endswith(" None") for line in lines), lines


def test_served_model_says_which_answers_are_certified_at_eps(registered, served):
    _, result, _, x = registered
    base, _ = served
    response = invoke(base, {"inputs": x.numpy().tolist(), "params": {"eps": EPS}})
    assert response.status_code == 200, response.text
    answers = response.json()["predictions"]
    _, _, radii = expected(result, x)
    assert [answer["certified"] for answer in answers] == (radii >= EPS).tolist()
    assert 0 < sum(answer["certified"] for answer in answers) < len(answers)


@pytest.mark.parametrize(
    ("inputs", "says"),
    [
        (np.zeros((2, 64)), "shape"),
        (np.zeros((2, 1, 8, 7)), "shape"),
        (np.full((2, 1, 8, 8), 16.0), "[0, 1]"),
    ],
    ids=["flat", "wrong-size", "not-scaled"],
)
def test_served_model_refuses_a_wrong_input_with_a_4xx(served, inputs, says):
    base, _ = served
    response = invoke(base, {"inputs": inputs.tolist()})
    assert 400 <= response.status_code < 500, response.text
    assert says in response.json()["message"]


def test_pyfunc_and_pytorch_flavors_of_the_registered_model(registered, mlflow_store):
    config, result, uri, x = registered
    with mlflow_store(config.tracking_uri):
        pyfunc = mlflow.pyfunc.load_model(uri)
        network = mlflow.pytorch.load_model(uri)
    answer = pyfunc.predict(x.numpy(), params={"eps": EPS})
    logits, labels, radii = expected(result, x)
    assert list(answer.columns) == ["label", "radius", "logits", "certified"]
    assert answer["label"].tolist() == labels.tolist()
    np.testing.assert_allclose(answer["radius"], radii.numpy(), atol=1e-5)
    assert answer["certified"].tolist() == (radii >= EPS).tolist()
    with torch.no_grad():  # the raw network: logits only
        np.testing.assert_allclose(network(x).numpy(), logits.numpy(), atol=1e-6)
    assert isinstance(pyfunc.get_raw_model(), torch.nn.Module)
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"\[0, 1\]"):
        pyfunc.predict(x.numpy() * 255)


def test_onnx_radius_output_matches_the_pytorch_certificate(registered, tmp_path):
    config, result, _, x = registered
    path = config.client.download_artifacts(result.run_id, "model.onnx", str(tmp_path))
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [output.name for output in session.get_outputs()] == ["output", "radius"]
    output, radius = session.run(None, {"input": x.numpy()})
    logits, _, radii = expected(result, x)
    np.testing.assert_allclose(output, logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(radius, radii.numpy(), atol=1e-5)


def test_certified_classifier_checks_its_inputs():
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    model = CertifiedClassifier(network, Certificate("classwise", 2.0, (1, 2, 2)))
    answer = model.certify(np.full((3, 1, 2, 2), 0.5), eps=0.0)
    assert answer["logits"].shape == (3, 3) and answer["certified"].all()
    top = np.sort(answer["logits"], axis=1)
    np.testing.assert_allclose(answer["radius"], (top[:, -1] - top[:, -2]) / 4.0, rtol=1e-6)
    assert model.certify(np.zeros((0, 1, 2, 2)))["logits"].shape == (0, 3)
    for bad, says in [
        (np.zeros((1, 2, 2)), "add the batch dimension"),
        (np.full((1, 1, 2, 2), np.nan), "NaN"),
        (np.full((1, 1, 2, 2), -0.1), "[0, 1]"),
        ([["a"]], "numbers"),
    ]:
        with pytest.raises(InvalidInput, match=re.escape(says)):
            model.certify(bad)
    with pytest.raises(InvalidInput, match="eps"):
        model.certify(np.zeros((1, 1, 2, 2)), eps=-1.0)


def test_liptune_predict_on_a_folder_of_images(registered, tmp_path, capsys):
    config, result, uri, x = registered
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    pixels = np.round(x[:5].numpy() * 255).astype(np.uint8)
    names = ["a.png", "b.png", "c.png", "d.png", "sub/e.png"]
    for name, image in zip(names, pixels, strict=True):
        Image.fromarray(image[0], mode="L").save(folder / name)
    out = tmp_path / "answers.csv"
    argv = ["predict", uri, str(folder), "--eps", str(EPS), "--out", str(out)]
    assert main([*argv, "--mlflow", config.tracking_uri]) == 0
    with out.open() as file:
        rows = list(csv.DictReader(file))
    assert [row["input"] for row in rows] == names
    read = torch.from_numpy(pixels.astype(np.float32) / 255.0)
    _, labels, radii = expected(result, read)
    assert [int(row["label"]) for row in rows] == labels.tolist()
    np.testing.assert_allclose([float(row["radius"]) for row in rows], radii.numpy(), atol=1e-5)
    assert [row["certified"] == "True" for row in rows] == (radii >= EPS).tolist()

    # An .npz in the Keras layout (N, H, W) uint8, to JSON; a single image to stdout.
    np.savez(tmp_path / "x.npz", x_test=pixels[:, 0])
    out = tmp_path / "answers.json"
    argv = ["predict", uri, str(tmp_path / "x.npz"), "--out", str(out)]
    assert main([*argv, "--mlflow", config.tracking_uri]) == 0
    answers = json.loads(out.read_text())
    assert [a["label"] for a in answers] == labels.tolist() and "certified" not in answers[0]
    capsys.readouterr()
    argv = ["predict", uri, str(folder / "a.png"), "--mlflow", config.tracking_uri]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith(f"a.png,{labels[0].item()},")


def test_liptune_predict_refuses_what_it_cannot_answer(registered, tmp_path, capsys):
    config, result, uri, _ = registered
    experiment = config.client.get_run(result.run_id).info.experiment_id
    (onnx_model,) = [
        model for model in config.client.search_logged_models([experiment]) if model.name == "onnx"
    ]
    np.savez(tmp_path / "ok.npz", x=np.zeros((1, 1, 8, 8), dtype=np.float32))
    argv = ["predict", f"models:/{onnx_model.model_id}", str(tmp_path / "ok.npz")]
    assert main([*argv, "--mlflow", config.tracking_uri]) == 2
    assert "does not answer with certificates" in capsys.readouterr().err
    Image.new("L", (28, 28)).save(tmp_path / "big.png")
    np.savez(tmp_path / "floats.npz", x=np.full((2, 1, 8, 8), 3.0, dtype=np.float32))
    for target, says in [
        (tmp_path / "big.png", "28x28 pixels, the model takes 8x8"),
        (tmp_path / "floats.npz", "[0, 1]"),
        (tmp_path / "missing", "does not exist"),
    ]:
        assert main(["predict", uri, str(target), "--mlflow", config.tracking_uri]) == 2
        assert says in capsys.readouterr().err


def test_liptune_train_prints_the_certificate_check():
    line = certificate_check_line(AttackSummary(100, 0, 0.8123, 0.7, 0.9))
    assert line == (
        "certificate check: 100 attacked points, 0 violations, tightness median 0.812 "
        "(p10 0.700, p90 0.900)"
    )
    broken = certificate_check_line(AttackSummary(10, 2))
    assert "2 violations" in broken and "does not hold" in broken
