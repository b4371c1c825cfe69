"""The trial record's round trip through a real Optuna storage."""

import math

import numpy as np
import optuna
import pytest

from worker.study._record import TrialAttributes, key
from worker.trial._certificates import AttackSummary, RadiiSummary


def test_record_round_trips_through_optuna_storage(tmp_path):
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(storage=storage, study_name="s")
    trial = study.ask()
    radii = RadiiSummary.from_arrays(np.array([0.1, 0.5, 0.0, 1.2]), np.array([1, 1, 0, 1], bool))
    record = TrialAttributes(
        worker="w0",
        metrics={"accuracy": 0.9},
        epochs=[{"epoch": 1.0, "train_loss": 0.3}],
        radii=radii,
        certificate_mode="global",
        mlflow_run_id="abc",
        retry_of=3,
        retries=1,
        pruned_at_epoch=2,
        lipschitz_bound=1.0001,
        lipschitz_estimate=0.99,
        attack=AttackSummary(
            points=2, violations=0, tightness_median=0.7, pairs=((0.2, 0.3), (0.1, None))
        ),
    )
    record.write(trial)
    study.tell(trial, 1.0)
    frozen = optuna.load_study(study_name="s", storage=storage).trials[0]
    back = TrialAttributes.read(frozen)
    assert back.radii is not None
    np.testing.assert_allclose(back.radii.radii, radii.radii)
    assert back.radii.n == 4
    back.radii = record.radii = None
    assert back == record
    # Fields left at their defaults are not stored.
    assert key("failure_reason") not in frozen.user_attrs
    assert frozen.user_attrs[key("worker")] == "w0"


def test_write_named_fields_only_and_rejects_unknown_names():
    attrs: dict = {}

    class Sink:
        def set_user_attr(self, name, value):
            attrs[name] = value

    TrialAttributes(worker="w", retries=0, lipschitz_bound=math.inf).write(Sink(), "retries")
    assert attrs == {key("retries"): 0}
    with pytest.raises(ValueError, match="no field"):
        TrialAttributes().write(Sink(), "retires")


def test_read_of_an_empty_trial_is_the_default_record():
    assert TrialAttributes.read({}) == TrialAttributes()


def test_read_named_fields_only():
    attrs = TrialAttributes(worker="w", retries=2).user_attrs()
    assert TrialAttributes.read(attrs, "retries") == TrialAttributes(retries=2)
