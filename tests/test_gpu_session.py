"""benchmarks/gpu_session.sh without a GPU: the whole `all` flow with fake commands, in seconds.

The script is what a lent GPU's one 600-second call runs. Here `python3`, `nvidia-smi` and (once)
`tar` are fakes first on PATH, and BUDGET, SETUP_S, CAPS and GRACE shrink the budget to seconds.
The fake stages finish, or hang and honour SIGINT, or hang and ignore it (the backstop that was
seen to fail) until the SIGKILL. Checked: every stage's limits stay inside its cap and the budget,
each case a killed stage finished is in the packed results, and $OUT holds only the pack and the
log. The three sessions run side by side (they mostly sleep), so the file takes about 8 seconds.
"""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")

# python3 as gpu_session.sh calls it: pip, -c, pytest (tests, or the SD bench files with
# --benchmark-json, which then behave as a bench stage), fastdiff bench and tune.py. FAKE_PLAN maps a
# substring of a stage's output name to how it behaves: {"hang": "int"} runs until SIGINT, then
# exits as pytest does; {"hang": "ignore"} ignores SIGINT (the KeyboardInterrupt swallowed in a
# weakref finaliser) and writes a case every case_s seconds until the SIGKILL. Every call is
# recorded in FAKE_CALLS with its working folder and PYTHONUNBUFFERED.
FAKE_PYTHON = '''#!{python}
import json, os, signal, sys, time
from pathlib import Path

args = sys.argv[1:]
plan = json.loads(os.environ.get("FAKE_PLAN", "{{}}"))
with open(os.environ["FAKE_CALLS"], "a") as calls:
    calls.write(json.dumps({{"args": args, "cwd": os.getcwd(),
                             "unbuffered": os.environ.get("PYTHONUNBUFFERED")}}) + "\\n")


def option(name):
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name:
            return args[i + 1]


def how(name):
    return next((value for key, value in plan.items() if key in name), {{}})


if args[:2] == ["-m", "pip"]:
    if "-e" in args:
        time.sleep(plan.get("pip_s", 0))
    sys.exit(1 if plan.get("pip_fails") else 0)
if args[0] == "-c":
    sys.exit(1 if "xdist" in args[1] else print("torch fake, triton fake, fastdiff fake") or 0)
if args[:2] == ["-m", "pytest"] and option("--junitxml"):
    xml = Path(option("--junitxml"))
    if how(xml.stem).get("hang") == "int":
        def interrupted(signum, frame):
            print("fake pytest: KeyboardInterrupt")
            xml.write_text("<testsuite/>")
            sys.exit(2)
        signal.signal(signal.SIGINT, interrupted)
        while True:
            time.sleep(0.05)
    xml.write_text("<testsuite/>")
    sys.exit(print("1 passed") or 0)
out = Path(option("--json") or option("--benchmark-json"))  # fastdiff bench, tune.py, the SD bench files
stage = how(out.name)
if stage.get("hang") == "ignore":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
n = 0
while stage.get("hang") or n < 2:
    time.sleep(stage.get("case_s", 0.05))
    n += 1
    with open(out.with_suffix(".jsonl"), "a") as log:
        log.write(json.dumps({{"record": {{"op": "fake", "case": n}}}}) + "\\n")
        log.flush()
        os.fsync(log.fileno())
    print(f"case {{n}} finished")
out.write_text(json.dumps({{"benchmarks": n}}))
'''
FAKE_NVIDIA_SMI = "#!/bin/sh\necho 'NVIDIA H200'\n"
FAKE_TAR = """#!/bin/sh
# fails once, while $FAKE_TAR_FAILS_ONCE exists
if [ -e "$FAKE_TAR_FAILS_ONCE" ]; then rm -f "$FAKE_TAR_FAILS_ONCE"; echo "tar: fake failure" >&2; exit 2; fi
exec {tar} "$@"
"""
STAGED = re.compile(r"=== \[(\d+)s\] (.*) \(SIGINT at (\d+)s, SIGKILL at (\d+)s\)")


