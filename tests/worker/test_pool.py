"""How a worker's --threads and a spec's training.threads combine (as the README says)."""

from worker.loop import trial_threads


def test_the_spec_asks_and_the_worker_caps():
    assert trial_threads(4, 2) == 2  # the spec asks for fewer: it gets them
    assert trial_threads(2, 8) == 2  # never more than the worker's share of the cores
    assert trial_threads(3, None) == 3
    assert trial_threads(None, 5) == 5
    assert trial_threads(None, None) is None
