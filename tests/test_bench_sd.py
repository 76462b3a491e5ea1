"""benchmarks/bench_sd_unet.py and bench_sd_vae.py without a GPU: the GPU benchmark's code path at tiny sizes.

One subprocess (``cpu_run``) runs the two bench files as `pytest benchmarks/bench_sd_*.py
--benchmark-enable` runs them on a CPU (the CPU tier: sd_models' ``tiny`` U-Net and VAE, fp32, the
stock provider timed, the others skipped with their reasons), then builds the accelerated providers
the GPU run times (``accelerate(model)`` and, where accelerate takes it, ``cuda_graph=True``, both
on the torch backend here) and counts the FLOPs of SD 1.5's real configs on the meta device. It
runs with transformers, accelerate and peft hidden from the import system, as on the GPU machine,
where gpu_session.sh's wheels bring diffusers alone. CUDA is hidden too, so on a GPU machine this
stays the CPU smoke test. No speed is asserted: records, skips, errors and counts are.
"""

import argparse
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastdiff import bench

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks"
HIDDEN = ("transformers", "accelerate", "peft")  # not on the GPU machine (accelerate: Hugging Face's package)
TINY = {"unet": {"preset": "tiny", "B": 2, "latent": 8, "tokens": 77}, "vae": {"preset": "tiny", "B": 1, "latent": 8}}

# argv: the output folder, TINY as JSON, then the hidden packages. Writes sd.json (pytest-benchmark),
# sd.jsonl (the suite's per-case log) and summary.json (what the tests below read).
DRIVER = r"""
import importlib.machinery, json, sys
from pathlib import Path

out, tiny, hidden = Path(sys.argv[1]), json.loads(sys.argv[2]), set(sys.argv[3:])


class Hidden:
    # PathFinder, blind to the hidden packages: find_spec answers None, as for a package not installed
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        return None if name.partition(".")[0] in hidden else self.inner.find_spec(name, path, target)

    def __getattr__(self, name):
        return getattr(self.inner, name)


sys.meta_path[:] = [Hidden(f) if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
import pytest
import torch

code = pytest.main(["benchmarks/bench_sd_unet.py", "benchmarks/bench_sd_vae.py", "-q", "-p", "no:cacheprovider",
                    "--benchmark-enable", f"--benchmark-json={out / 'sd.json'}", f"--case-log={out / 'sd.jsonl'}"])
import harness
import sd_models
from diffusers.models.attention_processor import Attention

summary = {"pytest": int(code), "checks": {}, "counts": {}}
for kind, dims in tiny.items():
    key = sd_models.reference_key(kind, dims, "cpu", torch.float32)
    summary["checks"][f"{kind}-reference_kept"] = key in sd_models._reference  # by the bench's stock case
    ref = sd_models.reference_output(kind, dims, "cpu", torch.float32)
    for provider in ("fastdiff", "fastdiff_graph"):
        try:
            call = sd_models.make_call(provider, kind, dims, "cpu", torch.float32)
        except sd_models.Unavailable as err:
            summary["checks"][f"{kind}-{provider}"] = {"unavailable": str(err)}
            continue
        result = call()
        call()  # a second call: what a graph replays (eager on a CPU)
        model = call.model.decoder if kind == "vae" else call.model
        summary["checks"][f"{kind}-{provider}"] = {
            "rel_err": harness.rel_err(result, ref), "shape": list(result.shape), "ref_shape": list(ref.shape),
            "processors": sorted({type(m.processor).__name__ for m in model.modules() if isinstance(m, Attention)}),
            "fast_modules": sd_models.fast_modules(call.model)}
    summary["counts"][f"tiny-{kind}"] = sd_models.count(kind, "tiny", dims["B"], dims["latent"])
for kind, latent, batch in (("unet", 64, 2), ("vae", 64, 1)):
    c = sd_models.count(kind, "sd15", batch, latent)
    summary["counts"][kind] = {k: c[k] for k in ("flops", "params", "heads", "flops_by_op")}
summary["imported"] = sorted(m for m in hidden if m in sys.modules)
(out / "summary.json").write_text(json.dumps(summary))
"""


def suite_module(name: str):
    if str(SUITE) not in sys.path:
        sys.path.insert(0, str(SUITE))
    return __import__(name)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    if importlib.util.find_spec("diffusers") is None:  # not imported here: the subprocess does that
        pytest.skip("diffusers is not installed: the SD benchmarks build diffusers models")
    out = tmp_path_factory.mktemp("sd")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-c", DRIVER, str(out), json.dumps(TINY), *HIDDEN], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pytest"] == 0, result.stdout[-4000:]
    return summary, out, result.stdout


