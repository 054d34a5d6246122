#!/usr/bin/env bash
# The benchmark suite on one GPU machine, in one command, within about 8 minutes; prints a table.
#
#   bash benchmarks/gpu.sh [out dir]        (default: benchmarks/results/gpu)
#
# Needs JAX with CUDA and the project's dependencies in the `python3` it finds (PYTHON=... to choose
# another; e.g. PYTHON=.venv/bin/python after `pip install -e .` there); offline, the missing ones
# can come as wheels in .whl/ (pip download ... -d .whl), installed into /tmp/asyncflower-site. vs_flower is not run here: it
# is a CPU benchmark, and it installs Flower from PyPI.
#
# Each step has a time limit, so the whole stays inside the budget even on a slower card; a step
# cut off by its limit keeps the rows it measured (<name>.partial.json), and the summary says so.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false            # steps run one after another; take memory as needed
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$OUT/xla-cache}"  # a rerun skips compilation
start=$(date +%s)

if ! "$PY" -c "import asyncflower_jax.strategy, hydra, flwr, jax" 2>/dev/null && [ -d .whl ]; then
  # offline: the missing dependencies as wheels, installed beside (not into) that Python, ahead of
  # its own packages (the versions the project was tested with)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/asyncflower-site .whl/*.whl && export PYTHONPATH="/tmp/asyncflower-site:$PYTHONPATH"
fi
if ! "$PY" -c "import asyncflower_jax.strategy, hydra, flwr, jax"; then
  echo "gpu.sh: $PY lacks the project's dependencies: install them (pip install -e .) or put their wheels in .whl/" >&2
  exit 1
fi
"$PY" -c "import jax; d = jax.devices(); print('devices:', d); assert d[0].platform == 'gpu', 'no GPU: this script is for GPU machines'" || exit 1

step() {  # step <name> <seconds> <command...>
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout --signal=TERM "$limit" "$@" 2>&1 | grep -v -E "^(W|I)[0-9]{4} " | tee "$OUT/$name.log" | tail -n 25
  echo "== $name: exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s so far"
}

# Sized from runs on an H200 (BENCHMARKS.md), where a sequential update costs about 1.2 ms: the full
# CPU grids do not fit in 8 minutes there. The steps took 141, 37, > 120, > 50 and 54 s with limits
# of 160, 60, 120, 50 and 100 (step 1b then timed one aggregation per call against the sequential
# baseline); the limits now give the two cut-off steps more room.
# 1. simulator vs sequential baseline at M = 100 and 8192, under the latency models whose deferred
#    batches average >= 4096 at M = 8192 with 2M updates (identical: 8192, Pareto 1.5: 4266); the
#    execution comparison is skipped (a 1024-client batch: vmap in one call is fastest on a GPU);
#    last, the aggregation step timed alone ("aggr share": how much of each run the device spends
#    aggregating, which says whether the device's steps or the host's loop hold the run back), and
#    the same steps with each model one flat vector (a few kernels per step instead of two per leaf)
step throughput 160 "$PY" benchmarks/throughput.py --out "$OUT" --repeats 1 --chunk-size 2048 --updates-per-client 2 --skip-execution \
  --concurrency 100 8192 --latencies identical pareto-1.5
# 1b. the host loop alone (a model too small to cost anything), one aggregation per call and 1024
#    (the GPU default), at M = 1000: the host's microseconds per update on this machine, against
#    the about 6 us that 200x needs (one aggregation per call against the sequential baseline was
#    measured before: 1.4 to 1.6x, BENCHMARKS.md)
step host_loop 45 "$PY" benchmarks/host_loop.py --out "$OUT" --repeats 2 --updates 4000 --concurrency 1000 --per-call 1 1024
# 2. per-client LEAF CNN against the shared-weights ceiling, M = 128, 512, 1024: the best float32
#    variant of that run, with XLA's convolutions and as patches and one matmul (models/conv.py),
#    each against the faster ceiling (about 9 s each, compilation included; bfloat16 gained 0.05)
step vectorization 140 "$PY" benchmarks/vectorization.py --out "$OUT" --repeats 2 --no-bf16 --variants vmap-chunk-64 vmap-chunk-64-patches
# 3. whole simulation / bare training (FedAsync, exponential durations: the smallest batches)
step overhead 70 "$PY" benchmarks/overhead.py --out "$OUT" --repeats 1 --chunk-size 2048 --rules fedasync --latencies exponential --concurrency 100 1000
# 4. N = 1e6 at M = 1000 and 10,000 (one process per point; the small sizes are the CPU's)
step scale 60 "$PY" benchmarks/scale.py --out "$OUT" --chunk-size 2048 --populations 1000000 --concurrency 1000 10000

echo
echo "== summary ($(( $(date +%s) - start )) s)"
"$PY" benchmarks/summarize.py "$OUT"
