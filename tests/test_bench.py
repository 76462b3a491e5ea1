"""``fastdiff bench`` and the benchmark suite: runs, records, tables, report, cost models, telemetry.

No speed is asserted anywhere: the suite reports speed. These tests check that a run leaves complete,
consistent records and a readable report, and that the bytes/FLOPs models count what they claim.
The CPU runs here are the suite's CPU cases (a few small shapes, fp32, no fastdiff provider).
"""

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import math
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fastdiff import bench

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
cpu_only = pytest.mark.skipif(HAS_CUDA, reason="runs the CPU cases; on a GPU machine see the gpu-marked test")


def suite_module(name: str):
    """A module of benchmarks/ (not a package: its folder goes on sys.path, as pytest does for it)."""
    if str(bench.SUITE) not in sys.path:
        sys.path.insert(0, str(bench.SUITE))
    return importlib.import_module(name)


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def run_bench(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = bench.run(bench_args(*argv))
    return code, out.getvalue()


def parse_tables(text: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """Every Markdown table in ``text`` as (the "### heading" above it, header, rows)."""
    tables, current, heading = [], None, ""
    for line in text.splitlines():
        if line.startswith("### "):
            heading = line[4:].strip()
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if current is None:
            current = (heading, cells, [])
            tables.append(current)
        elif not set("".join(cells)) <= set("-:"):
            current[2].append(cells)
    return tables


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `fastdiff bench --quick` on this CPU, shared by the tests that read its output."""
    path = tmp_path_factory.mktemp("bench") / "run.json"
    code, out = run_bench("--quick", "--json", str(path))
    return code, out, path


# ----------------------------------------------------------------------------- a whole run on the CPU
@cpu_only
def test_quick_run_writes_json_report_and_plot(quick_run):
    code, out, path = quick_run
    assert code == 0, out
    assert "no CUDA GPU" in out and "fastdiff (Triton) provider is skipped" in out
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = path.with_suffix(".md").read_text()
    assert "![speed-ups](run.png)" in report and "## Skipped" in report
    results = bench.load_results(path)
    assert set(results.ops()) == set(bench.OPS) - set(bench.GPU_ONLY_OPS)  # every other op has a CPU case
    assert {r["provider"] for r in results.records} == {"reference", "torch_peer", "diffusers"}
    reasons = [s["reason"] for s in results.session["skipped"]]
    assert any("fastdiff: no CUDA GPU" in reason for reason in reasons)
    # CUDA graphs: skipped, and the report says why
    for skipped in ("fastdiff_graph", "fastdiff_graph_cl", *bench.GPU_ONLY_OPS):
        assert any(reason.startswith(f"{skipped}: cuda_graph=True needs a CUDA GPU") for reason in reasons)
        assert f"{skipped}: cuda_graph=True needs a CUDA GPU" in report


@cpu_only
def test_printed_tables_parse_and_match_the_json(quick_run):
    code, out, path = quick_run
    records = bench.load_results(path).records
    tables = parse_tables(out)
    assert [op for op, _, _ in tables] == [op for op in bench.OPS if op not in bench.GPU_ONLY_OPS]
    for op, header, rows in tables:
        assert rows and all(len(row) == len(header) for row in rows)
        for row in rows:
            cells = dict(zip(header, row))
            shape = row[0].split()[0]  # end to end: "digits_B1 DDIM-2"
            by_provider = {r["provider"]: r for r in records
                           if (r["op"], r["shape"], r["dtype"]) == (op, shape, row[1])}
            for name, value in cells.items():
                if name.startswith("ms "):
                    expected = by_provider[name[3:]]["median_ms"]
                    assert float(value) == pytest.approx(expected, rel=0.01)
                elif " vs " in name:  # "<subject> vs <other>" = other's time / subject's time
                    main, other = name.split(" vs ")
                    ratio = by_provider[other]["median_ms"] / by_provider[main]["median_ms"]
                    assert float(value.rstrip("×")) == pytest.approx(ratio, abs=0.006)
                elif name.endswith("% of ceiling"):
                    assert re.fullmatch(r"\d+% (copy|fp32 mm)|–", value), value


@cpu_only
def test_every_record_has_the_required_extra_info(quick_run):
    harness, telemetry = suite_module("harness"), suite_module("telemetry")
    records = bench.load_results(quick_run[2]).records
    assert records
    for r in records:
        missing = set(harness.INFO_KEYS + telemetry.FIELDS + ("nvml_error",)) - set(r)
        assert not missing, (r["op"], r["provider"], missing)
        assert r["median_ms"] > 0 and r["timer"] == "perf_counter" and r["gpu_name"] is None
        assert r["peak_mem_mb"] is None  # CUDA's allocator statistics only
        if r["bytes"] is not None:  # GB/s is the modelled bytes over the measured time
            assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
            assert r["pct_copy_bw"] == pytest.approx(100 * r["gbps"] / r["copy_ceiling_gbps"])
        if r["bound"] == "compute":
            assert r["pct_matmul_peak"] == pytest.approx(100 * r["tflops"] / r["matmul_ceiling_tflops"])
        if r["provider"] != "reference":  # every provider was checked against the reference first
            assert r["rel_err"] is not None
            assert r["op"] == "end_to_end" or r["rel_err"] <= harness.TOLERANCE[r["dtype"]]
        if r["driver"] is None:  # no NVML on this machine: every field empty, and a reason
            assert r["nvml_error"] and all(r[f] is None for f in telemetry.FIELDS)


@cpu_only
def test_ops_filters_the_run(tmp_path):
    path = tmp_path / "some.json"
    code, out = run_bench("--ops", "attention,group_norm", "--no-compile", "--json", str(path))
    assert code == 0, out
    records = bench.load_results(path).records
    assert {r["op"] for r in records} == {"attention", "group_norm"}
    assert parse_tables(out)[0][1][2:] == ["ms reference", "ms torch_peer", "reference vs torch_peer",
                                                        "reference % of ceiling"]


@cpu_only
def test_keyword_and_time_budget_choose_the_cases_that_run(tmp_path, monkeypatch):
    """-k picks cases by id; --time-budget lets the cases that started finish and skips the rest, saying
    why. The suite's clock is replaced by one that moves 10 s per reading: the budget starts at 0, the
    first case starts at 10 (inside 15 s), the next would start at 20."""
    readings = iter(range(0, 10_000, 10))
    monkeypatch.setattr(suite_module("harness"), "clock", lambda: next(readings))
    path = tmp_path / "budget.json"
    code, out = run_bench("--ops", "attention", "group_norm", "--no-compile", "-k", "reference",
                          "--time-budget", "15", "--json", str(path))
    assert code == 0, out
    results = bench.load_results(path)
    assert [(r["op"], r["provider"]) for r in results.records] == [("attention", "reference")]
    budget = [s["test"] for s in results.session["skipped"] if s["reason"].startswith("--time-budget of 15 s spent")]
    assert budget and all("reference" in test for test in budget)  # -k deselected the other providers
    assert any("bench_group_norm.py" in test for test in budget)
    assert "--time-budget of 15 s spent" in path.with_suffix(".md").read_text()
    with pytest.raises(ValueError, match="--time-budget must be a positive number of seconds, got 0"):
        run_bench("--time-budget", "0", "--json", str(tmp_path / "x.json"))


@cpu_only
def test_an_interrupted_run_still_reports_the_cases_that_finished(quick_run, tmp_path, monkeypatch):
    """Ctrl-C, or `timeout -s INT` in gpu_session.sh: pytest returns 2 and pytest-benchmark has
    written the finished cases; the report covers them and the exit code stays 2. With no JSON the
    run is an error, as before."""
    path = tmp_path / "interrupted.json"
    path.write_bytes(quick_run[2].read_bytes())
    monkeypatch.setattr(bench, "run_suite", lambda args: (path, bench.PYTEST_INTERRUPTED))
    code, out = run_bench("--json", str(path))
    assert code == bench.PYTEST_INTERRUPTED and "interrupted; the report covers the cases that finished" in out
    assert path.with_suffix(".md").is_file() and path.with_suffix(".png").is_file()
    path.unlink()
    with pytest.raises(RuntimeError, match="pytest exit code 2"):
        run_bench("--json", str(path))


class LaunchSpy:
    """Stands in for a @triton.jit kernel: records the named launch options, then launches."""

    def __init__(self, kernel, keys, launched):
        self.kernel, self.keys, self.launched = kernel, keys, launched

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.launched.append(tuple(kwargs[key] for key in self.keys))
            return launch(*args, **kwargs)

        return run


@cpu_only
def test_tune_smoke_launches_and_checks_every_candidate(tmp_path, monkeypatch, request):
    """benchmarks/tune.py --smoke: each candidate reaches the kernel launch (not the shipped config)
    and computes the reference's result; a spent --time-budget skips the candidates."""
    tune = suite_module("tune")
    attention, q_sample, group_norm = tune.kernels("attention"), tune.kernels("q_sample"), tune.kernels("group_norm")
    launched = {"attention": [], "q_sample": [], "group_norm": [], "stats": []}
    for module, name, keys, log in (
            (attention, "_attention_fwd_kernel", ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), "attention"),
            (q_sample, "_q_sample_kernel", ("BLOCK", "num_warps", "num_stages"), "q_sample"),
            (group_norm, "_group_norm_kernel", ("BLOCK", "num_warps"), "group_norm"),
            (group_norm, "_group_norm_stats_kernel", ("BLOCK", "num_warps"), "stats")):
        monkeypatch.setattr(module, name, LaunchSpy(getattr(module, name), keys, launched[log]))
    # the launchers' cached KernelConfigs hold the kernel object: none may keep a spy after this test
    caches = [q_sample._config, group_norm._main_config, group_norm._stats_config]
    request.addfinalizer(lambda: [cache.cache_clear() for cache in caches])
    for cache in caches:
        cache.cache_clear()
    records = tune.sweep(["attention", "elementwise", "group_norm"], smoke=True, deadline=None, ceilings=None)
    assert [r["op"] for r in records] == ["attention"] * 2 + ["q_sample"] * 2 + ["ddim_step"] * 2 + ["group_norm"] * 2
    assert all(r["ok"] and "median_ms" not in r for case in records for r in case["results"])
    assert launched["attention"] == tune.ATTENTION_CANDIDATES[256] + tune.ATTENTION_CANDIDATES[64]
    assert launched["q_sample"] == tune.ELEMENTWISE_CANDIDATES * 2  # fp32, bf16
    # GroupNorm: the split path, so both kernels, each with the candidate's tile and warps
    assert launched["group_norm"] == launched["stats"] == tune.GROUP_NORM_CANDIDATES * 2
    assert records[0]["shipped"] in map(list, tune.ATTENTION_CANDIDATES[256])
    assert (group_norm.BLOCK_LARGE, group_norm.WARPS_LARGE) == tuple(records[-1]["shipped"])  # restored
    spent = tune.sweep(["elementwise"], smoke=True, deadline=-1.0, ceilings=None)
    assert all(r == {"config": r["config"], "skipped": "--time-budget spent"} for c in spent for r in c["results"])
    path = tmp_path / "tune.json"
    assert tune.main(["--smoke", "--ops", "elementwise", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["smoke"] is True


@pytest.mark.gpu
def test_gpu_quick_run_records_the_kernels_with_cuda_events(tmp_path):
    path = tmp_path / "gpu.json"
    code, out = run_bench("--quick", "--ops", "ddim_step", "attention", "--no-compile", "--json", str(path))
    assert code == 0, out
    records = bench.load_results(path).records
    mine = [r for r in records if r["provider"] == "fastdiff"]
    assert {r["op"] for r in mine} == {"ddim_step", "attention"}
    for r in records:
        assert r["timer"] == "cuda_events" and r["gpu_name"] and r["peak_mem_mb"] is not None
        assert r["l2_flushed"] and 0 < r["pct_copy_bw"]
    assert all(r["driver"] for r in records) or importlib.util.find_spec("pynvml") is None  # NVML answered
    assert "fastdiff vs reference" in out


# ----------------------------------------------------------------------------- arguments and files
def test_ops_must_be_known():
    assert bench.parse_ops(None) == list(bench.OPS)
    assert bench.parse_ops(["attention,q_sample", "attention"]) == ["attention", "q_sample"]
    with pytest.raises(ValueError, match="--ops .*'flash'"):
        bench.parse_ops(["attention,flash"])


def test_missing_suite_says_where_it_looked(tmp_path):
    with pytest.raises(ValueError, match="not at .*checkout"):
        bench.run(bench_args("--suite", str(tmp_path), "--json", str(tmp_path / "x.json")))


def test_default_json_path_names_date_and_device_and_never_overwrites(tmp_path):
    import datetime

    day = datetime.date(2026, 1, 31)
    first = bench.default_json_path(tmp_path, "NVIDIA H100 80GB HBM3", quick=False, today=day)
    assert first.name == "bench-2026-01-31-nvidia-h100-80gb-hbm3.json"
    first.write_text("{}")
    assert bench.default_json_path(tmp_path, "NVIDIA H100 80GB HBM3", False, day).name.endswith("hbm3-2.json")
    assert bench.default_json_path(tmp_path, "cpu", True, day).name == "bench-2026-01-31-cpu-quick.json"


def test_empty_results_are_an_error(tmp_path):
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(ValueError, match="no benchmark results"):
        bench.load_results(tmp_path / "empty.json")


def gpu_like_results(path: Path) -> Path:
    """A JSON as a GPU run writes it, with made-up times, to check the GPU-side tables without a GPU."""
    def record(op, provider, ms, shape="4x4x256x256", dtype="bf16", **more):
        return {"extra_info": {"op": op, "provider": provider, "shape": shape, "dtype": dtype, "median_ms": ms,
                               "gpu_name": "NVIDIA H100", "bound": "memory", "pct_copy_bw": 80.0, **more}}

    benchmarks = [record("ddim_step", "fastdiff", 0.5), record("ddim_step", "reference", 2.0),
                  record("ddim_step", "torch_peer", 0.75),
                  record("end_to_end", "fastdiff", 100.0, shape="ddpm-cifar10_B128", bound="compute",
                         pct_matmul_peak=41.2, matmul_ceiling="bf16"),
                  record("end_to_end", "diffusers", 150.0, shape="ddpm-cifar10_B128"),
                  record("end_to_end", "fastdiff_graph", 80.0, shape="ddpm-cifar10_B128"),
                  record("step_overhead", "fastdiff_graph", 80.0, shape="ddpm-cifar10_B128", bound="compute",
                         sampler="DDIM-50", step_ms=1.6, unet_ms_per_step=1.58, pct_overhead=1.25)]
    session = {"gpu_name": "NVIDIA H100", "cuda": "12.8", "quick": True, "compile": True,
               "ceilings": {"copy_gbps": 3000.0, "matmul_tflops": {"bf16": 700.0, "tf32": 380.0, "fp32": 50.0}},
               "skipped": [{"test": "x", "reason": "diffusers_fastdiff: not available"}]}
    path.write_text(json.dumps({"benchmarks": benchmarks, "fastdiff": session, "datetime": "2026-01-31T10:00:00"}))
    return path


def test_gpu_tables_compare_fastdiff_with_every_provider(tmp_path):
    code, out = run_bench("--from-json", str(gpu_like_results(tmp_path / "gpu.json")))
    assert code == 0
    (_, h1, rows1), (_, h2, rows2), (op3, h3, rows3) = parse_tables(out)
    assert h1 == ["shape", "dtype", "ms fastdiff", "ms reference", "ms torch_peer", "fastdiff vs reference",
                  "fastdiff vs torch_peer", "fastdiff % of ceiling"]
    assert rows1 == [["4x4x256x256", "bf16", "0.5", "2", "0.75", "4.00×", "1.50×", "80% copy"]]
    assert h2[2:4] == ["ms fastdiff", "ms fastdiff_graph"]  # the graphed pipeline next to the eager one
    assert rows2[0][-3:] == ["0.80×", "1.50×", "41% bf16 mm"]
    assert op3 == "step_overhead"  # its own table: per-step times and the overhead outside the U-Net
    assert h3 == ["shape", "dtype", "ms per step", "ms U-Net per step", "% overhead"]
    assert rows3 == [["ddpm-cifar10_B128 DDIM-50", "bf16", "1.6", "1.58", "1.25%"]]
    report = (tmp_path / "gpu.md").read_text()
    assert "NVIDIA H100" in report and "copy 3000 GB/s" in report and "diffusers_fastdiff: not available" in report
    assert "step_overhead (`benchmarks/bench_step_overhead.py`)" in report  # the method says how it is measured
    assert (tmp_path / "gpu.png").stat().st_size > 0


def test_step_overhead_is_the_share_of_a_step_outside_the_unet():
    overhead = suite_module("bench_step_overhead").overhead(step_run_ms=100.0, unet_run_ms=98.0, steps=50)
    assert overhead["step_ms"] == pytest.approx(2.0) and overhead["unet_ms_per_step"] == pytest.approx(1.96)
    assert overhead["pct_overhead"] == pytest.approx(2.0)


def test_bench_module_imports_neither_matplotlib_nor_pytest():
    code = ("import sys, fastdiff, fastdiff.bench; "
            "print(sorted(m for m in ('matplotlib', 'pytest', 'diffusers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- cost models and metrics
def test_cost_models_count_known_shapes():
    costs = suite_module("costs")
    # attention: two matmuls of 2·Nq·Nk·D per (batch, head); q, k, v read and the output written once
    a = costs.attention(batch=2, heads=3, n_q=5, n_k=7, head_dim=11, itemsize=2)
    assert a.flops == 4 * 2 * 3 * 5 * 7 * 11 and a.bytes == 2 * 2 * 3 * (5 + 7) * 11 * 2
    # elementwise ops: tensors read + written, each element once
    assert costs.q_sample(numel=1024, batch=4, itemsize=4).bytes == 3 * 1024 * 4 + 4 * (8 + 4)
    assert costs.q_sample(1024, 4, 4, target="v_prediction").bytes == 4 * 1024 * 4 + 4 * (8 + 4)
    assert costs.ddim_step(1000, 2).bytes == 4 * 1000 * 2
    assert costs.ddim_step(1000, 2, guided=True, noise=True).bytes == 6 * 1000 * 2
    assert costs.ddpm_step(1000, 4).bytes == 5 * 1000 * 4 and costs.ddpm_step(1000, 4, noise=False).bytes == 4 * 4000
    assert costs.group_norm(numel=4096, channels=64, itemsize=2).bytes == 2 * 4096 * 2 + 2 * 64 * 2
    assert costs.sampling(flops_per_image=10, batch=3, steps=50).flops == 1500


def test_unet_flops_match_diffusers_own_count():
    diffusers = pytest.importorskip("diffusers")
    from torch.utils.flop_counter import FlopCounterMode

    import fastdiff

    costs = suite_module("costs")
    config = fastdiff.UNet2DConfig.preset("ddpm-cifar10")
    with torch.device("meta"):
        theirs = diffusers.UNet2DModel(**config.to_diffusers()).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        theirs(torch.empty(1, 3, 32, 32, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"))
    assert costs.unet_flops_per_image("ddpm-cifar10") == counter.get_total_flops()
    assert 12e9 < counter.get_total_flops() < 13e9  # Ho et al.'s model: ~6.2 GMAC per 32x32 image


def test_derived_metrics_and_roofline():
    costs, harness = suite_module("costs"), suite_module("harness")
    ceilings = {"copy_gbps": 2000.0, "matmul_tflops": {"bf16": 500.0}}
    memory = harness.derive(costs.Cost(bytes=10**9, flops=10**9), 1.0, ceilings, "bf16")  # 1 GB in 1 ms
    assert memory["gbps"] == pytest.approx(1000) and memory["pct_copy_bw"] == pytest.approx(50)
    assert memory["bound"] == "memory" and memory["pct_matmul_peak"] is None
    assert memory["floor_ms"] == pytest.approx(0.5) and memory["pct_roofline"] == pytest.approx(50)
    compute = harness.derive(costs.Cost(bytes=10**6, flops=10**12), 4.0, ceilings, "bf16")  # 1 TFLOP in 4 ms
    assert compute["tflops"] == pytest.approx(250) and compute["pct_matmul_peak"] == pytest.approx(50)
    assert compute["bound"] == "compute"
    no_bytes = harness.derive(costs.Cost(bytes=None, flops=10**9), 1.0, ceilings, "fp32")  # no fp32 ceiling
    assert no_bytes["gbps"] is None and no_bytes["pct_matmul_peak"] is None and no_bytes["bound"] is None


def test_a_wrong_result_fails_its_case_before_it_is_timed():
    harness = suite_module("harness")
    x = torch.randn(100, dtype=torch.float64)
    assert harness.rel_err((x, 2 * x), (x, 2 * x)) == 0
    assert harness.rel_err(x * (1 + 1e-3), x) == pytest.approx(1e-3)
    expected = (3 / (x.square().sum() + 3)) ** 0.5  # only the second tensor differs, by 1 in each of 3 elements
    assert harness.rel_err((x, torch.zeros(3)), (x, torch.ones(3))) == pytest.approx(float(expected))
    recorder = harness.Recorder(benchmark=None, env=None, ceilings={})
    assert recorder.check(lambda: x, lambda: x, tolerance=0) == 0
    with pytest.raises(pytest.fail.Exception, match="wrong result"):
        recorder.check(lambda: x + 1, lambda: x, tolerance=1e-3)
    with pytest.raises(pytest.fail.Exception, match="wrong result"):
        recorder.check(lambda: x * math.nan, lambda: x, tolerance=1e-3)
    assert recorder.check(lambda: x + 1, lambda: x, tolerance=None) > 0.5  # recorded, not judged


def test_timer_counts_its_calls_and_reports_a_median():
    harness = suite_module("harness")
    calls = []
    t = harness.timed(lambda: calls.append(1), "cpu", warmup_ms=0, rep_ms=0, min_reps=7, max_reps=9)
    assert t.reps == 7 and len(calls) == 1 + 1 + 7  # untimed first call, one estimate, the timed reps
    assert t.min_ms <= t.median_ms <= t.max_ms and t.timer == "perf_counter" and not t.l2_flushed


def test_cases_select_by_tier():
    harness = suite_module("harness")
    cases = harness.elementwise_cases()
    assert {c.id for c in harness.select(cases, "cpu")} == {"4x4x256x256-fp32"}
    assert len(harness.select(cases, "quick")) == 4 and len(harness.select(cases, "full")) == 10
    numel = [torch.Size(c.dims["shape"]).numel() for c in harness.select(cases, "full") if c.dtype == "fp32"]
    assert numel == [2**20, 2**22, 2**24, 2**26, 2**28]


# ----------------------------------------------------------------------------- telemetry without NVML
@pytest.fixture
def telemetry(monkeypatch):
    module = suite_module("telemetry")
    monkeypatch.setitem(module._state, "initialised", False)
    return module


def test_telemetry_without_nvidia_ml_py(telemetry, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    sample = telemetry.read()
    assert all(sample[f] is None for f in telemetry.FIELDS)
    assert "nvidia-ml-py is not installed" in sample["nvml_error"]


def fake_nvml(init_error=None, power_error=None):
    class NVMLError(Exception):
        pass

    def init():
        if init_error:
            raise NVMLError(init_error)

    def power(handle):
        if power_error:
            raise NVMLError(power_error)
        return 300_000  # milliwatts

    return types.SimpleNamespace(
        nvmlInit=init, NVMLError=NVMLError, NVML_CLOCK_SM=1, NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetHandleByUUID=lambda uuid: "h", nvmlDeviceGetHandleByIndex=lambda i: "h",
        nvmlSystemGetDriverVersion=lambda: b"550.54", nvmlDeviceGetClockInfo=lambda h, kind: 1980,
        nvmlDeviceGetPowerUsage=power, nvmlDeviceGetTemperature=lambda h, kind: 41,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * 2**20))


def test_telemetry_without_a_driver(telemetry, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(init_error="NVML Shared Library Not Found"))
    sample = telemetry.read()
    assert all(sample[f] is None for f in telemetry.FIELDS)
    assert sample["nvml_error"] == "NVML unavailable: NVML Shared Library Not Found"


def test_telemetry_reads_every_field_and_loses_only_a_failed_one(telemetry, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    assert telemetry.read() == {"driver": "550.54", "sm_clock_mhz": 1980, "power_w": 300.0, "temperature_c": 41,
                                "memory_used_mb": 3.0, "nvml_error": None}
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(power_error="Not Supported"))
    sample = telemetry.read()
    assert sample["power_w"] is None and sample["sm_clock_mhz"] == 1980
    assert sample["nvml_error"] == "power_w: Not Supported"
