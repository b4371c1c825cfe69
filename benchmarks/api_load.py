"""API load benchmark: a study of 2,000 completed trials in PostgreSQL, 50 concurrent clients.

    .venv/bin/python benchmarks/api_load.py [--trials 2000] [--clients 50] [--seconds 15]
        [--api-processes 1]

1. Creates a fresh PostgreSQL database (127.0.0.1:5432, dropped at the end) and starts the API
   (``uvicorn --factory service.app:create_app``, no embedded workers; ``--api-processes``
   is uvicorn's ``--workers``, processes sharing the port) on it.
2. Submits the digits study through ``POST /studies`` and adds ``--trials`` completed trials
   through Optuna's storage (synthetic told values on an accuracy/robustness trade-off, with
   metrics and encoded radii of 1,797 points, as real trials store them).
3. A load generator in another process (``wrk -t2`` when installed, e.g. ``apt-get install
   wrk``; else ``--client`` mode, an httpx asyncio client) holding ``--clients`` concurrent
   connections requests ``GET /studies/{id}/pareto`` and then
   ``GET /studies/{id}`` for ``--seconds`` each, after a 3-second warm-up of each endpoint
   (every API process reads the study once into its own cache), and reports throughput and
   latency percentiles. Targets: pareto p99 < 50 ms, study > 300 requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Seconds of load on each endpoint before it is measured.
WARM_UP_S = 3.0
POSTGRES_SERVER_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432"
STUDY_SPEC = {
    "name": "api-load",
    "dataset": {"name": "digits"},
    "model": {"name": "mlp", "widths": [64, 64]},
    "training": {"epochs": 5, "batch_size": 128, "lr": 0.005},
    "search_space": {
        "loss": ["hkr", "tau_ce"],
        "margin": {"low": 0.01, "high": 2.0, "log": True},
        "alpha_kr": {"low": 1.0, "high": 1000.0, "log": True},
        "temperature": {"low": 0.1, "high": 100.0, "log": True},
    },
    "objectives": [{"metric": "accuracy"}, {"metric": "certified_accuracy", "eps": 0.3}],
    "n_trials": 2000,
    "seed": 0,
}


# --------------------------------------------------------------------------- load generator


async def _load(base_url: str, path: str, clients: int, seconds: float) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:
        deadline = time.perf_counter() + seconds

        async def one_client() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                response = await client.get(path, headers={"Accept": "application/json"})
                latencies.append(time.perf_counter() - start)
                errors += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    milliseconds = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(milliseconds, 50)),
        "p90_ms": float(np.percentile(milliseconds, 90)),
        "p99_ms": float(np.percentile(milliseconds, 99)),
    }


def run_client(base_url: str, path: str, clients: int, seconds: float) -> None:
    print(json.dumps(asyncio.run(_load(base_url, path, clients, seconds))))


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _wrk_ms(text: str) -> float:
    for unit in ("us", "ms", "s"):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * _WRK_UNITS[unit]
    raise ValueError(f"unexpected wrk latency {text!r}")


def measure_wrk(base_url: str, path: str, clients: int, seconds: float) -> dict[str, float]:
    """wrk (C, two threads) as the load generator: far lighter than a Python client."""
    output = subprocess.run(
        ["wrk", "-t2", f"-c{clients}", f"-d{round(seconds)}s", "--latency",
         "-H", "Accept: application/json", f"{base_url}{path}"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    result: dict[str, float] = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("50%", "90%", "99%"):
            result[f"p{parts[0][:-1]}_ms"] = _wrk_ms(parts[1])
        elif line.startswith("Requests/sec:"):
            result["requests_per_s"] = float(parts[1])
        elif "requests in" in line:
            result["requests"] = float(parts[0])
        elif line.strip().startswith("Non-2xx"):
            result["errors"] = float(parts[-1])
    result.setdefault("errors", 0.0)
    return result


def measure(base_url: str, path: str, clients: int, seconds: float) -> dict[str, float]:
    """The load generator in its own process: wrk when installed, else the httpx client."""
    if shutil.which("wrk"):
        return measure_wrk(base_url, path, clients, seconds)
    output = subprocess.run(
        [sys.executable, __file__, "--client", base_url, path, str(clients), str(seconds)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(output.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- set-up


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _synthetic_trials(n_trials: int, seed: int = 0) -> list:
    """Completed trials on a noisy accuracy / certified-accuracy trade-off."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import create_trial

    from worker.trial._certificates import RadiiSummary

    rng = np.random.default_rng(seed)
    distributions = {
        "loss": CategoricalDistribution(["hkr", "tau_ce"]),
        "margin": FloatDistribution(0.01, 2.0, log=True),
        "alpha_kr": FloatDistribution(1.0, 1000.0, log=True),
    }
    n_points = 1797
    trials = []
    for _ in range(n_trials):
        robustness = rng.uniform()
        accuracy = 0.97 - 0.25 * robustness**2 - rng.uniform(0, 0.08)
        correct = rng.uniform(size=n_points) < accuracy
        radii = rng.exponential(0.1 + 0.8 * robustness, size=n_points)
        summary = RadiiSummary.from_arrays(radii, correct)
        certified = float(summary.certified_accuracy(0.3))
        trials.append(
            create_trial(
                params={
                    "loss": "hkr",
                    "margin": float(rng.uniform(0.01, 2.0)),
                    "alpha_kr": float(rng.uniform(1.0, 1000.0)),
                },
                distributions=distributions,
                values=[float(correct.mean()), certified],
                user_attrs={
                    "liptune.metrics": {
                        "accuracy": float(correct.mean()),
                        "certified_accuracy_eps_0.3": certified,
                    },
                    "liptune.radii": summary.encode(),
                    "liptune.mlflow_run_id": uuid.uuid4().hex,
                    "liptune.model_uri": f"models:/m-{uuid.uuid4().hex}",
                },
            )
        )
    return trials


