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
* ``--case-log PATH``: one JSON line per finished case (its extra_info), per skip and for the
  session (env, versions, ceilings), each flushed to disk as it is written. pytest-benchmark writes
  its JSON only when the session ends, so a run killed before then leaves only this file;
  ``fastdiff bench --from-json`` builds the report from it.
* SIGINT and SIGTERM stop the run after the case in progress: pytest ends as after Ctrl-C (exit
  code 2) and still writes the JSON of the cases that finished. The handler only sets a flag:
  SIGINT's default KeyboardInterrupt can be raised inside a weakref finaliser, where Python prints
  and drops it, and a run went on that way. A second signal raises KeyboardInterrupt at once.
* The JSON gets a top-level ``fastdiff`` section: env, ceilings, versions and every skipped case
  with its reason.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import signal
import threading

import pytest
import torch

import harness

_CEILINGS = pytest.StashKey[dict]()
_DEADLINE = pytest.StashKey[float]()  # the harness.clock() reading after which no case starts (--time-budget)
# Skipped cases and why, for the report. The logreport hook gets no config: module state, reset per session.
_skips: list[dict] = []
# What the signal handler and the config-less hooks reach: the per-case log's path, the session to
# stop, the name of the signal that asked for the stop, and the handlers to restore.
_run: dict = {"case_log": None, "session": None, "stop": None, "handlers": {}}
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def pytest_addoption(parser):
    group = parser.getgroup("fastdiff bench")
    group.addoption("--quick", action="store_true", default=False,
                    help="GPU: a subset of the shapes and fewer sampling steps (no effect on a CPU)")
    group.addoption("--no-compile", action="store_true", default=False,
                    help="skip the torch.compile providers (compiling takes most of a quick run's time)")
    group.addoption("--time-budget", type=float, default=None, metavar="S",
                    help="start no case later than S seconds into the session; the rest are skipped, with "
                         "that reason, and the cases that ran keep their results")
    group.addoption("--case-log", default=None, metavar="PATH",
                    help="write one JSON line per finished case, per skip and for the session to PATH, each "
                         "flushed to disk at once: what a killed run leaves (fastdiff bench --from-json reads it)")


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
    path = config.getoption("--case-log", None)
    _run.update(case_log=path, session=None, stop=None)
    if path is not None:
        open(path, "w").close()  # this run's lines only
    _install_stop_handlers()


def pytest_unconfigure(config):
    for signum, handler in _run["handlers"].items():
        signal.signal(signum, handler)
    _run["handlers"] = {}


def pytest_sessionstart(session):
    _run["session"] = session
    _log_line({"session": _session_info(session.config), "when": datetime.datetime.now().isoformat()})


# ----------------------------------------------------------------------------- stopping on a signal
def _install_stop_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # signal.signal works in the main thread only (an embedding runner's worker: no handlers)
    _run["handlers"] = {signum: signal.signal(signum, _request_stop) for signum in STOP_SIGNALS}


def _request_stop(signum, frame):
    """Stop after the case in progress; a second signal stops now."""
    if _run["stop"] is not None:
        raise KeyboardInterrupt
    _run["stop"] = signal.Signals(signum).name
    if _run["session"] is not None:  # pytest's loop checks this after each case and ends as on Ctrl-C
        _run["session"].shouldstop = f"stopped by {_run['stop']}; the cases that finished keep their results"


@pytest.hookimpl(tryfirst=True)  # before the case's fixtures are set up (models built, compiled)
def pytest_runtest_setup(item):
    if _run["stop"] is not None:
        pytest.skip(f"stopped by {_run['stop']} before this case started")
    deadline = item.config.stash.get(_DEADLINE, None)
    if deadline is not None and harness.clock() > deadline:
        pytest.skip(f"--time-budget of {item.config.getoption('--time-budget'):g} s spent before this case started")


# ----------------------------------------------------------------------------- the per-case log
def _log_line(entry: dict) -> None:
    """Append ``entry`` to --case-log as one JSON line, on disk before this returns (a SIGKILL may follow)."""
    path = _run["case_log"]
    if path is None:
        return
    with open(path, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    benchmark = getattr(item, "funcargs", {}).get("benchmark")
    if call.when == "call" and outcome.get_result().passed and benchmark is not None:
        if "op" in benchmark.extra_info:  # Recorder.run filled it: a timed case, as load_results reads it
            _log_line({"test": item.nodeid, "record": dict(benchmark.extra_info)})


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
    _log_line({"session": {"ceilings": pytestconfig.stash[_CEILINGS]}})
    return pytestconfig.stash[_CEILINGS]


@pytest.fixture
def bench(benchmark, env, ceilings) -> harness.Recorder:
    return harness.Recorder(benchmark, env, ceilings)


def pytest_runtest_logreport(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2].removeprefix("Skipped: ")
        _skips.append({"test": report.nodeid, "reason": reason})
        _log_line({"skipped": _skips[-1]})


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _session_info(config) -> dict:
    """The JSON's ``fastdiff`` section without its skips: env, ceilings (once measured), versions."""
    env = _env(config)
    return {
        "device": env.device, "gpu_name": env.gpu_name, "cpu_name": env.cpu_name, "quick": env.quick,
        "compile": env.compile, "tier": env.tier, "ceilings": config.stash.get(_CEILINGS, None),
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "versions": {name: _version(name) for name in ("fastdiff", "torch", "triton", "diffusers", "nvidia-ml-py")},
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["fastdiff"] = {**_session_info(config), "skipped": list(_skips)}
