"""benchmarks/tune.py: the launch-configuration sweep, checked without a GPU.

``--smoke`` runs every candidate under Triton's interpreter at tiny sizes (checks, no timing). The
rest is what a lent GPU's time depends on: attention, the tables with the most to gain, is swept
first, and a sweep stopped by a signal or killed keeps what it ran.
"""

import json
import signal
import sys

import pytest
import torch

from fastdiff import bench

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="runs the smoke sweep under the interpreter")


@pytest.fixture
def tune():
    """benchmarks/tune.py as a module (its folder on sys.path, as the suite's own imports need)."""
    if str(bench.SUITE) not in sys.path:
        sys.path.insert(0, str(bench.SUITE))
    import tune as module

    return module


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
def test_tune_smoke_launches_and_checks_every_candidate(tune, tmp_path, monkeypatch, request):
    """benchmarks/tune.py --smoke: each candidate reaches the kernel launch (not the shipped config)
    and computes the reference's result; a spent --time-budget skips the candidates."""
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


def test_attention_is_swept_first(tune, monkeypatch):
    """Attention's configurations were chosen from compile reports and never timed: they have the
    most to gain, so a --time-budget that runs out must cut the elementwise kernels, not them."""
    assert list(tune.CASES) == ["attention", "group_norm", "elementwise"]
    assert next(tune.planned(list(tune.CASES), smoke=False))[0] == "attention"
    swept = []
    monkeypatch.setattr(tune, "sweep", lambda ops, *args: swept.append(ops) or [])
    assert tune.main(["--smoke"]) == 0 and swept == [["attention", "group_norm", "elementwise"]]


@cpu_only
def test_a_stopped_sweep_keeps_what_it_ran(tune, tmp_path, monkeypatch):
    """SIGINT (gpu_session.sh's timeout) lands during the third candidate: that one finishes, the rest
    are skipped with the reason, and the JSON, rewritten after every candidate, holds each one that ran."""
    real_rel_err, calls = tune.harness.rel_err, []

    def rel_err(out, ref):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return real_rel_err(out, ref)

    monkeypatch.setattr(tune.harness, "rel_err", rel_err)
    path, saved, writer = tmp_path / "tune.json", [], tune.json_writer

    def spying_writer(*args):
        save = writer(*args)
        return lambda records: (save(records), saved.append(json.loads(path.read_text())))

    monkeypatch.setattr(tune, "json_writer", spying_writer)
    before = signal.getsignal(signal.SIGINT)
    assert tune.main(["--smoke", "--ops", "elementwise", "--json", str(path)]) == 2
    assert signal.getsignal(signal.SIGINT) is before
    ran = [[r for c in data["cases"] for r in c["results"] if "rel_err" in r] for data in saved]
    assert [len(r) for r in ran] == [1, 2, 3, 3]  # after each candidate, and once at the end
    final = json.loads(path.read_text())
    results = [r for c in final["cases"] for r in c["results"]]
    assert all(r["ok"] for r in results[:3])
    assert results[3:] and all(r == {"config": r["config"], "skipped": "stopped by SIGINT"} for r in results[3:])
    assert [c["op"] for c in final["cases"]] == ["q_sample", "q_sample", "ddim_step", "ddim_step"]
    assert final == saved[-1]  # the last write is the whole sweep
