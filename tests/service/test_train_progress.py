"""Progress inside an epoch: ``train_epoch`` reports at its divergence checks, and ``liptune
train`` prints it, throttled."""

from __future__ import annotations

import torch
from torch import nn

from service.commands.train import EpochProgress
from worker.trial._training import train_epoch
from worker.trial.datasets._splits import Split


def test_train_epoch_reports_progress_at_each_check() -> None:
    torch.manual_seed(0)
    split = Split(torch.rand(100, 4), torch.randint(0, 2, (100,)))
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls: list[tuple[int, int, int]] = []
    train_epoch(
        model,
        nn.CrossEntropyLoss(),
        optimizer,
        split,
        10,
        None,
        3,
        check_every=4,
        on_progress=lambda *args: calls.append(args),
    )
    assert calls == [(3, 4, 10), (3, 8, 10)]


def test_liptune_train_prints_progress_at_most_every_interval(capsys, monkeypatch) -> None:
    clock = iter([0.0, 1.0, 6.0, 7.0, 12.5])
    monkeypatch.setattr("service.commands.train.time.monotonic", lambda: next(clock))
    progress = EpochProgress(epochs=20)  # reads the clock once: 0.0
    for step in (50, 100, 150, 200):  # at 1.0 (too soon), 6.0, 7.0 (too soon), 12.5
        progress(2, step, 400)
    assert capsys.readouterr().out.splitlines() == [
        "epoch   2/20  step 100/400",
        "epoch   2/20  step 200/400",
    ]
