"""What every bench file shares: the cases, the check, the timer, the ceilings and the record each case leaves.

Correct first (``Recorder.check``): before a provider is timed, its output is compared with the
reference provider's on the same input, ‖out − ref‖ / ‖ref‖ within ``TOLERANCE`` of the dtype; a
wrong (or NaN) result fails the case and is never timed.

Timing (``timed``):
* one untimed call first (torch.compile, Triton's JIT and autotuning, cuBLAS handles, the allocator;
  the check's call when there was one);
* one timed call estimates the cost; warm-up calls fill ``warmup_ms``; then ``rep_ms`` worth of timed
  calls (at least ``min_reps``, at most ``max_reps``), and the median is reported;
* on a GPU each call is bracketed by CUDA events recorded around it (GPU time, launch gaps included),
  and with ``flush_l2`` a 256 MB buffer is zeroed before every timed call, outside the events, so a
  memory-bound op reads its inputs from DRAM as it would inside a U-Net, not from a warm 50 MB L2;
* on a CPU the same loop reads ``time.perf_counter``. CPU numbers describe the CPU, nothing else.

Ceilings (``measure_ceilings``), once per session on the same device: a device-to-device copy of
1 GiB (GB/s counts bytes read + bytes written) and an 8192³ matmul in bf16, tf32 and fp32 (IEEE).
Random inputs throughout: zeros can run faster than data.
"""

from __future__ import annotations

import contextlib
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

import costs
import telemetry

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TIERS = ("full", "quick", "cpu")  # full/quick: GPU runs (quick is a subset); cpu: the small CPU cases

# Every extra_info carries these keys (None where one does not apply), then telemetry.FIELDS and
# nvml_error; tests/test_bench.py checks them.
INFO_KEYS = ("op", "provider", "shape", "dtype", "median_ms", "gpu_name", "gbps", "tflops", "pct_copy_bw",
             "pct_matmul_peak", "peak_mem_mb")

MiB = 2**20
clock = time.monotonic  # seconds; what --time-budget is measured with (a test replaces it)


# ----------------------------------------------------------------------------- environment and cases
@dataclass(frozen=True)
class Env:
    device: str  # "cuda" or "cpu"
    gpu_name: str | None
    cpu_name: str
    quick: bool
    compile: bool  # run the torch.compile providers

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def tier(self) -> str:
        return ("quick" if self.quick else "full") if self.on_gpu else "cpu"


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def detect_env(quick: bool, compile: bool) -> Env:
    on_gpu = torch.cuda.is_available()
    return Env(device="cuda" if on_gpu else "cpu", gpu_name=torch.cuda.get_device_name() if on_gpu else None,
               cpu_name=cpu_name(), quick=quick, compile=compile)


@dataclass(frozen=True)
class Case:
    """One shape and dtype of one op. ``dims`` are the op's own sizes; ``tiers`` where it runs."""

    shape: str  # human-readable, also the pytest id
    dtype: str  # a key of DTYPES
    dims: dict = field(hash=False)
    tiers: frozenset = frozenset({"full"})

    @property
    def id(self) -> str:
        return f"{self.shape}-{self.dtype}"

    def __repr__(self) -> str:  # what pytest-benchmark writes for the param in its JSON
        return self.id

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def expand(shapes: list[tuple[str, dict, set]], dtypes_by_tier: dict[str, tuple[str, ...]]) -> list[Case]:
    """Cases for every (shape, dtype) pair: a shape runs in its tiers, each tier in that tier's dtypes."""
    cases = {}
    for shape, dims, tiers in shapes:
        for tier in tiers:
            for dtype in dtypes_by_tier[tier]:
                key = (shape, dtype)
                old = cases.get(key)
                cases[key] = Case(shape, dtype, dims, frozenset({tier}) | (old.tiers if old else frozenset()))
    return list(cases.values())


def select(cases: list[Case], tier: str) -> list[Case]:
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {', '.join(TIERS)}; got {tier!r}")
    return [case for case in cases if tier in case.tiers]


def fmt_shape(shape) -> str:
    return "x".join(map(str, shape))


def elementwise_cases() -> list[Case]:
    """(B, 4, 256, 256) tensors, batches of 4-channel 256² latents: 1M, 4M, 16M, 64M and 256M elements
    in fp32 and bf16; quick: 1M and 64M; CPU: 1M in fp32."""
    sizes = ((20, {"full", "quick", "cpu"}), (22, {"full"}), (24, {"full"}), (26, {"full", "quick"}), (28, {"full"}))
    shapes = [(2 ** (log2 - 18), 4, 256, 256) for log2, _ in sizes]
    return expand([(fmt_shape(shape), {"shape": shape}, tiers) for shape, (_, tiers) in zip(shapes, sizes)],
                  {"full": ("fp32", "bf16"), "quick": ("fp32", "bf16"), "cpu": ("fp32",)})


