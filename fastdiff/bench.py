"""``fastdiff bench``: run the benchmark suite, print speed-ups and % of ceiling, write a report.

The suite is the ``benchmarks/`` folder of a checkout of the repository (pytest-benchmark; it does
not ship in the wheel). This command runs it in-process with ``pytest.main``, reads the JSON that
pytest-benchmark writes, prints one Markdown table per op, and writes next to the JSON a Markdown
report (``.md``) and a bar chart of the speed-ups (``.png``).

Reading the tables:
* ``ms <provider>``: the median time of one call (CUDA events on a GPU; see benchmarks/harness.py);
* ``<S> vs <provider>``: that provider's time over S's, so > 1 means S is faster. S is ``fastdiff``,
  or ``reference`` where fastdiff did not run (no GPU);
* ``% of ceiling``: S's throughput against the ceiling that bounds the case, both measured in the
  same run: the device copy bandwidth for a memory-bound case, the matmul rate of its precision for
  a compute-bound one (attention at scale, the U-Net).

``step_overhead`` has its own table (``overhead_table``): per DDIM step, a sampling run with
``cuda_graph=True`` against the U-Net's own graph replayed as many times, and the share of the step
that is not the U-Net (the goal: under 2%).

Besides the JSON the suite writes a per-case log (``<json stem>.jsonl``, benchmarks/conftest.py's
``--case-log``): one line per case as it finishes. A run killed before pytest-benchmark wrote its
JSON (it does so only when the session ends) still has that log, and the report is built from it.

Without a CUDA GPU the suite runs its CPU cases only: small shapes, fp32, the reference against
PyTorch's own ops and torch.compile. The Triton provider is skipped there (under Triton's CPU
interpreter its timings would mean nothing), and so is everything that needs CUDA graphs: the
fastdiff_graph providers and the ops in GPU_ONLY_OPS.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

OPS = ("q_sample", "ddim_step", "ddpm_step", "multistep_step", "attention", "group_norm", "end_to_end", "step_overhead")
GPU_ONLY_OPS = ("step_overhead",)  # CUDA graphs: their CPU case is skipped, so a CPU run has no record
PROVIDERS = ("fastdiff", "fastdiff_graph", "fastdiff_graph_cl", "reference", "torch_peer", "diffusers",
             "diffusers_compile", "diffusers_fastdiff")
SUITE = Path(__file__).resolve().parents[1] / "benchmarks"  # in a checkout: <repo>/benchmarks
PYTEST_INTERRUPTED = 2  # pytest's exit code after Ctrl-C (or SIGINT from `timeout -s INT`)
PYTEST_NO_TESTS = 5  # pytest's exit code when nothing was collected
# module -> its pip name: what a run needs (the suite runs under pytest-benchmark) and what the
# report needs (the plot), checked before any case runs rather than after the whole suite did
RUN_NEEDS = {"pytest": "pytest", "pytest_benchmark": "pytest-benchmark"}
REPORT_NEEDS = {"matplotlib": "matplotlib"}
OVERHEAD_NOTE = ("Per DDIM step: a sampling run with `cuda_graph=True`, and the U-Net alone in its own CUDA graph "
                 "replayed as many times; % overhead = (step − U-Net) / step, everything a step does besides the "
                 "U-Net (goal: under 2%).")


# ----------------------------------------------------------------------------- results
@dataclass
class Results:
    """What a suite run left in its JSON: one record (a benchmark's extra_info) per timed case."""

    records: list[dict]
    session: dict = field(default_factory=dict)  # the suite's "fastdiff" section: env, ceilings, skips
    commit: dict = field(default_factory=dict)
    when: str = ""
    partial: str = ""  # why these may not be all the run's cases (read from the per-case log of a killed run)

    def ops(self) -> list[str]:
        seen = {r["op"] for r in self.records}
        return [op for op in OPS if op in seen] + sorted(seen - set(OPS))


def case_log_path(json_path: str | Path) -> Path:
    """The per-case log written beside a run's JSON: results/bench-....jsonl."""
    return Path(json_path).with_suffix(".jsonl")


def load_results(path: str | Path) -> Results:
    """Read a pytest-benchmark JSON written by the suite, or the per-case log (``.jsonl``) of a run.
    A JSON that is missing or empty, when its log has cases, is a killed run: the log is read."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return load_case_log(path)
    if not path.is_file() or not path.read_text().strip():
        if case_log_path(path).is_file():
            return load_case_log(case_log_path(path))
        raise ValueError(f"no benchmark results in {path}: no case ran (every one skipped, failed or deselected)")
    data = json.loads(path.read_text())
    records = [b["extra_info"] for b in data.get("benchmarks", []) if "op" in b.get("extra_info", {})]
    return Results(records, data.get("fastdiff", {}), data.get("commit_info") or {}, data.get("datetime", ""))


def load_case_log(path: str | Path) -> Results:
    """Read the suite's per-case log: JSON lines {"session": {...}} (merged in order), {"record":
    extra_info} per finished case, {"skipped": {"test", "reason"}} per skip. A line that does not
    parse is the one a SIGKILL cut short, and is left out."""
    path = Path(path)
    records, session, skipped, when = [], {}, [], ""
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        session.update(entry.get("session", {}))
        when = entry.get("when", when)
        if "record" in entry:
            records.append(entry["record"])
        if "skipped" in entry:
            skipped.append(entry["skipped"])
    if not records:
        raise ValueError(f"no benchmark results in {path}: no case finished (every one skipped, failed or "
                         "deselected, or the run ended before the first)")
    partial = (f"from the per-case log {path.name}: the {len(records)} case(s) that finished (the run ended "
               "before pytest-benchmark wrote its JSON: killed?)")
    return Results(records, {**session, "skipped": skipped}, {}, when, partial)


def subject(records: list[dict]) -> str:
    """The provider speed-ups are measured for: fastdiff, or the reference where fastdiff did not run."""
    return "fastdiff" if any(r["provider"] == "fastdiff" for r in records) else "reference"


def providers_of(records: list[dict]) -> list[str]:
    seen = {r["provider"] for r in records}
    return [p for p in PROVIDERS if p in seen] + sorted(seen - set(PROVIDERS))


def cases_of(records: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    """(shape, dtype) -> provider -> record, in the order the cases ran."""
    cases: dict[tuple[str, str], dict[str, dict]] = {}
    for r in records:
        cases.setdefault((r["shape"], r["dtype"]), {})[r["provider"]] = r
    return cases


def speedup(by_provider: dict[str, dict], subject_name: str, other: str) -> float | None:
    """other's median time over the subject's (> 1: the subject is faster); None if either is missing."""
    if subject_name not in by_provider or other not in by_provider:
        return None
    return by_provider[other]["median_ms"] / by_provider[subject_name]["median_ms"]


# ----------------------------------------------------------------------------- tables
def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}" if value < 10 else f"{value:.1f}"


def ceiling_cell(record: dict | None) -> str:
    """'71% copy' or '43% bf16 mm': the record's share of the ceiling that bounds it."""
    if record is None:
        return "–"
    if record.get("bound") == "compute" and record.get("pct_matmul_peak") is not None:
        return f"{record['pct_matmul_peak']:.0f}% {record['matmul_ceiling']} mm"
    if record.get("pct_copy_bw") is not None:
        return f"{record['pct_copy_bw']:.0f}% copy"
    return "–"


