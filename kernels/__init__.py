"""fastdiff's Triton kernels, shipped as ``fastdiff.kernels``.

One fused op per file (``@triton.jit`` kernel + launcher); each launcher has the signature of its
plain-PyTorch twin in ``fastdiff.reference``. Call them through ``fastdiff.ops`` (it checks input
and picks the path); inside this package use relative imports. Never ``import kernels``: the folder
is the ``fastdiff.kernels`` package, not a top-level module.

The op modules load on first use (``launcher(name)``), so ``import fastdiff`` does not import
triton, and a broken op module cannot take the others down with it. (No module ``__getattr__``:
once a submodule such as ``.attention`` is imported, Python binds the module, not the function,
to that package attribute.)
"""

from __future__ import annotations

import importlib

from ._common import Unsupported

# op name -> the module (in this package) whose launcher it is
OP_MODULES = {
    "q_sample": "q_sample",
    "ddpm_step": "scheduler_step",
    "ddim_step": "scheduler_step",
    "multistep_update": "multistep",
    "attention": "attention",
    "group_norm": "group_norm",
}

__all__ = ["OP_MODULES", "Unsupported", "launcher"]


def launcher(name: str):
    """The launcher of op ``name`` (a key of ``OP_MODULES``), importing its module on first use."""
    if name not in OP_MODULES:
        raise ValueError(f"name must be one of {', '.join(map(repr, OP_MODULES))}; got {name!r}")
    return getattr(importlib.import_module(f".{OP_MODULES[name]}", __name__), name)
