"""Checks of what users hand to fastdiff: one function per kind of check, used by every entry point.

The rule everywhere: a value that cannot be right is refused up front, before any work starts,
with a ``TypeError`` (wrong kind of thing) or ``ValueError`` (wrong value) whose message names the
argument and says what was expected. The CLI turns both into one line and a non-zero exit.

Checks of tensor *values* (timesteps in range, an image in [0, 1], finite results) read the
tensor back to the host: one synchronisation, done once per call. They are skipped where a
read-back is impossible or unwanted: inside a CUDA-graph capture (an error there), under
``torch.compile`` (a graph break), for meta tensors (no values), and inside ``values_checked()``,
which the sampling loop enters after checking its tables once, so no step reads anything back.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

# The dtypes a model and its sampling loop can run in, with the spellings torch users type.
FLOAT_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}
# torch.Generator.manual_seed's range (it refuses 2**64); negative seeds are refused here: they
# alias positive ones (-1 is 2**64 - 1), so two spellings would name one stream.
SEED_RANGE = (0, 2**64)
# Beyond 2**24 float32 cannot hold consecutive integers: the U-Net's timestep embedding could not
# tell such timesteps apart, so no trained model has seen one.
MAX_UNET_TIMESTEP = 2**24


def _describe(value) -> str:
    """``str '0.5'``, ``int 5``: the type and value, for messages."""
    return f"{type(value).__name__} {value!r}"


# ----------------------------------------------------------------------------- plain values
def one_of(argument: str, value, allowed: Iterable) -> None:
    """``value`` must be one of ``allowed`` (option strings, usually)."""
    allowed = tuple(allowed)
    if not any(_matches(value, a) for a in allowed):
        raise ValueError(f"{argument} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _matches(value, option) -> bool:
    """``value == option`` without True matching 1 or a tensor comparing elementwise."""
    if isinstance(value, bool) != isinstance(option, bool) or isinstance(value, torch.Tensor):
        return False
    try:
        return bool(value == option)
    except (TypeError, ValueError):
        return False


def boolean(argument: str, value) -> bool:
    """True or False (also numpy's bool), never 0/1 or a string."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(f"{argument} must be True or False, got {_describe(value)}")
    return bool(value)


def integer(argument: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (Python, numpy, or a 0-d integer tensor) in [minimum, maximum]; bools refused."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point() \
            and not value.is_complex() and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{argument} must be an integer, got {_describe(value)}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{argument} must be an integer {_bounds(minimum, maximum)}, got {value}")
    return value


def real(argument: str, value, minimum: float | None = None, maximum: float | None = None, *,
         min_open: bool = False, max_open: bool = False) -> float:
    """A finite real number (Python, numpy, or a 0-d real tensor) within the bounds; NaN, ±inf,
    bools and strings refused. ``min_open``/``max_open`` exclude the bound itself."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_complex() and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{argument} must be a real number, got {_describe(value)}")
    value = float(value)
    below = minimum is not None and (value <= minimum if min_open else value < minimum)
    above = maximum is not None and (value >= maximum if max_open else value > maximum)
    if not math.isfinite(value) or below or above:
        bounds = _interval(minimum, maximum, min_open, max_open)
        raise ValueError(f"{argument} must be a finite number{' ' + bounds if bounds else ''}, got {value}")
    return value


def _bounds(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f"in [{minimum}, {maximum}]"
    return f">= {minimum}" if minimum is not None else f"<= {maximum}"


def _interval(minimum, maximum, min_open: bool, max_open: bool) -> str:
    if minimum is None and maximum is None:
        return ""
    if minimum is None:
        return f"{'<' if max_open else '<='} {maximum}"
    if maximum is None:
        return f"{'>' if min_open else '>='} {minimum}"
    return f"in {'(' if min_open else '['}{minimum}, {maximum}{')' if max_open else ']'}"


def seed(argument: str, value) -> int:
    """A seed for ``torch.Generator.manual_seed``: an integer in [0, 2**64)."""
    return integer(argument, value, SEED_RANGE[0], SEED_RANGE[1] - 1)


# ----------------------------------------------------------------------------- devices and dtypes
def available_devices() -> list[str]:
    """The devices this machine can run on, as one would type them."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    return names


def device(argument: str, value) -> torch.device:
    """A torch.device that exists here, from 'cpu', 'cuda', 'cuda:1', 'mps', a torch.device or a
    CUDA index; anything else (a typo, 'gpu', CUDA on a machine without it) is refused with what
    this machine has. 'auto' and None are the caller's to resolve (``distributed.default_device``)."""
    here = ", ".join(available_devices())
    if isinstance(value, bool) or not isinstance(value, (str, torch.device, numbers.Integral)):
        raise TypeError(f"{argument} must be a device such as 'cpu', 'cuda' or 'cuda:1', got {_describe(value)}; "
                        f"available here: {here}")
    try:
        if isinstance(value, numbers.Integral):
            parsed = torch.device("cuda", int(value))
        else:
            parsed = torch.device(value.strip().lower() if isinstance(value, str) else value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{argument} must be a device such as 'cpu', 'cuda' or 'cuda:1', got {value!r}; "
                         f"available here: {here}") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"{argument} {value!r} is not available: {why}; available here: {here}")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{argument} {value!r} does not exist: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s); available here: {here}")
        return parsed
    if parsed.type == "mps" and "mps" in available_devices():
        return parsed
    raise ValueError(f"{argument} {value!r} cannot run fastdiff here; available here: {here}")


