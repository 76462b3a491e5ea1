"""``fastdiff compare``: the fast path (Triton kernels) against the reference (plain PyTorch), step by step.

Both paths sample the same model from the same seed, once under ``use_backend("triton")`` and once
under ``use_backend("torch")``; the pipeline's ``callback`` hands over x_t (``prev_sample``) and the
predicted x0 (``pred_original_sample``) after every step. Errors are measured after each step of
the two *trajectories*, so they include what earlier steps carried forward: this is the error a
user of the fast path sees, not one kernel's error in isolation.

Error measures, per tensor, a = fast, b = reference, computed in float64 on the CPU:

* ``max_abs  = max |a − b|`` and ``mean_abs = mean |a − b|``;
* ``max_rel  = max |a − b| / max |b|``: relative to the reference's scale, not element by
  element, so elements near zero cannot blow it up. (0 when both are all zero, inf when only
  b is.) A NaN anywhere in a or b makes all three NaN, which is reported, never hidden.

The final images (in [0, 1]) are compared the same way, plus the number of 8-bit pixel values
that differ once each image is quantised as a PNG would be.

Timing. The recording runs double as warm-up (Triton compiles each kernel on its first call);
then each path runs ``repeats`` more times without the callback, alternating, each timed between
two ``torch.cuda.synchronize`` calls on CUDA, and the median counts. Under Triton's CPU
interpreter the "fast" path is an emulation, orders of magnitude slower than the reference: its
speed-up is reported as measured and says nothing about GPU speed.

Memory: the reference trajectory is kept on the CPU, 2 × steps × batch × C × H × W values in the
model's dtype (DDPM-1000, batch 16, 3×64×64, float32: 1.6 GB).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import backend, ops, validation
from .backend import use_backend
from .schedulers import SHORT_NAMES
from .io import write_json

FAST, REFERENCE = "triton", "torch"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FULL_TABLE_STEPS = 20  # longer runs print a sample of the steps plus the worst one
SAMPLED_ROWS = 10


# ----------------------------------------------------------------------------- error measures
@dataclass
class ErrorStats:
    max_abs: float
    mean_abs: float
    max_rel: float  # max |a − b| / max |b|


def error_stats(fast: torch.Tensor, reference: torch.Tensor) -> ErrorStats:
    """Max and mean |fast − reference| and the scale-relative max error (see the module docstring)."""
    if fast.shape != reference.shape:
        raise ValueError(f"fast has shape {tuple(fast.shape)}, reference {tuple(reference.shape)}")
    a, b = fast.detach().to("cpu", torch.float64), reference.detach().to("cpu", torch.float64)
    diff = (a - b).abs()
    max_abs, mean_abs = diff.max().item(), diff.mean().item()
    scale = b.abs().max().item()
    if math.isnan(max_abs) or math.isnan(scale):
        return ErrorStats(math.nan, math.nan, math.nan)
    if scale == 0:
        return ErrorStats(max_abs, mean_abs, 0.0 if max_abs == 0 else math.inf)
    return ErrorStats(max_abs, mean_abs, max_abs / scale)


@dataclass
class StepError:
    step: int  # index into the schedule, 0 = the noisiest
    timestep: int
    x_t: ErrorStats  # the sample after this step (prev_sample)
    x0: ErrorStats  # the step's prediction of the clean image (pred_original_sample)


def _badness(value: float) -> float:
    return math.inf if math.isnan(value) else value


@dataclass
class ComparisonResult:
    scheduler: str
    num_inference_steps: int
    batch_size: int
    seed: int
    eta: float
    guidance_scale: float | None
    class_labels: list[int] | None
    device: str
    device_name: str
    dtype: str
    interpreter: bool  # the fast path ran through Triton's CPU interpreter
    steps: list[StepError]
    image: ErrorStats  # final images in [0, 1]
    pixels_changed: int  # 8-bit pixel values that differ
    pixels_total: int
    fast_seconds: list[float]  # one per timed repeat
    reference_seconds: list[float]
    fast_backend: str = FAST
    reference_backend: str = REFERENCE
    fast_images: torch.Tensor | None = field(default=None, repr=False, compare=False)
    reference_images: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def fast_time(self) -> float | None:
        return statistics.median(self.fast_seconds) if self.fast_seconds else None

    @property
    def reference_time(self) -> float | None:
        return statistics.median(self.reference_seconds) if self.reference_seconds else None

    @property
    def speedup(self) -> float | None:
        """Reference time / fast time (medians); None when nothing was timed."""
        if not self.fast_seconds or not self.reference_seconds:
            return None
        return self.reference_time / self.fast_time

    @property
    def worst_step(self) -> StepError:
        """The step whose x_t is furthest from the reference (relative; NaN counts as worst)."""
        return max(self.steps, key=lambda s: _badness(s.x_t.max_rel))

    def to_dict(self) -> dict:
        """Everything but the images, JSON-ready: non-finite floats become "nan" / "inf" strings
        (strict JSON has no NaN), and the derived medians and speed-up are included."""
        data = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.repr}  # not the images
        data |= {"fast_time": self.fast_time, "reference_time": self.reference_time, "speedup": self.speedup,
                 "worst_step": self.worst_step.step}
        return _json_safe(data)


def _plain(value):
    """Dataclasses (also inside lists) as dicts."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# ----------------------------------------------------------------------------- running both paths
