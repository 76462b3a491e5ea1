#!/usr/bin/env bash
# What a session with a lent GPU runs. Written on a CPU machine: its GPU stages have not run yet.
#
# A session has about 15 minutes of device time, machine start included, and one call may run
# 10 minutes. So the whole job is one call of one stage, `all`, inside a time budget:
#
#   here, once:  bash benchmarks/gpu_session.sh wheels     # diffusers' wheels into .whl (git-ignored)
#   device run:  command "bash benchmarks/gpu_session.sh all", carry [".whl"], timeout_s 600
#
# `all` (BUDGET seconds in all, default 575: a 600 s call with time to pack) runs, most important
# first, each stage in what is left:
#   1. pytest -m gpu: the GPU tests (CUDA graphs == eager, no host sync, kernels at real sizes);
#   2. the op benchmarks, quick tier, without torch.compile peers: noising, both steps, attention,
#      GroupNorm+SiLU (the goals compare them with the eager reference, SDPA and F.group_norm);
#   3. DDIM-50 end to end at B = 256 in bf16 (the goal's case): fastdiff (eager, graphed,
#      graphed channels_last), the reference, diffusers and diffusers + torch.compile (when the
#      wheels came along);
#   4. step_overhead, quick tier: per-step overhead outside the U-Net with CUDA graphs;
#   5. benchmarks/tune.py: candidate launch configs of the elementwise kernels, GroupNorm, attention;
#   6. the kernel tests of the CPU suite (odd shapes and strides, every table entry), compiled;
#   7. with what time is left, the rest of the full tier (ops first, then end to end).
# Stage caps (s): 90, 100, 170, 45, 100, 55, the rest; estimates: no stage has run on a GPU yet.
# A broken setup (install, import) stops the script at once, leaving device time to fix and rerun.
# Benchmark stages pass `fastdiff bench --time-budget`, so a stage that runs long skips its last
# cases and still writes its JSON and report; `timeout` is the backstop. After every stage all
# results are packed again into $OUT/gpu-results.tgz (the device tool returns at most 8 files),
# beside the session log $OUT/gpu-session.log. Unpack into benchmarks/results/ and commit.
#
# Single stages, for a rerun: tests, kernel-tests, quick, tune, full [OP ...], end_to_end (step 3).
#
# The GPU machine has torch, triton, pytest, pytest-benchmark, nvidia-ml-py, matplotlib,
# safetensors, pillow, tqdm and huggingface_hub, but no diffusers: `wheels` downloads diffusers
# (the version pyproject's test extra pins) and importlib_metadata, the only requirement it lacks.
set -euo pipefail

out=${OUT:-benchmarks/results}
work=${GPU_SESSION_WORK:-/tmp/gpu-session}  # results before packing (not $OUT: 8 files come back)
budget=${BUDGET:-575}
start=$SECONDS
DIFFUSERS=diffusers==0.42.1  # as pyproject's test extra

log() { printf '\n=== [%ss] %s\n' "$((SECONDS - start))" "$*"; }
left() { echo $((budget - (SECONDS - start))); }
cap() { local l; l=$(left); echo $((l < $1 ? l : $1)); }  # the time left, at most $1 seconds
# results are named by date and GPU, e.g. bench-2026-11-25-nvidia-h100-80gb-hbm3-quick.json
stem() { echo "bench-$(date +%F)-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-')"; }
pack() { tar -czf "$out/gpu-results.tgz.tmp" -C "$work" . && mv "$out/gpu-results.tgz.tmp" "$out/gpu-results.tgz"; }

wheels() {  # on this (networked) machine: what the GPU machine lacks for the diffusers providers
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        -d .whl "$DIFFUSERS" importlib_metadata==8.7.0
    ls -l .whl
}

setup() {
    mkdir -p "$out" "$work"
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    # fastdiff.kernels is kernels/ mapped into the package: an install, not a path, makes it importable
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$work/install.log" 2>&1 ||
        { cat "$work/install.log"; exit 1; }
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee "$work/gpu.txt"
    python3 -c "import importlib.util, torch, triton, fastdiff; print('torch', torch.__version__, 'triton', triton.__version__,
'fastdiff', fastdiff.__version__, 'diffusers', importlib.util.find_spec('diffusers') is not None,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" | tee -a "$work/gpu.txt"
}