def op_table(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one op's table (see the module docstring)."""
    main, providers = subject(records), providers_of(records)
    others = [p for p in providers if p != main]
    header = ["shape", "dtype", *(f"ms {p}" for p in providers), *(f"{main} vs {p}" for p in others),
              f"{main} % of ceiling"]
    rows = []
    for (shape, dtype), by_provider in cases_of(records).items():
        sampler = next(iter(by_provider.values())).get("sampler")  # end to end: "DDIM-50"
        times = [_ms(by_provider[p]["median_ms"]) if p in by_provider else "–" for p in providers]
        ratios = [speedup(by_provider, main, p) for p in others]
        cells = [*times, *(f"{x:.2f}×" if x is not None else "–" for x in ratios),
                 ceiling_cell(by_provider.get(main))]
        rows.append([f"{shape} {sampler}" if sampler else shape, dtype, *cells])
    return header, rows


def overhead_table(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """step_overhead: per step, the graphed sampling run and the U-Net's own graph, and the overhead."""
    header = ["shape", "dtype", "ms per step", "ms U-Net per step", "% overhead"]
    rows = [[f"{r['shape']} {r['sampler']}", r["dtype"], _ms(r["step_ms"]), _ms(r["unet_ms_per_step"]),
             f"{r['pct_overhead']:.2f}%"] for r in records]
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---", "---"] + ["---:"] * (len(header) - 2)  # names left, numbers right
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|",
                      *("| " + " | ".join(row) + " |" for row in rows)])


