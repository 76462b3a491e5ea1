"""The ``fastdiff`` command: sample, train, quality, compare, bench, info."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import platform
import sys
import time

from . import validation
from .backend import BACKENDS, use_backend
from .schedulers import DEFAULT_STEPS, SHORT_NAMES, add_options_argument

GRID_BATCH_PER_CLASS, GRID_BATCH = 4, 16  # the grid's images: per class for conditional models, else in all
SET_BATCH = 32  # images per U-Net batch of an evaluation set (--outdir)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``fastdiff sample: error: argument --steps: ...`` (no usage
    block; ``--help`` shows it), exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # --batch must not quietly mean --batch-size
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="digits", help="pipeline folder, or 'digits' for the embedded model (default)")
    parser.add_argument("--out", default=None, help="image grid to write, .png (or another extension PIL writes; "
                        "default: samples.png)")
    parser.add_argument("--seed", type=validation.seed_arg(), default=0, help="seed of the torch.Generator, in "
                        "[0, 2**64); with --outdir, the base seed from which image i's own seed is derived (default: 0)")
    parser.add_argument("--scheduler", choices=tuple(SHORT_NAMES), default="ddim", help="sampler (default: ddim)")
    add_options_argument(parser)
    parser.add_argument("--steps", type=validation.int_arg(1), default=None,
                        help="inference steps (default: " + ", ".join(
                            f"{steps or 'every training timestep'} for {name}" for name, steps in DEFAULT_STEPS.items())
                        + ")")
    parser.add_argument("--eta", type=validation.float_arg(0), default=0.0,
                        help="DDIM's eta: 0 deterministic, 1 DDPM-like (default: 0)")
    parser.add_argument("--class", dest="classes", type=int, nargs="+", default=None, metavar="N",
                        help="class label(s) to draw; default: every class in turn, one column each")
    parser.add_argument("--guidance", type=validation.float_arg(), default=None,
                        help="classifier-free guidance weight (default: the model's saved value)")
    parser.add_argument("--batch-size", type=validation.int_arg(1), default=None,
                        help=f"images per U-Net batch: the whole grid ({GRID_BATCH_PER_CLASS} per class for "
                             f"conditional models, else {GRID_BATCH}); with --outdir, images per batch and process "
                             f"(default {SET_BATCH}), which fixes which images share a batch: keep it when resuming")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu; "
                        "under torchrun, cuda means each process's own cuda:LOCAL_RANK)")
    parser.add_argument("--scale", type=validation.int_arg(1), default=None,
                        help="upscale factor of the grid (default: to ~64 px per image)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay each denoising step from a CUDA graph: one launch per step instead of the "
                             "U-Net's hundreds, the same images (CUDA devices only)")
    parser.add_argument("--channels-last", action="store_true",
                        help="run the U-Net in channels_last (NHWC), the layout of cuDNN's tensor-core convolutions: "
                             "faster on GPUs, the same images up to convolution rounding")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    many = parser.add_argument_group(
        "evaluation sets (one PNG per image; split over processes under torchrun; a rerun resumes)")
    many.add_argument("--num-images", type=validation.int_arg(1), default=None, metavar="M",
                      help="write images 0..M-1 as DIR/000000.png, ...; needs --outdir")
    many.add_argument("--outdir", default=None, metavar="DIR", help="folder of the numbered PNGs; PNGs already "
                      "there are skipped, so rerunning a crashed job finishes it")
    many.add_argument("--npz", action="store_true", help="also write DIR/samples.npz (arr_0: M x H x W x C uint8, "
                      "arr_1: labels); needs --outdir")


def _load_sampler(args: argparse.Namespace, device):
    """The pipeline with the requested scheduler, and its number of inference steps."""
    from . import load_pretrained
    from .schedulers import default_steps, parse_options, swapped

    pipe = load_pretrained(args.model, device=device)
    if args.channels_last:
        import torch

        pipe.unet.to(memory_format=torch.channels_last)
    pipe.scheduler = swapped(pipe.scheduler, args.scheduler, parse_options(args.scheduler_option),
                             "--scheduler-option")
    return pipe, args.steps or default_steps(args.scheduler, pipe.scheduler)


def _check_cuda_graph(args: argparse.Namespace, device) -> None:
    """--cuda-graph needs a CUDA device: say so before the model loads."""
    import torch

    if args.cuda_graph and torch.device(device).type != "cuda":
        raise ValueError(f"--cuda-graph needs a CUDA device (CUDA graphs); the device is {device}. "
                         "Drop --cuda-graph, or sample on a GPU (--device cuda)")


def _sample(args: argparse.Namespace) -> int:
    if args.outdir is not None or args.num_images is not None:
        return _sample_many(args)
    import torch

    from . import distributed

    if args.npz:
        raise ValueError("--npz writes DIR/samples.npz of an evaluation set: it needs --outdir and --num-images")
    out = validation.output_file("--out", args.out or "samples.png", validation.image_suffixes())
    device = distributed.default_device(args.device, "--device")
    _check_cuda_graph(args, device)
    pipe, steps = _load_sampler(args, device)
    num_classes = pipe.unet.num_classes
    classes = args.classes if args.classes is not None else (list(range(num_classes)) if num_classes else None)
    batch = args.batch_size or (GRID_BATCH_PER_CLASS * len(classes) if classes else GRID_BATCH)
    labels = [classes[i % len(classes)] for i in range(batch)] if classes else None
    nrow = len(classes) if classes else None

    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    images = pipe(batch_size=batch, num_inference_steps=steps, generator=generator, class_labels=labels,
                  guidance_scale=args.guidance, eta=args.eta, progress=not args.no_progress,
                  cuda_graph=args.cuda_graph)
    seconds = time.perf_counter() - start
    scale = args.scale or max(1, 64 // pipe.unet.config.sample_size)
    path = images.save_grid(out, nrow=nrow, scale=scale)
    print(f"wrote {batch} samples ({args.scheduler.upper()}-{steps}, {seconds:.1f} s on {device}) to {path}")
    return 0


def _sample_many(args: argparse.Namespace) -> int:
    """``--num-images M --outdir DIR``: this process's share of an evaluation set (all of it alone)."""
    from . import distributed
    from .sample_many import sample_many

    if args.outdir is None or args.num_images is None:
        raise ValueError("--num-images and --outdir go together (an evaluation set of M PNGs in DIR)")
    for flag, value in (("--out", args.out), ("--scale", args.scale)):
        if value is not None:
            raise ValueError(f"{flag} applies to the grid; with --outdir use --num-images and --batch-size")
    validation.writable_folder("--outdir", args.outdir)
    device = distributed.default_device(args.device, "--device")
    _check_cuda_graph(args, device)
    distributed.init_from_env(device)
    pipe, steps = _load_sampler(args, device)
    start = time.perf_counter()
    result = sample_many(pipe, args.num_images, args.outdir, seed=args.seed, batch_size=args.batch_size or SET_BATCH,
                         num_inference_steps=steps, classes=args.classes, guidance_scale=args.guidance,
                         eta=args.eta, npz=args.npz, progress=not args.no_progress, cuda_graph=args.cuda_graph)
    seconds = time.perf_counter() - start
    if distributed.is_main():
        world = distributed.world_size()
        where = f"{world} processes" if world > 1 else str(device)
        npz = f"; {result.npz_path}" if result.npz_path else ""
        print(f"wrote {result.written} images, {result.skipped} already there ({args.scheduler.upper()}-{steps}, "
              f"{seconds:.1f} s on {where}) to {result.outdir}{npz}")
    return 0


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, ops
    from .backend import get_backend, interpreter_enabled, triton_available

    print(f"fastdiff     {__version__}")
    print(f"python       {platform.python_version()} ({platform.system()} {platform.machine()})")
    for package in ("torch", "triton", "numpy", "safetensors", "diffusers", "scikit-learn"):
        print(f"{package:<12} {_version(package)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"device       cuda:{i} {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)")
    else:
        print("device     cpu (no CUDA device)")
    print(f"backend      {get_backend()} (FASTDIFF_BACKEND / --backend)")
    triton_ok = triton_available() and (torch.cuda.is_available() or interpreter_enabled())
    where = "CUDA" if torch.cuda.is_available() else ("CPU interpreter" if interpreter_enabled() else "")
    print("usable       torch: yes; triton: " + (f"yes ({where})" if triton_ok else
          "no (" + ("not installed" if not triton_available() else "no CUDA device; set TRITON_INTERPRET=1 for the CPU interpreter") + ")"))
    kernels = ops.kernel_ops()
    print(f"kernels      {', '.join(kernels) if kernels else 'none yet: every op runs the reference'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, bench, compare, quality, training

    parser = ArgumentParser(prog="fastdiff", description="Fast DDPM/DDIM sampling with fused Triton kernels.")
    parser.add_argument("--version", action="version", version=f"fastdiff {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=ArgumentParser)

    sample = commands.add_parser("sample", help="draw samples to a PNG grid (default: the embedded digits model)",
                                 description="Draw samples to a PNG grid. With no arguments: the embedded digits "
                                             "model, DDIM 50 steps, four samples of each of the ten digits.")
    _sample_arguments(sample)
    sample.set_defaults(run=_sample)

    train = commands.add_parser("train", help="train a U-Net on digits or a folder of images",
                                description="Train a U-Net with safetensors checkpoints and exact --resume.")
    training.add_arguments(train)
    train.set_defaults(run=training.run)

    judge = commands.add_parser("quality", help="judge a digits model with a classifier (DDIM-10/50, DDPM-1000)",
                                description="Sample each digit class and score the samples with an SVM fitted on "
                                            "scikit-learn's digits: accuracy, confidence, diversity.")
    quality.add_arguments(judge)
    judge.set_defaults(run=quality.run)

    diff = commands.add_parser("compare", help="fast (Triton) vs reference (PyTorch) path from one seed: "
                                               "per-step errors and speed-up",
                               description="Sample a model on the Triton and on the PyTorch path from the same seed; "
                                           "report, per step, the max/mean abs and relative error of x_t and of the "
                                           "predicted x0, the final image difference and the speed-up.")
    compare.add_arguments(diff)
    diff.set_defaults(run=compare.run)

    bench_cmd = commands.add_parser("bench", help="run the benchmark suite: speed-ups and %% of ceiling, report + plot",
                                    description="Run benchmarks/ (pytest-benchmark): fastdiff's kernels against the "
                                                "reference, PyTorch and diffusers. Prints speed-ups and %% of the "
                                                "measured ceilings; writes JSON, a Markdown report and a plot. "
                                                "Without a GPU only the CPU cases run.")
    bench.add_arguments(bench_cmd)
    bench_cmd.set_defaults(run=bench.run)

    info = commands.add_parser("info", help="versions, device and usable backends",
                               description="Print versions, the device and which backends can run.")
    info.set_defaults(run=_info)
    for command in (sample, train, judge):
        command.add_argument("--backend", choices=BACKENDS, default=None,
                             help="fused-op path: triton kernels or the torch reference (default: $FASTDIFF_BACKEND "
                                  "or auto). Kernels have no backward: training runs the reference for the U-Net")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a flag argparse refused (one line printed)
        return stop.code if isinstance(stop.code, int) else 2
    backend = getattr(args, "backend", None)
    try:
        with use_backend(backend) if backend else contextlib.nullcontext():
            return args.run(args) or 0
    except (ValueError, TypeError, RuntimeError, ImportError, OSError) as err:  # a message, not a traceback
        print(f"fastdiff {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastdiff {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(err: BaseException) -> str:
    """The error's message on one line (torch's load_state_dict message spans many)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text}" if isinstance(err, OSError) else text


if __name__ == "__main__":
    sys.exit(main())
