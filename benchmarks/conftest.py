"""pytest setup of the benchmark suite: collection, options, fixtures and the JSON's ``fastdiff`` section.

Run it with ``fastdiff bench`` (table, Markdown report, plot), or directly:

    pytest benchmarks/ --benchmark-enable --benchmark-json=out.json [--quick] [--no-compile] [--time-budget S]

* Collection: every ``benchmarks/bench_*.py`` is collected by ``pytest_collect_file`` below, so no
  ``-o python_files=...`` is needed, and the repo's ``tests/`` run never collects a benchmark.
  (pyproject's addopts has ``--benchmark-disable``: pass ``--benchmark-enable``.)
* Cases: each bench file lists its cases (``CASES``, see harness.Case); ``pytest_generate_tests``
  parametrizes ``case`` with the ones of this run's tier: ``full`` on a GPU, ``quick`` with
  ``--quick``, ``cpu`` without CUDA (small shapes, fp32, no fastdiff provider).
* Fixtures: ``env`` (device, quick, compile), ``ceilings`` (copy bandwidth and matmul rates,
  measured once per session, before the first case), ``bench`` (harness.Recorder: checks and times
  a provider and fills ``benchmark.extra_info``).
* ``--time-budget S``: a case that would start more than S seconds after the session began is
  skipped, with that reason, and the cases that ran keep their results: a run that must fit a
  fixed slot of GPU time (see gpu_session.sh) ends on time with a report instead of being killed.
* The JSON gets a top-level ``fastdiff`` section: env, ceilings, versions and every skipped case
  with its reason.
"""

from __future__ import annotations

import importlib.metadata
import platform

import pytest
import torch

import harness

_CEILINGS = pytest.StashKey[dict]()
_DEADLINE = pytest.StashKey[float]()  # the harness.clock() reading after which no case starts (--time-budget)
# Skipped cases and why, for the report. The logreport hook gets no config: module state, reset per session.
_skips: list[dict] = []


def pytest_addoption(parser):
    group = parser.getgroup("fastdiff bench")
    group.addoption("--quick", action="store_true", default=False,
                    help="GPU: a subset of the shapes and fewer sampling steps (no effect on a CPU)")
    group.addoption("--no-compile", action="store_true", default=False,
                    help="skip the torch.compile providers (compiling takes most of a quick run's time)")
    group.addoption("--time-budget", type=float, default=None, metavar="S",
                    help="start no case later than S seconds into the session; the rest are skipped, with "
                         "that reason, and the cases that ran keep their results")


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest's python plugin whatever its name.
    is_bench = file_path.name.startswith("bench_") and file_path.suffix == ".py"
    if is_bench and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    _skips.clear()
    budget = config.getoption("--time-budget", None)
    if budget is not None:
        if not budget > 0:
            raise pytest.UsageError(f"--time-budget must be a positive number of seconds, got {budget}")
        config.stash[_DEADLINE] = harness.clock() + budget


@pytest.hookimpl(tryfirst=True)  # before the case's fixtures are set up (models built, compiled)
def pytest_runtest_setup(item):
    deadline = item.config.stash.get(_DEADLINE, None)
    if deadline is not None and harness.clock() > deadline:
        pytest.skip(f"--time-budget of {item.config.getoption('--time-budget'):g} s spent before this case started")


def _env(config) -> harness.Env:
    return harness.detect_env(quick=config.getoption("--quick"), compile=not config.getoption("--no-compile"))


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = harness.select(metafunc.module.CASES, _env(metafunc.config).tier)
        metafunc.parametrize("case", cases, ids=[case.id for case in cases])


@pytest.fixture(scope="session")
def env(pytestconfig) -> harness.Env:
    return _env(pytestconfig)


@pytest.fixture(scope="session")
def ceilings(pytestconfig, env) -> dict:
    """Measured before the first case runs: this also brings the GPU's clocks up."""
    pytestconfig.stash[_CEILINGS] = harness.measure_ceilings(env)
    return pytestconfig.stash[_CEILINGS]


@pytest.fixture
def bench(benchmark, env, ceilings) -> harness.Recorder:
    return harness.Recorder(benchmark, env, ceilings)


def pytest_runtest_logreport(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2].removeprefix("Skipped: ")
        _skips.append({"test": report.nodeid, "reason": reason})


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def pytest_benchmark_update_json(config, benchmarks, output_json):
    env = _env(config)
    output_json["fastdiff"] = {
        "device": env.device, "gpu_name": env.gpu_name, "cpu_name": env.cpu_name, "quick": env.quick,
        "compile": env.compile, "tier": env.tier, "ceilings": config.stash.get(_CEILINGS, None),
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("fastdiff", "torch", "triton", "diffusers", "nvidia-ml-py")},
        "skipped": list(_skips),
    }
