#!/usr/bin/env bash
# The first minutes on a GPU or TPU machine: one command that measures instead of setting up.
#
#   scripts/accelerator_check.sh OUTDIR                            # on the GPU/TPU machine
#   ACCELERATOR_CHECK_TINY=1 scripts/accelerator_check.sh OUTDIR   # CPU smoke: tiny shapes
#
# From a fresh checkout it runs these parts in order, each under its own timeout and all within
# ACCELERATOR_CHECK_BUDGET_S (default 570 s, so the whole check ends inside ten minutes):
#   install       only if needed: when JAX cannot see the accelerator, `pip install -e '.[gpu]'`
#                 (or '.[tpu]') then '.[test]'; when it can, only missing packages by name, so
#                 a preinstalled accelerator JAX is never replaced
#   device        backend, devices, versions (and nvidia-smi's view)      -> device.jsonl
#   kernel_tests  JAXPOST_TEST_BACKEND=accelerator pytest -m accelerator: the kernels compiled
#                                                                         -> kernel_tests.jsonl
#   bench_kernels scripts/bench_kernels.py --time (Pallas vs XLA at N=8192, V=151936)
#   sampler       scripts/bench_sampler.py --size large (jaxpost vs transformers on CUDA; on a
#                 TPU jaxpost alone)
#   train_step    scripts/bench_train_step.py: an SFT step at the Qwen2.5-0.5B shape
#   memory        scripts/bench_memory.py: compiled temp bytes vs the planner (4/24 layers)
# Every part writes OUTDIR/<part>.jsonl (JSON lines) and OUTDIR/<part>.log; OUTDIR/summary.jsonl
# holds one line per part (status ok | failed | timeout | no_time, rc, seconds). A failing part
# does not stop the others; the exit status is 1 if any part failed.
#
# ACCELERATOR_CHECK_TINY=1 runs every part at tiny shapes on whatever backend there is and never
# installs anything: it checks the wiring (tests/test_accelerator_check.py runs it). There,
# bench_kernels runs --memory (its --time needs an accelerator) and the accelerator tests skip.
set -uo pipefail

OUT=${1:?usage: scripts/accelerator_check.sh OUTDIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 1
PY=${PYTHON:-python3}
TINY=${ACCELERATOR_CHECK_TINY:-0}
BUDGET=${ACCELERATOR_CHECK_BUDGET_S:-570}
export NO_GCE_CHECK=true PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
: >"$OUT/summary.jsonl"
FAILED=0

# part NAME TIMEOUT_S STDOUT CMD...: runs CMD under a timeout capped by what is left of the budget,
# stderr to NAME.log and stdout to the file STDOUT (or "-": to NAME.log too), and records one
# summary line. CMD may be one of the functions below (they are exported to its shell).
part() {
  local name=$1 limit=$2 stdout=$3
  shift 3
  local left=$((BUDGET - SECONDS)) start=$SECONDS rc status
  ((limit > left)) && limit=$left
  local log=$OUT/$name.log
  rm -f "$OUT/$name.jsonl" && : >"$log"
  [[ $stdout == - ]] && stdout=$log
  if ((limit < 10)); then
    rc=124 status=no_time
  else
    echo "== $name (timeout ${limit}s)" >&2
    timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" >>"$stdout" 2>>"$log"
    rc=$?
    case $rc in
      0) status=ok ;;
      124 | 137) status=timeout ;;
      *) status=failed ;;
    esac
  fi
  ((rc != 0)) && FAILED=1
  printf '{"part": "%s", "status": "%s", "rc": %d, "seconds": %d, "timeout_s": %d}\n' \
    "$name" "$status" "$rc" $((SECONDS - start)) "$limit" | tee -a "$OUT/summary.jsonl" >&2
}

# Prints what the parts need but cannot import, as pip names, one per line.
missing_packages() {
  "$PY" - <<'EOF'
import importlib.util
need = {"jax": "jax", "flax": "flax", "optax": "optax", "absl": "absl-py", "numpy": "numpy",
        "safetensors": "safetensors", "transformers": "transformers", "torch": "torch",
        "pytest": "pytest"}
for module, package in need.items():
    if importlib.util.find_spec(module) is None:
        print(package)
EOF
}