def tables(results: Results) -> str:
    """Every op's table under a heading, ready for a terminal or a Markdown file."""
    parts = []
    for op in results.ops():
        records = [r for r in results.records if r["op"] == op]
        if op == "step_overhead":
            parts.append(f"### {op}\n\n{OVERHEAD_NOTE}\n\n{markdown_table(*overhead_table(records))}")
        else:
            parts.append(f"### {op}\n\n{markdown_table(*op_table(records))}")
    return "\n\n".join(parts)


def ceilings_line(session: dict) -> str:
    ceilings = session.get("ceilings")
    if not ceilings:
        return "ceilings: not measured (no case ran)"
    rates = ", ".join(f"{name} {value:.3g}" for name, value in ceilings["matmul_tflops"].items())
    return f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s (read + write); matmul TFLOP/s: {rates}"


def device_line(session: dict) -> str:
    if session.get("gpu_name"):
        return f"device: {session['gpu_name']} (CUDA {session.get('cuda')})"
    return f"device: CPU only ({session.get('cpu_name', 'unknown CPU')}): no fastdiff (Triton) timings"


# ----------------------------------------------------------------------------- report
def _span(records: list[dict], key: str, unit: str) -> str | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return f"{min(values):.0f}–{max(values):.0f} {unit}" if values else None


def telemetry_line(records: list[dict]) -> str:
    """The range of the NVML samples taken after each case, or why there are none."""
    spans = [_span(records, "sm_clock_mhz", "MHz SM clock"), _span(records, "power_w", "W"),
             _span(records, "temperature_c", "°C"), _span(records, "memory_used_mb", "MB used")]
    if any(spans):
        drivers = sorted({r["driver"] for r in records if r.get("driver")})
        return ", ".join(s for s in spans if s) + (f" (driver {', '.join(drivers)})" if drivers else "")
    reasons = sorted({r.get("nvml_error") or "no samples" for r in records})
    return "none: " + "; ".join(reasons)


def skipped_lines(session: dict) -> list[str]:
    counts: dict[str, int] = {}
    for skip in session.get("skipped", []):
        counts[skip["reason"]] = counts.get(skip["reason"], 0) + 1
    return [f"- {reason} ({n} case{'s' * (n > 1)})" for reason, n in counts.items()]


def machine_rows(results: Results) -> list[tuple[str, str]]:
    """(label, value) rows of the report's header table: device, run, versions, ceilings, telemetry."""
    s = results.session
    device = f"{s['gpu_name']} (CUDA {s.get('cuda')})" if s.get("gpu_name") else \
        f"no GPU: CPU only ({s.get('cpu_name', 'unknown')}), no fastdiff (Triton) timings"
    run = ("quick" if s.get("quick") else "full") if s.get("gpu_name") else "CPU cases"
    commit = (results.commit.get("id") or "?")[:10] + (" (dirty)" if results.commit.get("dirty") else "")
    versions = ", ".join(f"{k} {v}" for k, v in s.get("versions", {}).items() if v)
    rows = [("device", device),
            ("run", f"{run}; torch.compile providers {'on' if s.get('compile', True) else 'off'}; commit {commit}"),
            ("versions", f"{versions} (Python {s.get('python', '?')})"),
            ("ceilings", ceilings_line(s).removeprefix("ceilings: ")),
            ("telemetry", telemetry_line(results.records))]
    return rows + ([("results", results.partial)] if results.partial else [])


