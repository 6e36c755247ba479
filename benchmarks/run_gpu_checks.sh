#!/usr/bin/env bash
# Every GPU check of the Triton and CUDA kernels in one command: the build, the kernel tests, then
# benchmarks/kernels.py.
#
#   bash benchmarks/run_gpu_checks.sh        # PYTHON=/path/to/python to pick the interpreter (default: python, else python3)
#
# Phase 0 builds the extensions in place (setup.py build_ext --inplace) for this GPU's architecture only
# (TORCH_CUDA_ARCH_LIST, default the device's capability), with the compiler's per-kernel resource report in
# build.log and any register spills listed in spills.txt; SKIP_BUILD=1 keeps an existing build. Phase 1 runs the kernel tests as seven pytest shards at once: compiling Triton kernels is CPU-bound and serial
# within a process, and the shards share triton's on-disk cache. Phase 2 runs the benchmark alone, so it times an
# idle GPU and finds most kernels compiled. Each step has a timeout (TEST_TIMEOUT, BENCH_TIMEOUT seconds); together
# they stay under 10 minutes. Results: benchmarks/results/<date>-<card>-kernels.md, logs in
# benchmarks/results/<date>-<card>-gpu-checks/; both are also copied to $OUT when it is set. Exit status 0 only when
# every shard and the benchmark passed.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}  # the GPU image has only python3
BUILD_TIMEOUT=${BUILD_TIMEOUT:-120}
TEST_TIMEOUT=${TEST_TIMEOUT:-240}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-210}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET MEGAPHI_KERNELS

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run_gpu_checks: $PY finds no CUDA GPU (torch missing or torch.cuda.is_available() is False); nothing run"
    exit 2
fi
card=$("$PY" -c "import re, torch; print(re.sub('[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
prefix=benchmarks/results/$(date +%Y-%m-%d)-$card
logs=$prefix-gpu-checks
mkdir -p "$logs"

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| triton', triton.__version__)" 2>&1
    command -v nvcc > /dev/null && nvcc --version | tail -2
    git log -1 --format='commit %h %s' 2>/dev/null
    git status --short 2>/dev/null | head -20
} | tee "$logs/environment.txt"

build_rc=skipped
if [ "${SKIP_BUILD:-0}" = 0 ]; then
    arch=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
    echo "== phase 0: setup.py build_ext --inplace for $arch (timeout ${BUILD_TIMEOUT}s)"
    TORCH_CUDA_ARCH_LIST=$arch MEGAPHI_PTXAS_VERBOSE=1 MAX_JOBS=$(nproc) timeout -k 10 "$BUILD_TIMEOUT" \
        "$PY" setup.py build_ext --inplace > "$logs/build.log" 2>&1
    build_rc=$?
    # Each kernel that spills, on one line: its (mangled) name, then ptxas's spill counts.
    awk '/Compiling entry function/ {k = $0} /bytes spill/ && !/ 0 bytes spill stores, 0 bytes spill loads/ {
        print k " ->" $0}' "$logs/build.log" > "$logs/spills.txt"
    echo "   phase 0 took ${SECONDS}s (exit $build_rc); $(grep -c "Compiling entry function" "$logs/build.log")" \
        "kernel compilations, $(wc -l < "$logs/spills.txt") with spills"
fi
"$PY" -c "from megaphi import kernels; print('backends:', kernels.backend_status())" 2>&1 | tee -a "$logs/environment.txt"

copy_out() {  # the results so far, for a caller that only gets $OUT back
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT/results" && cp -r "$logs" "$OUT/results/" && cp "$prefix"-kernels.* "$OUT/results/" 2>/dev/null
    fi
    return 0
}

if ! "$PY" -c "import pytest" 2>/dev/null; then
    echo "run_gpu_checks: pytest is not installed for $PY; the tests are skipped, the benchmark still runs" \
        | tee "$logs/pytest-missing.txt"
    shards=()