# too_little NAME SECONDS MIN: say so and succeed when SECONDS < MIN (`timeout 0` would mean no limit)
too_little() {
    if (($2 < $3)); then
        log "skipped $1: ${2}s left"
        return 0
    fi
    return 1
}

# bench NAME SECONDS ARGS...: fastdiff bench into $work/<stem>-NAME.json, inside SECONDS
bench() {
    local name=$1 seconds=$2
    shift 2
    too_little "bench $name" "$seconds" 30 && return 0
    log "fastdiff bench $* (--time-budget $((seconds - 20)), stopped at ${seconds}s)"
    timeout -s INT -k 15 "$seconds" python3 -m fastdiff bench "$@" --time-budget "$((seconds - 20))" \
        --json "$work/$(stem)-$name.json" 2>&1 | tee "$work/bench-$name.log" || echo "bench $name: exit $?"
}

# run_tests NAME SECONDS PYTEST-ARGS...: pytest into $work/NAME.{log,xml}, inside SECONDS
run_tests() {
    local name=$1 seconds=$2
    shift 2
    too_little "pytest $name" "$seconds" 20 && return 0
    # pytest-xdist, where installed (the GPU image has it): Triton compiles in 4 processes, not 1
    local parallel=()
    python3 -c "import xdist" 2>/dev/null && parallel=(-n 4 --dist loadfile)
    log "pytest $* ${parallel[*]} (stopped at ${seconds}s)"
    timeout -s INT -k 15 "$seconds" python3 -m pytest "$@" "${parallel[@]}" -q -rs -p no:cacheprovider \
        --junitxml="$work/$name.xml" 2>&1 | tee "$work/$name.log" || echo "pytest $name: exit $?"
}

run_stage() {
    local stage=$1
    shift
    case $stage in
    tests) run_tests gpu-tests "${1:-900}" -m gpu ;;
    kernel-tests)  # the CPU suite's kernel tests (odd shapes, strides, every table entry), compiled for this GPU
        run_tests kernel-tests "${1:-900}" -m "not gpu" tests/test_kernel_attention.py tests/test_kernel_group_norm.py \
            tests/test_kernel_q_sample.py tests/test_kernel_scheduler_step.py
        ;;
    quick) bench quick "${1:-900}" --quick ;;
    tune)
        local seconds=${1:-900}
        too_little tune "$seconds" 30 && return 0
        log "benchmarks/tune.py (--time-budget $((seconds - 15)), stopped at ${seconds}s)"
        timeout -s INT -k 15 "$seconds" python3 benchmarks/tune.py --time-budget "$((seconds - 15))" \
            --json "$work/$(stem | sed 's/^bench-/tune-/').json" 2>&1 | tee "$work/tune.log" || echo "tune: exit $?"
        ;;
    full)
        local name
        name=$(IFS=-; echo "$*")
        if (($#)); then bench "full-$name" 900 --ops "$@"; else bench full 900; fi
        ;;
    end_to_end)  # the goal's providers first; torch_peer's compile and diffusers_fastdiff come in `rest`
        bench e2e-B256-bf16 "${1:-900}" --ops end_to_end -k "B256 and bf16 and not torch_peer and not diffusers_fastdiff"
        ;;
    all)
        run_stage tests "$(cap 90)"; pack
        bench ops-quick "$(cap 100)" --quick --no-compile --ops q_sample ddim_step ddpm_step attention group_norm; pack
        run_stage end_to_end "$(cap 170)"; pack
        bench overhead-quick "$(cap 45)" --quick --ops step_overhead; pack
        run_stage tune "$(cap 100)"; pack
        run_stage kernel-tests "$(cap 55)"; pack
        bench rest "$(left)" --ops q_sample ddim_step ddpm_step attention group_norm end_to_end \
            -k "not (B256 and bf16) or torch_peer or diffusers_fastdiff"; pack
        log "done"
        ;;
    *)
        echo "unknown stage $stage (wheels, all, tests, kernel-tests, quick, tune, full [OP ...], end_to_end)" >&2
        exit 2
        ;;
    esac
}

if [[ ${1:-} == wheels ]]; then
    wheels
    exit
fi
mkdir -p "$out"
exec > >(tee -a "$out/gpu-session.log") 2>&1  # everything below: on the terminal and in the log
setup
case ${1:-all} in
full) run_stage "$@" ;;
*) for stage in "${@:-all}"; do run_stage "$stage"; done ;;
esac
pack
