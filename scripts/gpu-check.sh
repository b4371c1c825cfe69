#!/usr/bin/env bash
# The GPU check: run from the repository root on a fresh GPU machine (nothing installed), it
# installs the project and, in about 10 minutes, runs
#   1. the core's tests with CUDA as torch's default device (layers, losses, certificates,
#      export, bounds), and the training loop's own tests;
#   2. one training epoch under torch.cuda.set_sync_debug_mode("warn"), counting the host
#      synchronisations (expected: one per divergence check, none per step), with offset
#      cross-entropy and the training augmentation (crops and flips drawn on the GPU);
#   3. a real `liptune serve` (API only) with a `liptune worker --trials-per-device 4` on the
#      GPU beside it: one Fashion-MNIST trial, then a 4-trial study, through the REST API;
#   4. the field's standard task: one CIFAR-10 trial (32x32x3) with offset cross-entropy and
#      augmentation (random crops and flips) through `liptune train`, on the CIFAR-10 python
#      batches under a data root when present (cifar-10-batches-py or cifar10 under
#      $DATA/datasets or /usr/share/datasets), else on a generated set of that shape written as
#      CIFAR-10 batches;
#   5. benchmarks/gpu_throughput.py (1, 2, 4, 8 concurrent reference trials) and
#      benchmarks/core_speed.py --device cuda.
# Results go to $OUT (default /tmp/liptune-gpu-check): logs, JUnit XML, JSON figures, summary.txt.
#
#   scripts/gpu-check.sh                 # on a GPU machine
#   DEVICE=cpu scripts/gpu-check.sh      # the same steps on the CPU, with smaller settings
#   TESTS_LAST=1 scripts/gpu-check.sh    # the figures first, the test steps last
#
# DEVICE=cpu shrinks: the Fashion-MNIST subsample (5,000 examples, 1 epoch), the CIFAR-10 trial
# (1,000 training images, 1 epoch, a smaller conv net; a generated set of 1,200), the throughput
# rounds (1, 2 trials of 1 epoch on 2,000 examples), core_speed --quick; it skips the sync-debug
# count (a CUDA-only mode) and the training tests (the ordinary test run has them).
set -uo pipefail

DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/liptune-gpu-check}
PYTHON=${PYTHON:-python3}
PORT=${PORT:-18765}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=0

note() { echo "$*" | tee -a "$SUMMARY"; }
step() { # step NAME COMMAND...: run, log to $OUT/NAME.log, record pass/fail and seconds
    local name=$1 started=$SECONDS
    shift
    if "$@" >"$OUT/$name.log" 2>&1; then
        note "PASS $name ($((SECONDS - started)) s)"
    else
        note "FAIL $name ($((SECONDS - started)) s): see $OUT/$name.log"
        tail -20 "$OUT/$name.log"
        FAILED=1
    fi
}

if [ "$DEVICE" = cpu ]; then
    N_SAMPLES=5000 EPOCHS=1 THROUGHPUT=(--concurrency 1,2 --epochs 1 --n-samples 2000)
    CORE_SPEED=(--quick)
    CIFAR_SAMPLES=1000 CIFAR_EPOCHS=1 CIFAR_CHANNELS="[8, 16]" CIFAR_DENSE="[32]"
    CIFAR_GENERATED=(1000 200)
else
    N_SAMPLES=null EPOCHS=2 THROUGHPUT=(--concurrency 1,2,4,8 --epochs 2)
    CORE_SPEED=(--threads 1 --repeats 40)
    CIFAR_SAMPLES=null CIFAR_EPOCHS=${CIFAR_EPOCHS:-5} CIFAR_CHANNELS="[32, 64, 128]"
    CIFAR_DENSE="[256]" CIFAR_GENERATED=(50000 10000)
fi

