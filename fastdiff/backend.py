"""Which path runs the fused ops: our Triton kernels or the plain-PyTorch reference.

One switch, read at call time:

* ``FASTDIFF_BACKEND=auto|triton|torch`` in the environment (default ``auto``);
* ``with fastdiff.use_backend("torch"): ...`` overrides it for the enclosed block (per thread /
  per asyncio task, it nests).

``auto`` means: Triton for CUDA tensors, or for any tensor under Triton's CPU interpreter
(``TRITON_INTERPRET=1``), when Triton imports; the reference otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "FASTDIFF_BACKEND"

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastdiff_backend", default=None)


def _check(name: str, where: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{where} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name.lower()


def get_backend() -> str:
    """The backend asked for: the innermost ``use_backend`` block, else ``$FASTDIFF_BACKEND``."""
    name = _override.get()
    if name is not None:
        return name
    return _check(os.environ.get(ENV_VAR, "auto") or "auto", f"${ENV_VAR}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the enclosed block on ``name`` ('auto', 'triton' or 'torch')."""
    token = _override.set(_check(name, "backend"))
    try:
        yield _override.get()
    finally:
        _override.reset(token)


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is a Linux-only dependency)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(tensor: torch.Tensor) -> str:
    """'triton' or 'torch': the path an op on ``tensor`` takes under the current backend.

    ``triton`` asked for explicitly on a tensor no kernel can run on (a CPU tensor without the
    interpreter, or no Triton installed) is an error rather than a silent fallback.
    """
    name = get_backend()
    if name == "torch":
        return "torch"
    runnable = triton_available() and (tensor.is_cuda or interpreter_enabled())
    if name == "auto":
        return "triton" if runnable else "torch"
    if not runnable:
        why = "triton is not installed" if not triton_available() else (
            f"the tensor is on {tensor.device.type}; Triton kernels need CUDA tensors "
            "or TRITON_INTERPRET=1 for the CPU interpreter")
        raise RuntimeError(f"backend 'triton' was requested but cannot run: {why}")
    return "triton"
