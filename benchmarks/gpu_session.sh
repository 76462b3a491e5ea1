#!/usr/bin/env bash
# What a session with a lent GPU runs, stage by stage, each stage's output under $OUT (the device
# tool's return folder; benchmarks/results/ elsewhere). Written on a CPU machine: its GPU stages
# have not run yet. Each device call is limited to 10 minutes, so give one or two stages per call:
#
#   bash benchmarks/gpu_session.sh tests quick      # pytest -m gpu, then fastdiff bench --quick
#   bash benchmarks/gpu_session.sh full attention group_norm      # the full bench of some ops
#   bash benchmarks/gpu_session.sh full q_sample ddim_step ddpm_step
#   bash benchmarks/gpu_session.sh full end_to_end
#
# The GPU machine has torch, triton, pytest, pytest-benchmark, nvidia-ml-py, matplotlib, safetensors,
# pillow and tqdm, but no diffusers (the diffusers providers and interop tests then skip). To include
# them, download the wheels here first and name .whl in the call's carry:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       diffusers==0.36.0 importlib_metadata
set -euo pipefail

out=${OUT:-benchmarks/results}
mkdir -p "$out"
log() { printf '\n=== %s\n' "$*"; }
# results are named by date and GPU, e.g. bench-2026-11-25-nvidia-h100-80gb-hbm3-quick.json
stem() { echo "bench-$(date +%F)-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-')"; }

setup() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    # fastdiff.kernels is kernels/ mapped into the package: an install, not a path, makes it importable
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee "$out/gpu.txt"
    python3 -c "import torch, triton, fastdiff; print('torch', torch.__version__, 'triton', triton.__version__,
'fastdiff', fastdiff.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" | tee -a "$out/gpu.txt"
}

run_stage() {
    local stage=$1
    shift
    case $stage in
    tests)
        log "pytest -m gpu"
        python3 -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$out/gpu-tests.xml" 2>&1 \
            | tee "$out/gpu-tests.log" || echo "pytest -m gpu failed (exit $?): see gpu-tests.log"
        ;;
    quick)
        log "fastdiff bench --quick"
        python3 -m fastdiff bench --quick --json "$out/$(stem)-quick.json" 2>&1 | tee "$out/bench-quick.log"
        ;;
    full)
        log "fastdiff bench --ops $*"
        local name
        name=$(IFS=-; echo "$*")
        python3 -m fastdiff bench --ops "$@" --json "$out/$(stem)-${name:-all}.json" 2>&1 \
            | tee "$out/bench-${name:-all}.log"
        ;;
    *)
        echo "unknown stage $stage (tests, quick, full [OP ...])" >&2
        exit 2
        ;;
    esac
}

setup
case ${1:-} in
full) run_stage "$@" ;;
"") run_stage tests; run_stage quick ;;
*) for stage in "$@"; do run_stage "$stage"; done ;;
esac
