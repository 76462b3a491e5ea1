#!/usr/bin/env bash
# What a session with a lent GPU runs. Written on a CPU machine: its GPU stages have not run yet
# (tests/test_gpu_session.py runs the whole flow with fake commands).
#
# A session has about 15 minutes of device time, machine start included, and one call may run
# 10 minutes. So the whole job is one call of one stage, `all`, inside a time budget:
#
#   here, once:  bash benchmarks/gpu_session.sh wheels     # diffusers' wheels into .whl (git-ignored)
#   device run:  command "bash benchmarks/gpu_session.sh all", carry [".whl"], timeout_s 600
#
# The budget (BUDGET, default 570 s: the call's 600 less 30 for the last pack and the log) counts
# from the script's start, setup included, and adds up (the script refuses caps that do not):
#
#   setup 40 (two pip installs, the version check) + stage caps 80 + 115 + 175 + 40 + 60 + 30 + 30 = 570,
#   and the rest stage gets what is left: nothing when every stage and setup run to their caps, and
#   what setup and the stages before it leave unspent otherwise (setup's 40 s are an allowance: two
#   pip installs and an import take ~20). (Stage 2 got 15 s more for the multistep step's 6 quick cases
#   and stage 3 25 s more for DPM++-10 at B = 256, both taken from tune's 90; stage 5, the SD U-Net and
#   VAE, got its 60 s from the rest's former floor of 30, tune's 50 -> 30 and the kernel tests' 40 -> 30:
#   all estimates. The sweep stops between candidates and keeps what it measured; the kernel tests stop
#   on SIGINT with their JUnit XML.)
#
# Stages, most important first, each capped at min(its cap, the budget left):
#   1. pytest -m gpu (80 s): the GPU tests (CUDA graphs == eager, no host sync, kernels at real
#      sizes), less the bench test that stage 2 repeats;
#   2. the op benchmarks, quick tier, without torch.compile peers (115 s): noising, the DDIM and DDPM
#      steps, the multistep step (DPM-Solver++, UniPC, Euler; 6 cases), attention, GroupNorm+SiLU (the
#      goals compare them with the eager reference, diffusers' step, SDPA and F.group_norm);
#   3. DDIM-50 end to end at B = 256 in bf16 (175 s; the goal's case), then DPM++-10 at the same B:
#      fastdiff (eager, graphed, graphed channels_last), the reference, diffusers and (DDIM only)
#      diffusers + torch.compile (when the wheels came along);
#   4. step_overhead, quick tier (40 s): per-step overhead outside the U-Net with CUDA graphs;
#   5. Stable Diffusion 1.5's U-Net (B = 2: one image with guidance) and VAE decode in diffusers, fp16
#      (60 s): stock, accelerate(model) and accelerate(model, cuda_graph=True); benchmarks/bench_sd_unet.py
#      and bench_sd_vae.py, which `fastdiff bench --ops` does not list, so pytest runs them as fastdiff
#      bench runs its files (`fastdiff bench --from-json` makes their report here, off the device).
#      Their diffusers + torch.compile (a minute or more to compile SD's U-Net: an estimate) is left to
#      the single stage `sd`, a call of its own;
#   6. benchmarks/tune.py (30 s): attention's launch configs first, then GroupNorm's, the elementwise kernels';
#   7. the kernel tests of the CPU suite (30 s): odd shapes and strides, every table entry, compiled;
#   8. with what time is left, the rest of the full tier (ops first, then end to end, DPM++'s
#      diffusers + torch.compile among it).
# Caps are estimates: no stage has run on a GPU yet. BUDGET, SETUP_S, CAPS (seven numbers, in stage
# order) and GRACE can be set in the environment (the test runs `all` in seconds that way).
#
# A stage of S seconds gets SIGINT at S - GRACE and SIGKILL at S (GRACE 10 s): no stage outlives
# its cap. Benchmark stages also pass `--time-budget S - 2·GRACE`, so no case starts in the last
# 2·GRACE seconds. On SIGINT `fastdiff bench` and tune.py stop after the case in progress and write
# their results; a SIGKILL still leaves every finished case: `fastdiff bench` writes one JSON line
# per case as it ends (<json stem>.jsonl), tune.py rewrites its JSON after every candidate. After
# every stage all results are packed again into $OUT/gpu-results.tgz (the device tool returns at most
# 8 files; $OUT holds this and the session log $OUT/gpu-session.log). Unpack into benchmarks/results/
# and commit; `fastdiff bench --from-json X.json` rebuilds the report of a killed stage from X.jsonl.
# A broken setup (install, import) stops the script at once, leaving device time to fix and rerun.
#
# Single stages, for a rerun, each capped by the budget: tests, kernel-tests, quick, tune,
# full [OP ...], end_to_end (step 3), sd (step 5's files, full tier, every provider: torch.compile too).
#
# The GPU machine has torch, triton, pytest, pytest-benchmark, nvidia-ml-py, matplotlib,
# safetensors, pillow, tqdm and huggingface_hub, but no diffusers: `wheels` downloads diffusers
# (the version pyproject's test extra pins) and importlib_metadata, the only requirement it lacks.
# The SD benchmarks build their models from configs, with no text encoder: no transformers needed.
set -euo pipefail
[[ -n ${EPOCHREALTIME:-} ]] || { echo "gpu_session.sh needs bash 5 (EPOCHREALTIME)" >&2; exit 2; }

