"""Sweep the launch configurations of fastdiff's kernels on this GPU, to choose the shipped tables
from timings instead of compile reports.

    python benchmarks/tune.py [--ops elementwise attention group_norm] [--json PATH] [--time-budget S]
    python benchmarks/tune.py --smoke     # no GPU: the interpreter at tiny sizes, checks only

For each case (an op at a shape and dtype the goals care about), every candidate configuration is
launched through ``fastdiff.ops`` on the triton backend, with the launcher's choice replaced by the
candidate, checked against the reference (‖out − ref‖ / ‖ref‖ within harness.TOLERANCE), then
timed as the suite times (harness.timed: CUDA events, 256 MB of L2 flushed before each call,
median). One table per case, the shipped configuration marked, and a JSON with every number.

Candidates: the elementwise kernels (q_sample, ddim_step) take BLOCK × num_warps; attention takes
(BLOCK_M, BLOCK_N, num_warps, num_stages) at the padded head dim of the case; GroupNorm+SiLU takes
its large tile and its warps (BLOCK_LARGE, WARPS_LARGE: groups of at least that many elements, and
the split path's statistics). The attention and GroupNorm candidates were vetted ahead of time with
``python -m fastdiff.kernels.aot`` on a CPU machine: none spills on sm_90 under Triton 3.6 or 3.9,
and each attention candidate uses HGMMA.

Attention is swept first: its tables have never been timed and have the most to gain, so it must
not be what a spent --time-budget cuts. ``--json`` is rewritten after every candidate, and SIGINT
or SIGTERM (gpu_session.sh's timeout) ends the sweep after the candidate in progress, the rest
marked as skipped: a stopped or killed sweep keeps what it timed.

``--smoke`` (what tests/test_tune.py runs) checks every candidate under Triton's interpreter at
tiny sizes and times nothing: a candidate that computes a wrong result fails there first.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

sys.path.insert(0, str(Path(__file__).resolve().parent))
import costs  # noqa: E402
import harness  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff import ops  # noqa: E402
from fastdiff.io import atomic_write  # noqa: E402

ELEMENTWISE_CANDIDATES = [(block, warps, 1) for block in (512, 1024, 2048, 4096) for warps in (4, 8)]
GROUP_NORM_CANDIDATES = [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16)]  # (BLOCK_LARGE, WARPS_LARGE)
ATTENTION_CANDIDATES = {  # padded head dim -> (BLOCK_M, BLOCK_N, num_warps, num_stages)
    256: [(64, 16, 8, 2), (64, 16, 8, 3), (64, 32, 4, 2), (64, 32, 8, 2), (64, 32, 8, 3), (64, 64, 8, 2),
          (64, 64, 8, 3), (128, 16, 8, 2), (128, 16, 8, 3), (128, 32, 8, 2), (128, 32, 8, 3)],
    64: [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 3), (64, 128, 4, 3), (64, 128, 8, 3), (128, 32, 4, 3),
         (128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3)],
}
# (op, shape, dtype): the goals' cases, in sweep order: most to gain first (attention's and
# GroupNorm's tables were chosen from compile reports, never timed; the elementwise kernels are
# copy-bound, where a block size should matter least). Attention: the DDPM CIFAR-10 U-Net's
# (N = 256, D = 256) at B = 128, and a 64×64 latent map's (N = 4096, D = 64); elementwise: 64M
# elements (256 MB in fp32).
CASES = {
    "attention": [("attention", (128, 1, 256, 256), "bf16"), ("attention", (4, 8, 4096, 64), "bf16")],
    # the CIFAR-10 U-Net's 32×32 level at B = 128, and a 64×64 latent U-Net's first level (21M elements)
    "group_norm": [("group_norm", (128, 128, 32, 32), dtype) for dtype in ("fp32", "bf16")]
                  + [("group_norm", (16, 320, 64, 64), "bf16")],
    "elementwise": [("q_sample", (256, 4, 256, 256), dtype) for dtype in ("fp32", "bf16")]
                   + [("ddim_step", (256, 4, 256, 256), dtype) for dtype in ("fp32", "bf16")],
}
GROUPS = 32  # the U-Net's norm_num_groups (fewer when there are fewer channels: the smoke shape)
SMOKE_SHAPES = {"q_sample": (2, 3, 17, 19), "ddim_step": (2, 3, 17, 19), "attention": (1, 2, 70, None),
                "group_norm": (1, 8, 128, 128)}  # 8 groups of 16384 elements: the large tile and the split path


@contextlib.contextmanager
def replaced(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


@contextlib.contextmanager
def large_tile(module, block: int, warps: int):
    """group_norm's BLOCK_LARGE and WARPS_LARGE replaced; its cached configurations dropped on the
    way in and out (they hold the tile size)."""
    with replaced(module, "BLOCK_LARGE", block), replaced(module, "WARPS_LARGE", warps):
        module._main_config.cache_clear()
        module._stats_config.cache_clear()
        try:
            yield
        finally:
            module._main_config.cache_clear()
            module._stats_config.cache_clear()


def kernels(name: str):
    return importlib.import_module(f"fastdiff.kernels.{name}")


# ----------------------------------------------------------------------------- the cases
def make_case(op: str, shape: tuple, dtype: torch.dtype, device: str):
    """(call, cost): ``call()`` runs the op on seeded random inputs through fastdiff.ops (whichever
    backend is in use); ``cost`` is its bytes and FLOPs (costs.py)."""
    gen = torch.Generator(device).manual_seed(0)
    randn = lambda *s: torch.randn(s, generator=gen, device=device).to(dtype)  # noqa: E731
    itemsize = torch.empty((), dtype=dtype).element_size()
    if op == "q_sample":
        x0, noise = randn(*shape), randn(*shape)
        t = torch.randint(0, 1000, (shape[0],), generator=gen, device=device)
        table = torch.linspace(0.9999, 0.005, 1000, device=device)
        return (lambda: ops.q_sample(x0, noise, t, table)), costs.q_sample(x0.numel(), shape[0], itemsize)
    if op == "ddim_step":
        model_output, sample = randn(*shape), randn(*shape)
        alpha_t, alpha_prev = torch.tensor([0.5, 0.6], device=device).unbind()  # 0-d, as the loop passes them

        def call():
            return ops.ddim_step(model_output, sample, alpha_t, alpha_prev, eta=0.0, prediction_type="epsilon",
                                 clip_sample_range=1.0)

        return call, costs.ddim_step(sample.numel(), itemsize)
    if op == "group_norm":
        x, weight, bias = randn(*shape), 1 + 0.1 * randn(shape[1]), 0.1 * randn(shape[1])
        groups = min(GROUPS, shape[1])
        return ((lambda: ops.group_norm(x, groups, weight, bias, 1e-6, silu=True)),
                costs.group_norm(x.numel(), shape[1], itemsize, silu=True))
    batch, heads, n, head_dim = shape
    q, k, v = randn(*shape), randn(*shape), randn(*shape)
    return (lambda: ops.attention(q, k, v)), costs.attention(batch, heads, n, n, head_dim, itemsize)


def chooser(op: str, shape: tuple, dtype: torch.dtype):
    """(the shipped config, [candidates], candidate -> context manager that makes the launcher take it)."""
    if op == "attention":
        module = kernels("attention")
        block_d = module.block_d_for(shape[-1])
        shipped = module._choose(block_d, dtype, True)
        choose = module._choose

        def use(candidate):
            return replaced(module, "_choose", lambda d, t, a: candidate if d == block_d else choose(d, t, a))

        return shipped, ATTENTION_CANDIDATES[block_d], use
    if op == "group_norm":
        module = kernels("group_norm")
        return (module.BLOCK_LARGE, module.WARPS_LARGE), GROUP_NORM_CANDIDATES, lambda c: large_tile(module, *c)
    module = kernels("q_sample" if op == "q_sample" else "scheduler_step")
    shipped = module.block_config(shape[1] * shape[2] * shape[3])
    return shipped, ELEMENTWISE_CANDIDATES, lambda candidate: replaced(module, "block_config", lambda n: candidate)


# ----------------------------------------------------------------------------- the sweep
_stop: dict = {"by": None}  # the signal that asked the sweep to stop (set by the handler, read between candidates)


def _request_stop(signum, frame):
    """Stop after the candidate in progress; a second signal stops now."""
    if _stop["by"] is not None:
        raise KeyboardInterrupt
    _stop["by"] = signal.Signals(signum).name


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM set a flag that ``sweep`` reads between candidates, instead of raising a
    KeyboardInterrupt wherever Python happens to be (in a weakref finaliser it is printed and
    dropped, and the run goes on until the SIGKILL). The old handlers come back on exit."""
    _stop["by"] = None
    old = {signum: signal.signal(signum, _request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


def why_not(deadline: float | None) -> str | None:
    """Why the next candidate must not start: a signal, a spent --time-budget, or None."""
    if _stop["by"] is not None:
        return f"stopped by {_stop['by']}"
    if deadline is not None and harness.clock() > deadline:
        return "--time-budget spent"
    return None


def planned(ops_wanted: list[str], smoke: bool):
    """(op, shape, dtype name) of every case of ``ops_wanted``, in order; ``smoke``: at the tiny sizes."""
    seen = set()
    for group in ops_wanted:
        for op, shape, dtype_name in CASES[group]:
            if smoke:
                shape = SMOKE_SHAPES[op] if op != "attention" else (*SMOKE_SHAPES[op][:3], shape[-1])
                if (op, shape, dtype_name) in seen:  # two cases that shrink to one smoke shape
                    continue
                seen.add((op, shape, dtype_name))
            yield op, shape, dtype_name


def sweep(ops_wanted: list[str], smoke: bool, deadline: float | None, ceilings: dict | None,
          save=None) -> list[dict]:
    """Every candidate of every case of ``ops_wanted``, in order; ``save(records)`` after each one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    records = []
    for op, shape, dtype_name in planned(ops_wanted, smoke):
        dtype = harness.DTYPES[dtype_name]
        shipped, candidates, use = chooser(op, shape, dtype)
        case = {"op": op, "shape": harness.fmt_shape(shape), "dtype": dtype_name, "shipped": list(shipped),
                "results": []}
        records.append(case)
        inputs = None  # made for the first candidate that runs: a case none reaches allocates nothing
        for candidate in candidates:
            result = {"config": list(candidate)}
            case["results"].append(result)
            reason = why_not(deadline)
            if reason is not None:
                result["skipped"] = reason
                continue
            if inputs is None:
                call, cost = make_case(op, shape, dtype, device)
                with fastdiff.use_backend("torch"):
                    inputs = call, cost, call()
                case.update(bytes=cost.bytes, flops=cost.flops)
            try_candidate(result, case, inputs, use(candidate), device, smoke, ceilings)
            print(format_result(case, result), flush=True)
            if save is not None:
                save(records)
    return records


def try_candidate(result: dict, case: dict, inputs: tuple, chosen, device: str, smoke: bool,
                  ceilings: dict | None) -> None:
    """Check (and unless ``smoke``, time) one candidate into ``result``. ``inputs``: the case's call,
    its cost and the reference's output; ``chosen``: the context that makes the launcher take the candidate."""
    call, cost, expected = inputs
    try:
        with chosen, fastdiff.use_backend("triton"):
            result["rel_err"] = harness.rel_err(call(), expected)
            if not smoke:
                result["median_ms"] = harness.timed(call, device, flush_l2=True).median_ms
    except Exception as error:  # report every candidate: an illegal one must not end the sweep
        result["error"] = f"{type(error).__name__}: {error}"[:500]
        return
    result["ok"] = result["rel_err"] <= harness.TOLERANCE[case["dtype"]]
    if "median_ms" in result:
        seconds = result["median_ms"] * 1e-3
        if case["op"] == "attention":
            result["tflops"] = cost.flops / seconds / 1e12
            peak = (ceilings or {}).get("matmul_tflops", {}).get(case["dtype"])
            result["pct_ceiling"] = 100 * result["tflops"] / peak if peak else None
        else:
            result["gbps"] = cost.bytes / seconds / 1e9
            peak = (ceilings or {}).get("copy_gbps")
            result["pct_ceiling"] = 100 * result["gbps"] / peak if peak else None


def format_result(case: dict, result: dict) -> str:
    mark = " (shipped)" if result["config"] == case["shipped"] else ""
    head = f"{case['op']:9s} {case['shape']:>16s} {case['dtype']:4s} {str(tuple(result['config'])):20s}"
    if "error" in result:
        return f"{head} ERROR {result['error'][:80]}{mark}"
    if "skipped" in result:
        return f"{head} skipped: {result['skipped']}{mark}"
    rate = (f"{result['tflops']:7.1f} TFLOP/s" if "tflops" in result else
            f"{result['gbps']:7.0f} GB/s" if "gbps" in result else "")
    pct = f"{result['pct_ceiling']:5.1f}% of ceiling" if result.get("pct_ceiling") is not None else ""
    ms = f"{result['median_ms']:8.4f} ms " if "median_ms" in result else ""
    verdict = "" if result["ok"] else "  WRONG"
    return f"{head} {ms}{rate} {pct} rel_err {result['rel_err']:.1e}{verdict}{mark}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", choices=list(CASES), default=list(CASES),
                        help="kernel groups, swept in this order (default: all, most to gain first)")
    parser.add_argument("--json", type=Path, default=None, help="where to write every number (after every candidate)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="S",
                        help="start no candidate later than S seconds after the start")
    parser.add_argument("--smoke", action="store_true", help="no GPU needed: the interpreter, tiny sizes, no timing")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not (on_gpu or args.smoke):
        parser.error("timing configurations needs a CUDA GPU; --smoke checks the candidates under the interpreter")
    smoke = args.smoke and not on_gpu
    with stop_on_signals():
        deadline = None if args.time_budget is None else harness.clock() + args.time_budget
        ceilings = None if smoke else harness.measure_ceilings(harness.detect_env(quick=False, compile=False))
        save = None if args.json is None else json_writer(args.json, smoke, on_gpu, ceilings)
        records = sweep(args.ops, smoke, deadline, ceilings, save)
        if save is not None:
            save(records)  # also when no candidate ran
    wrong = [(c["op"], c["shape"], c["dtype"], r["config"]) for c in records for r in c["results"]
             if "error" in r or r.get("ok") is False]
    if wrong:
        print(f"tune: {len(wrong)} candidate(s) failed or computed a wrong result: {wrong}", flush=True)
    stopped = sum(r.get("skipped", "").startswith("stopped by") for c in records for r in c["results"])
    if stopped:
        print(f"tune: {_stop['by']}: {stopped} candidate(s) not run; the JSON has those that ran", flush=True)
    return 1 if wrong else 2 if stopped else 0


def json_writer(path: Path, smoke: bool, on_gpu: bool, ceilings: dict | None):
    """``save(records)``: the whole JSON rewritten atomically, so a kill leaves the last complete one."""
    import triton

    head = {"when": datetime.datetime.now().isoformat(timespec="seconds"), "smoke": smoke,
            "device": torch.cuda.get_device_name() if on_gpu else "cpu", "ceilings": ceilings,
            "versions": {"torch": torch.__version__, "triton": triton.__version__, "fastdiff": fastdiff.__version__}}

    def save(records: list[dict]) -> None:
        text = json.dumps({**head, "cases": records}, indent=1)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    return save


if __name__ == "__main__":
    sys.exit(main())
