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
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from fastdiff import bench
from fastdiff.reference import ROW_SIZE

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
def test_multistep_cases_and_the_dpm_sampler_run_on_the_cpu(quick_run):
    """The CPU tier's multistep cases (one SD latent per sampler) against diffusers' steps, and end to
    end DPM++ next to DDIM (at the CPU tier's 2 steps each), with images/s in the record."""
    costs = suite_module("costs")
    records = bench.load_results(quick_run[2]).records
    steps = [r for r in records if r["op"] == "multistep_step"]
    assert {r["shape"] for r in steps} == {"dpmpp2m_cfg_1x4x64x64", "unipc_bh2_1x4x64x64", "euler_cfg_1x4x64x64"}
    assert {r["provider"] for r in steps} == {"reference", "torch_peer", "diffusers"}
    for r in steps:
        assert r["bytes"] == costs.multistep_step(1 * 4 * 64 * 64, 4, r["solver"], guided=r["guided"]).bytes
        assert r["guided"] == ("_cfg_" in r["shape"]) and r["step"] == 10 and r["steps"] == 20
    end_to_end = [r for r in records if r["op"] == "end_to_end"]
    assert {(r["shape"], r["sampler"]) for r in end_to_end} == {("digits_B1", "DDIM-2"), ("digits_B1_dpmpp", "DPM++-2")}
    for r in end_to_end:
        assert r["images_per_s"] == pytest.approx(1 / (r["median_ms"] * 1e-3))  # B = 1


@cpu_only
def test_ops_filters_the_run(tmp_path):
    path = tmp_path / "some.json"
    code, out = run_bench("--ops", "attention,group_norm", "--no-compile", "--json", str(path))
    assert code == 0, out
    records = bench.load_results(path).records
    assert {r["op"] for r in records} == {"attention", "group_norm"}
    assert parse_tables(out)[0][1][2:] == ["ms reference", "ms torch_peer", "reference vs torch_peer",
                                                        "reference % of ceiling"]
    logged = bench.load_case_log(bench.case_log_path(path))  # the same cases, one JSON line each
    assert sorted(map(json.dumps, logged.records)) == sorted(map(json.dumps, records))
    assert logged.session["ceilings"] == bench.load_results(path).session["ceilings"]


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


@cpu_only
def test_sigint_stops_the_run_after_the_case_in_progress(tmp_path, monkeypatch):
    """`timeout -s INT` in gpu_session.sh: the signal only asks for a stop, so the case it lands in
    finishes, no other starts, pytest ends as after Ctrl-C (exit code 2) and its JSON still comes.
    The suite's clock raises the signal when the first case starts (its second reading)."""
    readings = iter(range(10_000))

    def clock():
        reading = next(readings)
        if reading == 1:
            signal.raise_signal(signal.SIGINT)
        return reading

    monkeypatch.setattr(suite_module("harness"), "clock", clock)
    before = signal.getsignal(signal.SIGINT)
    path = tmp_path / "int.json"
    code, out = run_bench("--ops", "attention", "--no-compile", "-k", "reference", "--time-budget", "1000",
                          "--json", str(path))
    assert code == bench.PYTEST_INTERRUPTED and "stopped by SIGINT" in out
    assert "interrupted; the report covers the cases that finished" in out
    records = bench.load_results(path).records
    assert [(r["op"], r["provider"]) for r in records] == [("attention", "reference")]  # the first case only
    assert bench.load_case_log(bench.case_log_path(path)).records == records
    assert signal.getsignal(signal.SIGINT) is before  # the suite's handler is gone with the run


# A pytest plugin for the runs below: after the first case it sends this process STOP_WITH
# (SIGTERM), or with STOP_WITH=hang it hangs, as a run stuck where a signal was lost does.
STOP_AFTER_FIRST = """
import os, signal, time

done = []


def pytest_runtest_logfinish(nodeid, location):
    if done:
        return
    done.append(nodeid)
    how = os.environ["STOP_WITH"]
    if how == "hang":
        time.sleep(600)
    os.kill(os.getpid(), getattr(signal, how))
"""


