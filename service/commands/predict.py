"""``liptune predict MODEL_URI INPUT``: labels and certified radii of a batch of inputs.

``MODEL_URI`` is a model logged by a trial (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
``models:/m-...`` or a local folder), loaded with ``mlflow.pyfunc.load_model``: what
``mlflow models serve`` answers, computed here. ``INPUT`` is read as data, never as code:

- an ``.npz`` file with an array ``x`` or ``x_test`` (Keras layout: ``(N, H, W)``,
  ``(N, H, W, C)`` or already ``(N, C, H, W)``; vectors ``(N, F)``);
- a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.gif``, ``.tif``, ``.tiff``,
  ``.webp``, in its subfolders too), or a single image, read with Pillow as grayscale or RGB
  to fit the model; an image must already have the model's size.

Integer arrays and images are 8-bit pixels (divided by 255); float arrays must already be in
[0, 1]. Each input gets a row ``input`` (its file, or its index), ``label``, ``radius`` and,
with ``--eps E``, ``certified`` (radius >= E), written as CSV (stdout, or ``--out FILE.csv``)
or JSON (``--out FILE.json``). Exit codes: 0 done, 2 a bad model, input or option.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HELP = "label inputs with a registered model, with certified radii"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: Inputs per call of the model; the progress bar shows when there are more than one batch.
BATCH = 256


class PredictError(ValueError):
    """A model, input or option ``liptune predict`` cannot use; the message says why."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_uri", metavar="MODEL_URI", help="e.g. models:/digits@champion")
    parser.add_argument(
        "input", metavar="INPUT", type=Path, help=".npz (x or x_test), image folder or image"
    )
    parser.add_argument("--eps", type=float, help="also say whether each radius is >= EPS")
    parser.add_argument(
        "--out", type=Path, metavar="FILE", help="write FILE.csv or FILE.json (default: CSV)"
    )
    parser.add_argument(
        "--mlflow",
        metavar="URI",
        help="MLflow tracking URI of the registry (default: $MLFLOW_TRACKING_URI, else the "
        "data directory's)",
    )
    parser.add_argument("--data-dir", help="data directory (default: $LIPTUNE_HOME or ~/.liptune)")


def run(args: argparse.Namespace) -> int:
    try:
        if args.eps is not None and not (math.isfinite(args.eps) and args.eps >= 0):
            raise PredictError(f"--eps must be a radius >= 0, got {args.eps}")
        if args.out is not None and args.out.suffix.lower() not in (".csv", ".json"):
            raise PredictError(f"--out must end with .csv or .json, got {args.out}")
        model = load_model(args.model_uri, tracking_uri(args))
        shape = input_shape(model)
        names, x = read_inputs(args.input, shape)
        rows = predict(model, names, x, args.eps)
        write_rows(rows, args.out, with_certified=args.eps is not None)
    except PredictError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.out is not None:
        print(f"{len(rows)} inputs -> {args.out}", file=sys.stderr)
    return 0


def tracking_uri(args: argparse.Namespace) -> str:
    if args.mlflow:
        return args.mlflow
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    from service.commands.train import tracking_config
    from worker.common import liptune_home

    return tracking_config(liptune_home(args.data_dir), None).tracking_uri


def load_model(model_uri: str, uri: str):
    """The pyfunc model at ``model_uri``; a model that does not answer with certificates (an
    ONNX model, or one logged before they were served) is refused."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from liptune.serving import LOADER_MODULE
    from worker.tracking import using_tracking_uri

    try:
        with using_tracking_uri(uri):
            model = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as error:
        raise PredictError(f"cannot load {model_uri} from {uri}: {error}") from None
    if model.loader_module != LOADER_MODULE:
        raise PredictError(
            f"{model_uri} does not answer with certificates (its pyfunc is "
            f"{model.loader_module}): use the model a trial logged as 'model', or the registered "
            "one"
        )
    return model


def input_shape(model) -> tuple[int, ...]:
    """The shape of one input, from the model's signature."""
    (spec,) = model.metadata.get_input_schema().inputs
    return tuple(int(size) for size in spec.shape[1:])