# ------------------------------------------------------------------ install
install() {
    if .venv/bin/python -c "import liptune, worker, service, pytest, deel.torchlip" 2>/dev/null; then
        echo "the project is installed in .venv already: kept as it is"
    elif [ ! -x .venv/bin/python ]; then
        # System site packages: a machine image's CUDA torch is kept, not replaced.
        "$PYTHON" -m venv --system-site-packages .venv || return 1
    fi
    if ! .venv/bin/python -c "import liptune, worker, service, pytest, deel.torchlip" 2>/dev/null; then
        .venv/bin/python -m pip install -q --upgrade pip || return 1
        if ! .venv/bin/python -c "import torch" 2>/dev/null; then
            .venv/bin/python -m pip install -q torch || return 1 # PyPI's Linux wheel: CUDA build
        fi
        .venv/bin/python -m pip install -q -e '.[test]' || return 1
    fi
    .venv/bin/python - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory >> 20, "MiB")
EOF
}
step install install
if [ "$DEVICE" != cpu ]; then
    .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
        { note "FAIL: torch sees no CUDA device (DEVICE=$DEVICE)"; exit 1; }
    command -v nvidia-smi >/dev/null && nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
fi
cat "$OUT/install.log" | tail -3 | tee -a "$SUMMARY"

# Fashion-MNIST: Debian's package when present, else the four IDX files under $DATA/fashion-mnist.
DATA=${DATA:-$OUT/data}
mkdir -p "$DATA/datasets"
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ ! -d "$DATA/datasets/fashion-mnist" ]; then
    note "NOTE: no Fashion-MNIST (apt-get install dataset-fashion-mnist, or put the IDX files in $DATA/datasets/fashion-mnist)"
fi

# ------------------------------------------------------------------ 1. core tests on the device
CORE_TESTS=(tests/core/test_nn_layers.py tests/core/test_nn_properties.py tests/core/test_losses.py
    tests/core/test_certify.py tests/core/test_export.py tests/core/test_conditioning.py)
for file in tests/core/test_bound*.py tests/core/test_attack*.py tests/core/test_conv_*.py \
    tests/worker/test_bounds_study.py tests/worker/test_conv_zoo.py; do
    [ -e "$file" ] && CORE_TESTS+=("$file")
done
test_steps() {
    step core-tests .venv/bin/python -m pytest -q -p no:cacheprovider --device "$DEVICE" \
        --junitxml="$OUT/core-tests.xml" "${CORE_TESTS[@]}"
    # The training loop's CPU tests (no-sync counts on the meta device, divergence, bf16,
    # limits); DEVICE=cpu leaves them to the ordinary test run.
    [ "$DEVICE" != cpu ] && step training-tests .venv/bin/python -m pytest -q \
        -p no:cacheprovider --junitxml="$OUT/training-tests.xml" tests/worker/test_training.py \
        tests/worker/test_training_devices.py
}
# TESTS_LAST=1 runs the test steps after the figures (a device lent for minutes reports the
# measurements first).
[ "${TESTS_LAST:-0}" = 1 ] || test_steps

# ------------------------------------------------------------------ 2. host syncs of an epoch
sync_count() {
    .venv/bin/python - "$DEVICE" <<'EOF'
import math, sys, warnings
import torch
from worker.trial._augment import build_augmentation
from worker.trial.datasets import load_dataset
from worker.trial._losses import build_loss
from worker.trial._models import build_model
from worker.spec import TrialSpec
from worker.trial._training import make_optimizer, train_epoch

device = torch.device(sys.argv[1])
spec = TrialSpec.model_validate({
    "name": "sync", "dataset": {"name": "digits"},
    "model": {"name": "convnet", "channels": [16], "dense_widths": [32]},
    "training": {"batch_size": 32, "augment": {"random_crop": 2, "horizontal_flip": True}},
    "loss": {"family": "offset_ce", "margin": 0.5, "temperature": 4.0}})
splits = load_dataset(spec.dataset, data_roots=[], seed=0)
model = build_model(spec.model, splits.input_shape, splits.num_classes).to(device)
loss_fn = build_loss(spec.loss, splits.task)
optimizer = make_optimizer(model, spec.training)
train = splits.train.to(device)
generator = torch.Generator(device=device).manual_seed(0)
augment = build_augmentation(spec.training.augment, splits.input_shape)
train_epoch(model, loss_fn, optimizer, train, 32, generator, 1, check_every=10,
            augment=augment)  # warm-up
steps = math.ceil(len(train) / 32)
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("warn")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    train_epoch(model, loss_fn, optimizer, train, 32, generator, 2, check_every=10,
                augment=augment)
torch.cuda.set_sync_debug_mode(0)
syncs = [w for w in caught if "synchroniz" in str(w.message)]
for w in syncs[:20]:
    print(w.filename, w.lineno, str(w.message)[:120])
expected = steps // 10 + 1
print(f"steps {steps}: {len(syncs)} synchronising calls, expected at most {2 * expected}")
sys.exit(0 if len(syncs) <= 2 * expected else 1)
EOF
}
[ "$DEVICE" != cpu ] && step sync-count sync_count

