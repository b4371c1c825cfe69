"""Workers guard themselves: a trial that cannot allocate its memory fails with a reason that
says so, and its worker lives on to run the next trial.

A real ``liptune worker`` runs under an address-space limit (``RLIMIT_AS``), so the allocation
of a too-large model really fails inside it, as it would on a machine that has less memory than
the spec needs (admission is the API's; here the studies are stored directly, as a client of the
storage could).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tests.conftest import REPO_ROOT
from tests.worker.test_workers import new_study, trials_in
from worker.loop import failure_budget

#: The worker's address space: an idle worker maps about 1.1 GiB, a tiny trial adds little.
ADDRESS_SPACE = 3 * 2**30


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def test_a_trial_out_of_memory_fails_with_its_reason_and_the_worker_runs_the_next(
    tmp_path: Path, tiny_study_spec
) -> None:
    url = f"sqlite:///{tmp_path / 'liptune.db'}"
    # 24,576 x 24,576 float32 weights are 2.25 GiB: more than the worker has left.
    huge = tiny_study_spec(name="huge", model={"name": "mlp", "widths": [24576, 24576]}, n_trials=1)
    _, huge_study = new_study(url, huge)  # the oldest study: tried first
    _, tiny_study = new_study(url, tiny_study_spec(n_trials=1))
    log = tmp_path / "worker.log"
    with log.open("wb") as output:
        process = subprocess.run(
            [
                sys.executable,
                "-m",
                "service.cli",
                "worker",
                "--storage",
                url,
                "--data-dir",
                str(tmp_path),
                "--mlflow",
                "none",
                "--device",
                "cpu",
                "--threads",
                "1",
                "--once",
            ],
            cwd=REPO_ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
            stdout=output,
            stderr=output,
            preexec_fn=_limit_address_space,
            timeout=180,
        )
    text = log.read_text(errors="replace")
    assert process.returncode == 0, text[-3000:]
    huge_study = optuna.load_study(study_name=huge_study.study_name, storage=url)
    failed = trials_in(huge_study, TrialState.FAIL)
    # Each attempt failed the same way until the study's failure budget was spent.
    assert len(failed) == len(huge_study.trials) == failure_budget(huge) + 1, text[-3000:]
    for trial in failed:
        assert trial.user_attrs["liptune.failure_reason"] == (
            'out of memory: model {"name": "mlp", "widths": [24576, 24576]} at batch size 64 '
            "on cpu: could not allocate 2.25 GiB"
        )
    assert huge_study.user_attrs["liptune.status"] == "failed"
    tiny_study = optuna.load_study(study_name=tiny_study.study_name, storage=url)
    assert [trial.state for trial in tiny_study.trials] == [TrialState.COMPLETE], text[-3000:]
    assert tiny_study.user_attrs["liptune.status"] == "completed"


def test_a_device_out_of_memory_names_the_allocation(tiny_study_spec) -> None:
    """CUDA's allocator words it differently (``torch.OutOfMemoryError``): same reason."""
    import torch

    from worker.trial._run import allocation_failed, out_of_memory_reason

    spec = tiny_study_spec().trial_spec({"loss": "hkr", "margin": 0.5, "alpha_kr": 10.0}, seed=0)
    error = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.1 GiB"
    )
    assert allocation_failed(error)
    assert not allocation_failed(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert out_of_memory_reason(spec, "cuda:0", error) == (
        'out of memory: model {"name": "mlp", "widths": [16]} at batch size 64 on cuda:0: '
        "could not allocate 2.00 GiB"
    )
