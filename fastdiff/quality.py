"""Judge digit samples with a classifier: does the model draw the digit it was asked for?

The embedded ``digits`` model is trained on scikit-learn's 8×8 digits, upsampled to 16×16. We
shrink its samples back to 8×8 and ask an SVM fitted on the real digits three questions:

* **accuracy**: is the sample recognised as the requested class?
* **mean confidence**: the classifier's probability of the *requested* class, averaged over
  samples (not the probability of whatever class it predicts: a confident wrong digit scores 0).
* **diversity**: within each class, the mean pairwise L2 distance between samples divided by the
  same statistic over the real digits of that class, averaged over classes. About 1 means as
  varied as the data; near 0 means the model draws one image per class. Pixel noise also adds
  distance (noise images score ≈1), so read it together with accuracy.

Also reported, not judged: ``nearest_train_ratio``, the mean distance from a sample to its nearest
real digit over the same for real digits (leave-one-out). Near 0 means the model copies training
images, which neither accuracy nor diversity would notice. With ``--reference RUN`` (e.g.
dpm++-200), each run's ``reference_rms`` is the RMS pixel distance ([0, 1] scale, mean over
samples) of its samples from RUN's samples drawn from the same noise: for deterministic samplers,
how far a run is from the ODE solution that RUN approximates. It ranks samplers where the
classifier saturates, and it does not reward a sampler for drawing more typical digits than the
model would.

The issue's bar (DDIM-50, class-conditional): accuracy ≥ 0.9 and mean confidence ≥ 0.8; we add
diversity ≥ 0.5 (``MIN_DIVERSITY``). DDIM-10 and DDPM-1000 are reported alongside. The
``baseline`` rows run real digits through the same measurement to show it is sound.

Caveats:

* The default classifier is fitted on all 1797 digits, the data the model was trained on, so the
  "real digits" baseline scores the classifier on its own training set (optimistic: accuracy 1.0).
  The held-out baseline fits on the even-indexed half and scores the odd half (≈0.99 / ≈0.9).
* The classifier sees 8×8 images; detail the model adds at 16×16 is invisible to it.
* scikit-learn is an optional extra: ``pip install fastdiff[digits]``.

Run it: ``python -m fastdiff.quality`` (or ``benchmarks/digits_quality.py``); ``--help`` for flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import validation
from .io import write_json
from .schedulers import add_options_argument, parse_options, swapped

NUM_CLASSES = 10
DIGIT_SIZE = 8  # scikit-learn's digits are 8×8, pixel values 0..16
MODEL_SIZE = 16  # the embedded model works at 16×16

# Which digits the classifier is fitted on (and the real digits samples are compared with).
# "all": every digit, as the model was trained. "even": the even-indexed half, so the odd half can
# be scored as digits the classifier has never seen (the honest baseline).
PARTS = ("all", "even", "odd")

DEFAULT_RUNS = ("ddim-10", "ddim-50", "ddpm-1000")

# Below half the spread of the real digits, a model is drawing near-copies of a few images per
# class. Classifier-free guidance trades diversity for fidelity, so a healthy guided model sits
# below 1.0; a collapsed one sits near 0. 0.5 separates the two with room on both sides.
MIN_DIVERSITY = 0.5
MIN_ACCURACY = 0.9  # the bar
MIN_CONFIDENCE = 0.8


def _require_sklearn():
    try:
        import sklearn
    except ImportError as err:
        raise ImportError("fastdiff.quality needs scikit-learn: pip install fastdiff[digits]") from err
    return sklearn


# --------------------------------------------------------------------------------------------
# Real digits, in the model's space and in the classifier's
# --------------------------------------------------------------------------------------------

def upsample_like_training(pixels: torch.Tensor) -> torch.Tensor:
    """8×8 digits with values 0..16, (B, 8, 8) → (B, 1, 16, 16) images in [0, 1].

    Mirrors the data module's mapping (x/8 − 1, then bilinear, align_corners=False), re-derived
    here rather than imported so the check does not share a bug with the training code.
    """
    x = pixels.to(torch.float32)[:, None] / 8 - 1  # (B, 1, 8, 8) in [-1, 1]
    x = F.interpolate(x, size=(MODEL_SIZE, MODEL_SIZE), mode="bilinear", align_corners=False)
    return ((x + 1) / 2).clamp(0, 1)  # the pipeline's output range


@functools.cache
def real_digits(part: str = "all") -> tuple[torch.Tensor, np.ndarray]:
    """The real digits as the model sees them: ((N, 1, 16, 16) images in [0, 1], (N,) labels).

    Cached and shared between callers: copy before modifying in place.
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}; got {part!r}")
    _require_sklearn()
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = slice(None) if part == "all" else slice(0 if part == "even" else 1, None, 2)
    images = upsample_like_training(torch.as_tensor(digits.images[keep]))
    return images, digits.target[keep].copy()


