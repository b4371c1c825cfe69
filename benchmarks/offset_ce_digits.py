"""Offset cross-entropy against tau-CE and HKR on the study-efficiency digits task.

The task, training loop and seeds of ``study_efficiency.py``'s ``digits`` table (the README's MLP
64-64, 10 epochs, lr 0.005, global head, test split scored after the last epoch): ``offset_ce``
is trained here over 3 offsets x 3 temperatures for each of the table's seeds, and tau-CE's
8 temperatures and HKR's 35 (margin, alpha_kr) settings are read from the table. For each family
and seed, the hypervolume of its (test accuracy, certified accuracy at eps) front above (0.1, 0)
and its best certified accuracy among settings of accuracy >= 0.95; mean (min-max) over seeds.

    PYTHONPATH=. .venv/bin/python benchmarks/offset_ce_digits.py

The offsets bracket the one that certifies eps 0.3 (gap sqrt(2) * 0.3 = 0.42); the temperatures
(liptune's tau = 1 / the papers' T) span 2 to 32.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import study_efficiency as se

OFFSETS = (0.2, 0.42, 0.85)
TEMPERATURES = (2.0, 8.0, 32.0)
REPORTED_EPS = (0.3, 0.5)


def train_offset_ce(seed: int) -> list[dict]:
    """The last epoch's row of each offset_ce setting, trained as the table's rows were."""
    task = se.TASKS["digits"]
    space = {"loss": ["offset_ce"], "margin": list(OFFSETS), "temperature": list(TEMPERATURES)}
    study = se.StudySpec.model_validate({**task.study, "search_space": space})
    rows = []
    for margin in OFFSETS:
        for temperature in TEMPERATURES:
            config = {"loss": "offset_ce", "margin": margin, "temperature": temperature}
            spec = study.trial_spec(config, seed=seed)
            splits = se.load_dataset(spec.dataset, data_roots=[], seed=spec.seed)
            torch.manual_seed(spec.seed)
            model = se.build_model(spec.model, splits.input_shape, splits.num_classes)
            mode = model.certificate_mode
            epochs: list[dict] = []
            tested: list = []

            def on_epoch(record, model=model, splits=splits, epochs=epochs, tested=tested):
                epochs.append(se._epoch_row(model, splits, model.certificate_mode, record, tested))

            se.train(
                model,
                se.build_loss(spec.loss, splits.task),
                splits,
                spec.training,
                eps=spec.eps,
                mode=mode,
                device=torch.device("cpu"),
                seed=spec.seed,
                on_epoch=on_epoch,
            )
            rows.append(epochs[-1])
    return rows


def main() -> None:
    torch.set_num_threads(1)
    table = se.read_table(se.TASKS["digits"])
    seeds = sorted({row.get("seed", 0) for row in table})
    last_rows = {
        (family, seed): [
            row["epochs"][-1]
            for row in table
            if row.get("seed", 0) == seed and row["config"]["loss"] == family and row["epochs"]
        ]
        for family in ("tau_ce", "hkr")
        for seed in seeds
    }
    for seed in seeds:
        last_rows[("offset_ce", seed)] = train_offset_ce(seed)
    print(f"digits, MLP 64-64, 10 epochs, seeds {seeds}")
    for eps in REPORTED_EPS:
        print(f"eps {eps:g}: | family | settings | hypervolume | best cert. acc. at acc >= 0.95 |")
        for family in ("offset_ce", "tau_ce", "hkr"):
            volumes, bests = [], []
            for seed in seeds:
                points = [
                    (row["test_accuracy"], row[f"test_certified_accuracy_eps_{eps:g}"])
                    for row in last_rows[(family, seed)]
                ]
                volumes.append(se.hypervolume(points))
                bests.append(max((c for a, c in points if a >= 0.95), default=0.0))
            print(
                f"| {family} | {len(points)} | {statistics.mean(volumes):.3f} "
                f"({min(volumes):.3f}-{max(volumes):.3f}) | {statistics.mean(bests):.3f} "
                f"({min(bests):.3f}-{max(bests):.3f}) |"
            )


if __name__ == "__main__":
    main()