def test_cpu_run_times_the_stock_models_and_records_every_field(cpu_run):
    summary, out, _ = cpu_run
    harness, telemetry = suite_module("harness"), suite_module("telemetry")
    records = bench.load_results(out / "sd.json").records
    assert {(r["op"], r["provider"], r["shape"], r["dtype"]) for r in records} == {
        ("sd_unet", "diffusers", "tiny_B2_8x8", "fp32"), ("sd_vae", "diffusers", "tiny_B1_8x8_to_16x16", "fp32")}
    for r in records:
        missing = set(harness.INFO_KEYS + telemetry.FIELDS + ("nvml_error",)) - set(r)
        assert not missing, (r["op"], missing)
        kind = "unet" if r["op"] == "sd_unet" else "vae"
        dims = TINY[kind]
        assert r["model"] == kind and r["preset"] == "tiny" and r["batch"] == dims["B"] and r["latent"] == 8
        assert r["median_ms"] > 0 and r["timer"] == "perf_counter" and not r["l2_flushed"]
        assert r["speedup_vs_diffusers"] == 1.0 and r["rel_err"] is None  # the stock model is the reference
        rate = r["steps_per_s"] if kind == "unet" else r["decodes_per_s"]
        assert rate == pytest.approx(1e3 / r["median_ms"])
        counted = summary["counts"][f"tiny-{kind}"]
        assert r["flops"] == counted["flops"] > 0 and r["params"] == counted["params"] > 0
        assert r["bytes"] == 4 * (counted["params"] + counted["input_numel"] + counted["output_numel"])
        assert r["matmul_ceiling"] == "fp32" and r["bound"] in ("compute", "memory")
        assert r["tflops"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e12)
        assert r["build_s"] >= 0 and r["first_call_s"] > 0 and r["fast_modules"] == {}  # stock
        if kind == "unet":  # B = 2: one image's step with guidance
            assert r["images_per_step"] == 1 and r["tokens"] == 77
        else:
            assert r["images_per_s"] == pytest.approx(r["decodes_per_s"])
    logged = bench.load_case_log(out / "sd.jsonl")  # the per-case log holds the same records
    assert sorted(map(json.dumps, logged.records)) == sorted(map(json.dumps, records))


def test_cpu_run_skips_the_gpu_providers_saying_why(cpu_run):
    _, out, _ = cpu_run
    skipped = bench.load_results(out / "sd.json").session["skipped"]
    reasons = {(s["test"].split("::")[1].split("[")[0], s["test"].rsplit("-", 1)[1].rstrip("]")): s["reason"]
               for s in skipped}
    assert set(reasons) == {("test_sd_unet", p) for p in ("fastdiff", "fastdiff_graph", "diffusers_compile")} | \
        {("test_sd_vae", p) for p in ("fastdiff", "fastdiff_graph")}
    for (_, provider), reason in reasons.items():
        expected = {"fastdiff": "fastdiff: no CUDA GPU",
                    "fastdiff_graph": "fastdiff_graph: cuda_graph=True needs a CUDA GPU",
                    "diffusers_compile": "diffusers_compile: compiling a U-Net takes minutes on a CPU"}[provider]
        assert reason.startswith(expected), reason


@pytest.mark.parametrize("kind", ["unet", "vae"])
@pytest.mark.parametrize("provider", ["fastdiff", "fastdiff_graph"])
def test_accelerated_providers_compute_the_stock_output(cpu_run, kind, provider):
    """What the GPU run times, here on the torch backend (FastAttnProcessor runs SDPA there, and
    cuda_graph=True runs eagerly on CPU tensors): the stock model's output, twice over."""
    checks = cpu_run[0]["checks"]
    assert checks[f"{kind}-reference_kept"]  # the stock case left its output for the others' checks
    check = checks[f"{kind}-{provider}"]
    if "unavailable" in check:
        assert provider == "fastdiff_graph" and "cuda_graph" in check["unavailable"]
        pytest.skip(f"{provider}: {check['unavailable']}")
    assert check["shape"] == check["ref_shape"] and check["rel_err"] <= 1e-6
    assert check["processors"] == ["FastAttnProcessor"]
    fast = check["fast_modules"]  # accelerate's GroupNorm swap is in too (the torch backend runs it stock here)
    assert fast["FastAttnProcessor"] > 0 and fast.get("FastGroupNorm", 0) + fast.get("FastResnetBlock2D", 0) > 0, fast