# ------------------------------------------------------------------ 3. serve + a GPU worker
HOME_DIR="$OUT/home"
rm -rf "$HOME_DIR" && mkdir -p "$HOME_DIR"
export LIPTUNE_HOME="$HOME_DIR"
ROOTS=(--data-root "$DATA/datasets" --data-root /usr/share/datasets)
.venv/bin/liptune serve --port "$PORT" --workers 0 --data-dir "$HOME_DIR" >"$OUT/serve.log" 2>&1 &
SERVE=$!
.venv/bin/liptune worker --device "$DEVICE" --trials-per-device 4 --data-dir "$HOME_DIR" \
    "${ROOTS[@]}" --id gpu >"$OUT/worker.log" 2>&1 &
WORKER=$!
cleanup() {
    kill -TERM "$WORKER" "$SERVE" 2>/dev/null
    wait "$WORKER" "$SERVE" 2>/dev/null
}
trap cleanup EXIT

study() { # study N_TRIALS: submit a Fashion-MNIST study over REST, wait until it completes
    .venv/bin/python - "$PORT" "$1" "$N_SAMPLES" "$EPOCHS" <<'EOF'
import json, sys, time, urllib.request
port, n_trials, n_samples, epochs = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
base = f"http://127.0.0.1:{port}"
for _ in range(120):
    try:
        urllib.request.urlopen(base + "/health", timeout=2)
        break
    except OSError:
        time.sleep(1)
spec = {
    "name": f"gpu-check-{n_trials}",
    "dataset": {"name": "fashion-mnist", "n_samples": json.loads(n_samples)},
    "model": {"name": "convnet", "channels": [16, 32], "dense_widths": [64]},
    "training": {"epochs": epochs, "batch_size": 128, "lr": 1e-3},
    "search_space": {"loss": ["hkr"], "margin": {"low": 0.1, "high": 1.0, "log": True},
                     "alpha_kr": {"low": 10.0, "high": 200.0, "log": True}},
    "objectives": [{"metric": "accuracy"}, {"metric": "certified_accuracy", "eps": 0.1}],
    "n_trials": n_trials, "seed": 0,
}
request = urllib.request.Request(base + "/studies", data=json.dumps(spec).encode(),
                                 headers={"Content-Type": "application/json"})
study_id = json.load(urllib.request.urlopen(request))["id"]
started = time.time()
while time.time() - started < 480:
    body = json.load(urllib.request.urlopen(f"{base}/studies/{study_id}"))
    if body["status"] != "running":
        break
    time.sleep(2)
print(json.dumps(body, indent=2)[:3000])
front = json.load(urllib.request.urlopen(f"{base}/studies/{study_id}/pareto"))
print(json.dumps(front, indent=2)[:2000])
print(f"{n_trials} trial(s): {body['status']} in {time.time() - started:.0f} s")
sys.exit(0 if body["status"] == "completed" else 1)
EOF
}
step serve-one-trial study 1
step serve-four-trials study 4
grep -h "complete:" "$OUT/worker.log" | tail -5 >>"$SUMMARY"
cleanup
trap - EXIT