def _wait_healthy(base_url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the API exited with {process.returncode}")
        try:
            if httpx.get(f"{base_url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the API did not answer in time")


def main(args: argparse.Namespace) -> None:
    import httpx
    import optuna
    import sqlalchemy as sa

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    database = f"liptune_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(f"{POSTGRES_SERVER_URL}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{database}"')
    storage_url = f"{POSTGRES_SERVER_URL}/{database}"
    home = Path(args.home or f"/tmp/{database}")
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "LIPTUNE_HOME": str(home),
        "LIPTUNE_STORAGE_URL": storage_url,
        "LIPTUNE_MAX_TRIALS": str(args.trials),
    }
    server = subprocess.Popen(
        [
            sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
            "--no-access-log", "--loop", "uvloop", "--http", "httptools",
            "--workers", str(args.api_processes),
        ],
        cwd=REPO_ROOT,
        env=env,
    )  # fmt: skip
    try:
        _wait_healthy(base_url, server)
        spec = {**STUDY_SPEC, "n_trials": args.trials}
        study_id = httpx.post(f"{base_url}/studies", json=spec, timeout=60).json()["id"]
        storage = optuna.storages.RDBStorage(storage_url)
        study = optuna.load_study(study_name=f"liptune-{study_id}", storage=storage)
        started = time.perf_counter()
        study.add_trials(_synthetic_trials(args.trials))
        print(f"inserted {args.trials} trials in {time.perf_counter() - started:.1f} s")

        started = time.perf_counter()
        first = httpx.get(f"{base_url}/studies/{study_id}", timeout=300).json()
        print(f"first read (all trials from storage): {time.perf_counter() - started:.2f} s")
        assert first["counts"]["COMPLETE"] == args.trials, first["counts"]
        front = httpx.get(f"{base_url}/studies/{study_id}/pareto").json()["trials"]
        print(f"front: {len(front)} trials; hypervolume {first['hypervolume']:.4f}")

        results = {}
        for label, path in (
            ("GET /studies/{id}/pareto", f"/studies/{study_id}/pareto"),
            ("GET /studies/{id}", f"/studies/{study_id}"),
            ("GET /studies/{id}/pareto?eps=0.5", f"/studies/{study_id}/pareto?eps=0.5"),
        ):
            measure(base_url, path, args.clients, WARM_UP_S)
            results[label] = measure(base_url, path, args.clients, args.seconds)
            print(label, json.dumps({k: round(v, 2) for k, v in results[label].items()}))
        pareto = results["GET /studies/{id}/pareto"]
        detail = results["GET /studies/{id}"]
        print(
            f"pareto p99 {pareto['p99_ms']:.1f} ms (target < 50): "
            f"{'met' if pareto['p99_ms'] < 50 else 'NOT met'}; "
            f"study {detail['requests_per_s']:.0f} req/s (target > 300): "
            f"{'met' if detail['requests_per_s'] > 300 else 'NOT met'}"
        )
    finally:
        server.terminate()
        server.wait()
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.dispose()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        base, path, clients, seconds = sys.argv[2:6]
        run_client(base, path, int(clients), float(seconds))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--home", help="data directory of the API (default: under /tmp)")
    parser.add_argument(
        "--api-processes", type=int, default=1, help="uvicorn worker processes of the API"
    )
    main(parser.parse_args())
