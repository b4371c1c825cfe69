"""Trial throughput on one device: the Fashion-MNIST reference trial, 1, 2, 4, 8 at once.

Each concurrent trial is its own process, as ``liptune worker --trials-per-device N`` runs them
(see :mod:`worker.trial._devices`): a child imports torch, loads the data and builds nothing else,
says it is ready, and waits; the clock starts when every child of a round is ready and stops when
the last one has finished its trial (training, export, bound, test certificates; no MLflow).
Per round it reports:

- ``trials_per_hour`` (trials / wall time) and its ratio to one trial alone (``speedup``: the
  issue's target is >= 4x with concurrent trials on a GPU);
- ``epochs_per_s`` (all trials' epochs / wall time) and the median seconds of one epoch;
- on CUDA, ``torch.cuda.max_memory_allocated`` of each trial beside its estimate
  (:func:`worker.trial._devices.trial_memory_bytes`), and the GPU's utilisation and memory sampled
  every 0.5 s with ``nvidia-smi`` (mean and max) when it is installed.

On the CPU the cores are shared evenly between the children (torch threads = cores // N).

    .venv/bin/python benchmarks/gpu_throughput.py --device cuda            # 1,2,4,8 x 2 epochs
    .venv/bin/python benchmarks/gpu_throughput.py --device cpu --concurrency 1,2 \\
        --epochs 1 --n-samples 2000                                         # a CPU comparison
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_fashion_mnist import reference_spec


def child(spec_json: str, device: str, data_roots: list[Path] | None = None) -> None:
    """One trial: load, say ``ready``, wait for a line on stdin, run, print the figures."""
    import torch

    from worker.common._paths import default_data_roots, liptune_home
    from worker.spec import TrialSpec
    from worker.trial._devices import trial_memory_bytes
    from worker.trial._run import run_trial
    from worker.trial.datasets import load_dataset

    spec = TrialSpec.model_validate_json(spec_json)
    roots = data_roots or default_data_roots(liptune_home())
    load_dataset(spec.dataset, data_roots=roots, seed=spec.seed)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.zeros(1, device=device)  # the CUDA context, outside the clock
    print("ready", flush=True)
    sys.stdin.readline()
    result = run_trial(spec, tracking=None, data_roots=roots, device=device)
    figures = {
        "status": result.status,
        "failure_reason": result.failure_reason,
        "epoch_seconds": [record["seconds"] for record in result.epochs],
        "accuracy": result.metrics.get("accuracy"),
        "estimate_mib": trial_memory_bytes(spec) / 2**20,
        "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
    }
    print(json.dumps(figures), flush=True)


class GPUSampler:
    """``nvidia-smi`` utilisation (%) and memory used (MiB) every ``interval`` seconds."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        query = [
            "nvidia-smi",
            "--query-gpu=utilization.gpu,memory.used",
            "--format=csv,noheader,nounits",
        ]
        while not self._stop.wait(self.interval):
            output = subprocess.run(query, capture_output=True, text=True)
            for line in output.stdout.strip().splitlines()[:1]:
                utilisation, memory = (float(value) for value in line.split(","))
                self.samples.append((utilisation, memory))

    def __enter__(self) -> GPUSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float] | None:
        if not self.samples:
            return None
        utilisation = [sample[0] for sample in self.samples]
        return {
            "utilisation_mean_pct": statistics.fmean(utilisation),
            "utilisation_max_pct": max(utilisation),
            "memory_used_max_mib": max(sample[1] for sample in self.samples),
        }


def run_round(
    spec_json: str, device: str, count: int, threads: int, data_roots: list[Path] | None = None
) -> dict:
    """``count`` trials at once; their figures and the round's wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, __file__, "--child", spec_json, "--device", device]
    for root in data_roots or []:
        command += ["--data-root", str(root)]
    children = [
        subprocess.Popen(
            [*command, "--threads", str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(count)
    ]
    for process in children:
        line = process.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"a trial process did not start: {line!r}")
    sampler = GPUSampler() if device.startswith("cuda") and shutil.which("nvidia-smi") else None
    started = time.perf_counter()
    if sampler is not None:
        sampler.__enter__()
    for process in children:
        process.stdin.write("go\n")
        process.stdin.flush()
    results = []
    for process in children:
        output, _ = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"a trial process failed with status {process.returncode}")
        results.append(json.loads(output.strip().splitlines()[-1]))
    wall = time.perf_counter() - started
    if sampler is not None:
        sampler.__exit__()
    epochs = sum(len(result["epoch_seconds"]) for result in results)
    return {
        "trials": count,
        "threads_per_trial": threads,
        "wall_s": wall,
        "trials_per_hour": count * 3600 / wall,
        "epochs_per_s": epochs / wall,
        "median_epoch_s": statistics.median(s for r in results for s in r["epoch_seconds"]),
        "statuses": sorted({result["status"] for result in results}),
        "accuracy_min": min(result["accuracy"] or 0.0 for result in results),
        "estimate_mib": results[0]["estimate_mib"],
        "peak_mib_max": max((r["peak_mib"] or 0.0) for r in results) or None,
        "gpu": sampler.summary() if sampler is not None else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N (default: cuda)")
    parser.add_argument("--concurrency", default="1,2,4,8", help="comma-separated trial counts")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial (default: 2)")
    parser.add_argument("--n-samples", type=int, default=None, help="subsample the train split")
    parser.add_argument("--precision", default="float32", choices=["float32", "tf32", "bf16"])
    parser.add_argument("--json", metavar="PATH", help="write the figures there as JSON")
    parser.add_argument(
        "--data-root",
        action="append",
        type=Path,
        help="where Fashion-MNIST is looked for (repeatable; default: the data directory's)",
    )
    parser.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        child(args.child, args.device, args.data_root)
        return 0
    spec = reference_spec(args.epochs, args.n_samples, None)
    training = spec.training.model_copy(update={"precision": args.precision})
    spec_json = spec.model_copy(update={"training": training}).model_dump_json()
    cores = os.cpu_count() or 1
    rounds = []
    for count in (int(text) for text in args.concurrency.split(",")):
        threads = max(1, cores // count) if args.device == "cpu" else 1
        figures = run_round(spec_json, args.device, count, threads, args.data_root)
        rounds.append(figures)
        figures["speedup"] = figures["trials_per_hour"] / rounds[0]["trials_per_hour"]
        gpu = figures["gpu"] or {}
        print(
            f"{args.device} x{count:<2} wall {figures['wall_s']:7.1f} s  "
            f"{figures['trials_per_hour']:7.1f} trials/h ({figures['speedup']:.2f}x)  "
            f"{figures['epochs_per_s']:.3f} epochs/s  epoch {figures['median_epoch_s']:.2f} s  "
            f"est {figures['estimate_mib']:.0f} MiB  peak {figures['peak_mib_max'] or 0:.0f} MiB  "
            f"util {gpu.get('utilisation_mean_pct', float('nan')):.0f}%  "
            f"{figures['statuses']}",
            flush=True,
        )
    result = {
        "device": args.device,
        "epochs": args.epochs,
        "n_samples": args.n_samples,
        "precision": args.precision,
        "cores": cores,
        "rounds": rounds,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