def dtype(argument: str, value) -> torch.dtype:
    """A floating-point torch.dtype a model can run in, from the dtype or its usual names
    ('float16', 'fp16', 'half', 'torch.bfloat16', ...); complex, integer and bool refused."""
    if isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        if name in FLOAT_DTYPES:
            return FLOAT_DTYPES[name]
    elif isinstance(value, torch.dtype) and value in set(FLOAT_DTYPES.values()):
        return value
    raise (ValueError if isinstance(value, (str, torch.dtype)) else TypeError)(
        f"{argument} must be torch.float32, torch.float16, torch.bfloat16 or torch.float64 (or a name such as "
        f"'fp16', 'bf16'), got {value!r}")


# ----------------------------------------------------------------------------- tensors
def tensor(argument: str, value, *, floating: bool = False, integer: bool = False) -> torch.Tensor:
    """A torch.Tensor; of a floating-point dtype with ``floating``, of an integer one (not bool)
    with ``integer``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{argument} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{argument} must be a floating-point tensor, got dtype {value.dtype}")
    if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{argument} must be an integer tensor, got dtype {value.dtype}")
    return value


_values_checked: contextvars.ContextVar[bool] = contextvars.ContextVar("fastdiff_values_checked", default=False)


@contextlib.contextmanager
def values_checked() -> Iterator[None]:
    """Skip the checks of tensor values in the enclosed block: its caller checked them once, up
    front (the sampling loop's tables and labels), and a per-step read-back would stall a GPU."""
    token = _values_checked.set(True)
    try:
        yield
    finally:
        _values_checked.reset(token)


def _can_read_back(x: torch.Tensor) -> bool:
    """Whether checking ``x``'s values is possible and wanted (see the module docstring)."""
    if torch.compiler.is_compiling() or x.is_meta or _values_checked.get():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def finite(argument: str, x: torch.Tensor) -> None:
    """Every value of ``x`` finite (one read-back)."""
    if _can_read_back(x) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{argument} holds {bad} NaN or infinite value(s) of {x.numel()}")


def in_range(argument: str, x: torch.Tensor, low: float, high: float, what: str = "") -> None:
    """Every value of ``x`` finite and in [low, high] (one read-back); ``what`` says why those bounds."""
    finite(argument, x)
    if _can_read_back(x) and x.numel():
        lo, hi = (float(v) for v in torch.aminmax(x.detach().float()))
        if lo < low or hi > high:
            raise ValueError(f"{argument} must lie in [{_number(low)}, {_number(high)}]{what}, got values in "
                             f"[{_number(lo)}, {_number(hi)}]")


def _number(x: float) -> str:
    """16777215 rather than 1.67772e+07, 0.5 as 0.5."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**53 else f"{x:g}"


def timesteps(argument: str, t, num_train_timesteps: int, *, on_device: bool = True) -> None:
    """Integer timesteps (an int, or an integer tensor) in [0, num_train_timesteps): -1 would wrap
    around to the last entry of the ᾱ table, T or more would index past it. ``on_device=False``
    checks the values of a CPU tensor only (for per-step ops, where a GPU read-back would stall
    the queue; the public entry points check everywhere)."""
    if isinstance(t, torch.Tensor):
        tensor(argument, t, integer=True)
        if not _can_read_back(t) or not t.numel() or (t.device.type != "cpu" and not on_device):
            return
        lo, hi = (int(v) for v in torch.aminmax(t.detach()))
    else:
        lo = hi = integer(argument, t)
    if lo < 0 or hi >= num_train_timesteps:
        raise ValueError(f"{argument} must lie in [0, {num_train_timesteps}) (num_train_timesteps), "
                         f"got values in [{lo}, {hi}]")


def unet_timesteps(argument: str, t: torch.Tensor) -> None:
    """Timesteps fed to a U-Net: finite, >= 0 and below 2**24 (``MAX_UNET_TIMESTEP``)."""
    in_range(argument, t, 0, MAX_UNET_TIMESTEP - 1, " (a diffusion timestep)")


# ----------------------------------------------------------------------------- results
class NonFiniteError(RuntimeError):
    """Sampling produced NaN or infinite values (bad weights, an overflow in fp16, ...)."""


def finite_result(x: torch.Tensor, what: str, on_nonfinite: str = "raise") -> bool:
    """Check a result once, at the end (one read-back): True when finite; otherwise raise
    ``NonFiniteError`` (``on_nonfinite='raise'``) or warn and return False ('warn')."""
    import warnings

    one_of("on_nonfinite", on_nonfinite, ("raise", "warn"))
    if not _can_read_back(x) or bool(torch.isfinite(x).all()):
        return True
    bad = int((~torch.isfinite(x)).sum())
    message = (f"{what}: {bad} of {x.numel()} values are NaN or infinite; the model diverged (bad weights, "
               "or an overflow in a low-precision dtype: try float32)")
    if on_nonfinite == "raise":
        raise NonFiniteError(message + "; pass on_nonfinite='warn' to get the images anyway")
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return False


# ----------------------------------------------------------------------------- files
def output_file(argument: str, path, suffixes: Iterable[str] | None = None) -> Path:
    """A file that can be written: not a folder, with one of ``suffixes`` (lower case, with the
    dot) when given, in a folder that exists or can be made and is writable. Checked before the
    work that produces the file, so a long run is not lost to a typo."""
    path = Path(path)
    suffixes = None if suffixes is None else tuple(suffixes)
    if path.is_dir():
        raise ValueError(f"{argument}: {path} is a folder; expected a file there (or nothing), e.g. "
                         f"{path / ('out' + (suffixes[0] if suffixes else ''))}")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ValueError(f"{argument}: {path} must end in {' or '.join(suffixes)}")
    writable_folder(argument, path.parent, target=path)
    return path


def writable_folder(argument: str, folder, target=None) -> Path:
    """A folder that exists and takes new files, or can be made: its nearest existing ancestor is a
    folder where a file can be created, probed for real (read-only mounts, ACLs and root all count).
    ``target``: what will be written there, for the message (default: the folder)."""
    folder = Path(folder)
    target = folder if target is None else target
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # "." or "/" always exists
    if not existing.is_dir():
        raise ValueError(f"{argument}: cannot write {target}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fastdiff-write-test.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{argument}: cannot write {target}: creating a file in {existing} fails "
                         f"({err.strerror or err})") from err
    return folder


def image_suffixes() -> tuple[str, ...]:
    """The file extensions PIL can write an image to ('.png', '.jpg', ...)."""
    from PIL import Image

    Image.init()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE))


# ----------------------------------------------------------------------------- command-line types
def _arg_type(check, convert, expected: str):
    """An argparse ``type=``: parse the text, then ``check`` it; argparse prefixes the flag."""
    import argparse

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
        try:
            return check(value)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err).strip()) from None

    parse.__name__ = expected  # argparse names the type in some messages
    return parse


def int_arg(minimum: int | None = None, maximum: int | None = None):
    return _arg_type(lambda v: integer("", v, minimum, maximum), int, "an integer")


def float_arg(minimum: float | None = None, maximum: float | None = None, *, min_open: bool = False):
    return _arg_type(lambda v: real("", v, minimum, maximum, min_open=min_open), float, "a number")


def seed_arg():
    return _arg_type(lambda v: seed("", v), int, "an integer")
