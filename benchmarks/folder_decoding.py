"""Image folders: what inspecting, decoding and caching a user's folder of PNGs costs.

For each shape (28x28 grey, 32x32 colour) it writes N PNG files in ten class folders (the
one-level ImageFolder layout), then times, in this process:

- ``inspect``: :func:`worker.trial.datasets.describe_dataset` from the files' headers, as a
  submission does (nothing decoded);
- ``first load``: the first trial's :func:`worker.trial.datasets.load_dataset` (decodes every image
  once into the ``uint8`` cache, then makes the trial's float splits);
- ``second load``: another trial of the study (another seed): no decoding, the cache's arrays
  are split again;

and reports the decoded cache's bytes (what a worker holds for the study) next to the float32
splits one trial makes from it.

    python benchmarks/folder_decoding.py [--images 10000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from worker.spec import DatasetSpec
from worker.trial.datasets import clear_cache, clear_descriptions, describe_dataset, load_dataset
from worker.trial.datasets import folder as folder_module

SHAPES = {"28x28 grey": (1, 28, 28), "32x32 colour": (3, 32, 32)}


def write_pngs(root: Path, count: int, shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    channels, height, width = shape
    for index in range(count):
        folder = root / f"class{index % 10}"
        folder.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
        image.save(folder / f"{index:05d}.png")


def measure(root: Path, name: str, shape: tuple[int, int, int], count: int) -> dict:
    directory = root / name.replace(" ", "-")
    directory.mkdir()
    started = time.perf_counter()
    write_pngs(directory, count, shape)
    written = time.perf_counter() - started
    spec = DatasetSpec(name="folder", path=directory.name)
    clear_cache()
    clear_descriptions()
    decoded = 0
    real_decode = folder_module._decode

    def counting(*args):
        nonlocal decoded
        decoded += 1
        return real_decode(*args)

    folder_module._decode = counting
    try:
        started = time.perf_counter()
        described = describe_dataset(spec, [root])
        inspect_s = time.perf_counter() - started
        started = time.perf_counter()
        first = load_dataset(spec, data_roots=[root], seed=0)
        first_s = time.perf_counter() - started
        decoded_first = decoded
        started = time.perf_counter()
        load_dataset(spec, data_roots=[root], seed=1)
        second_s = time.perf_counter() - started
    finally:
        folder_module._decode = real_decode
    splits_bytes = sum(
        s.x.numel() * 4 + s.y.numel() * 8 for s in (first.train, first.val, first.test)
    )
    return {
        "shape": name,
        "images": count,
        "write_s": round(written, 2),
        "inspect_s": round(inspect_s, 2),
        "first_load_s": round(first_s, 2),
        "second_load_s": round(second_s, 3),
        "decoded_first": decoded_first,
        "decoded_second": decoded - decoded_first,
        "cache_mib": round(described.cache_bytes / 2**20, 1),
        "float_splits_mib": round(splits_bytes / 2**20, 1),
        "per_10k_first_load_s": round(first_s * 10_000 / count, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name, shape in SHAPES.items():
            rows.append(measure(Path(directory), name, shape, args.images))
            print(json.dumps(rows[-1]))
    header = (
        "| images | inspect (headers) | first load (decode) | second load | decoded on 2nd "
        "| cache | float32 splits |"
    )
    print("\n" + header + "\n|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['images']:,} {row['shape']} | {row['inspect_s']} s | {row['first_load_s']} s "
            f"| {row['second_load_s']} s | {row['decoded_second']} | {row['cache_mib']} MiB "
            f"| {row['float_splits_mib']} MiB |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
