"""Offset cross-entropy against tau-CE and HKR on the study-efficiency Fashion-MNIST task.

Reads the trainings of ``study_efficiency.py``'s tables (the same convnet 16-32 / 64, 9 epochs,
lr 1e-3, batch 128, the fixed 10,000-image training subset, the 10,000 test images):

* ``fashion-inv`` (invertible pooling): offset_ce's offsets 0.2, 0.35, 0.7 (0.35 = sqrt(2) * 0.25,
  the logit gap that certifies eps 0.25 for a global head) x temperatures 2, 8, 32 (liptune's
  tau; the papers' T = 1 / tau), tau-CE's 8 temperatures, HKR's margins 0.2, 0.5, 1, 2 x
  alpha_kr 100, inf;
* ``fashion`` (l2 pooling, the study-efficiency table): the same offset_ce grid trained into it,
  tau-CE's 8 temperatures, HKR's 35 settings (and the same 8-setting HKR subset).

For each family and seed: the hypervolume of its front of (test accuracy, certified accuracy at
eps) of the trained models above the tables' reference point (0.1, 0), certified accuracy from
the stored radii (exact at any eps), and the front's best certified accuracy among settings of
accuracy >= 0.80; mean (min-max) over the seeds present for every family.

    PYTHONPATH=. .venv/bin/python benchmarks/offset_ce_fashion.py

Build the tables first (about 1 minute per training on one core):

    ... benchmarks/study_efficiency.py build --task fashion-inv --threads 1 --seed S
    ... benchmarks/study_efficiency.py build --task fashion-offset --threads 1 --seed S \\
        --families offset_ce
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import study_efficiency as se

from worker.trial._certificates import RadiiSummary

REPORTED_EPS = (0.25, 0.5, 1.0)
ACCURACY_FLOOR = 0.80
#: HKR's subset trained with invertible pooling, to compare the l2 table on the same settings.
HKR_SUBSET = {
    se.config_key({"loss": "hkr", "margin": m, "alpha_kr": a})
    for m in se.INVERTIBLE_MARGINS
    for a in se.INVERTIBLE_ALPHAS
}


def points(rows: list[dict], eps: float) -> list[tuple[float, float]]:
    """(test accuracy, certified accuracy at ``eps``) of each trained model."""
    return [
        (
            row["epochs"][-1]["test_accuracy"],
            float(RadiiSummary.decode(row["test_radii"]).certified_accuracy(eps)),
        )
        for row in rows
        if row["test_radii"] and row["epochs"] and not row["failure_reason"]
    ]


def families(task_name: str) -> dict[str, list[dict]]:
    """The table's trainings by family (label) and configuration set."""
    table = se.read_table(se.TASKS[task_name])
    offsets = {se.config_key(c) for c in se.offset_configs(se.TASKS["fashion-inv"])}
    temperatures = {se.config_key({"loss": "tau_ce", "temperature": t}) for t in se.TEMPERATURES}
    groups = {
        "offset_ce": [row for row in table if row["key"] in offsets],
        "tau_ce": [row for row in table if row["key"] in temperatures],
        "hkr (8)": [row for row in table if row["key"] in HKR_SUBSET],
    }
    hkr_all = [row for row in table if row["config"]["loss"] == "hkr"]
    if len({row["key"] for row in hkr_all}) > len(HKR_SUBSET):
        groups["hkr (35)"] = hkr_all
    groups = {family: rows for family, rows in groups.items() if rows}
    if len(groups) > 1:  # the front of every setting above together
        keys = {row["key"] for rows in groups.values() for row in rows}
        groups["all together"] = [row for row in table if row["key"] in keys]
    return groups


def report(task_name: str, pooling: str, seeds: list[int]) -> None:
    """The table for ``seeds``; a family keeps the settings trained in every one of them (a
    partial table compares on what is there)."""
    groups = families(task_name)
    for family, rows in groups.items():
        keys = {row["key"] for row in rows}
        for seed in seeds:
            keys &= {row["key"] for row in rows if row.get("seed", 0) == seed}
        groups[family] = [row for row in rows if row["key"] in keys]
    print(f"\n{pooling} pooling ({task_name}), seeds {seeds}")
    print("| eps | family | settings | hypervolume | best cert. acc. at acc >= 0.80 |")
    print("|---|---|---|---|---|")
    for eps in REPORTED_EPS:
        for family, rows in groups.items():
            volumes, bests, settings = [], [], 0
            for seed in seeds:
                mine = [row for row in rows if row.get("seed", 0) == seed]
                settings = len(mine)
                front = points(mine, eps)
                volumes.append(se.hypervolume(front))
                bests.append(max((c for a, c in front if a >= ACCURACY_FLOOR), default=0.0))
            if not settings:
                continue
            print(
                f"| {eps:g} | {family} | {settings} | {statistics.mean(volumes):.3f} "
                f"({min(volumes):.3f}-{max(volumes):.3f}) | {statistics.mean(bests):.3f} "
                f"({min(bests):.3f}-{max(bests):.3f}) |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    report("fashion-inv", "invertible", args.seeds)
    report("fashion", "l2", args.seeds)


if __name__ == "__main__":
    main()
