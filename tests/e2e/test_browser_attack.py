"""The trial page's attack check in a real headless Chromium: the radius-against-distance plot
with its diagonal, the summary table, and the warning of a broken certificate (the server,
browser and page fixtures of ``tests/e2e/test_browser.py``)."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from tests.e2e.test_browser import browser, open_page, page, screenshot, server  # noqa: F401
from tests.service.test_pages import told_trial
from worker.study._record import TrialAttributes
from worker.study._studies import load_study
from worker.trial._certificates import AttackSummary

pytestmark = pytest.mark.browser


def _add_attacked_trial(storage, study_id: str, attack: AttackSummary) -> None:
    trial = told_trial(0, np.random.default_rng(0))
    load_study(storage, study_id).add_trial(
        optuna.trial.create_trial(
            params=trial.params,
            distributions=trial.distributions,
            values=trial.values,
            user_attrs={**trial.user_attrs, **TrialAttributes(attack=attack).user_attrs()},
        )
    )


@pytest.mark.parametrize("violations", [0, 1])
def test_trial_page_plots_the_attack_check_and_warns_on_a_broken_certificate(
    server,  # noqa: F811
    page,  # noqa: F811
    violations: int,
) -> None:
    page, errors = page
    pairs = [(0.2, 0.5), (0.3, 0.45), (0.1, None)]
    if violations:
        pairs.append((0.6, 0.4))
    attack = AttackSummary(
        points=len(pairs), violations=violations, tightness_median=0.6, tightness_p10=0.4,
        tightness_p90=1.5 if violations else 0.67, pairs=tuple(pairs),
    )  # fmt: skip
    study_id = server["submit"](name=f"attacked-{violations}", n_trials=1)
    _add_attacked_trial(server["storage"], study_id, attack)
    open_page(page, f"{server['url']}/studies/{study_id}/trials/0")

    roles = page.evaluate(
        "Array.from(document.getElementById('attack-plot').data, (t) => t.meta.role)"
    )
    assert roles == ["diagonal", "attacked", *(["violation"] if violations else [])]
    table = page.inner_text("#attack-table")
    assert "points attacked" in table and "0.6" in table
    warning = page.locator("#certificate-violations")
    if violations:
        assert warning.is_visible()
        assert "1 of 4 test points" in warning.inner_text()
    else:
        assert not warning.is_visible()
    screenshot(page, f"trial-attack-{violations}")
    open_page(page, f"{server['url']}/studies/{study_id}")
    note = "certificates broken by the attack: 1"
    assert (note in page.inner_text("#trials-table")) == bool(violations)
    assert errors.unexpected() == []