def report_markdown(results: Results, plot_name: str) -> str:
    s = results.session
    title = s.get("gpu_name") or f"CPU ({s.get('cpu_name', 'unknown')})"
    lines = [f"# fastdiff benchmarks: {title}, {results.when[:10]}", "",
             "Median time per call; speed-up = the other provider's time / the subject's (> 1: the subject "
             "is faster); % of ceiling = the subject's GB/s or TFLOP/s against the copy bandwidth or the "
             "matmul rate measured in the same run, whichever bounds the case (`bound` in the JSON).", "",
             "| | |", "|---|---|", *(f"| {label} | {value} |" for label, value in machine_rows(results)), "",
             "## Results", "", tables(results), "", f"![speed-ups]({plot_name})", ""]
    skipped = skipped_lines(s)
    if skipped:
        lines += ["## Skipped", "", *skipped, ""]
    lines += ["## Method", "",
              "- Time: one untimed call, warm-up, then the median of per-call CUDA events (on a CPU, "
              "`time.perf_counter`). A 256 MB buffer is zeroed before each timed call of an op, so its "
              "inputs come from DRAM, not L2. Details: `benchmarks/harness.py`.",
              "- Bytes and FLOPs per case are counted before timing (`benchmarks/costs.py`): the fewest "
              "bytes (each input read once, each output written once) and the formula's FLOPs "
              "(attention 4·B·H·Nq·Nk·D; the U-Net counted by torch's FLOP counter).",
              "- The JSON next to this file has every number, the NVML telemetry of each case and "
              "pytest-benchmark's own host-clock rounds. Reproduce: `fastdiff bench` (`--quick`, `--ops ...`).", ""]
    if "step_overhead" in results.ops():
        lines.insert(-2, f"- step_overhead (`benchmarks/bench_step_overhead.py`). {OVERHEAD_NOTE}")
    return "\n".join(lines)


def plot_speedups(results: Results, path: Path) -> Path:
    """A horizontal bar chart per op: the subject's speed-up over each other provider, per case (log x)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = []
    for op in results.ops():
        records = [r for r in results.records if r["op"] == op]
        main = subject(records)
        others = [p for p in providers_of(records) if p != main]
        cases = cases_of(records)
        bars = {p: [speedup(by, main, p) for by in cases.values()] for p in others}
        if any(x is not None for xs in bars.values() for x in xs):
            panels.append((op, main, [f"{shape} {dtype}" for shape, dtype in cases], bars))

    heights = [max(1.0, 0.22 * len(labels) * len(bars)) for _, _, labels, bars in panels] or [1.0]
    fig, axes = plt.subplots(len(heights), 1, figsize=(9, sum(heights) + 0.6 * len(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no speed-ups to plot: each case ran one provider", ha="center", va="center")
        axes[0][0].set_axis_off()
    for ax, (op, main, labels, bars) in zip((row[0] for row in axes), panels):
        _bar_panel(ax, op, main, labels, bars)
    fig.tight_layout()
    from .io import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return Path(path)


def _bar_panel(ax, op: str, main: str, labels: list[str], bars: dict[str, list]) -> None:
    """Bars grow from 1× (equal speed): right when ``main`` is faster, left when it is slower."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    height = 0.8 / len(bars)
    values = [x for xs in bars.values() for x in xs if x is not None]
    for i, (provider, xs) in enumerate(bars.items()):
        ys = [row + (i - (len(bars) - 1) / 2) * height for row in range(len(labels))]
        widths = [x - 1 if x is not None else math.nan for x in xs]
        ax.barh(ys, widths, left=1, height=height, label=f"vs {provider}")
        for y, x in zip(ys, xs):
            if x is not None:
                ax.annotate(f"{x:.2f}×", (x, y), xytext=(3 if x >= 1 else -3, 0), textcoords="offset points",
                            ha="left" if x >= 1 else "right", va="center", fontsize=6)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    low, high = min(values + [1.0]), max(values + [1.0])
    ax.set_xlim(low / 2, high * 2)  # room for the labels
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_title(f"{op}: {main} speed-up (> 1: {main} faster)", fontsize=9)
    ax.legend(fontsize=7, loc="best")