else
    # Shards split by the kernels they compile (a few seconds each): the test_gpu_* tests at phi-1 sizes, then the
    # CPU tests, which run on the GPU too (fp32 and fp16, small odd shapes).
    shards=(gpu-attention-bf16 gpu-attention-fp16 gpu-attention-variants gpu-others rest-attention-fp32
            rest-attention rest-others cuda)
    attention=tests/test_kernels_triton_attention.py
    declare -A shard_args=(
        [gpu-attention-bf16]="$attention|test_gpu_matches_reference and bf16"
        [gpu-attention-fp16]="$attention|test_gpu_matches_reference and fp16"
        [gpu-attention-variants]="$attention|test_gpu_fusion_variants_agree"
        [gpu-others]="tests/test_kernels_triton.py|test_gpu_"
        [rest-attention-fp32]="$attention|test_fp32_matches_reference"
        [rest-attention]="$attention|not test_gpu_ and not test_fp32_matches_reference"
        [rest-others]="tests/test_kernels_triton.py tests/test_kernels_dispatch.py|not test_gpu_"
        [cuda]="tests/test_kernels_cuda.py tests/test_kernels_cuda_mlp_rotary.py|"
    )
    echo "== phase 1: ${#shards[@]} pytest shards at once (timeout ${TEST_TIMEOUT}s each)"
    for name in "${shards[@]}"; do
        IFS='|' read -r files expr <<< "${shard_args[$name]}"
        # shellcheck disable=SC2086  # files is a list
        (timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest -v --durations=5 -rfEs -p no:cacheprovider $files -k "$expr" \
            > "$logs/pytest-$name.log" 2>&1; echo $? > "$logs/pytest-$name.rc") &
    done
    wait
    echo "   phase 1 done at ${SECONDS}s"
    copy_out
fi

bench_start=$SECONDS
echo "== phase 2: benchmarks/kernels.py (timeout ${BENCH_TIMEOUT}s)"
TRITON_PRINT_AUTOTUNING=1 timeout -k 10 "$BENCH_TIMEOUT" "$PY" benchmarks/kernels.py --attention-variants \
    --output "$prefix-kernels.md" > "$logs/benchmark.log" 2>&1
bench_rc=$?
echo "   phase 2 took $((SECONDS - bench_start))s; ${SECONDS}s in all"
copy_out

echo
echo "================ summary ($card) ================"
problems=()
case $build_rc in
    0|skipped) ;; *) problems+=("build (exit $build_rc, see $logs/build.log)") ;;
esac
echo "build                    $build_rc; spills: $(cat "$logs/spills.txt" 2>/dev/null | wc -l) kernel(s)"
for name in ${shards[@]+"${shards[@]}"}; do
    rc=$(cat "$logs/pytest-$name.rc" 2>/dev/null || echo "?")
    case $rc in
        0) state=passed ;; 124|137) state="TIMED OUT after ${TEST_TIMEOUT}s" ;; 5) state="NO TESTS COLLECTED" ;;
        *) state="FAILED (exit $rc)" ;;
    esac
    [ "$rc" = 0 ] || problems+=("pytest $name")
    printf '%-24s %s: %s\n' "$name" "$state" "$(grep -E '(passed|failed|error|skipped|no tests ran)' \
        "$logs/pytest-$name.log" | tail -1 | sed 's/^=* *//; s/ *=*$//')"
    grep -E '^(FAILED|ERROR|SKIPPED)' "$logs/pytest-$name.log" | cut -c1-220 | sed 's/^/    /'
    case $rc in 124|137) echo "    still running: $(tail -1 "$logs/pytest-$name.log" | cut -c1-200)" ;; esac
done
case $bench_rc in
    0) state=passed ;; 124|137) state="TIMED OUT after ${BENCH_TIMEOUT}s" ;; *) state="FAILED (exit $bench_rc)" ;;
esac
[ "$bench_rc" = 0 ] || problems+=("benchmark")
echo "benchmark                $state; results: $prefix-kernels.md, log: $logs/benchmark.log"
if [ -f "$prefix-kernels.md" ]; then
    grep -E '^\||^Failed' "$prefix-kernels.md"
else
    tail -25 "$logs/benchmark.log"
fi
if [ ${#problems[@]} -eq 0 ]; then
    echo "ALL GPU CHECKS PASSED"
    exit 0
fi
echo "PROBLEMS: ${problems[*]} (logs in $logs)"
exit 1