def images_to_digits(images: torch.Tensor) -> np.ndarray:
    """(B, 1, H, W) images in [0, 1], H = W a multiple of 8 → (B, 64) classifier features.

    Undoes the data module's mapping: [0, 1] → [-1, 1] → pixel values 0..16, then shrinks to 8×8
    by average pooling (each 8×8 pixel is the mean of the block it was upsampled into). The
    classifier's features are pixel/16, so the scalings cancel to pooling alone; they are written
    out so the code reads as the inverse of the training mapping.
    """
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3] \
            or images.shape[2] % DIGIT_SIZE:
        raise ValueError(f"images must be (B, 1, H, H) with H a multiple of {DIGIT_SIZE}; "
                         f"got {tuple(images.shape)}")
    x = images.detach().to("cpu", torch.float64)
    validation.finite("images", x)
    pixels16 = ((x * 2 - 1) + 1) * 8  # [0, 1] → [-1, 1] → 0..16
    pooled = F.avg_pool2d(pixels16, kernel_size=x.shape[2] // DIGIT_SIZE)  # (B, 1, 8, 8)
    return (pooled.clamp(0, 16) / 16).reshape(len(x), -1).numpy()  # (B, 64)


@functools.cache
def _real_features(part: str) -> tuple[np.ndarray, np.ndarray]:
    """Real digits through the same 8 → 16 → 8 round trip as samples, so both carry the same blur."""
    images, labels = real_digits(part)
    return images_to_digits(images), labels


@functools.cache
def fit_digits_classifier(seed: int = 0, part: str = "all"):
    """An RBF SVM fitted on the real digits (features = pixel/16), with calibrated probabilities.

    gamma=0.25 is scikit-learn's classic gamma=0.001 for raw 0..16 pixels rescaled to pixel/16
    features (×16²); 5-fold cross-validated accuracy ≈ 0.97. Probabilities come from Platt
    scaling on held-out folds (CalibratedClassifierCV; ``SVC(probability=True)`` is deprecated
    from scikit-learn 1.9). ``seed`` shuffles those folds. Cached per process.
    """
    _require_sklearn()
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.datasets import load_digits
    from sklearn.model_selection import StratifiedKFold
    from sklearn.svm import SVC

    if part not in ("all", "even"):
        raise ValueError(f"the classifier is fitted on part 'all' or 'even'; got {part!r}")
    digits = load_digits()
    keep = slice(None) if part == "all" else slice(0, None, 2)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    classifier = CalibratedClassifierCV(SVC(gamma=0.25, C=10), method="sigmoid", cv=folds, ensemble=False)
    return classifier.fit(digits.data[keep] / 16, digits.target[keep])


# --------------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------------

def _mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean L2 distance over all unordered pairs; nan with fewer than two rows."""
    if len(features) < 2:
        return math.nan
    return torch.pdist(torch.as_tensor(features)).mean().item()


def _nearest_distances(features: np.ndarray, reference: np.ndarray, *, exclude_self: bool = False) -> np.ndarray:
    """Distance from each row of ``features`` to its nearest row of ``reference``."""
    dist = torch.cdist(torch.as_tensor(features), torch.as_tensor(reference))  # (B, N)
    if exclude_self:  # leave-one-out: features is reference, a digit is not its own neighbour
        dist.fill_diagonal_(math.inf)
    return dist.min(dim=1).values.numpy()


@functools.cache
def _real_statistics(part: str) -> tuple[dict[int, float], float]:
    """(mean pairwise distance per class, mean leave-one-out nearest-neighbour distance)."""
    features, labels = _real_features(part)
    spread = {c: _mean_pairwise_distance(features[labels == c]) for c in range(NUM_CLASSES)}
    nearest = _nearest_distances(features, features, exclude_self=True).mean().item()
    return spread, nearest


def _nanmean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def reference_distance(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of the RMS pixel difference between each image and the reference image
    drawn from the same noise (both (B, C, H, W) in [0, 1])."""
    if images.shape != reference.shape:
        raise ValueError(f"reference: got {tuple(reference.shape)} reference images for {tuple(images.shape)} samples")
    return (images.double() - reference.double()).square().mean(dim=(1, 2, 3)).sqrt().mean().item()


def _standard_error(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


@dataclass
class QualityReport:
    """How a set of class-conditional digit samples scores; see the module docstring."""

    name: str
    n: int
    accuracy: float  # fraction predicted as the requested class
    mean_confidence: float  # mean classifier probability of the *requested* class
    diversity: float  # within-class spread / real digits' within-class spread, class-averaged
    nearest_train_ratio: float  # nearest-real-digit distance / real digits' own (leave-one-out)
    per_class_accuracy: dict[int, float]
    per_class_diversity: dict[int, float]
    seconds: float | None = None  # sampling time, when the samples came from a pipeline
    # Standard errors of accuracy and mean confidence over the samples (sample std / sqrt(n)):
    # two runs whose difference is within about twice these are not told apart by this measure.
    accuracy_se: float = math.nan
    confidence_se: float = math.nan
    # RMS pixel distance to the --reference run's samples from the same noise (reference_distance)
    reference_rms: float = math.nan

    def passes(self, min_accuracy: float = MIN_ACCURACY, min_confidence: float = MIN_CONFIDENCE,
               min_diversity: float = MIN_DIVERSITY) -> bool:
        # `>=` is False for nan, so a report without diversity (one sample per class) fails.
        return (self.accuracy >= min_accuracy and self.mean_confidence >= min_confidence
                and self.diversity >= min_diversity)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"passes": self.passes()}

    @staticmethod
    def markdown_header() -> str:
        return ("| run | samples | accuracy | confidence (± s.e.) | diversity | nearest-train | pass | seconds "
                "| to reference |\n|---|---:|---:|---:|---:|---:|:---:|---:|---:|")

    def to_markdown_row(self) -> str:
        seconds = "" if self.seconds is None else f"{self.seconds:.1f}"
        spread = "" if math.isnan(self.confidence_se) else f" ± {self.confidence_se:.4f}"
        distance = "" if math.isnan(self.reference_rms) else f"{self.reference_rms:.4f}"
        return (f"| {self.name} | {self.n} | {self.accuracy:.3f} | {self.mean_confidence:.4f}{spread} | "
                f"{self.diversity:.2f} | {self.nearest_train_ratio:.2f} | "
                f"{'yes' if self.passes() else 'no'} | {seconds} | {distance} |")


def evaluate_samples(images: torch.Tensor, labels, *, name: str = "samples", seed: int = 0,
                     part: str = "all") -> QualityReport:
    """Score (B, 1, 16, 16) images in [0, 1] generated for ``labels`` (B class ids, 0..9).

    ``part`` picks the real digits the classifier is fitted on and samples are compared with
    ("all" for model samples; "even" for the held-out baseline).
    """
    labels = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64).reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must lie in 0..{NUM_CLASSES - 1}")
    features = images_to_digits(images)  # (B, 64)
    proba = fit_digits_classifier(seed, part).predict_proba(features)  # (B, 10), columns = classes
    correct = proba.argmax(axis=1) == labels
    confidence = proba[np.arange(len(labels)), labels]
    real_spread, real_nearest = _real_statistics(part)
    present = sorted(set(labels.tolist()))
    per_class_diversity = {c: _mean_pairwise_distance(features[labels == c]) / real_spread[c] for c in present}
    nearest = _nearest_distances(features, _real_features(part)[0]).mean().item()
    return QualityReport(
        name=name,
        n=len(labels),
        accuracy=float(correct.mean()),
        mean_confidence=float(confidence.mean()),
        diversity=_nanmean(per_class_diversity.values()),
        nearest_train_ratio=nearest / real_nearest,
        per_class_accuracy={c: float(correct[labels == c].mean()) for c in present},
        per_class_diversity=per_class_diversity,
        accuracy_se=_standard_error(correct),
        confidence_se=_standard_error(confidence),
    )