# ------------------------------------------------------------------ 4. CIFAR-10, offset CE, augmentation
# The python batches under a data root when present; else a generated set of CIFAR-10's shape
# (class-coloured blobs under noise: learnable, so the accuracy says the loop works), written as
# CIFAR-10 batches in $DATA/datasets/cifar10-generated and named with dataset.path.
CIFAR_PATH=null
cifar_data() {
    local root name
    for root in "$DATA/datasets" /usr/share/datasets; do
        for name in cifar-10-batches-py cifar10; do
            if [ -f "$root/$name/data_batch_1" ] && [ -f "$root/$name/test_batch" ]; then
                echo "CIFAR-10 batches found in $root/$name"
                return 0
            fi
        done
    done
    CIFAR_PATH='"cifar10-generated"'
    [ -f "$DATA/datasets/cifar10-generated/test_batch" ] && return 0
    .venv/bin/python - "$DATA/datasets/cifar10-generated" "${CIFAR_GENERATED[@]}" <<'EOF'
import sys
from pathlib import Path

import numpy as np

from worker.trial.datasets._cifar import write_cifar_dataset

directory, n_train, n_test = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
colours = rng.uniform(0.2, 0.8, size=(10, 3))
centres = rng.uniform(8, 24, size=(10, 2))
yy, xx = np.mgrid[0:32, 0:32]


def images(n):
    labels = rng.integers(0, 10, size=n)
    squared = (yy - centres[labels, 0, None, None]) ** 2 + (xx - centres[labels, 1, None, None]) ** 2
    blobs = np.exp(-squared / 60.0)
    x = colours[labels][:, :, None, None] * blobs[:, None] + rng.normal(0, 0.15, (n, 3, 32, 32))
    return (np.clip(x, 0, 1) * 255).astype(np.uint8), labels


write_cifar_dataset(directory, *images(n_train), *images(n_test))
print(f"generated CIFAR-10-shaped batches: {n_train} train, {n_test} test, in {directory}")
EOF
}
cifar_trial() {
    cifar_data || return 1
    local spec="$OUT/cifar10-offset-ce.json"
    cat >"$spec" <<EOF
{"name": "gpu-check-cifar10",
 "dataset": {"name": "cifar10", "path": $CIFAR_PATH, "n_samples": $CIFAR_SAMPLES},
 "model": {"name": "convnet", "channels": $CIFAR_CHANNELS, "dense_widths": $CIFAR_DENSE},
 "training": {"epochs": $CIFAR_EPOCHS, "batch_size": 256, "lr": 1e-3, "schedule": "cosine",
              "augment": {"random_crop": 4, "horizontal_flip": true}},
 "loss": {"family": "offset_ce", "margin": 0.3, "temperature": 8.0},
 "eps": [0.1412, 0.2824, 0.4235]}
EOF
    cat "$spec"
    .venv/bin/liptune train "$spec" --device "$DEVICE" --data-dir "$HOME_DIR" "${ROOTS[@]}"
}
step cifar10-offset-ce cifar_trial
grep -hE "batches found|generated CIFAR|^ +(clean|0\.[0-9]+) +[0-9.]+$|training_time" \
    "$OUT/cifar10-offset-ce.log" >>"$SUMMARY"

# ------------------------------------------------------------------ 5. benchmarks
step gpu-throughput .venv/bin/python benchmarks/gpu_throughput.py --device "$DEVICE" \
    "${ROOTS[@]}" "${THROUGHPUT[@]}" --json "$OUT/gpu_throughput.json"
grep -h "trials/h" "$OUT/gpu-throughput.log" >>"$SUMMARY"
step core-speed .venv/bin/python benchmarks/core_speed.py --device "$DEVICE" "${CORE_SPEED[@]}" \
    --json
grep -hE "train (liptune|deel)/|train step|inference" "$OUT/core-speed.log" >>"$SUMMARY"

[ "${TESTS_LAST:-0}" = 1 ] && test_steps
note "gpu-check on $DEVICE: $([ $FAILED = 0 ] && echo all passed || echo SOME FAILED) in $SECONDS s"
exit $FAILED