def write_report(results: Results, json_path: Path) -> tuple[Path, Path]:
    """``<json>.md`` and ``<json>.png`` next to the JSON."""
    from .io import atomic_write

    json_path = Path(json_path)
    png = plot_speedups(results, json_path.with_suffix(".png"))
    md = json_path.with_suffix(".md")
    text = report_markdown(results, png.name)
    atomic_write(md, lambda tmp: Path(tmp).write_text(text))
    return md, png


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``fastdiff bench``."""
    parser.add_argument("--quick", action="store_true",
                        help="GPU: a few shapes per op and 10 sampling steps instead of 50 (minutes, not tens "
                             "of minutes)")
    parser.add_argument("--ops", nargs="+", default=None, metavar="OP",
                        help=f"run only these ops (space or comma separated): {', '.join(OPS)} (default: all)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="where pytest-benchmark writes the results; the report (.md) and plot (.png) go next "
                             "to it (default: benchmarks/results/bench-DATE-DEVICE[-quick].json)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile providers (compiling is most of a quick run's time)")
    parser.add_argument("-k", dest="keyword", default=None, metavar="EXPR",
                        help="run only the cases whose pytest id matches EXPR (pytest's -k), e.g. "
                             "-k 'B256 and bf16'")
    parser.add_argument("--time-budget", type=float, default=None, metavar="S",
                        help="start no case later than S seconds into the run; the cases left are skipped, with "
                             "that reason, and the report covers those that ran")
    parser.add_argument("--from-json", type=Path, default=None, metavar="PATH",
                        help="run nothing: print the tables and rewrite the report of an earlier run's JSON")
    parser.add_argument("--suite", type=Path, default=SUITE, metavar="DIR",
                        help="the benchmarks/ folder to run (default: the one in this checkout)")


def parse_ops(values: list[str] | None) -> list[str]:
    """--ops values (space and/or comma separated) -> op names, checked against OPS."""
    if not values:
        return list(OPS)
    ops = [name for value in values for name in value.split(",") if name]
    unknown = [name for name in ops if name not in OPS]
    if unknown or not ops:
        raise ValueError(f"--ops must name ops among {', '.join(OPS)}; got {', '.join(map(repr, unknown or values))}")
    return list(dict.fromkeys(ops))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_json_path(results_dir: Path, device: str, quick: bool, today: datetime.date | None = None) -> Path:
    """benchmarks/results/bench-2026-01-31-nvidia-h100-80gb-hbm3[-quick].json, with -2, -3, ... rather than
    overwriting an earlier run of the same day."""
    stem = f"bench-{(today or datetime.date.today()).isoformat()}-{_slug(device)}" + ("-quick" if quick else "")
    path, n = results_dir / f"{stem}.json", 2
    while path.exists():
        path, n = results_dir / f"{stem}-{n}.json", n + 1
    return path


def require(modules: dict[str, str], purpose: str) -> None:
    """ImportError naming what is missing and the pip command, unless every module imports."""
    missing = []
    for module, package in modules.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise ImportError(f"fastdiff bench needs {' and '.join(missing)} {purpose}: pip install {' '.join(missing)} "
                          "(or pip install -e '.[bench]')")


def find_suite(suite: Path) -> Path:
    """The benchmarks folder, or a ValueError saying where it was looked for and how to get it."""
    if suite.is_dir() and (suite / "conftest.py").is_file() and any(suite.glob("bench_*.py")):
        return suite
    raise ValueError(f"the benchmark suite is not at {suite}. It ships in the repository, not the wheel: run "
                     "`fastdiff bench` from a checkout installed with `pip install -e '.[bench]'`, or pass --suite DIR")


def pytest_arguments(suite: Path, ops: list[str], json_path: Path, quick: bool, no_compile: bool,
                     keyword: str | None = None, time_budget: float | None = None) -> list[str]:
    """pytest.main's arguments: the bench files of ``ops``, benchmarks enabled (pyproject's addopts
    disables them for the test suite), the JSON where we want it, no cache folder written."""
    files = [str(suite / f"bench_{op}.py") for op in ops]
    return [*files, "-q", "-p", "no:cacheprovider", "--benchmark-enable", f"--benchmark-json={json_path}",
            f"--case-log={case_log_path(json_path)}", "--benchmark-columns=median,rounds", "--benchmark-sort=fullname",
            *(["--quick"] if quick else []), *(["--no-compile"] if no_compile else []),
            *(["-k", keyword] if keyword else []), *([f"--time-budget={time_budget:g}"] if time_budget else [])]


def run_suite(args: argparse.Namespace) -> tuple[Path, int]:
    """Run the suite in this process; returns the JSON path and pytest's exit code."""
    import pytest
    import torch

    suite, ops = find_suite(args.suite), parse_ops(args.ops)
    if args.time_budget is not None and not args.time_budget > 0:
        raise ValueError(f"--time-budget must be a positive number of seconds, got {args.time_budget:g}")
    on_gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if on_gpu else "cpu"
    json_path = args.json or default_json_path(suite / "results", device, args.quick and on_gpu)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (json_path, case_log_path(json_path)):  # an earlier run's file must not pass for this run's
        stale.unlink(missing_ok=True)
    if not on_gpu:
        print("fastdiff bench: no CUDA GPU. Running the CPU cases only (small shapes, fp32: the reference "
              "against PyTorch's own ops and torch.compile); the fastdiff (Triton) provider is skipped, since "
              "its timings under Triton's CPU interpreter would mean nothing; so is what needs CUDA graphs "
              f"(the fastdiff_graph providers, {', '.join(GPU_ONLY_OPS)}).", flush=True)
    print(f"fastdiff bench: {', '.join(ops)} on {device}{' (quick)' if args.quick and on_gpu else ''} -> {json_path}",
          flush=True)
    code = pytest.main(pytest_arguments(suite, ops, json_path, args.quick, args.no_compile, args.keyword,
                                        args.time_budget))
    return json_path, int(code)