@dataclass
class Session:
    rc: int
    wall: float
    output: str
    log: str
    out: Path
    calls: list[dict]
    budget: int

    def staged(self) -> list[tuple[int, str, int, int]]:
        """(start, command, SIGINT at, SIGKILL at) of every stage that ran, from the session log."""
        return [(int(a), cmd, int(b), int(c)) for a, cmd, b, c in STAGED.findall(self.log)]

    def packed(self) -> dict[str, bytes]:
        with tarfile.open(self.out / "gpu-results.tgz") as tar:
            return {m.name.removeprefix("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def launch(tmp: Path, args: list[str], env: dict, plan: dict, tar_fails_once: bool = False):
    """Start gpu_session.sh from ``tmp`` (not the repository root) with the fakes first on PATH."""
    fakes = tmp / "bin"
    fakes.mkdir(parents=True)
    for name, text in (("python3", FAKE_PYTHON.format(python=sys.executable)), ("nvidia-smi", FAKE_NVIDIA_SMI),
                       ("tar", FAKE_TAR.format(tar=shutil.which("tar")))):
        (fakes / name).write_text(text)
        (fakes / name).chmod(0o755)
    if tar_fails_once:
        (tmp / "tar-fails-once").touch()
    full_env = {key: value for key, value in os.environ.items()
                if key not in ("PYTHONUNBUFFERED", "BUDGET", "SETUP_S", "CAPS", "GRACE")}
    full_env.update(PATH=f"{fakes}:{os.environ['PATH']}", OUT="out", GPU_SESSION_WORK=str(tmp / "work"),
                    FAKE_PLAN=json.dumps(plan), FAKE_CALLS=str(tmp / "calls.jsonl"),
                    FAKE_TAR_FAILS_ONCE=str(tmp / "tar-fails-once"), **env)
    process = subprocess.Popen(["bash", str(SCRIPT), *args], cwd=tmp, env=full_env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    return process, time.monotonic()


def finish(tmp: Path, process, started: float, budget: int, ended: float | None = None) -> Session:
    output, _ = process.communicate(timeout=120)
    wall = (ended or time.monotonic()) - started
    calls_file = tmp / "calls.jsonl"
    calls = [json.loads(line) for line in calls_file.read_text().splitlines()] if calls_file.exists() else []
    log = tmp / "out" / "gpu-session.log"
    return Session(process.returncode, wall, output, log.read_text() if log.exists() else "", tmp / "out", calls,
                   budget)


ALL = {"BUDGET": "27", "SETUP_S": "2", "CAPS": "3 3 4 3 3 3 3", "GRACE": "1"}  # 2 + 22 = 24 s, rest >= 3
ALL_CAPS = [3, 3, 4, 3, 3, 3, 3]


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """`all` (the GPU tests stopped by SIGINT, the end-to-end stage SIGKILLed, the first pack failing),
    a rerun of `quick` after a slow setup and one of `sd`, run at the same time."""
    plans = {
        "all": (["all"], ALL, {"gpu-tests": {"hang": "int"}, "e2e": {"hang": "ignore", "case_s": 0.3}}, True),
        "rerun": (["quick"], {"BUDGET": "7", "GRACE": "1"}, {"pip_s": 2, "quick": {"hang": "ignore"}}, False),
        "sd": (["sd"], {"BUDGET": "6", "GRACE": "1"}, {"sd-full": {"hang": "int"}}, False),
    }
    started, ended = {}, {}
    for name, (args, env, plan, tar_fails_once) in plans.items():
        tmp = tmp_path_factory.mktemp(name)
        started[name] = tmp, *launch(tmp, args, env, plan, tar_fails_once), int(env["BUDGET"])
    while len(ended) < len(started) and time.monotonic() - min(run[2] for run in started.values()) < 120:
        ended.update({name: time.monotonic() for name, run in started.items()
                      if name not in ended and run[1].poll() is not None})  # each one's own end
        time.sleep(0.02)
    return {name: finish(*run, ended.get(name)) for name, run in started.items()}


def test_all_keeps_every_stage_inside_its_cap_and_the_budget(sessions):
    s = sessions["all"]
    assert s.rc == 0, s.output
    assert ("budget 27s = setup 2 + tests 3 + ops-quick 3 + e2e 4 + overhead 3 + sd 3 + tune 3 + kernel-tests 3 "
            "+ rest 3") in s.log
    staged = s.staged()
    assert len(staged) == 8, s.log  # seven capped stages and the rest
    for (start, command, sigint, sigkill), cap in zip(staged, ALL_CAPS + [None]):
        assert start + sigkill <= s.budget and sigint == sigkill - 1, command
        if cap is not None:
            assert sigkill == cap, command
        budget_flag = re.search(r"--time-budget (\d+)", command)
        assert budget_flag is not None or "pytest" in command, command
        if budget_flag:  # no case starts in the last 2·GRACE seconds of its stage
            assert int(budget_flag[1]) == sigkill - 2, command
    rest_start, _, _, rest_kill = staged[-1]
    assert rest_kill >= s.budget - rest_start - 1  # the rest stage gets what is left
    assert s.wall <= s.budget + 1


def test_a_killed_stage_keeps_every_case_it_finished(sessions):
    s = sessions["all"]
    assert "gpu-tests: stopped by SIGINT at 2s" in s.log and "fake pytest: KeyboardInterrupt" in s.log
    assert "bench-e2e-B256-bf16: killed at 4s" in s.log  # SIGINT ignored: the SIGKILL ended it
    packed = s.packed()
    [cases] = [name for name in packed if name.endswith("-e2e-B256-bf16.jsonl")]
    records = [json.loads(line)["record"] for line in packed[cases].decode().splitlines()]
    finished = packed["bench-e2e-B256-bf16.log"].decode().count(" finished")
    assert finished >= 3 and len(records) >= finished  # each line is on disk before "finished" is printed
    assert [r["case"] for r in records] == list(range(1, len(records) + 1))
    assert "gpu-tests.xml" in packed  # written on SIGINT


def test_out_holds_the_pack_and_the_log_and_the_log_is_complete(sessions):
    for s in sessions.values():
        assert sorted(p.name for p in s.out.iterdir()) == ["gpu-results.tgz", "gpu-session.log"]  # <= 8 come back
        assert s.log.rstrip().splitlines()[-1].endswith("/gpu-results.tgz and this log")  # tee was waited for


def test_a_failed_pack_is_logged_and_the_session_goes_on(sessions):
    s = sessions["all"]
    assert "pack: tar failed; the previous pack stays: tar: fake failure" in s.log
    packed = s.packed()  # a later pack has every stage, the first one included
    assert "gpu-tests.xml" in packed and "kernel-tests.xml" in packed
    assert any(name.endswith("-rest.json") for name in packed) and any(name.startswith("tune-") for name in packed)


def test_the_script_runs_from_any_folder_with_unbuffered_python(sessions):
    for s in sessions.values():
        assert s.calls and all(call["cwd"] == str(ROOT) for call in s.calls)  # cd'd to the repository root
        assert all(call["unbuffered"] == "1" for call in s.calls)
        assert (s.out / "gpu-session.log").is_file()  # OUT=out: a folder of the caller's, not of the root
    assert not (ROOT / "out").exists()


def test_a_rerun_of_one_stage_is_capped_by_the_budget_left(sessions):
    s = sessions["rerun"]
    assert s.rc == 0, s.output
    [(start, command, sigint, sigkill)] = s.staged()
    assert start >= 2 and "fastdiff bench --quick" in command  # setup's 2 s came off the budget first
    assert start + sigkill <= s.budget and sigkill >= s.budget - start - 1
    assert "bench-quick: killed at" in s.log and s.wall <= s.budget + 1  # + the last pack, the log, the fakes' start


def test_gpu_tests_leave_out_the_bench_test_that_the_op_stage_repeats(sessions):
    [gpu_tests] = [c["args"] for c in sessions["all"].calls if c["args"][:2] == ["-m", "pytest"] and "gpu" in c["args"]]
    repeated = gpu_tests[gpu_tests.index("--deselect") + 1]
    path, name = repeated.split("::")
    tree = ast.parse((ROOT / path).read_text())
    [test] = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name]
    assert "pytest.mark.gpu" in [ast.unparse(d) for d in test.decorator_list]
    run = next(node for node in ast.walk(test) if isinstance(node, ast.Call) and ast.unparse(node.func) == "run_bench")
    flags = [arg.value for arg in run.args if isinstance(arg, ast.Constant)]
    ops_quick = next(c["args"] for c in sessions["all"].calls if any("ops-quick" in a for a in c["args"]))
    assert "--quick" in flags and "--no-compile" in flags and "--quick" in ops_quick and "--no-compile" in ops_quick
    ops = flags[flags.index("--ops") + 1:]
    ops = ops[:next((i for i, flag in enumerate(ops) if flag.startswith("-")), len(ops))]
    assert ops and set(ops) <= set(ops_quick[ops_quick.index("--ops") + 1:])  # every case it runs, stage 2 runs


def test_every_op_and_kernel_test_file_has_a_stage(sessions):
    """A new op (fastdiff.bench.OPS) runs in the quick op stage and in the rest of the full tier, and a
    new kernel's test file in the kernel-tests stage: registering one where the suite finds it is
    not enough for the GPU session to run it."""
    from fastdiff import bench

    calls = [c["args"] for c in sessions["all"].calls]

    def ops_of(stage: str) -> set[str]:
        [args] = [a for a in calls if any(arg.endswith(f"-{stage}.json") for arg in a)]
        ops = args[args.index("--ops") + 1:]
        return set(ops[:next((i for i, op in enumerate(ops) if op.startswith("-")), len(ops))])

    per_op = set(bench.OPS) - {"end_to_end", *bench.GPU_ONLY_OPS}  # end to end and step_overhead: own stages
    assert per_op <= ops_of("ops-quick") and per_op | {"end_to_end"} <= ops_of("rest")
    [kernel_tests] = [a for a in calls if a[:2] == ["-m", "pytest"] and any("kernel-tests" in arg for arg in a)]
    assert {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_kernel_*.py")} <= set(kernel_tests)


@pytest.mark.parametrize("args, env, message", [
    (["all"], {"BUDGET": "100"}, "setup + stage caps = 570s exceed BUDGET=100s (setup 40 + tests 80 + "),
    (["all"], {"CAPS": "1 2"}, "CAPS must give 7 caps (tests ops-quick e2e overhead sd tune kernel-tests)"),
    (["all"], {"BUDGET": "569"}, "setup + stage caps = 570s exceed BUDGET=569s"),
    (["all"], {"GRACE": "ten"}, "must be whole seconds; got 'ten'"),
    (["tests", "quik"], {}, "unknown stage quik"),
])
def test_a_bad_budget_or_stage_is_refused_before_setup(tmp_path, args, env, message):
    s = finish(tmp_path, *launch(tmp_path, args, env, {}), 0)
    assert s.rc == 2 and message in s.log, s.output
    assert s.calls == []  # no install ran: no device time spent


def test_the_default_budget_adds_up_and_a_broken_setup_stops_at_once(tmp_path):
    s = finish(tmp_path, *launch(tmp_path, ["all"], {}, {"pip_fails": True}), 570)
    assert s.rc == 1
    assert ("budget 570s = setup 40 + tests 80 + ops-quick 115 + e2e 175 + overhead 40 + sd 60 + tune 30 "
            "+ kernel-tests 30 + rest 0") in s.log
    assert not s.staged()  # no stage started after the failed install


def test_the_sd_stage_runs_the_sd_bench_files_as_fastdiff_bench_runs_its_files(sessions):
    """The SD bench files are not among fastdiff bench's --ops: `all` runs them with pytest, quick tier,
    without torch.compile, their JSON and per-case log in the pack; `sd` alone runs every provider."""
    calls = {name: [c["args"] for c in s.calls if c["args"][:2] == ["-m", "pytest"] and
                    any(a.startswith("--benchmark-json=") for a in c["args"])] for name, s in sessions.items()}
    [quick], [full] = calls["all"], calls["sd"]
    for args in (quick, full):
        files = [a for a in args if a.startswith("benchmarks/bench_sd_")]
        assert files == ["benchmarks/bench_sd_unet.py", "benchmarks/bench_sd_vae.py"]
        assert all((ROOT / f).is_file() for f in files) and "--benchmark-enable" in args
        [json_arg] = [a for a in args if a.startswith("--benchmark-json=")]
        [log_arg] = [a for a in args if a.startswith("--case-log=")]
        assert log_arg.removeprefix("--case-log=") == json_arg.removeprefix("--benchmark-json=")[:-5] + ".jsonl"
    assert "--quick" in quick and quick[quick.index("-k") + 1] == "not diffusers_compile"
    assert "--quick" not in full and "-k" not in full
    assert any(name.endswith("-sd-quick.jsonl") for name in sessions["all"].packed())
    s = sessions["sd"]
    assert s.rc == 0, s.output
    [(start, command, sigint, sigkill)] = s.staged()
    assert "bench-sd-full: stopped by SIGINT" in s.log and start + sigkill <= s.budget
    assert int(re.search(r"--time-budget (\d+)", command)[1]) == sigkill - 2


def test_every_bench_file_has_a_stage(sessions):
    """A bench file is run by `fastdiff bench --ops` (its op in fastdiff.bench.OPS) or by the SD stage's
    pytest call: none is left out of `all`."""
    from fastdiff import bench

    run = {a for c in sessions["all"].calls for a in c["args"] if a.startswith("benchmarks/bench_")}
    for path in (ROOT / "benchmarks").glob("bench_*.py"):
        assert path.stem.removeprefix("bench_") in bench.OPS or f"benchmarks/{path.name}" in run, path.name