def baseline_report(heldout: bool = False, seed: int = 0) -> QualityReport:
    """Real digits through the same measurement.

    heldout=False scores the classifier's own training digits (optimistic; nearest_train_ratio is 0
    because every digit is its own nearest neighbour). heldout=True fits on the even half and
    scores the odd half, which the classifier has never seen: the honest reference.
    """
    if heldout:
        images, labels = real_digits("odd")
        return evaluate_samples(images, labels, name="real digits (held-out half)", seed=seed, part="even")
    images, labels = real_digits("all")
    return evaluate_samples(images, labels, name="real digits (fit set)", seed=seed, part="all")


# --------------------------------------------------------------------------------------------
# Sampling from a pipeline
# --------------------------------------------------------------------------------------------

def parse_run(spec: str) -> tuple[str, int]:
    """'ddim-50' → ('ddim', 50), 'euler-a-10' → ('euler-a', 10): the scheduler is a short name
    (``schedulers.SHORT_NAMES``), the steps a positive integer after the last '-'."""
    from .schedulers import SHORT_NAMES

    kind, _, steps = spec.lower().rpartition("-")
    if kind not in SHORT_NAMES or not steps.isdigit() or int(steps) < 1:
        raise ValueError(f"run must look like SCHEDULER-STEPS with SCHEDULER one of "
                         f"{', '.join(SHORT_NAMES)} (e.g. ddim-50); got {spec!r}")
    return kind, int(steps)


