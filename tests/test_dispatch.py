"""fastdiff.ops routes every op to its Triton kernel or to the reference, as the issue specifies:

* backend 'triton' (or 'auto' with CUDA tensors / under the interpreter) runs the kernel;
* backend 'torch' runs the reference;
* when autograd must record the op (training), the reference runs on every backend (no kernel has
  a backward) and gradients flow;
* input a kernel cannot take (float64 here) falls back to the reference under 'auto' and is a clear
  error under an explicit 'triton'.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import fastdiff
from fastdiff import backend, ops, reference
from fastdiff.schedulers.linear import LinearPlan, LinearStep

pytestmark = pytest.mark.skipif(not backend.triton_available(), reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(DEVICE)


def alphas(dtype=torch.float32):
    return torch.linspace(0.999, 0.01, 50, dtype=dtype, device=DEVICE)


def call(op: str, dtype=torch.float32, requires_grad=False):
    """Call ``ops.<op>`` on small inputs; return its (first) output."""
    x = randn(2, 4, 5, 3, dtype=dtype, seed=1).requires_grad_(requires_grad)
    y = randn(2, 4, 5, 3, dtype=dtype, seed=2)
    a_t, a_prev = torch.tensor(0.5), torch.tensor(0.7)
    if op == "q_sample":
        return ops.q_sample(x, y, torch.tensor([3, 40], device=DEVICE), alphas(dtype))
    if op == "ddpm_step":
        return ops.ddpm_step(x, y, a_t, a_prev, randn(2, 4, 5, 3, dtype=dtype, seed=3))[0]
    if op == "ddim_step":
        return ops.ddim_step(x, y, a_t, a_prev, randn(2, 4, 5, 3, dtype=dtype, seed=3), eta=0.5)[0]
    if op == "multistep_update":  # DPM-Solver++(2M)-shaped: x and c combined with the previous output
        row = LinearPlan(pushes=1).pack(LinearStep(convert=(1.0, -0.5, 0.0, 0.8), out={"x": 0.9, "c": 0.2, "m1": -0.1},
                                                   push=True))[:reference.ROW_SIZE]
        slots = randn(5, 2, 4, 5, 3, dtype=dtype, seed=4)
        return ops.multistep_update(x, y, row, slots)[0]
    if op == "attention":
        return ops.attention(x, y, y)
    return ops.group_norm(x, 2, silu=True)


def test_every_op_has_a_kernel():
    assert ops.kernel_ops() == list(ops.OP_NAMES)


@pytest.mark.parametrize("op", ops.OP_NAMES)
def test_triton_backend_runs_the_kernel_and_torch_the_reference(op, launches):
    with fastdiff.use_backend("triton"):
        fast = call(op)
    assert launches[op] == 1
    with fastdiff.use_backend("torch"):
        expected = call(op)
    assert launches[op] == 1
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["attention", "group_norm", "q_sample"])
def test_autograd_takes_the_reference_on_every_backend(op, launches):
    with fastdiff.use_backend("triton"):
        out = call(op, requires_grad=True)
    assert launches[op] == 0 and out.requires_grad
    out.sum().backward()  # gradients flow through the reference


def test_no_grad_takes_the_kernel_even_for_parameters(launches):
    weight = torch.nn.Parameter(torch.ones(4, device=DEVICE))
    with fastdiff.use_backend("triton"), torch.no_grad():
        ops.group_norm(randn(2, 4, 3, 3), 2, weight)
    assert launches["group_norm"] == 1


@pytest.mark.parametrize("op", ops.OP_NAMES)
def test_unsupported_dtype_falls_back_under_auto_and_is_an_error_under_triton(op, launches):
    with fastdiff.use_backend("auto"):
        out = call(op, dtype=torch.float64)
    assert out.dtype == torch.float64
    if backend.resolve(out) == "triton":
        assert launches[op] == 1  # the kernel was asked, said Unsupported, and the reference answered
        with fastdiff.use_backend("triton"):
            with pytest.raises(ValueError, match="float64"):
                call(op, dtype=torch.float64)


def test_reference_and_ops_share_signatures():
    import inspect

    for name in ops.OP_NAMES:
        launcher = importlib.import_module("fastdiff.kernels").launcher(name)
        assert inspect.signature(launcher) == inspect.signature(getattr(reference, name)), name


def test_compiled_unet_is_one_graph_on_the_reference(tiny_pipeline):
    """torch.compile traces the reference (the backend switch would break the graph at every op)."""
    unet = tiny_pipeline().unet
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    torch._dynamo.reset()
    compiled = torch.compile(unet, backend="eager", fullgraph=True)  # fullgraph: a graph break is an error
    with torch.no_grad(), fastdiff.use_backend("torch"):
        torch.testing.assert_close(compiled(x, t), unet(x, t), rtol=1e-5, atol=1e-5)