def has_results(json_path: Path) -> bool:
    """Whether a run left results: its JSON, or a finished case in its per-case log."""
    if json_path.is_file() and json_path.stat().st_size:
        return True
    try:
        return bool(load_case_log(case_log_path(json_path)).records)
    except (OSError, ValueError):
        return False


def run(args: argparse.Namespace) -> int:
    """``fastdiff bench``: run (or, with --from-json, reread) the suite; print tables; write the report."""
    if args.from_json is not None:
        require(REPORT_NEEDS, "to write the report's plot")
        json_path, code = args.from_json, 0
    else:
        require({**RUN_NEEDS, **REPORT_NEEDS}, "to run the suite and plot its report")
        json_path, code = run_suite(args)
        if code == PYTEST_INTERRUPTED and has_results(json_path):
            # Ctrl-C, SIGINT or SIGTERM: the cases that finished are in the JSON (or at least the per-case log)
            print("fastdiff bench: interrupted; the report covers the cases that finished", flush=True)
        elif code not in (0, 1):  # 1: some case failed, the others still have results
            raise RuntimeError(f"the benchmark run stopped (pytest exit code {code}"
                               f"{': no case collected' if code == PYTEST_NO_TESTS else ''}); see its output above")
    results = load_results(json_path)
    if results.partial:
        print(f"fastdiff bench: the report is built {results.partial}", flush=True)
    md, png = write_report(results, json_path)
    print(f"\nfastdiff bench: medians per call (CUDA events on a GPU; pytest-benchmark's table above, if any, "
          f"is its own few host-clock rounds)\n{device_line(results.session)}\n{ceilings_line(results.session)}\n"
          f"speed-up = other time / {subject(results.records)} time; > 1: faster\n\n{tables(results)}\n")
    print(f"results: {json_path}\nreport:  {md}\nplot:    {png}")
    if code == 1:
        print("fastdiff bench: some cases failed (see pytest's output above); the report covers the others")
    return code