@contextmanager
def _scheduler_swapped(pipe, kind: str, options: dict | None = None) -> Iterator[None]:
    """Run with a ``kind`` scheduler built from the pipeline's config and ``options``; put the
    original back after."""
    original = pipe.scheduler
    pipe.scheduler = swapped(original, kind, options, "scheduler_options")
    try:
        yield
    finally:
        pipe.scheduler = original


def sample_pipeline(pipe, scheduler: str = "ddim", num_inference_steps: int = 50, per_class: int = 20,
                    guidance_scale: float | None = None, eta: float = 0.0, seed: int = 0,
                    batch_size: int = 200, progress: bool = False,
                    scheduler_options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``per_class`` samples of each digit: ((10·per_class, 1, 16, 16) images, labels, seconds).

    Labels run 0..9, 0..9, ...; one generator seeded once drives every batch, so a run is
    reproducible for a given batch_size. guidance_scale=None keeps the pipeline's default;
    ``scheduler_options`` are config values over the pipeline's (e.g. timestep_spacing="trailing").
    """
    labels = torch.arange(NUM_CLASSES).repeat(per_class)  # (10·per_class,)
    kwargs = dict(num_inference_steps=num_inference_steps, progress=progress)
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    if scheduler == "ddim":  # eta is DDIM's noise knob; the others have none
        kwargs["eta"] = eta
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    start = time.perf_counter()
    with _scheduler_swapped(pipe, scheduler, scheduler_options):
        for batch in labels.split(batch_size):
            out = pipe(batch_size=len(batch), generator=generator, class_labels=batch, **kwargs)
            chunks.append(out.images.detach().float().cpu())
    return torch.cat(chunks), labels, time.perf_counter() - start


def evaluate_pipeline(pipe, scheduler: str = "ddim", num_inference_steps: int = 50, per_class: int = 20,
                      guidance_scale: float | None = None, eta: float = 0.0, seed: int = 0,
                      batch_size: int = 200, progress: bool = False,
                      scheduler_options: dict | None = None) -> QualityReport:
    """Sample ``per_class`` images of every digit with the given scheduler and score them."""
    images, labels, seconds = sample_pipeline(pipe, scheduler, num_inference_steps, per_class,
                                              guidance_scale, eta, seed, batch_size, progress, scheduler_options)
    report = evaluate_samples(images, labels, name=f"{scheduler.upper()}-{num_inference_steps}", seed=seed)
    report.seconds = seconds
    return report


def save_grid(images: torch.Tensor, labels, path, scale: int = 4) -> Path:
    """PNG with one row per class (in label order), samples left to right; equal counts per class."""
    from .images import save_image_grid

    labels = torch.as_tensor(labels).cpu()
    counts = torch.bincount(labels, minlength=NUM_CLASSES)
    per_row = int(counts.max())
    if bool((counts[counts > 0] != per_row).any()):
        raise ValueError(f"save_grid needs the same number of samples per class; got {counts.tolist()}")
    order = torch.argsort(labels, stable=True)  # group by class, keep sampling order within a class
    return save_image_grid(images[order], path, nrow=per_row, scale=scale)


# --------------------------------------------------------------------------------------------
# Command line: python -m fastdiff.quality, benchmarks/digits_quality.py, `fastdiff quality`
# --------------------------------------------------------------------------------------------

PLOT_METRICS = (("accuracy", "accuracy"), ("mean_confidence", "confidence"), ("diversity", "diversity"))
REFERENCE_METRIC = ("reference_rms", "RMS distance to the reference run")


def plot_steps(runs: Sequence[dict], path, baselines: Sequence[dict] = ()) -> Path:
    """Quality against the number of steps: accuracy, confidence and diversity (one panel each) per
    scheduler, steps on a log axis; a scheduler run at one step count only (DDPM-1000) is a dashed
    level, the baselines (real digits) dotted ones. ``runs``: ``QualityReport.to_dict()`` records.
    Runs measured against a --reference get a fourth panel, that distance on a log axis."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("the quality plot needs matplotlib: pip install matplotlib") from error
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[int, dict]]] = {}
    for record in runs:
        kind, steps = parse_run(record["name"])
        curves.setdefault(kind, []).append((steps, record))
    measured = any(record.get(REFERENCE_METRIC[0]) is not None and not math.isnan(record[REFERENCE_METRIC[0]])
                   for record in runs)
    metrics = (*PLOT_METRICS, REFERENCE_METRIC) if measured else PLOT_METRICS
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), constrained_layout=True)
    for ax, (key, label) in zip(axes, metrics):
        for kind, points in curves.items():
            points.sort(key=lambda point: point[0])
            steps = [n for n, _ in points]
            values = [np.nan if r.get(key) is None else r[key] for _, r in points]
            if len(points) == 1:
                ax.axhline(values[0], linestyle="--", linewidth=1, color="gray", label=f"{kind.upper()}-{steps[0]}")
            else:
                ax.plot(steps, values, marker="o", label=kind.upper())
        if key == REFERENCE_METRIC[0]:
            ax.set_yscale("log")
        else:
            for record in baselines:
                ax.axhline(record[key], linestyle=":", linewidth=1, color="black", label=record["name"])
        ax.set_xscale("log")
        ticks = sorted({n for points in curves.values() if len(points) > 1 for n, _ in points})
        if ticks:
            ax.set_xticks(ticks, [str(n) for n in ticks])
            ax.minorticks_off()
        ax.set_xlabel("sampling steps (U-Net calls)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default="digits", help="pretrained name or directory (default: digits)")
    parser.add_argument("--runs", nargs="+", default=None, metavar="SCHEDULER-STEPS",
                        help=f"what to evaluate (default: {' '.join(DEFAULT_RUNS)})")
    add_options_argument(parser)
    parser.add_argument("--reference", default=None, metavar="SCHEDULER-STEPS",
                        help="also sample this run (e.g. dpm++-200) from the same noise and report each run's RMS "
                             "pixel distance to it: how far a deterministic sampler is from the ODE solution")
    parser.add_argument("--per-class", type=validation.int_arg(1), default=20, help="samples per digit (default: 20)")
    parser.add_argument("--guidance", type=validation.float_arg(), default=None,
                        help="classifier-free guidance scale (default: the pipeline's)")
    parser.add_argument("--eta", type=validation.float_arg(0), default=0.0, help="DDIM eta (default: 0)")
    parser.add_argument("--seed", type=validation.seed_arg(), default=0)
    parser.add_argument("--batch-size", type=validation.int_arg(1), default=200,
                        help="samples per pipeline call (default: 200)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--grid", type=Path, default=None, metavar="PATH",
                        help="also save each run's samples as a PNG grid, one row per digit "
                             "(samples.png → samples-ddim-50.png)")
    parser.add_argument("--plot", type=Path, default=None, metavar="PATH",
                        help="also plot accuracy, confidence and diversity against steps, one line per scheduler (PNG)")
    parser.add_argument("--from-json", type=Path, nargs="+", default=None, metavar="PATH",
                        help="sample nothing: print (and --plot) the runs of earlier --json results")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any run misses the bar")
    parser.add_argument("--progress", action="store_true", help="show sampling progress bars")
    return parser


def _grid_path(path: Path, run: str) -> Path:
    return path.with_name(f"{path.stem}-{run}{path.suffix or '.png'}")


def _device(args: argparse.Namespace) -> str:
    from .distributed import default_device

    return str(default_device(args.device, "--device"))


def _json_safe(value):
    """nan (e.g. diversity with one sample per class) → null: bare NaN is not valid JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _metadata(args: argparse.Namespace) -> dict:
    import fastdiff

    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fastdiff": fastdiff.__version__,
        "torch": torch.__version__,
        "sklearn": _require_sklearn().__version__,
        "model": str(args.model),
        "device": _device(args),
        "per_class": args.per_class,
        "guidance": args.guidance,
        "eta": args.eta,
        "scheduler_options": parse_options(getattr(args, "scheduler_option", None)),
        "reference": getattr(args, "reference", None),
        "seed": args.seed,
        "bar": {"min_accuracy": MIN_ACCURACY, "min_confidence": MIN_CONFIDENCE, "min_diversity": MIN_DIVERSITY},
    }


def run(args: argparse.Namespace) -> int:
    """Evaluate the requested runs, print a Markdown table; the exit status for the CLI."""
    import fastdiff

    if args.from_json is not None and (args.runs is not None or args.reference is not None):
        raise ValueError(f"{'--runs' if args.runs is not None else '--reference'} samples new runs, --from-json "
                         "reads earlier ones: give one of them")
    runs = [parse_run(spec) for spec in args.runs or DEFAULT_RUNS]  # a typo, a bad path, a missing model: first
    reference = None if args.reference is None else parse_run(args.reference)
    if args.json is not None:
        validation.output_file("--json", args.json, (".json",))
    if args.grid is not None:
        validation.output_file("--grid", args.grid, validation.image_suffixes())
    if args.plot is not None:
        validation.output_file("--plot", args.plot, (".png",))
    if args.from_json is not None:
        return _replot(args)
    pipe = fastdiff.load_pretrained(args.model, device=_device(args))
    options = parse_options(args.scheduler_option)
    for kind, _ in runs + ([reference] if reference else []):  # an option a scheduler does not take: before sampling
        swapped(pipe.scheduler, kind, options, "--scheduler-option")
    baselines = [baseline_report(heldout=False, seed=args.seed), baseline_report(heldout=True, seed=args.seed)]
    print(QualityReport.markdown_header())
    for report in baselines:
        print(report.to_markdown_row(), flush=True)

    def sample(kind, steps):
        return sample_pipeline(pipe, kind, steps, args.per_class, args.guidance, args.eta, args.seed,
                               args.batch_size, args.progress, options)

    reference_images = None if reference is None else sample(*reference)[0]
    reports = []
    for kind, steps in runs:
        images, labels, seconds = sample(kind, steps)
        report = evaluate_samples(images, labels, name=f"{kind.upper()}-{steps}", seed=args.seed)
        report.seconds = seconds
        if reference_images is not None:
            report.reference_rms = reference_distance(images, reference_images)
        reports.append(report)
        print(report.to_markdown_row(), flush=True)
        if args.grid is not None:
            save_grid(images, labels, _grid_path(args.grid, f"{kind}-{steps}"))
    if args.json is not None:
        result = _metadata(args) | {"baseline": [r.to_dict() for r in baselines],
                                    "runs": [r.to_dict() for r in reports]}
        write_json(_json_safe(result), args.json)
    if args.plot is not None:
        plot_steps([_json_safe(r.to_dict()) for r in reports], args.plot, [_json_safe(baselines[1].to_dict())])
    return 1 if args.strict and not all(r.passes() for r in reports) else 0


def _replot(args: argparse.Namespace) -> int:
    """--from-json: the runs of earlier results (a later file's run replaces an earlier one's of that name)."""
    from .io import read_json

    runs, baselines = {}, {}
    for path in args.from_json:
        data = read_json(path, argument="--from-json")
        if not isinstance(data.get("runs"), list):
            raise ValueError(f"--from-json: {path} is not a quality result (no 'runs' list; write one with --json)")
        runs.update({r["name"]: r for r in data["runs"]})
        baselines.update({r["name"]: r for r in data.get("baseline", [])})
    for record in runs.values():
        parse_run(record["name"])
    fields = {f.name for f in dataclasses.fields(QualityReport)}

    def report(record: dict) -> QualityReport:
        return QualityReport(**{k: (math.nan if v is None and k != "seconds" else v)
                                for k, v in record.items() if k in fields})

    print(QualityReport.markdown_header())
    for record in baselines.values():
        print(report(record).to_markdown_row())
    reports = [report(record) for record in runs.values()]
    for r in reports:
        print(r.to_markdown_row())
    if args.plot is not None:
        heldout = [r for name, r in baselines.items() if "held-out" in name]
        plot_steps(list(runs.values()), args.plot, heldout)
    return 1 if args.strict and not all(r.passes() for r in reports) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.quality", description=__doc__.split("\n\n")[0])
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