# ----------------------------------------------------------------------------- providers
def skip_reason(provider: str, env: Env, compiled: bool = False) -> str | None:
    """Why ``provider`` cannot run here (None: it can). ``compiled``: this op's provider is a torch.compile."""
    if provider in ("fastdiff", "diffusers_fastdiff") and not env.on_gpu:
        return (f"{provider}: no CUDA GPU. The Triton kernels would run in Triton's CPU interpreter, "
                "whose timings mean nothing")
    if compiled and not env.compile:
        return f"{provider}: torch.compile providers are off (--no-compile)"
    return None


def op_checked(provider: str, op: str, case: Case, *args, peer: Callable | None = None, **kwargs) -> dict:
    """``op_call``'s call plus what ``Recorder.run`` checks it against: the reference provider's call
    (none for the reference itself) and the tolerance of the case's dtype."""
    return {"fn": op_call(provider, op, *args, peer=peer, **kwargs),
            "expected": None if provider == "reference" else op_call("reference", op, *args, **kwargs),
            "tolerance": TOLERANCE[case.dtype]}


def op_call(provider: str, op: str, *args, peer: Callable | None = None, **kwargs) -> Callable[[], object]:
    """A zero-argument call of fused op ``op`` as ``provider`` runs it.

    fastdiff / reference: ``fastdiff.ops.<op>`` on the triton / torch backend, so both pay the same
    input checks a user's call pays. torch_peer: ``peer`` when given (PyTorch's own op), else
    ``torch.compile`` of ``fastdiff.reference.<op>``.
    """
    from fastdiff import ops, reference, use_backend

    if provider == "torch_peer":
        fn = peer or fresh_compile(getattr(reference, op))
        return lambda: fn(*args, **kwargs)
    backend = {"fastdiff": "triton", "reference": "torch"}[provider]
    fn = getattr(ops, op)

    def call():
        with use_backend(backend):
            return fn(*args, **kwargs)

    return call


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- timing
class _HostClock:
    """Marks are time.perf_counter() readings (CPU work is synchronous)."""

    name = "perf_counter"

    def marks(self, n: int) -> list:
        return [0.0] * n

    def mark(self, marks: list, i: int) -> None:
        marks[i] = time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        return (end - start) * 1e3


class _CudaClock:
    """Marks are CUDA events, created before the loop so that creating one never delays a launch."""

    name = "cuda_events"

    def marks(self, n: int) -> list:
        return [torch.cuda.Event(enable_timing=True) for _ in range(n)]

    def mark(self, marks: list, i: int) -> None:
        marks[i].record()

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end)


_flush_buffers: dict[str, torch.Tensor] = {}


def _l2_flush_buffer() -> torch.Tensor:
    """256 MB to zero between timed calls: larger than any L2 (50 MB on H100, 40 MB on A100)."""
    if "cuda" not in _flush_buffers:
        _flush_buffers["cuda"] = torch.empty(256 * MiB, dtype=torch.int8, device="cuda")
    return _flush_buffers["cuda"]


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    reps: int
    timer: str
    l2_flushed: bool


def _clamp(value: float, low: int, high: int) -> int:
    return int(min(max(value, low), high))


def timed(fn: Callable[[], object], device: str, *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
          min_reps: int = 5, max_reps: int = 500, flush_l2: bool = False, first_call: bool = True) -> Timing:
    """Median time of ``fn()`` in milliseconds: warm-up, then per-call timings (see the module docstring).
    ``first_call=False``: the caller has already called ``fn`` once (compiled, allocated)."""
    clock = _CudaClock() if device == "cuda" else _HostClock()
    flush = flush_l2 and device == "cuda"
    buffer = _l2_flush_buffer() if flush else None

    def run(n: int) -> list[float]:
        start, end = clock.marks(n), clock.marks(n)
        for i in range(n):
            if buffer is not None:
                buffer.zero_()  # queued before the start event: not timed
            clock.mark(start, i)
            fn()
            clock.mark(end, i)
        synchronize(device)
        return [clock.elapsed_ms(s, e) for s, e in zip(start, end)]

    if first_call:
        fn()  # compile / autotune / allocate: never timed
        synchronize(device)
    estimate = max(run(1)[0], 1e-4)
    for _ in range(_clamp(warmup_ms / estimate, 0, max_reps)):
        fn()
    times = run(_clamp(rep_ms / estimate, min_reps, max_reps))
    return Timing(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times), reps=len(times),
                  timer=clock.name, l2_flushed=flush)