start=${EPOCHREALTIME/[.,]/}  # microseconds (bash 5): $SECONDS would round the time spent down by up to 1 s
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# resolved before the cd below, so that a relative OUT or GPU_SESSION_WORK means the caller's folder
out=$(realpath -m "${OUT:-$root/benchmarks/results}")
work=$(realpath -m "${GPU_SESSION_WORK:-/tmp/gpu-session}")  # results before packing (not $OUT: 8 files come back)
cd "$root"
export PYTHONUNBUFFERED=1  # a killed process keeps its last lines in the log: the ones that say why

budget=${BUDGET:-570}
setup_allowance=${SETUP_S:-40}
grace=${GRACE:-10}
stages=(tests ops-quick e2e overhead sd tune kernel-tests)
read -r -a caps <<<"${CAPS:-80 115 175 40 60 30 30}"  # seconds, in the order of `stages`
DIFFUSERS=diffusers==0.42.1  # as pyproject's test extra
# tests/ benchmark test that runs `fastdiff bench --quick --no-compile --ops ddim_step attention`:
# the op-bench stage runs those cases again, so the GPU-tests stage leaves it out
REPEATED_BENCH_TEST=tests/test_bench.py::test_gpu_quick_run_records_the_kernels_with_cuda_events

spent() {  # whole seconds since the start, a started second counted as spent
    local now=${EPOCHREALTIME/[.,]/}
    echo $(((now - start + 999999) / 1000000))
}
log() { printf '\n=== [%ss] %s\n' "$(spent)" "$*"; }
die() {
    echo "gpu_session.sh: $*" >&2
    exit 2
}
left() {  # seconds of the budget left, never below 0
    local l=$((budget - $(spent)))
    echo $((l > 0 ? l : 0))
}
cap() {  # the time left, at most $1 seconds (no $1: all of it)
    local l c
    l=$(left)
    c=${1:-$l}
    echo $((l < c ? l : c))
}
# results are named by date and GPU, e.g. bench-2026-11-25-nvidia-h100-80gb-hbm3-quick.json
stem() { echo "bench-$(date +%F)-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-')"; }

# pack: $work into $OUT/gpu-results.tgz. Never fails: under set -e a failed tar would end the
# session and lose every stage after it; the last good pack stays.
pack() {
    local err
    if err=$(tar -czf "$out/gpu-results.tgz.tmp" -C "$work" . 2>&1); then
        mv -f "$out/gpu-results.tgz.tmp" "$out/gpu-results.tgz" || log "pack: mv failed; the previous pack stays"
    else
        rm -f "$out/gpu-results.tgz.tmp"
        log "pack: tar failed; the previous pack stays: $err"
    fi
}