def test_the_sd15_configs_count_sd15s_model(cpu_run):
    """SD 1.5's U-Net (859.5M parameters, 8 heads of 40/80/160) and VAE decoder (49.5M, one head of
    512 over the 64x64 latent), counted on the meta device: FLOPs as sd_models' docstring says."""
    counts = cpu_run[0]["counts"]
    unet, vae = counts["unet"], counts["vae"]
    assert unet["params"] == 859_520_964 and unet["heads"] == [[8, 40], [8, 80], [8, 160]]
    assert unet["flops"] == pytest.approx(1.607e12, rel=1e-3)
    # attention's two matmuls at B = 2: self 4·B·N²·C and cross 4·B·N·77·C at 64, 32, 16 px (5 blocks
    # each: 2 down, 3 up) and the mid block's 8 px (1)
    levels = [(64 * 64, 320, 5), (32 * 32, 640, 5), (16 * 16, 1280, 5), (8 * 8, 1280, 1)]
    attention = sum(4 * 2 * n * (n + 77) * c * blocks for n, c, blocks in levels)
    assert unet["flops_by_op"]["aten.bmm"] == attention
    assert vae["params"] == 49_490_199 and vae["heads"] == [[1, 512]]
    assert vae["flops"] == pytest.approx(2.5145e12, rel=1e-3)
    # the mid block's attention (4·N²·C at N = 4096; torch may count its projections as bmm too)
    assert vae["flops_by_op"]["aten.bmm"] >= 4 * 4096 * 4096 * 512
    assert vae["flops_by_op"]["aten.convolution"] == pytest.approx(2.4716e12, rel=1e-3)


def test_the_benchmark_needs_no_transformers(cpu_run):
    """The GPU machine has no transformers (nor accelerate, peft): with them hidden, the run above
    built and ran every model, and nothing tried to import them."""
    assert cpu_run[0]["imported"] == []


def test_report_shows_steps_per_second_speedups_over_stock(tmp_path):
    """A GPU-like JSON of the SD U-Net (made-up times): `fastdiff bench --from-json` writes its table
    with fastdiff as the subject, so "fastdiff vs diffusers" is the speed-up over stock."""
    def record(provider, ms):
        return {"extra_info": {"op": "sd_unet", "provider": provider, "shape": "sd15_B2_64x64", "dtype": "fp16",
                               "median_ms": ms, "gpu_name": "NVIDIA H200", "bound": "compute",
                               "pct_matmul_peak": 12.0, "matmul_ceiling": "bf16", "steps_per_s": 1e3 / ms,
                               "speedup_vs_diffusers": 18.0 / ms}}

    path = tmp_path / "sd.json"
    session = {"gpu_name": "NVIDIA H200", "cuda": "12.8", "quick": True, "compile": True, "skipped": [],
               "ceilings": {"copy_gbps": 4000.0, "matmul_tflops": {"bf16": 800.0, "tf32": 400.0, "fp32": 50.0}}}
    benchmarks = [record("diffusers", 18.0), record("fastdiff", 12.0), record("fastdiff_graph", 9.0),
                  record("diffusers_compile", 15.0)]
    path.write_text(json.dumps({"benchmarks": benchmarks, "fastdiff": session, "datetime": "2026-12-01T10:00:00"}))
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert bench.run(parser.parse_args(["--from-json", str(path)])) == 0
    table = [line for line in printed.getvalue().splitlines() if line.startswith("| ")]
    header, row = ([c.strip() for c in line.strip("| ").split("|")] for line in table)
    cells = dict(zip(header, row))
    assert "### sd_unet" in printed.getvalue() and cells["fastdiff vs diffusers"] == "1.50×"
    assert cells["fastdiff vs fastdiff_graph"] == "0.75×" and cells["fastdiff % of ceiling"] == "12% bf16 mm"


def test_cases_and_providers():
    harness, unet, vae, sd_models = (suite_module(m) for m in ("harness", "bench_sd_unet", "bench_sd_vae", "sd_models"))
    for module in (unet, vae):
        full, quick, cpu = (harness.select(module.CASES, tier) for tier in ("full", "quick", "cpu"))
        assert {c.id for c in quick} <= {c.id for c in full} and quick
        assert {c.dtype for c in full} == {"fp16"} and all(c.dims["preset"] == "sd15" for c in full)
        assert [c.dtype for c in cpu] == ["fp32"] and all(c.dims["preset"] == "tiny" for c in cpu)
        assert module.PROVIDERS[0] == "diffusers"  # the stock case runs first and keeps its output
    assert [c.dims["B"] for c in harness.select(unet.CASES, "quick")] == [2]  # SD's batch of one image with CFG
    assert "diffusers_compile" in unet.PROVIDERS and "diffusers_compile" not in vae.PROVIDERS
    gpu = harness.Env("cuda", "NVIDIA H200", "cpu", quick=True, compile=True)
    cpu_env = harness.Env("cpu", None, "cpu", quick=False, compile=True)
    assert sd_models.ceiling_key("fp16", gpu) == "bf16" and sd_models.ceiling_key("fp32", cpu_env) == "fp32"
