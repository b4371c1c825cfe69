"""The conv family in the zoo, the spec, the study's search space and the catalog."""

from __future__ import annotations

import optuna
import pydantic
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from liptune.export import vanilla_export
from liptune.nn import AOLConv2d, BCOPConv2d, SpectralConv2d
from service.app import create_app
from service.config import Settings
from worker.search._space import PARAMS_ATTR, enqueue, grid, suggest_params
from worker.spec import CONV_FAMILIES, ConvNetSpec, ResNetSpec, SearchSpace
from worker.trial._models import build_model
from worker.trial._run import run_trial

optuna.logging.set_verbosity(optuna.logging.WARNING)

LAYERS = {"spectral": SpectralConv2d, "aol": AOLConv2d, "bcop": BCOPConv2d}


def dense_norm(model: nn.Module, shape: tuple[int, ...]) -> float:
    """Spectral norm of the Jacobian of ``model`` at a random input (float64)."""
    model = vanilla_export(model).double()
    x = torch.rand(shape, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda z: model(z.unsqueeze(0)), x)
    return torch.linalg.matrix_norm(jacobian.reshape(-1, x.numel()), 2).item()


@pytest.mark.parametrize("conv", CONV_FAMILIES)
@pytest.mark.parametrize("spec_class", [ConvNetSpec, ResNetSpec])
def test_conv_nets_use_the_family_and_stay_one_lipschitz(conv, spec_class):
    torch.manual_seed(0)
    spec = spec_class(conv=conv, channels=[4, 8], dense_widths=[8])
    model = build_model(spec, (1, 8, 8), 10).eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(
        {name for name, layer in LAYERS.items() if isinstance(m, layer)} == {conv} for m in convs
    )
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(vanilla_export(model)(x), model(x), rtol=0, atol=1e-6)
    assert dense_norm(model, (1, 8, 8)) <= 1 + 1e-6


def test_conv_default_is_spectral_and_unknown_families_are_refused():
    assert ConvNetSpec().conv == "spectral" and ResNetSpec().conv == "spectral"
    with pytest.raises(pydantic.ValidationError, match="conv"):
        ConvNetSpec(conv="cayley")
    with pytest.raises(pydantic.ValidationError, match="distinct"):
        SearchSpace(conv=["aol", "aol"])
    with pytest.raises(pydantic.ValidationError, match="at least one convolution family"):
        SearchSpace(conv=[])


def test_searching_conv_needs_a_model_with_convolutions(tiny_study_spec):
    with pytest.raises(pydantic.ValidationError, match=r"search_space\.conv.*'mlp'"):
        tiny_study_spec(search_space={"loss": ["hkr"], "conv": ["aol", "bcop"]})


DEFAULT_LOSS_SPACE = {
    "loss": ["hkr", "tau_ce"],
    "margin": [0.1, 0.5],
    "alpha_kr": {"low": 1.0, "high": 100.0, "log": True},
    "temperature": {"low": 1.0, "high": 50.0, "log": True},
}


def conv_study(tiny_study_spec, conv: list[str], **loss_space):
    return tiny_study_spec(
        model={"name": "convnet", "channels": [4], "dense_widths": [8]},
        search_space={**(loss_space or DEFAULT_LOSS_SPACE), "conv": conv},
    )


def test_conv_is_a_categorical_next_to_the_loss_and_reaches_the_trial(tiny_study_spec):
    spec = conv_study(tiny_study_spec, ["spectral", "aol", "bcop"])
    study = optuna.create_study(
        directions=["maximize", "maximize"], sampler=optuna.samplers.RandomSampler(seed=0)
    )
    seen = set()
    for _ in range(24):
        trial = study.ask()
        params = suggest_params(trial, spec.search_space)
        assert trial.distributions["conv"].choices == ("spectral", "aol", "bcop")
        # Only the chosen loss family's parameters, plus the conv family.
        expected = {"hkr": {"margin", "alpha_kr"}, "tau_ce": {"temperature"}}[params["loss"]]
        assert set(params) == {"loss", "conv", *expected}
        assert set(trial.params) == {"loss", "conv", *expected}
        assert trial.user_attrs[PARAMS_ATTR] == params
        trial_spec = spec.trial_spec(params, seed=0)
        assert trial_spec.model.conv == params["conv"]
        assert trial_spec.loss.family == params["loss"]
        seen.add(params["conv"])
        study.tell(trial, [0.5, 0.5])
    assert seen == set(CONV_FAMILIES)


def test_without_conv_search_trials_have_no_conv_parameter(tiny_study_spec):
    spec = tiny_study_spec(model={"name": "convnet", "conv": "aol"})
    trial = optuna.create_study().ask()
    params = suggest_params(trial, spec.search_space)
    assert "conv" not in params and "conv" not in trial.params
    assert spec.trial_spec(params, seed=0).model.conv == "aol"


def test_one_conv_family_is_passed_without_a_suggestion(tiny_study_spec):
    spec = conv_study(tiny_study_spec, ["bcop"])
    trial = optuna.create_study().ask()
    params = suggest_params(trial, spec.search_space)
    assert params["conv"] == "bcop" and "conv" not in trial.params


def test_an_enqueued_conv_family_is_kept(tiny_study_spec):
    spec = conv_study(tiny_study_spec, ["aol", "bcop"])
    study = optuna.create_study()
    enqueue(study, {"loss": "hkr", "margin": 0.1, "alpha_kr": 10.0, "conv": "bcop"})
    trial = study.ask()
    params = suggest_params(trial, spec.search_space)
    assert params == {"loss": "hkr", "margin": 0.1, "alpha_kr": 10.0, "conv": "bcop"}


def test_grid_multiplies_by_the_conv_families(tiny_study_spec):
    spec = conv_study(tiny_study_spec, ["aol", "bcop"], loss=["hinge"], margin=[0.1, 0.5])
    assert grid(spec.search_space) == {"margin": [0.1, 0.5], "conv": ["aol", "bcop"]}


def test_a_suggested_conv_family_trains_in_a_real_trial(tiny_study_spec):
    spec = conv_study(tiny_study_spec, ["aol", "bcop"])
    params = {"loss": "hkr", "margin": 0.5, "alpha_kr": 10.0, "conv": "bcop"}
    result = run_trial(spec.trial_spec(params, seed=0), tracking=None, data_roots=[])
    assert result.status == "completed", result.failure_reason
    assert result.metrics["accuracy"] > 0.2
    # The exported model is plain: the BCOP layer became an nn.Conv2d.
    assert [type(m) for m in result.model.modules() if isinstance(m, nn.Conv2d)] == [nn.Conv2d]


def test_get_models_documents_the_conv_families(tmp_path):
    app = create_app(Settings(home=tmp_path, storage_url=f"sqlite:///{tmp_path / 'l.db'}"))
    with TestClient(app) as client:
        items = {item["name"]: item for item in client.get("/models").json()["items"]}
    for name in ("convnet", "resnet"):
        field = items[name]["fields"]["conv"]
        assert field["choices"] == list(CONV_FAMILIES)
        assert field["default"] == "spectral"
        assert "bcop" in field["description"] and "aol" in field["description"]
    assert "conv" in items["convnet"]["description"]
    assert "conv" not in items["mlp"]["fields"]