# check_arguments STAGE...: known stages, whole seconds in BUDGET, SETUP_S, GRACE and CAPS; before
# setup, so that a typo costs no device time
check_arguments() {
    local value
    if [[ ${1:-all} != full ]]; then
        for value in "${@:-all}"; do
            [[ $value =~ ^(all|tests|kernel-tests|quick|tune|end_to_end|sd)$ ]] ||
                die "unknown stage $value (wheels, all, tests, kernel-tests, quick, tune, full [OP ...], end_to_end," \
                    "sd)"
        done
    fi
    for value in "$budget" "$setup_allowance" "$grace" "${caps[@]}"; do
        [[ $value =~ ^(0|[1-9][0-9]*)$ ]] || die "BUDGET, SETUP_S, GRACE and CAPS must be whole seconds; got '$value'"
    done
    ((${#caps[@]} == ${#stages[@]})) || die "CAPS must give ${#stages[@]} caps (${stages[*]}); got '${caps[*]}'"
}

# check_budget: setup + all's stage caps fit the budget; logs the sums
check_budget() {
    local total=$setup_allowance sums="setup $setup_allowance" i
    for i in "${!stages[@]}"; do
        total=$((total + caps[i]))
        sums+=" + ${stages[i]} ${caps[i]}"
    done
    ((total <= budget)) || die "setup + stage caps = ${total}s exceed BUDGET=${budget}s ($sums)"
    log "budget ${budget}s = $sums + rest $((budget - total)) (the rest also gets what setup leaves)"
}

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
    log "setup took $(spent)s of its ${setup_allowance}s"
}

# too_little NAME SECONDS MIN: say so and succeed when SECONDS < MIN (`timeout 0` would mean no limit)
too_little() {
    if (($2 < $3)); then
        log "skipped $1: ${2}s left"
        return 0
    fi
    return 1
}

# staged NAME SECONDS CMD...: CMD, its output in the session log and $work/NAME.log, with SIGINT
# at SECONDS - grace and SIGKILL at SECONDS (timeout signals CMD's whole process group)
staged() {
    local name=$1 seconds=$2 rc=0
    shift 2
    log "$* (SIGINT at $((seconds - grace))s, SIGKILL at ${seconds}s)"
    timeout -s INT -k "$grace" "$((seconds - grace))" "$@" 2>&1 | tee "$work/$name.log" || rc=$?
    case $rc in
    0) ;;
    124) log "$name: stopped by SIGINT at $((seconds - grace))s" ;;
    137) log "$name: killed at ${seconds}s; what it wrote before stays" ;;
    *) log "$name: exit $rc" ;;
    esac
}

# bench NAME SECONDS ARGS...: fastdiff bench into $work/<stem>-NAME.json (and .jsonl, .md, .png), inside SECONDS
bench() {
    local name=$1 seconds=$2
    shift 2
    too_little "bench $name" "$seconds" $((3 * grace)) && return 0
    staged "bench-$name" "$seconds" python3 -m fastdiff bench "$@" --time-budget "$((seconds - 2 * grace))" \
        --json "$work/$(stem)-$name.json"
}

# bench_sd NAME SECONDS PYTEST-ARGS...: the SD bench files, which fastdiff bench's --ops does not list,
# run by pytest with the flags fastdiff bench gives its files, into $work/<stem>-NAME.json and its
# per-case .jsonl, inside SECONDS (no report here: `fastdiff bench --from-json` writes it off the device)
SD_BENCH_FILES=(benchmarks/bench_sd_unet.py benchmarks/bench_sd_vae.py)
bench_sd() {
    local name=$1 seconds=$2 json
    shift 2
    too_little "bench $name" "$seconds" $((3 * grace)) && return 0
    json="$work/$(stem)-$name.json"
    staged "bench-$name" "$seconds" python3 -m pytest "${SD_BENCH_FILES[@]}" -q -p no:cacheprovider --benchmark-enable \
        "--benchmark-json=$json" "--case-log=${json%.json}.jsonl" --benchmark-columns=median,rounds \
        --benchmark-sort=fullname "$@" --time-budget "$((seconds - 2 * grace))"
}