@pytest.fixture(scope="module")
def stopped_runs(tmp_path_factory):
    """The suite's two CPU attention cases of the reference, run as `fastdiff bench` runs them, in
    two processes at once: one gets SIGTERM after its first case, the other hangs after its first
    case and is SIGKILLed once its per-case log holds that case."""
    tmp = tmp_path_factory.mktemp("stopped")
    (tmp / "stop_after_first.py").write_text(STOP_AFTER_FIRST)
    runs = {}
    for how in ("SIGTERM", "hang"):
        json_path = tmp / f"{how}.json"
        args = bench.pytest_arguments(bench.SUITE, ["attention"], json_path, False, True, keyword="reference")
        env = {**os.environ, "STOP_WITH": how,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp), os.environ.get("PYTHONPATH")]))}
        process = subprocess.Popen([sys.executable, "-m", "pytest", *args, "-p", "stop_after_first"], cwd=ROOT,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        runs[how] = (process, json_path)
    killed, killed_json = runs["hang"]
    deadline = time.monotonic() + 120
    while '"record"' not in read_or_empty(bench.case_log_path(killed_json)) and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    ended = {}
    for how, (process, path) in runs.items():
        out, _ = process.communicate(timeout=120)
        ended[how] = process.returncode, out, path
    return ended


def read_or_empty(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def test_sigterm_stops_the_run_after_the_case_in_progress(stopped_runs):
    """As SIGINT does (above): a batch system's or a device tool's SIGTERM ends the run after the case
    in progress with exit code 2, and pytest-benchmark's JSON still comes."""
    code, out, path = stopped_runs["SIGTERM"]
    assert code == bench.PYTEST_INTERRUPTED, out
    assert "stopped by SIGTERM" in out
    records = bench.load_results(path).records
    assert [(r["op"], r["provider"]) for r in records] == [("attention", "reference")]  # the first case only
    assert bench.load_case_log(bench.case_log_path(path)).records == records


def test_a_killed_run_keeps_its_finished_cases_and_reports_them(stopped_runs, tmp_path, monkeypatch):
    code, out, path = stopped_runs["hang"]
    assert code == -signal.SIGKILL and not path.exists(), out  # pytest-benchmark never wrote its JSON
    code, out = run_bench("--from-json", str(path))  # the report, built from the per-case log
    assert code == 0 and "from the per-case log hang.jsonl: the 1 case(s) that finished" in out
    [(_, header, rows)] = parse_tables(out)
    assert header[2] == "ms reference" and len(rows) == 1
    assert "from the per-case log" in path.with_suffix(".md").read_text()
    harness, telemetry = suite_module("harness"), suite_module("telemetry")
    [record] = bench.load_results(path).records
    assert not set(harness.INFO_KEYS + telemetry.FIELDS) - set(record)  # the whole record, not a summary
    # an interrupted run whose JSON is missing: the report still comes, from the log
    lost = tmp_path / "lost.json"
    bench.case_log_path(lost).write_bytes(bench.case_log_path(path).read_bytes())
    monkeypatch.setattr(bench, "run_suite", lambda args: (lost, bench.PYTEST_INTERRUPTED))
    code, out = run_bench("--json", str(lost))
    assert code == bench.PYTEST_INTERRUPTED and "from the per-case log lost.jsonl" in out
    assert lost.with_suffix(".md").is_file()


def test_the_case_log_drops_a_line_cut_short_and_merges_the_session(tmp_path):
    path = tmp_path / "run.jsonl"
    lines = [{"session": {"device": "cuda", "gpu_name": "NVIDIA H200", "ceilings": None}, "when": "2026-12-01T10:00"},
             {"session": {"ceilings": {"copy_gbps": 4000.0, "matmul_tflops": {"bf16": 900.0}}}},
             {"test": "a", "record": {"op": "ddim_step", "provider": "fastdiff", "shape": "s", "dtype": "bf16",
                                      "median_ms": 1.0}},
             {"skipped": {"test": "b", "reason": "--time-budget of 5 s spent before this case started"}}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"test": "c", "rec')  # SIGKILL mid-line
    results = bench.load_results(path)
    assert [r["op"] for r in results.records] == ["ddim_step"] and results.when.startswith("2026-12-01")
    assert results.session["gpu_name"] == "NVIDIA H200" and results.session["ceilings"]["copy_gbps"] == 4000.0
    assert [s["test"] for s in results.session["skipped"]] == ["b"]
    path.write_text(json.dumps(lines[0]) + "\n")
    with pytest.raises(ValueError, match="no benchmark results in .*run.jsonl: no case finished"):
        bench.load_results(path)


@pytest.mark.parametrize("module, package", [("matplotlib", "matplotlib"), ("pytest_benchmark", "pytest-benchmark")])
def test_a_missing_package_is_refused_before_any_case_runs(tmp_path, monkeypatch, module, package):
    """The report's plot needs matplotlib: without it the run must stop before the suite, not after."""
    monkeypatch.setitem(sys.modules, module, None)  # import -> ImportError
    monkeypatch.setattr(bench, "run_suite", lambda args: pytest.fail("the suite ran"))
    with pytest.raises(ImportError) as error:
        run_bench("--quick", "--json", str(tmp_path / "x.json"))
    message = str(error.value)
    assert f"fastdiff bench needs {package}" in message and f"pip install {package}" in message
    assert "\n" not in message
    if module == "matplotlib":  # rereading a JSON writes the plot too
        with pytest.raises(ImportError, match="needs matplotlib to write the report's plot: pip install matplotlib"):
            run_bench("--from-json", str(gpu_like_results(tmp_path / "gpu.json")))
    assert not list(tmp_path.glob("*.md"))


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
    # multistep steps: model output(s), x and the slots read; x_next, the slots written, x̂0; + the packed row
    row = 4 * ROW_SIZE
    assert costs.multistep_step(1000, 4, "dpmpp2m").bytes == (3 + 2) * 4000 + row  # m, x, m1; x_next, c
    assert costs.multistep_step(1000, 2, "dpmpp2m", guided=True).bytes == (4 + 2) * 2000 + row  # + m_u
    assert costs.multistep_step(1000, 4, "unipc_bh2").bytes == (5 + 3) * 4000 + row  # + m2, last; + last
    assert costs.multistep_step(1000, 4, "euler", guided=True).bytes == (3 + 2) * 4000 + row  # m, m_u, x; x_next, x̂0
    assert costs.multistep_step(1000, 4, "dpmpp2m", guided=True).flops == (3 + 4 + 5) * 1000  # guide, c, 3 terms
    assert costs.multistep_step(1000, 4, "unipc_bh2").flops == (4 + 7 + 7) * 1000  # c; x_next, last over 4 terms
    assert costs.sampling(flops_per_image=10, batch=3, steps=50).flops == 1500


@pytest.mark.parametrize("solver", ["dpmpp2m", "unipc_bh2", "euler"])
def test_multistep_costs_count_what_the_steady_rows_read_and_write(solver):
    """costs.MULTISTEP_STEPS against the packed row of the step the bench times: the slots its flags
    read and write, whether x̂0 is written, and its nonzero coefficients (a sum of n terms: 2n − 1 FLOPs)."""
    from fastdiff import reference as R

    costs, steps = suite_module("costs"), suite_module("bench_multistep_step")
    state = steps.steady_state(solver, False, (1, 4, 8, 8), torch.float32, "cpu", with_diffusers=False)
    row = state.row.cpu()
    reads = int((row[R.ROW_READS:R.ROW_READS + R.MULTISTEP_SLOTS] > 0).sum())
    sets = (row[R.ROW_SETS:R.ROW_SETS + 2] > 0).tolist()
    writes = int(row[R.ROW_PUSH] >= 0) + sum(sets)
    combines = [R.ROW_OUT] + [offset for offset, on in zip((R.ROW_LAST, R.ROW_ACC), sets) if on]
    terms = [int((row[offset:offset + R.MULTISTEP_INPUTS] != 0).sum()) for offset in combines]
    flops = 4 + sum(2 * n - 1 for n in terms)  # c = (a·x + b·m)/d, then each sum
    assert (state.slots is not None) == (reads + writes > 0)
    assert costs.MULTISTEP_STEPS[solver] == (reads, writes, state.returns_x0, flops)


@pytest.mark.parametrize("solver, guided", [("dpmpp2m", True), ("unipc_bh2", False), ("euler", True)])
def test_multistep_fastdiff_provider_runs_the_kernel_on_its_own_slots(solver, guided, launches):
    """What the GPU run's fastdiff provider calls, here on Triton's interpreter (on a GPU: compiled):
    one launch, the reference's x_next, x̂0 and slots; the state's slots are left as they were."""
    steps, harness = suite_module("bench_multistep_step"), suite_module("harness")
    device = "cuda" if HAS_CUDA else "cpu"
    state = steps.steady_state(solver, guided, (2, 4, 8, 8), torch.float32, device, with_diffusers=False)
    before = None if state.slots is None else state.slots.clone()
    out, expected = steps.fused_step("fastdiff", state)(), steps.fused_step("reference", state)()
    assert launches["multistep_update"] == 1 and len(out) == len(expected) == 2
    assert harness.rel_err(out, expected) <= 1e-6
    if before is not None:
        assert torch.equal(state.slots, before) and not torch.equal(out[1], before)  # the copy was updated


def test_multistep_cases_cover_every_sampler_and_size():
    harness, steps = suite_module("harness"), suite_module("bench_multistep_step")
    full, quick = harness.select(steps.CASES, "full"), harness.select(steps.CASES, "quick")
    assert {c.id for c in quick} <= {c.id for c in full} and len({c.id for c in full}) == len(full)
    variants = {(c.dims["solver"], c.dims["guided"], c.dtype) for c in full}
    assert variants == {(s, g, d) for s, g in steps.VARIANTS for d in ("fp32", "bf16")}
    main = {c.dims["shape"] for c in full if (c.dims["solver"], c.dims["guided"]) == ("dpmpp2m", True)}
    assert main == set(steps.LATENTS + steps.PIXELS)
    assert {c.dtype for c in harness.select(steps.CASES, "cpu")} == {"fp32"}


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


def test_relative_error_stays_on_the_device_and_in_chunks(monkeypatch):
    """rel_err reads back two float64 sums, never the tensors (at 256M elements a float64 copy to the
    host is 2 GiB per tensor); widening to float64 chunk by chunk gives the same number."""
    harness = suite_module("harness")
    out, ref = torch.randn(1000), torch.randn(1000)
    out2, ref2 = torch.randn(37).bfloat16(), torch.randn(37).bfloat16()
    whole = harness.rel_err((out, out2), (ref, ref2))
    expected = ((out.double() - ref.double()).square().sum() + (out2.double() - ref2.double()).square().sum()) \
        / (ref.double().square().sum() + ref2.double().square().sum())
    assert whole == pytest.approx(float(expected) ** 0.5, rel=1e-12)

    def no_copy(*args, **kwargs):
        raise AssertionError("rel_err copied a tensor to the host")

    monkeypatch.setattr(torch.Tensor, "cpu", no_copy)
    monkeypatch.setattr(torch.Tensor, "numpy", no_copy)
    assert harness.rel_err((out, out2), (ref, ref2), chunk=7) == pytest.approx(whole, rel=1e-12)
    with pytest.raises(ValueError, match="rel_err: out has 1000 elements where ref has 999"):
        harness.rel_err(out, ref[:999])


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