def read_inputs(path: Path, shape: Sequence[int]) -> tuple[list[str], np.ndarray]:
    """The names and the float32 inputs ``(N, *shape)`` in ``path``."""
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise PredictError(f"{path} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        images = [read_image(file, shape) for file in files]
        return [str(file.relative_to(path)) for file in files], np.stack(images)
    if not path.is_file():
        raise PredictError(f"{path} does not exist")
    if path.suffix.lower() == ".npz":
        x = in_layout(read_npz(path), shape, path)
        return [str(i) for i in range(len(x))], x
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [path.name], read_image(path, shape)[None]
    raise PredictError(f"{path}: expected an .npz file, an image or a folder of images")


def read_npz(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            key = next((k for k in ("x", "x_test") if k in arrays.files), None)
            if key is None:
                raise PredictError(f"{path} has no array x or x_test (it has {arrays.files})")
            return arrays[key]
    except (OSError, ValueError) as error:
        if isinstance(error, PredictError):
            raise
        raise PredictError(f"cannot read {path} as .npz: {error}") from None


def in_layout(array: np.ndarray, shape: Sequence[int], source: Path) -> np.ndarray:
    """``array`` as ``(N, *shape)`` float32: a channel axis added to ``(N, H, W)`` for a
    one-channel model, ``(N, H, W, C)`` moved to ``(N, C, H, W)``; integers divided by 255."""
    shape = tuple(shape)
    if array.dtype.kind not in "uif" or array.ndim < 2:
        raise PredictError(f"{source}: expected a numeric array (N, ...), got {array.dtype}")
    if tuple(array.shape[1:]) != shape and len(shape) == 3:
        channels, height, width = shape
        if channels == 1 and tuple(array.shape[1:]) == (height, width):
            array = array[:, None]
        elif tuple(array.shape[1:]) == (height, width, channels):
            array = array.transpose(0, 3, 1, 2)
    if tuple(array.shape[1:]) != shape:
        raise PredictError(
            f"{source}: the model takes inputs of shape {shape}, the array holds "
            f"{tuple(array.shape[1:])}"
        )
    if array.dtype.kind in "ui":
        array = array / 255.0
    return np.ascontiguousarray(array, dtype=np.float32)


def read_image(path: Path, shape: Sequence[int]) -> np.ndarray:
    """The image at ``path`` as ``shape`` ``(C, H, W)`` float32 in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    if len(shape) != 3 or shape[0] not in (1, 3):
        raise PredictError(f"the model takes inputs of shape {tuple(shape)}, not images")
    channels, height, width = shape
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    except (OSError, UnidentifiedImageError) as error:
        raise PredictError(f"cannot read {path} as an image: {error}") from None
    if pixels.shape[:2] != (height, width):
        raise PredictError(
            f"{path} is {pixels.shape[1]}x{pixels.shape[0]} pixels, the model takes "
            f"{width}x{height}"
        )
    pixels = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return (pixels / 255.0).astype(np.float32)


def predict(model, names: list[str], x: np.ndarray, eps: float | None) -> list[dict]:
    """One row per input, the model called on batches of :data:`BATCH` (a progress bar on
    stderr when there is more than one)."""
    from mlflow.exceptions import MlflowException
    from tqdm import tqdm

    params = None if eps is None else {"eps": float(eps)}
    rows: list[dict] = []
    with tqdm(
        total=len(x), unit="input", file=sys.stderr, disable=len(x) <= BATCH, leave=False
    ) as bar:
        for start in range(0, len(x), BATCH):
            try:
                answer = model.predict(x[start : start + BATCH], params=params)
            except MlflowException as error:
                raise PredictError(error.message) from None
            for offset, row in enumerate(answer.itertuples(index=False)):
                record = {
                    "input": names[start + offset],
                    "label": int(row.label),
                    "radius": float(row.radius),
                }
                if eps is not None:
                    record["certified"] = bool(row.certified)
                rows.append(record)
            bar.update(len(answer))
    return rows


def write_rows(rows: list[dict], out: Path | None, *, with_certified: bool) -> None:
    if out is not None and out.suffix.lower() == ".json":
        out.write_text(json.dumps(rows, indent=1) + "\n")
        return
    fields = ["input", "label", "radius"] + (["certified"] if with_certified else [])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    if out is None:
        sys.stdout.write(buffer.getvalue())
    else:
        out.write_text(buffer.getvalue())
