"""Speed of the constrained-layer core: training step and inference, against baselines.

The reference network (28x28x1 inputs, batch 256) is built three ways:

- ``liptune``: SpectralConv2d 1->16 (3x3, same), GroupSort2, ScaledL2NormPool2d(2),
  SpectralConv2d 16->32, GroupSort2, ScaledL2NormPool2d(2), flatten, SpectralLinear 1568->64,
  GroupSort2, FrobeniusLinear 64->10;
- ``aol``, ``bcop``: the same with AOLConv2d / BCOPConv2d in place of SpectralConv2d (the GNP
  convolution families);
- ``orthogonium-aoc``, ``orthogonium-aol``: the same with orthogonium's AdaptiveOrthoConv2d
  (zero padding) / AOLConv2D, the external anchors (``pip install --no-deps orthogonium``;
  skipped when it is missing);
- ``deel``: the same with deel-torchlip's layers;
- ``plain``: the unconstrained twin (nn.Conv2d / nn.Linear, ReLU, AvgPool2d).

A training step is forward, cross-entropy, backward and an Adam step. The variants run in one
process, interleaved round-robin, and the median of the repetitions is reported, so that load
from other processes hits all of them alike; the ratios are the figures to read. Inference
compares the exported liptune model with the plain twin. Peak memory is the peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs``; Linux) above the resident set of the
built model and its batch, in a fresh child process running a few steps of one variant.

    .venv/bin/python benchmarks/core_speed.py            # full run, 1 and 2 threads
    .venv/bin/python benchmarks/core_speed.py --quick    # a smoke run
    .venv/bin/python benchmarks/core_speed.py --device cuda   # on a GPU

On CUDA each timed call ends with ``torch.cuda.synchronize()`` and peak memory is
``torch.cuda.max_memory_allocated`` above the built model and its batch, in this process.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from liptune import nn as lnn
from liptune.export import vanilla_export

BATCH = 256
#: Where the models and batches live (``--device``).
DEVICE = torch.device("cpu")
VARIANTS = ("liptune", "aol", "bcop", "orthogonium-aoc", "orthogonium-aol", "deel", "plain")
CONVS = {"liptune": lnn.SpectralConv2d, "aol": lnn.AOLConv2d, "bcop": lnn.BCOPConv2d}


def _orthogonium_conv(variant: str) -> Callable[..., nn.Module]:
    from orthogonium.layers.conv.AOC import AdaptiveOrthoConv2d
    from orthogonium.layers.conv.AOL import AOLConv2D

    if variant == "orthogonium-aol":
        return AOLConv2D
    return lambda *args, **kwargs: AdaptiveOrthoConv2d(*args, padding_mode="zeros", **kwargs)


def available_variants() -> tuple[str, ...]:
    try:
        import orthogonium  # noqa: F401
    except ImportError:
        return tuple(v for v in VARIANTS if not v.startswith("orthogonium"))
    return VARIANTS


def build(variant: str) -> nn.Module:
    if variant in CONVS or variant.startswith("orthogonium"):
        conv = CONVS[variant] if variant in CONVS else _orthogonium_conv(variant)
        return lnn.LipschitzSequential(
            conv(1, 16, 3, padding="same"),
            lnn.GroupSort2(),
            lnn.ScaledL2NormPool2d(2),
            conv(16, 32, 3, padding="same"),
            lnn.GroupSort2(),
            lnn.ScaledL2NormPool2d(2),
            nn.Flatten(),
            lnn.SpectralLinear(1568, 64),
            lnn.GroupSort2(),
            lnn.FrobeniusLinear(64, 10),
        )
    if variant == "deel":
        from deel import torchlip

        return torchlip.Sequential(
            torchlip.SpectralConv2d(1, 16, 3, padding=1),
            torchlip.GroupSort2(),
            torchlip.ScaledL2NormPool2d(2),
            torchlip.SpectralConv2d(16, 32, 3, padding=1),
            torchlip.GroupSort2(),
            torchlip.ScaledL2NormPool2d(2),
            nn.Flatten(),
            torchlip.SpectralLinear(1568, 64),
            torchlip.GroupSort2(),
            torchlip.FrobeniusLinear(64, 10),
        )
    if variant == "plain":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(1568, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((BATCH, 1, 28, 28), generator=generator)
    y = torch.randint(0, 10, (BATCH,), generator=generator)
    return x.to(DEVICE), y.to(DEVICE)


def training_step(model: nn.Module) -> Callable[[], None]:
    model.to(DEVICE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = batch()
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def inference(model: nn.Module) -> Callable[[], None]:
    model.to(DEVICE)
    x, _ = batch()
    model.eval()

    def run() -> None:
        with torch.inference_mode():
            model(x)

    return run


def interleaved_medians(
    runs: dict[str, Callable[[], None]], repeats: int, warmup: int
) -> dict[str, float]:
    """Median seconds per call of each run, the runs taking turns round-robin."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            _wait()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _wait() -> None:
    """Let the device finish what was queued (a no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def cuda_peak_mib(variant: str, steps: int) -> float:
    """Peak CUDA memory allocated over ``steps`` steps above the built model and batch, MiB."""
    step = training_step(build(variant))
    torch.cuda.synchronize(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    baseline = torch.cuda.memory_allocated(DEVICE)
    for _ in range(steps):
        step()
    torch.cuda.synchronize(DEVICE)
    return (torch.cuda.max_memory_allocated(DEVICE) - baseline) / 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak(variant: str, steps: int) -> float:
    """In this process: peak resident set over ``steps`` steps above the built model, MiB.

    Linux only: writing 5 to ``/proc/self/clear_refs`` resets the peak (``VmHWM``).
    """
    torch.set_num_threads(1)
    step = training_step(build(variant))
    baseline = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    for _ in range(steps):
        step()
    return (_status_kib("VmHWM") - baseline) / 1024


def peak_memory_mib(variant: str, steps: int) -> float:
    """:func:`measure_peak` of one variant in a fresh child process."""
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import core_speed;"
        f"print(core_speed.measure_peak({variant!r}, {steps}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return float(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions, one thread count")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    repeats = args.repeats or (5 if args.quick else 40)
    warmup = 2 if args.quick else 5
    thread_counts = [1] if args.quick else [int(t) for t in args.threads.split(",")]
    torch.manual_seed(0)
    figures: dict = {"batch": BATCH, "repeats": repeats, "device": str(DEVICE), "threads": {}}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        models = {name: build(name) for name in available_variants()}
        train = interleaved_medians(
            {name: training_step(model) for name, model in models.items()}, repeats, warmup
        )
        exported = vanilla_export(models["liptune"])
        infer = interleaved_medians(
            {"exported": inference(exported), "plain": inference(models["plain"])},
            repeats,
            warmup,
        )
        ratios = {
            "train liptune/plain": train["liptune"] / train["plain"],
            "train liptune/deel": train["liptune"] / train["deel"],
            "train deel/plain": train["deel"] / train["plain"],
            "train aol/plain": train["aol"] / train["plain"],
            "train bcop/plain": train["bcop"] / train["plain"],
            "train aol/liptune": train["aol"] / train["liptune"],
            "train bcop/liptune": train["bcop"] / train["liptune"],
            **{
                f"train {name}/plain": train[name] / train["plain"]
                for name in train
                if name.startswith("orthogonium")
            },
            "inference exported/plain": infer["exported"] / infer["plain"],
        }
        figures["threads"][threads] = {"train_ms": train, "inference_ms": infer, "ratios": ratios}
        print(
            f"{DEVICE}, torch threads: {threads}  (batch {BATCH}, median of {repeats}, interleaved)"
        )
        for name, seconds in train.items():
            print(f"  train step  {name:<9} {seconds * 1e3:8.1f} ms")
        for name, seconds in infer.items():
            print(f"  inference   {name:<9} {seconds * 1e3:8.1f} ms")
        for name, value in ratios.items():
            print(f"  {name:<26} {value:6.2f}")
    memory_steps = 2 if args.quick else 5
    peak = cuda_peak_mib if DEVICE.type == "cuda" else peak_memory_mib
    figures["peak_memory_mib"] = {v: peak(v, memory_steps) for v in available_variants()}
    what = "CUDA memory allocated" if DEVICE.type == "cuda" else "resident set (1 thread)"
    print(f"peak {what} above the built model, {memory_steps} training steps:")
    for name, mib in figures["peak_memory_mib"].items():
        print(f"  {name:<9} {mib:8.1f} MiB")
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
