"""A classwise-head study end to end: every trial completes, certified by the per-logit bound."""

from collections.abc import Callable
from typing import Any

from optuna.trial import TrialState

from service.migrations import upgrade
from worker.loop import Worker, WorkerOptions
from worker.study._record import TrialAttributes
from worker.study._studies import create_study, optuna_study_name


def test_a_classwise_study_completes_with_bounds_recorded(
    sqlite_url: str, tiny_study_spec: Callable[..., Any]
) -> None:
    import optuna

    spec = tiny_study_spec(n_trials=2, model={"name": "mlp", "widths": [16], "head": "classwise"})
    upgrade(sqlite_url)
    create_study(sqlite_url, spec, "classwise")
    options = WorkerOptions(storage_url=sqlite_url, threads=1, device="cpu", exit_when_idle=True)
    assert Worker(options).run() == 2

    study = optuna.load_study(study_name=optuna_study_name("classwise"), storage=sqlite_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    for trial in study.trials:
        record = TrialAttributes.read(trial)
        assert record.certificate_mode == "classwise"
        assert record.failure_reason is None
        # Each logit's guaranteed bound, at most 1 + the gate's tolerance; estimate below it.
        assert 0 < record.lipschitz_estimate <= record.lipschitz_bound <= 1.01
        assert record.attack is not None and record.attack.points > 0
        assert record.attack.violations == 0
