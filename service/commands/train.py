"""``liptune train SPEC``: run one trial from a YAML or JSON :class:`~worker.spec.TrialSpec`.

Prints each epoch (inside a long one, every few seconds, the step it is at), then the final
metrics and the MLflow run id. Exit codes: 0 completed, 1 the trial failed (diverged, or its
Lipschitz bound was violated), 2 the spec is invalid or cannot run here (missing data set,
unknown device...).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml
from pydantic import ValidationError

HELP = "run one trial from a YAML/JSON spec, without the service"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", type=Path, help="trial spec, YAML or JSON (see worker/spec.py)")
    add_common_arguments(parser)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared with ``liptune demo``."""
    parser.add_argument("--data-dir", help="data directory (default: $LIPTUNE_HOME or ~/.liptune)")
    parser.add_argument(
        "--mlflow",
        metavar="URI",
        help="MLflow tracking URI (default: sqlite:///DATA_DIR/mlflow.db, artifacts beside it)",
    )
    parser.add_argument(
        "--data-root",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="another directory data sets may be read from (repeatable)",
    )
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the spec's)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")


def read_spec(path: Path):
    """The :class:`TrialSpec` in ``path``; raises ``ValueError`` with readable lines."""
    from worker.spec import TrialSpec

    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{path} is not valid {path.suffix[1:] or 'YAML'}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping (a trial spec), got {type(data).__name__}")
    try:
        return TrialSpec.model_validate(data)
    except ValidationError as error:
        raise ValueError(f"invalid trial spec {path}:\n" + validation_lines(error)) from None


def validation_lines(error: ValidationError) -> str:
    """One ``field.path: reason`` line per problem."""
    lines = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(spec)"
        lines.append(f"  {where}: {problem['msg']}")
    return "\n".join(lines)


def tracking_config(home: Path, uri: str | None):
    from worker.tracking import TrackingConfig

    if uri is None:
        return TrackingConfig.for_home(home)
    if uri.startswith("sqlite:///"):
        # A local store keeps its artifacts beside the database, not in the working directory.
        database = Path(uri.removeprefix("sqlite:///")).expanduser().resolve()
        return TrackingConfig(uri, database.parent / "mlartifacts")
    return TrackingConfig(uri, None)


def print_epoch(record: dict, epochs: int) -> None:
    parts = [f"epoch {record['epoch']:>3}/{epochs}", f"loss {record['train_loss']:.4f}"]
    if "val_accuracy" in record:
        parts.append(f"val acc {record['val_accuracy']:.3f}")
    certified = [key for key in record if key.startswith("val_certified_accuracy_eps_")]
    if certified:
        eps = certified[0].rsplit("_", 1)[-1]
        parts.append(f"val cert@{eps} {record[certified[0]]:.3f}")
    parts.append(f"{record['seconds']:.2f} s")
    print("  ".join(parts), flush=True)


class EpochProgress:
    """Prints ``epoch 3/100  step 400/938`` at most every :attr:`interval_s` seconds inside an
    epoch, so a long epoch shows it is moving."""

    interval_s = 5.0

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self._last = time.monotonic()

    def __call__(self, epoch: int, step: int, n_steps: int) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval_s and step < n_steps:
            print(f"epoch {epoch:>3}/{self.epochs}  step {step}/{n_steps}", flush=True)
            self._last = now


def print_result(result, spec, tracking_uri: str) -> None:
    from worker.spec import metric_key
    from worker.trial import TrialOutcome

    if result.status != TrialOutcome.COMPLETED:
        print(f"trial {result.status}: {result.failure_reason or 'stopped'}")
    else:
        metrics = result.metrics
        print(f"\ncertificate mode: {result.certificate_mode}")
        print(f"{'eps':>8}  {'certified accuracy':>18}")
        print(f"{'clean':>8}  {metrics['accuracy']:>18.4f}")
        for eps in spec.eps:
            value = metrics[metric_key("certified_accuracy", eps)]
            print(f"{eps:>8g}  {value:>18.4f}")
        others = {
            key: value
            for key, value in metrics.items()
            if key != "accuracy" and not key.startswith("certified_accuracy_eps_")
        }
        for key, value in others.items():
            print(f"{key}: {value:.6g}")
        if result.attack is not None:
            print(certificate_check_line(result.attack))
    if result.run_id:
        print(f"\nMLflow run: {result.run_id} ({tracking_uri})")
    if result.model_uri:
        print(f"model: {result.model_uri} (mlflow.pyfunc.load_model: labels and certified radii;")
        print("       mlflow.pytorch.load_model: the network)")


def certificate_check_line(attack) -> str:
    """The minimal-norm attack check of the certificates in one line, as the API and the trial
    page give it: points attacked, violations (must be 0), tightness (radius / adversarial
    distance) median and its p10-p90 spread."""
    line = f"certificate check: {attack.points} attacked points, {attack.violations} violations"
    if attack.tightness_median is not None:
        line += (
            f", tightness median {attack.tightness_median:.3f} "
            f"(p10 {attack.tightness_p10:.3f}, p90 {attack.tightness_p90:.3f})"
        )
    else:
        line += ", tightness n/a (no attacked point was broken)"
    if attack.violations:
        line += "  <- a certificate was broken: the bound does not hold"
    return line


def execute(spec, args: argparse.Namespace) -> int:
    """Run ``spec`` with the command-line options; the exit code."""
    from worker.common import default_data_roots, liptune_home
    from worker.trial import TrialOutcome, run_trial
    from worker.trial.datasets import DatasetError

    home = liptune_home(args.data_dir)
    config = tracking_config(home, args.mlflow)
    try:
        result = run_trial(
            spec,
            tracking=config,
            data_roots=[*default_data_roots(home), *args.data_root],
            device=args.device,
            threads=args.threads,
            on_epoch=lambda record: print_epoch(record, spec.training.epochs),
            on_progress=EpochProgress(spec.training.epochs),
        )
    except (DatasetError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_result(result, spec, config.tracking_uri)
    return 0 if result.status == TrialOutcome.COMPLETED else 1


def run(args: argparse.Namespace) -> int:
    try:
        spec = read_spec(args.spec)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return execute(spec, args)