check_install() {
  local missing extra=""
  missing=$(missing_packages) || return 1
  if "$PY" -c "import jax, sys; sys.exit(jax.default_backend() == 'cpu')" 2>/dev/null; then
    echo "JAX already sees the accelerator; missing packages: ${missing:-none}"
    # shellcheck disable=SC2086  # one word per package
    [[ -z $missing ]] || "$PY" -m pip install -q $missing
    return
  fi
  if ((TINY)); then
    echo "tiny mode: no install; missing packages: ${missing:-none}"
    [[ -z $missing ]]
    return
  fi
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    extra=gpu
  elif [[ -e /dev/accel0 || -e /dev/vfio/0 || -n ${TPU_ACCELERATOR_TYPE:-} ]]; then
    extra=tpu
  else
    echo "no GPU (nvidia-smi) or TPU (/dev/accel*, /dev/vfio) found" >&2
    return 1
  fi
  echo "JAX does not see the accelerator: installing .[$extra] then .[test]"
  "$PY" -m pip install -q -e ".[$extra]" && "$PY" -m pip install -q -e ".[test]"
}

check_device() {
  "$PY" - "$TINY" <<'EOF'
import json, platform, sys
import jax, jaxlib
backend = jax.default_backend()
devices = jax.devices()
print(json.dumps({"bench": "device", "backend": backend, "device_count": len(devices),
                  "device_kind": devices[0].device_kind, "platform": devices[0].platform,
                  "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                  "python": platform.python_version()}))
if backend == "cpu" and sys.argv[1] != "1":
    sys.exit("JAX sees no GPU or TPU: the kernels would only run interpreted")
EOF
  local rc=$?
  command -v nvidia-smi >/dev/null && nvidia-smi >&2
  return $rc
}

check_kernel_tests() {
  JAXPOST_TEST_BACKEND=accelerator "$PY" -m pytest -m accelerator -q -p no:cacheprovider \
    --junitxml="$OUT/kernel_tests.xml" tests/test_kernels_*.py
  local rc=$?
  # One JSON line per test and a count line, from pytest's JUnit XML.
  "$PY" - "$OUT/kernel_tests.xml" >"$OUT/kernel_tests.jsonl" <<'EOF'
import collections, json, sys
import xml.etree.ElementTree as ET
counts = collections.Counter()
for case in ET.parse(sys.argv[1]).iter("testcase"):
    outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
    counts[outcome] += 1
    print(json.dumps({"bench": "kernel_test", "test": f"{case.get('classname')}::{case.get('name')}",
                      "outcome": outcome, "seconds": float(case.get("time", 0))}))
print(json.dumps({"bench": "kernel_tests", **counts}))
EOF
  return $rc
}

if ((TINY)); then
  BENCH_KERNELS=(--memory --rows 64 --width 32 --vocab 512 --impls fused fused_linear)
  SAMPLER=(--layers 1 --width 64 --vocab 128 --batch 2 --prompt 4 --new 4 --repeats 1)
  TRAIN=(--model tiny --batch 2 --seq-len 16 --repeats 2)
  MEMORY=(--layers 1 --remat full --repeats 1)
else
  BENCH_KERNELS=(--time --repeats 5)
  SAMPLER=(--size large --repeats 3)
  TRAIN=(--model qwen2.5-0.5b --batch 8 --seq-len 1024 --repeats 5)
  MEMORY=(--layers 4,24 --remat none,full --repeats 1)
fi

export OUT PY TINY
export -f missing_packages check_install check_device check_kernel_tests
part install 240 - check_install
part device 60 "$OUT/device.jsonl" check_device
cat "$OUT/device.jsonl" 2>/dev/null
# transformers' side of the sampler comparison runs on CUDA; elsewhere only jaxpost is timed.
grep -q '"backend": "tpu"' "$OUT/device.jsonl" 2>/dev/null && SAMPLER+=(--skip-transformers)
part kernel_tests 180 - check_kernel_tests
part bench_kernels 120 "$OUT/bench_kernels.jsonl" \
  "$PY" scripts/bench_kernels.py "${BENCH_KERNELS[@]}"
part sampler 120 - "$PY" scripts/bench_sampler.py "${SAMPLER[@]}" --out "$OUT/sampler.jsonl"
part train_step 180 - \
  "$PY" scripts/bench_train_step.py "${TRAIN[@]}" --out "$OUT/train_step.jsonl"
# the compiled step's memory on this backend against the planner's estimate for it
part memory 120 "$OUT/memory.jsonl" "$PY" scripts/bench_memory.py "${MEMORY[@]}"

echo "== summary ($OUT/summary.jsonl, ${SECONDS}s)"
cat "$OUT/summary.jsonl"
exit $FAILED
