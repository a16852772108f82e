#!/usr/bin/env bash
# One run on a GPU machine (an H100/H200 with torch and triton preinstalled, no network): the
# cuda tests, every op benchmark at the shapes of benchmarks/README.md, the CUDA decode kernel
# against the Triton decode path, the model (medium, bf16), a block-size sweep of the iterate,
# what the driver reports for every Triton kernel, and profiler tables of the model and the
# iterate. Each section has a time limit and the whole run a budget (SUITE_BUDGET seconds,
# default 420); a section that would not fit is skipped and says so.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_suite.sh            # results: $OUT/gpu-run.json, $OUT/log.txt
#   SUITE_SECTIONS="tests iterate" bash benchmarks/gpu_suite.sh     # only some sections
#
# Files written (few, so they can be fetched from a lent machine): gpu-run.json (every result
# with the device and versions), log.txt (every section's output), profile.txt.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-run}
mkdir -p "$OUT"
WORK=$(mktemp -d)
BUDGET=${SUITE_BUDGET:-420}
SECTIONS=${SUITE_SECTIONS:-"tests_first tests cuda_tests iterate iterate_ee model ops sweep profile iterate_fp32 report"}
# (iterate_fast: the iterate without torch.compile, for a short re-measure; not in the default list)
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/python:${PYTHONPATH:-}" TRITON_DEFAULT_FP_FUSION=1
LOG="$OUT/log.txt"
: > "$LOG"

say() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
wanted() { [[ " $SECTIONS " == *" $1 "* ]]; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# section NAME LIMIT COMMAND...: runs COMMAND under min(LIMIT, budget left), its output into the log
section() {
  local name=$1 limit=$2; shift 2
  wanted "$name" || return 0
  local remaining; remaining=$(left)
  if (( remaining < 20 )); then say "skip $name: budget spent"; return 0; fi
  (( limit > remaining )) && limit=$remaining
  say "== $name (limit ${limit}s)"
  timeout --kill-after=5 "$limit" "$@" >> "$LOG" 2>&1
  say "== $name rc=$?"
  merge
}
merge() {
  python - "$WORK" "$OUT/gpu-run.json" <<'EOF' >> "$LOG" 2>&1
import glob, json, os, sys
work, out = sys.argv[1], sys.argv[2]
runs = {}
for path in sorted(glob.glob(os.path.join(work, "*.json"))):
    try:
        with open(path) as f:
            runs[os.path.basename(path)[:-5]] = json.load(f)
    except Exception as e:  # a section killed while writing
        runs[os.path.basename(path)[:-5]] = {"error": repr(e)}
with open(out, "w") as f:
    json.dump(runs, f, indent=1)
EOF
}

say "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
python -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$LOG"
if ls .whl/*.whl >/dev/null 2>&1; then  # optional baselines (Liger-Kernel) carried as wheels
  python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# the compiled extension (C++ CPU kernels and the CUDA decode kernel) builds in the background
# (SUITE_BUILD=0 skips it: only the cuda_tests section needs it)
BUILD=
if [[ "${SUITE_BUILD:-1}" != 0 ]]; then
  ( INL_KERNELS_MARCH=native MAX_JOBS=12 python setup.py -q build_ext --inplace > "$WORK/build.log" 2>&1;
    echo "build rc=$?" >> "$WORK/build.log" ) &
  BUILD=$!
fi

# correctness first, while the extension builds: every cuda-marked test that needs no extension,
# the ones no GPU has run yet first (decode in a CUDA graph / reduce-overhead against eager, the
# Triton ops under torch.compile); -v so that each test's name and result reach the log even
# when the section runs out of time
section tests_first ${SUITE_TESTS_FIRST_LIMIT:-120} python -m pytest -v -m cuda -p no:cacheprovider -n 4 \
  tests/inl_llm/test_decode.py tests/test_library.py
section tests ${SUITE_TESTS_LIMIT:-150} python -m pytest -v -m cuda -p no:cacheprovider -n 8 tests/triton tests/inl_llm \
  tests/test_iterate.py --deselect tests/inl_llm/test_decode.py

if [[ -n "$BUILD" ]]; then
  say "waiting for the extension build"; wait $BUILD; tail -n 3 "$WORK/build.log" | tee -a "$LOG"
  grep -iE "error|warning: inl" "$WORK/build.log" | head -20 >> "$LOG"
fi
section cuda_tests 60 python -m pytest -q -m cuda -p no:cacheprovider tests/cuda

section iterate 170 python -m benchmarks.bench_iterate --device cuda --dtype bf16 --early-exit off --warmup 2 \
  --repeat 5 --json "$WORK/iterate_bf16.json"
section iterate_ee 40 python -m benchmarks.bench_iterate --device cuda --dtype bf16 --early-exit on --no-compile \
  --modes fwd --shapes 16384x2048x5 64x2048x5 --warmup 2 --repeat 5 --json "$WORK/iterate_bf16_early_exit.json"
# the same without torch.compile (whose baseline rows a full run above gives): the quick re-measure
section iterate_fast 70 python -m benchmarks.bench_iterate --device cuda --dtype bf16 --early-exit off --no-compile \
  --warmup 2 --repeat 5 --json "$WORK/iterate_bf16_no_compile.json"
section model 120 python -m benchmarks.bench_model --device cuda --size medium --dtype bf16 --batch 8 --seq 1024 \
  --modes forward decode block --warmup 1 --repeat 3 --json "$WORK/model_medium.json"
section ops 45 python -m benchmarks.bench_rms_norm --repeat 5 --json "$WORK/rms_norm.json"
section ops 45 python -m benchmarks.bench_rope --repeat 5 --json "$WORK/rope.json"
section ops 75 python -m benchmarks.bench_attention --repeat 5 --json "$WORK/attention.json"
section sweep 60 python -m benchmarks.sweep_iterate --budget 50 --kinds fwd decode bwd --json "$WORK/sweep.json"
section profile 60 python -m benchmarks.profile_gpu --out "$OUT/profile.txt"
section iterate_fp32 60 python -m benchmarks.bench_iterate --device cuda --dtype fp32 --early-exit off --no-compile \
  --shapes 16384x2048x5 --warmup 2 --repeat 5 --json "$WORK/iterate_fp32.json"
section report 90 python -m benchmarks.kernel_report --driver --json "$WORK/kernel_driver.json"
merge
say "done"