# run_tests NAME SECONDS PYTEST-ARGS...: pytest into $work/NAME.{log,xml}, inside SECONDS
run_tests() {
    local name=$1 seconds=$2
    shift 2
    too_little "pytest $name" "$seconds" $((2 * grace)) && return 0
    # pytest-xdist, where installed (the GPU image has it): Triton compiles in 4 processes, not 1
    local parallel=()
    python3 -c "import xdist" 2>/dev/null && parallel=(-n 4 --dist loadfile)
    staged "$name" "$seconds" python3 -m pytest "$@" "${parallel[@]}" -q -rs -p no:cacheprovider \
        --junitxml="$work/$name.xml"
}

tune() {
    local seconds=$1
    too_little tune "$seconds" $((3 * grace)) && return 0
    staged tune "$seconds" python3 benchmarks/tune.py --time-budget "$((seconds - 2 * grace))" \
        --json "$work/$(stem | sed 's/^bench-/tune-/').json"
}

# run_stage STAGE [SECONDS | OP ...]: one stage, inside SECONDS (default: the budget left)
run_stage() {
    local stage=$1
    shift
    case $stage in
    tests) run_tests gpu-tests "$(cap "${1:-}")" -m gpu --deselect "$REPEATED_BENCH_TEST" ;;
    kernel-tests)  # the CPU suite's kernel tests (odd shapes, strides, every table entry), compiled for this GPU
        run_tests kernel-tests "$(cap "${1:-}")" -m "not gpu" tests/test_kernel_attention.py \
            tests/test_kernel_group_norm.py tests/test_kernel_q_sample.py tests/test_kernel_scheduler_step.py \
            tests/test_kernel_multistep.py
        ;;
    quick) bench quick "$(cap "${1:-}")" --quick ;;
    tune) tune "$(cap "${1:-}")" ;;
    full)
        local name
        name=$(IFS=-; echo "$*")
        if (($#)); then bench "full-$name" "$(cap)" --ops "$@"; else bench full "$(cap)"; fi
        ;;
    sd)  # the SD U-Net and VAE, full tier, every provider (torch.compile of the U-Net included)
        bench_sd sd-full "$(cap "${1:-}")"
        ;;
    end_to_end)  # the goal's providers first (DDIM's, then DPM++'s); the compiles and diffusers_fastdiff in `rest`
        bench e2e-B256-bf16 "$(cap "${1:-}")" --ops end_to_end \
            -k "B256 and bf16 and not torch_peer and not diffusers_fastdiff and not (dpmpp and diffusers_compile)"
        ;;
    all)
        run_stage tests "${caps[0]}"; pack
        bench ops-quick "$(cap "${caps[1]}")" --quick --no-compile --ops q_sample ddim_step ddpm_step \
            multistep_step attention group_norm; pack
        run_stage end_to_end "${caps[2]}"; pack
        bench overhead-quick "$(cap "${caps[3]}")" --quick --ops step_overhead; pack
        bench_sd sd-quick "$(cap "${caps[4]}")" --quick -k "not diffusers_compile"; pack
        run_stage tune "${caps[5]}"; pack
        run_stage kernel-tests "${caps[6]}"; pack
        bench rest "$(left)" --ops q_sample ddim_step ddpm_step multistep_step attention group_norm end_to_end \
            -k "not (B256 and bf16) or torch_peer or diffusers_fastdiff or (dpmpp and diffusers_compile)"
        ;;
    *) die "unknown stage $stage" ;;
    esac
}

main() {
    check_arguments "$@"
    if [[ " ${*:-all} " == *" all "* ]]; then check_budget; fi
    setup
    case ${1:-all} in
    full) run_stage "$@"; pack ;;
    *) for stage in "${@:-all}"; do run_stage "$stage"; pack; done ;;
    esac
    log "done: $out/gpu-results.tgz and this log"
}

if [[ ${1:-} == wheels ]]; then
    wheels
    exit
fi
mkdir -p "$out"
# everything on the terminal and in the log; a pipeline, not `exec > >(tee ...)`, so that the script
# waits for tee and the log's last lines are on disk before the device tool collects $OUT
main "$@" 2>&1 | tee -a "$out/gpu-session.log"