def peak_mem_mb(fn: Callable[[], object], device: str) -> float | None:
    """Device memory one call of ``fn`` allocates at its peak, beyond what was allocated before it
    (workspaces, temporaries, outputs). None on a CPU."""
    if device != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated() - before) / MiB


# ----------------------------------------------------------------------------- ceilings
@contextlib.contextmanager
def fp32_matmul_precision(precision: str):
    """'highest': fp32 matmuls in IEEE fp32; 'high': in TF32 on tensor cores. Restored on exit."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def measure_ceilings(env: Env) -> dict:
    """Copy bandwidth (GB/s, read + write) and matmul rates (TFLOP/s) of this device, measured now."""
    device = env.device
    copy_numel, n = (2**28, 8192) if env.on_gpu else (2**24, 1024)  # 1 GiB / 64 MiB of fp32
    src = torch.randn(copy_numel, device=device)
    dst = torch.empty_like(src)
    copy = timed(lambda: dst.copy_(src), device, warmup_ms=100, rep_ms=300)
    copy_gbps = 2 * src.numel() * src.element_size() / (copy.median_ms * 1e-3) / 1e9
    del src, dst

    matmul = {}
    # (name, dtype, fp32 precision); a CPU has no TF32, and its bf16 rate is not what a CPU case uses.
    kinds = [("bf16", torch.bfloat16, "highest"), ("tf32", torch.float32, "high"), ("fp32", torch.float32, "highest")]
    for name, dtype, precision in kinds if env.on_gpu else kinds[2:]:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        out = torch.empty_like(a)
        with fp32_matmul_precision(precision):
            t = timed(lambda: torch.mm(a, b, out=out), device, warmup_ms=100, rep_ms=300)
        matmul[name] = 2 * n**3 / (t.median_ms * 1e-3) / 1e12
    return {"copy_gbps": copy_gbps, "copy_bytes": 2 * copy_numel * 4, "matmul_tflops": matmul,
            "matmul_n": n, "device": device}


def ceiling_key(dtype: str, env: Env, op: str) -> str:
    """Which matmul rate bounds a case. fp32 attention kernels use IEEE dots ('fp32'); a fp32 U-Net's
    convolutions run TF32 on the tensor cores by cuDNN's default ('tf32'); bf16 is 'bf16'. On a CPU: 'fp32'."""
    if not env.on_gpu:
        return "fp32"
    if dtype == "fp32":
        return "tf32" if op == "end_to_end" else "fp32"
    return dtype


# ----------------------------------------------------------------------------- the record
# Largest ‖out − ref‖ / ‖ref‖ against the reference provider before a case's time is believed.
# fp32: exact fp32 arithmetic lands near 1e-6 (TF32 would be ~3e-4). bf16: the reference rounds to
# bf16 after every op, a fused kernel once at the end; they differ by a few bf16 ulps (~4e-3).
TOLERANCE = {"fp32": 1e-3, "bf16": 2e-2}


def _flat(out) -> list[torch.Tensor]:
    return [t.flatten() for t in (out if isinstance(out, (tuple, list)) else (out,))]


def rel_err(out, ref, chunk: int = 2**24) -> float:
    """‖out − ref‖ / ‖ref‖ over a tensor or a tuple of tensors (a step's x_{t−1} and x̂0), in float64.

    The sums of squares stay on the tensors' device and only they are read back: copying the
    outputs and references to the host in float64 (2 GiB per 256M-element tensor) moved several GiB
    over PCIe per check. ``chunk`` elements at a time are widened to float64, so the temporaries
    stay at a few hundred MiB."""
    diff = norm = 0.0
    for o, r in zip(_flat(out), _flat(ref)):
        if o.numel() != r.numel():
            raise ValueError(f"rel_err: out has {o.numel()} elements where ref has {r.numel()}")
        r = r.to(o.device)
        for start in range(0, r.numel(), chunk):
            r64 = r[start:start + chunk].double()
            diff = diff + (o[start:start + chunk].double() - r64).square().sum()
            norm = norm + r64.square().sum()
    diff, norm = float(diff), float(norm)  # the only reads back to the host: two scalars
    return (diff / norm) ** 0.5 if norm else float(diff > 0) * math.inf