class _Trajectory:
    """The reference run's (x_t, x0) after each step, kept on the CPU until the fast run compares."""

    def __init__(self):
        self.timesteps: list[int] = []
        self.samples: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.errors: list[StepError] = []

    def record(self, index: int, t: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        self.timesteps.append(t)
        self.samples.append((x_t.detach().to("cpu", copy=True), x0.detach().to("cpu", copy=True)))

    def compare(self, index: int, t: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        if index >= len(self.timesteps) or self.timesteps[index] != t:
            raise RuntimeError(f"the fast run's step {index} (t={t}) has no twin in the reference run "
                               f"(timesteps {self.timesteps})")
        ref_x_t, ref_x0 = self.samples[index]
        self.samples[index] = None  # compared: free it
        self.errors.append(StepError(index, t, error_stats(x_t, ref_x_t), error_stats(x0, ref_x0)))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(sample, backend_name: str, device: torch.device) -> float:
    """Seconds for one full sampling run; on CUDA, queued work is waited for on both sides."""
    _synchronize(device)
    start = time.perf_counter()
    sample(backend_name)
    _synchronize(device)
    return time.perf_counter() - start


def _with_scheduler(pipe, scheduler: str):
    """A pipeline sharing ``pipe``'s U-Net with a ``scheduler`` built from its scheduler config
    (the caller's pipeline is left as it was)."""
    from .pipeline import DiffusionPipeline
    from .schedulers import swapped

    if not isinstance(pipe, DiffusionPipeline):
        raise TypeError(f"pipe must be a fastdiff.DiffusionPipeline, got {type(pipe).__name__}")
    return DiffusionPipeline(pipe.unet, swapped(pipe.scheduler, scheduler), guidance_scale=pipe.guidance_scale)


def _check_fast_path_runs(device: torch.device) -> None:
    """Fail before the (possibly long) reference run when the fast path cannot run here."""
    with use_backend(FAST):
        backend.resolve(torch.empty(0, device=device))  # raises, saying why (no CUDA, no interpreter)
    available = ops.kernel_ops()
    missing = [name for name in ops.OP_NAMES if name not in available]
    if missing:
        raise RuntimeError(f"the fast path has no Triton kernel for {', '.join(missing)} in this install")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()


def compare(pipe, *, num_inference_steps: int, batch_size: int = 1, seed: int = 0, class_labels=None,
            guidance_scale: float | None = None, eta: float = 0.0, scheduler: str = "ddim", repeats: int = 1,
            progress: bool = False) -> ComparisonResult:
    """Sample ``pipe`` on the fast and the reference path from one seed; measure how far apart they are.

    scheduler: a short name ('ddim', 'ddpm', ...: schedulers.SHORT_NAMES), built from the pipeline's scheduler config (``pipe`` is not
    changed). repeats: timed runs of each path after the two recording runs (0: no timing). The
    other arguments are those of ``DiffusionPipeline.__call__``; the errors are defined in this
    module's docstring. Runs under ``torch.no_grad`` (the pipeline's), so the kernels do run.
    """
    from .images import to_uint8

    validation.integer("num_inference_steps", num_inference_steps, minimum=1)
    validation.integer("batch_size", batch_size, minimum=1)
    validation.integer("repeats", repeats, minimum=0)
    validation.seed("seed", seed)
    pipe = _with_scheduler(pipe, scheduler)
    device = pipe.device
    _check_fast_path_runs(device)

    def sample(backend_name: str, callback=None) -> torch.Tensor:
        with use_backend(backend_name):
            return pipe(batch_size=batch_size, num_inference_steps=num_inference_steps, class_labels=class_labels,
                        generator=torch.Generator().manual_seed(seed), guidance_scale=guidance_scale, eta=eta,
                        progress=progress, callback=callback).images

    steps, fast, reference = _record_both(sample)
    fast_seconds, reference_seconds = _time_both(sample, repeats, device)
    guided = class_labels is not None
    return ComparisonResult(
        scheduler=scheduler, num_inference_steps=num_inference_steps, batch_size=batch_size, seed=seed, eta=eta,
        guidance_scale=float(pipe.guidance_scale if guidance_scale is None else guidance_scale) if guided else None,
        class_labels=torch.as_tensor(class_labels).flatten().tolist() if guided else None,
        device=str(device), device_name=_device_name(device), dtype=str(pipe.dtype).removeprefix("torch."),
        interpreter=device.type != "cuda", steps=steps, image=error_stats(fast, reference),
        pixels_changed=int((to_uint8(fast) != to_uint8(reference)).sum()), pixels_total=fast.numel(),
        fast_seconds=fast_seconds, reference_seconds=reference_seconds, fast_images=fast, reference_images=reference)


def _record_both(sample) -> tuple[list[StepError], torch.Tensor, torch.Tensor]:
    """Per-step errors and both final images: the reference run records, the fast run compares."""
    trajectory = _Trajectory()
    reference = sample(REFERENCE, trajectory.record).cpu()
    fast = sample(FAST, trajectory.compare).cpu()  # also the warm-up: Triton compiles each kernel here
    if len(trajectory.errors) != len(trajectory.timesteps):
        raise RuntimeError(f"the fast run took {len(trajectory.errors)} steps, the reference "
                           f"{len(trajectory.timesteps)}")
    return trajectory.errors, fast, reference


def _time_both(sample, repeats: int, device: torch.device) -> tuple[list[float], list[float]]:
    """``repeats`` timed runs of each path, alternating, so drift (clock boost, heat, other load)
    hits both alike."""
    fast_seconds, reference_seconds = [], []
    for _ in range(repeats):
        fast_seconds.append(_timed(sample, FAST, device))
        reference_seconds.append(_timed(sample, REFERENCE, device))
    return fast_seconds, reference_seconds


# ----------------------------------------------------------------------------- reporting
def table_rows(result: ComparisonResult, max_rows: int = FULL_TABLE_STEPS) -> list[StepError]:
    """Every step when there are at most ``max_rows``; else ~``SAMPLED_ROWS`` evenly spaced steps,
    the last one and the worst one."""
    steps = result.steps
    if len(steps) <= max_rows:
        return list(steps)
    stride = max(1, len(steps) // SAMPLED_ROWS)
    keep = set(range(0, len(steps), stride)) | {len(steps) - 1, result.worst_step.step}
    return [steps[i] for i in sorted(keep)]


def format_table(result: ComparisonResult, max_rows: int = FULL_TABLE_STEPS) -> str:
    """The per-step errors as a fixed-width table; the worst step is marked with '*'."""
    header = (f"{'step':>5} {'t':>5} | {'x_t max|Δ|':>10} {'mean|Δ|':>9} {'max rel':>9} | "
              f"{'x0 max|Δ|':>10} {'mean|Δ|':>9} {'max rel':>9}")
    worst = result.worst_step.step
    lines = [header, "-" * len(header)]
    for s in table_rows(result, max_rows):
        lines.append(f"{s.step:>4}{'*' if s.step == worst else ' '} {s.timestep:>5} | "
                     f"{s.x_t.max_abs:>10.2e} {s.x_t.mean_abs:>9.2e} {s.x_t.max_rel:>9.2e} | "
                     f"{s.x0.max_abs:>10.2e} {s.x0.mean_abs:>9.2e} {s.x0.max_rel:>9.2e}")
    if len(result.steps) > max_rows:
        lines.append(f"({len(lines) - 2} of {len(result.steps)} steps shown; --json has them all)")
    return "\n".join(lines)


def summary(result: ComparisonResult) -> str:
    """One line: the run, the final image difference, the worst step and the speed."""
    worst = result.worst_step
    line = (f"{result.scheduler.upper()}-{result.num_inference_steps}, batch {result.batch_size}, {result.dtype} "
            f"on {_where(result)}: final image max|Δ| {result.image.max_abs:.2e}, "
            f"mean {result.image.mean_abs:.2e}, {result.pixels_changed}/{result.pixels_total} 8-bit values differ; "
            f"worst x_t max rel {worst.x_t.max_rel:.2e} at step {worst.step} (t={worst.timestep})")
    if result.speedup is None:
        return line + "; not timed (--repeats 0)"
    return (line + f"; {result.fast_backend} {_seconds(result.fast_time)} vs {result.reference_backend} "
            f"{_seconds(result.reference_time)} (median of {len(result.fast_seconds)}): "
            f"speed-up {result.speedup:.3g}×")


def _where(result: ComparisonResult) -> str:
    return f"{result.device}, Triton interpreter" if result.interpreter else f"{result.device} ({result.device_name})"


def _seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def save_comparison_png(result: ComparisonResult, path, scale: int | None = None) -> tuple[Path, float]:
    """One row per image: fast | reference | |fast − reference| × gain, with the gain chosen so the
    largest difference is white (0 when the images are identical). Returns (path, gain)."""
    from .images import save_image_grid

    fast, reference = result.fast_images, result.reference_images
    if fast is None or reference is None:
        raise ValueError("result holds no images (was it loaded from JSON?)")
    diff = (fast.double() - reference.double()).abs()
    peak = diff.max().item()
    gain = 1.0 / peak if peak > 0 and math.isfinite(peak) else 0.0
    amplified = (diff * gain).nan_to_num(nan=1.0).to(fast.dtype)
    cells = torch.stack([fast, reference, amplified], dim=1).flatten(0, 1)  # (3B, C, H, W): rows of three
    scale = scale or max(1, 64 // fast.shape[-1])
    return save_image_grid(cells, path, nrow=3, scale=scale), gain


# ----------------------------------------------------------------------------- command line
INTERPRETER_NOTE = ("note: no CUDA device, so the Triton kernels ran through Triton's CPU interpreter (an "
                    "emulation): the errors are real, the timings are not GPU speed")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``fastdiff compare``."""
    parser.add_argument("--model", default="digits", help="pipeline folder, or 'digits' for the embedded model "
                        "(default: %(default)s)")
    parser.add_argument("--scheduler", choices=tuple(SHORT_NAMES), default="ddim", help="sampler (default: %(default)s)")
    parser.add_argument("--steps", type=validation.int_arg(1), default=20, help="inference steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=validation.int_arg(1), default=4,
                        help="images per run (default: %(default)s)")
    parser.add_argument("--seed", type=validation.seed_arg(), default=0,
                        help="seed of the torch.Generator (default: %(default)s)")
    parser.add_argument("--eta", type=validation.float_arg(0), default=0.0, help="DDIM's eta (default: %(default)s)")
    parser.add_argument("--class", dest="classes", type=int, nargs="+", default=None, metavar="N",
                        help="class label(s), cycled over the batch (default: 0, 1, 2, ... for a "
                             "class-conditional model)")
    parser.add_argument("--guidance", type=validation.float_arg(), default=None,
                        help="classifier-free guidance weight (default: the model's saved value)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="model and sampling dtype, the same on both paths (default: %(default)s)")
    parser.add_argument("--repeats", type=validation.int_arg(0), default=1, help="timed runs of each path after the warm-up; the "
                        "median counts; 0 skips timing (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the full result as JSON")
    parser.add_argument("--png", type=Path, default=None, metavar="PATH",
                        help="write fast | reference | amplified |difference|, one row per image")
    parser.add_argument("--tolerance", type=validation.float_arg(0), default=None, metavar="REL",
                        help="exit 1 when some step's x_t max rel error exceeds REL (default: never)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def prepare_interpreter(device: str | torch.device) -> bool:
    """On a CPU device, make sure the Triton kernels will run through the interpreter: set
    ``TRITON_INTERPRET=1`` when triton has not been imported yet (it is read when the kernels are
    built), else fail saying how to run. Returns True when this call set it."""
    if torch.device(device).type == "cuda" or backend.interpreter_enabled():
        return False
    if "triton" in sys.modules:
        raise RuntimeError("the fast path on a CPU needs Triton's interpreter, which must be chosen before "
                           "triton is imported: run with TRITON_INTERPRET=1 in the environment")
    os.environ["TRITON_INTERPRET"] = "1"
    return True


def _class_labels(args: argparse.Namespace, pipe) -> list[int] | None:
    classes = args.classes
    if classes is None and pipe.unet.is_conditional:
        classes = list(range(pipe.unet.num_classes))
    return None if classes is None else [classes[i % len(classes)] for i in range(args.batch_size)]


def run(args: argparse.Namespace) -> int:
    """``fastdiff compare``: print the per-step table and a summary; write --json / --png if asked."""
    from .pipeline import load_pretrained

    from .distributed import default_device

    for flag, path, suffixes in (("--json", args.json, (".json",)), ("--png", args.png, validation.image_suffixes())):
        if path is not None:
            validation.output_file(flag, path, suffixes)
    device = default_device(args.device, "--device")
    if prepare_interpreter(device):
        print("note: set TRITON_INTERPRET=1 for this run (no CUDA device)", file=sys.stderr)
    pipe = load_pretrained(args.model, device=device, dtype=DTYPES[args.dtype])
    result = compare(pipe, num_inference_steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                     class_labels=_class_labels(args, pipe), guidance_scale=args.guidance, eta=args.eta,
                     scheduler=args.scheduler, repeats=args.repeats, progress=not args.no_progress)
    print(format_table(result))
    print(summary(result))
    if result.interpreter:
        print(INTERPRETER_NOTE)
    if args.json is not None:
        write_json(_metadata(args) | result.to_dict(), args.json)
        print(f"wrote {args.json}")
    if args.png is not None:
        path, gain = save_comparison_png(result, args.png)
        print(f"wrote {path} (fast | reference | |difference| × {gain:.3g})")
    return _verdict(result, args.tolerance)


def _verdict(result: ComparisonResult, tolerance: float | None) -> int:
    if tolerance is None:
        return 0
    worst = result.worst_step
    if _badness(worst.x_t.max_rel) <= tolerance:
        return 0
    print(f"fastdiff compare: x_t max rel error {worst.x_t.max_rel:.2e} at step {worst.step} exceeds "
          f"--tolerance {tolerance:g}", file=sys.stderr)
    return 1


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _metadata(args: argparse.Namespace) -> dict:
    from . import __version__

    return {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": str(args.model), "fastdiff": __version__, "torch": torch.__version__,
            "triton": _version("triton"), "kernel_ops": ops.kernel_ops()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.compare", description=__doc__.split("\n\n")[0])
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
