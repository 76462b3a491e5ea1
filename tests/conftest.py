"""Test-session setup shared by every test file.

* Without a CUDA GPU, Triton kernels run on the CPU through Triton's interpreter. It has to be
  chosen before ``triton`` is first imported, hence here, at collection time.
* The suite's default backend is 'torch' (the reference): model-sized tests (U-Net, pipeline,
  quality, training) would take hours through the interpreter. Kernel tests opt in explicitly, with
  ``fastdiff.use_backend("triton")`` or by calling the launchers in ``fastdiff.kernels``; a
  ``FASTDIFF_BACKEND`` already in the environment is respected.
* ``@pytest.mark.gpu`` tests (realistic sizes) run only where CUDA is available: ``pytest -m gpu``.
* The interpreter's integer-overflow checks (it checks every int32 add/mul of a kernel's index
  arithmetic) stay on for the kernel test files (``test_kernel_*.py``: the shapes, strides and
  sizes near the int32 limits) and are off elsewhere, where the kernels run inside models at
  tiny sizes whose offsets are far from overflowing: they cost 55-65% of an interpreted GroupNorm
  or attention launch.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTDIFF_BACKEND", "torch")

# Where the kernel tests put their tensors: the GPU when there is one, else the CPU (interpreter).
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def interpreter_overflow_checks(request):
    """The interpreter's overflow checks on for test_kernel_*.py, off for the rest (module docstring)."""
    builder = None
    if os.environ.get("TRITON_INTERPRET") == "1" and not request.path.name.startswith("test_kernel"):
        try:
            from triton.runtime import interpreter
        except ImportError:
            interpreter = None
        builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if options is None or not hasattr(options, "sanitize_overflow"):
        yield
        return
    builder.options = dataclasses.replace(options, sanitize_overflow=False)
    try:
        yield
    finally:
        builder.options = options


@pytest.fixture
def kernel_device() -> str:
    return KERNEL_DEVICE


def make_tiny_pipeline(device: str = "cpu"):
    """The tests' tiny model: an 8×8, 1-channel, 3-class U-Net (channels 8/16, 2 GroupNorm groups,
    attention at 4×4 and in the middle, seed 0) with DDIM over T = 50 and guidance 2.0. Every kernel
    path in a few ms on a GPU; under the interpreter each GroupNorm program costs ~30 ms, hence 2 groups."""
    from fastdiff import DDIMScheduler, DiffusionPipeline, UNet2D

    torch.manual_seed(0)
    unet = UNet2D(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                  attention_resolutions=(4,), norm_num_groups=2, dropout=0.0, num_classes=3)
    return DiffusionPipeline(unet.to(device).eval(), DDIMScheduler(num_train_timesteps=50), guidance_scale=2.0)


@pytest.fixture
def tiny_pipeline():
    """``make_tiny_pipeline``: call it (optionally with a device) for a fresh pipeline."""
    return make_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny pipeline saved to a folder (read-only for the tests)."""
    path = tmp_path_factory.mktemp("tiny_model")
    make_tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture
def launches(monkeypatch) -> dict[str, int]:
    """op name -> how many times its Triton launcher ran in this test (so a green kernel test cannot
    be the reference answering in the kernel's place)."""
    import importlib

    from fastdiff import ops

    counts = {name: 0 for name in ops.OP_NAMES}
    kernels = importlib.import_module("fastdiff.kernels")
    for name in ops.OP_NAMES:
        module = importlib.import_module(f"fastdiff.kernels.{kernels.OP_MODULES[name]}")
        launcher = getattr(module, name)

        def counted(*args, _name=name, _launcher=launcher, **kwargs):
            counts[_name] += 1
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return counts


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ----------------------------------------------------------------------------- the scheduler test files'
@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of (2, 3, 4, 4)-sized tensors: more only adds overhead and
    contention. Not autouse: a file asks for it with ``pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    """One entry (the sample's dtype) per call of ``ops.multistep_update`` (either backend): a
    drop-in's fused steps."""
    from fastdiff import ops

    calls, real = [], ops.multistep_update

    def counted(*args, **kwargs):
        calls.append(args[1].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "multistep_update", counted)
    return calls


@pytest.fixture
def op_calls(fused_calls) -> dict[str, int]:
    """``fused_calls`` counted: ``op_calls["multistep_update"]`` is how many fused steps ran so far."""

    class Counts(dict):
        def __getitem__(self, name):
            if name != "multistep_update":
                raise KeyError(name)
            return len(fused_calls)

    return Counts()