def derive(cost: costs.Cost, median_ms: float, ceilings: dict, key: str) -> dict:
    """GB/s, TFLOP/s and % of the measured ceilings for ``cost`` done in ``median_ms``."""
    seconds = median_ms * 1e-3
    copy_gbps, matmul = ceilings["copy_gbps"], ceilings["matmul_tflops"].get(key)
    gbps = cost.bytes / seconds / 1e9 if cost.bytes is not None else None
    tflops = cost.flops / seconds / 1e12 if cost.flops is not None else None
    bound = cost.bound(copy_gbps, matmul)
    floor = cost.floor_ms(copy_gbps, matmul)
    return {
        "bytes": cost.bytes, "flops": cost.flops, "gbps": gbps, "tflops": tflops,
        "pct_copy_bw": 100 * gbps / copy_gbps if gbps is not None else None,
        # a matmul rate bounds only work that is matmul; an elementwise op's few FLOPs are not judged by it
        "pct_matmul_peak": 100 * tflops / matmul if tflops is not None and matmul and bound == "compute" else None,
        "bound": bound, "floor_ms": floor, "pct_roofline": 100 * floor / median_ms if floor else None,
        "copy_ceiling_gbps": copy_gbps, "matmul_ceiling": key, "matmul_ceiling_tflops": matmul,
    }


# timed()'s defaults and pytest-benchmark's extra rounds per device. On a CPU a case runs for
# tens of milliseconds at most, so that the CPU suite stays a smoke test of the machinery.
TIMING = {"cuda": {"warmup_ms": 25.0, "rep_ms": 100.0, "min_reps": 5, "rounds": 5},
          "cpu": {"warmup_ms": 10.0, "rep_ms": 50.0, "min_reps": 3, "rounds": 1}}


class Recorder:
    """The ``bench`` fixture: times one provider on one case and fills pytest-benchmark's record."""

    def __init__(self, benchmark, env: Env, ceilings: dict):
        self.benchmark, self.env, self.ceilings = benchmark, env, ceilings

    def skip_unless_runnable(self, provider: str, compiled: bool = False) -> None:
        import pytest

        reason = skip_reason(provider, self.env, compiled)
        if reason:
            pytest.skip(reason)

    def check(self, fn: Callable[[], object], expected: Callable[[], object], tolerance: float | None) -> float:
        """‖fn() − expected()‖ / ‖expected()‖, each drawn after torch.manual_seed(0) (a sampling run
        draws its noise from the global generator); fails the case above ``tolerance`` or on NaN."""
        import pytest

        torch.manual_seed(0)
        out = fn()
        torch.manual_seed(0)
        err = rel_err(out, expected())
        if tolerance is not None and not err <= tolerance:
            pytest.fail(f"wrong result: relative error {err:.3g} against the reference (tolerance {tolerance:g}); "
                        "not timed")
        return err

    def run(self, *, op: str, provider: str, case: Case, fn: Callable[[], object], cost: costs.Cost,
            expected: Callable[[], object] | None = None, tolerance: float | None = None,
            flush_l2: bool = True, extra: dict | None = None, **timing) -> dict:
        """Check ``fn`` against ``expected`` (the reference provider; ``check``), time it (``timed``'s
        keyword arguments in ``timing``), derive the metrics, sample NVML, write everything (and
        ``extra``) to ``benchmark.extra_info``, and let pytest-benchmark time ``rounds`` more
        synchronised calls on the host clock for its own statistics (defaults: TIMING). Returns the extra_info."""
        env = self.env
        err = self.check(fn, expected, tolerance) if expected is not None else None
        timing = {**TIMING[env.device], **timing}
        rounds = timing.pop("rounds")
        t = timed(fn, env.device, flush_l2=flush_l2, first_call=expected is None, **timing)
        info = {"op": op, "provider": provider, "shape": case.shape, "dtype": case.dtype, "case": case.id,
                "median_ms": t.median_ms, "min_ms": t.min_ms, "max_ms": t.max_ms, "reps": t.reps,
                "timer": t.timer, "l2_flushed": t.l2_flushed, "device": env.device, "gpu_name": env.gpu_name,
                "peak_mem_mb": peak_mem_mb(fn, env.device), "rel_err": err}
        info.update(derive(cost, t.median_ms, self.ceilings, ceiling_key(case.dtype, env, op)))
        info.update(telemetry.read(torch.cuda.current_device() if env.on_gpu else 0))
        info.update(extra or {})
        self.benchmark.extra_info.update(info)

        def synced():
            fn()
            synchronize(env.device)

        self.benchmark.pedantic(synced, rounds=rounds, iterations=1)
        return info


def reset_compile() -> None:
    """Clear dynamo's caches before a case compiles: every case compiles for its own static shapes,
    and none inherits another's recompilations (or hits the recompile limit and silently runs eager)."""
    import torch._dynamo

    torch._dynamo.reset()


def fresh_compile(fn, **kwargs):
    """``torch.compile(fn)`` for static shapes, after ``reset_compile``."""
    reset_compile()
    return torch.compile(fn, dynamic=False, **kwargs)

