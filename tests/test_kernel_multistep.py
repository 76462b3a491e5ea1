"""The linear multistep step kernel (fastdiff.kernels.multistep) against its plain-PyTorch twin,
fastdiff.reference.multistep_update, on the CPU through Triton's interpreter or on CUDA, and the
row packing of fastdiff.schedulers.linear.

Tolerances, relative to the scale (max |expected|) of each output: fp32 bit for bit on the
interpreter (same operations in the same order, no FMA contraction), 1e-6 on a GPU; fp16 / bf16
1e-3 / 1e-2 against the fp32 reference on the same (rounded) inputs: the kernel computes in fp32
and rounds once on store (the interpreter's fp32 -> bf16 cast truncates: up to 1 ulp more).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastdiff
from fastdiff import ops, reference
from fastdiff.schedulers.linear import NAMES, LinearPlan, LinearStep, slot_buffers

TOLERANCES = {torch.float32: 0.0, torch.float16: 1e-3, torch.bfloat16: 1e-2}
ODD_SHAPES = [(3, 3, 7, 5), (1, 1, 1, 1), (2, 4, 33, 17), (5, 1030), (2, 3)]


def random_step(g: torch.Generator, pushes: int, noise: bool) -> LinearStep:
    """A step with random coefficients over every input the ring holds after ``pushes`` pushes."""
    names = ["x", "c", *(["z"] if noise else []), *[f"m{k}" for k in range(1, min(pushes, 3) + 1)], "last", "acc"]

    def coefficients():
        return {name: float(torch.randn((), generator=g)) for name in names}

    flip = torch.rand(3, generator=g) < 0.5
    a, b, e = (float(v) for v in torch.randn(3, generator=g))
    d = float(0.5 + torch.rand((), generator=g))
    return LinearStep(convert=(a, b, e if noise else 0.0, d), out=coefficients(),
                      last=coefficients() if flip[0] else None, acc=coefficients() if flip[1] else None,
                      push=bool(flip[2]), noise=noise)


def run_both(step_inputs, row, slots, backend, **kwargs):
    """(x_next, c, slots after) on ``backend``; each path gets its own copy of the slots."""
    slots = slots.clone()
    with fastdiff.use_backend(backend):
        prev, converted = ops.multistep_update(*step_inputs, row, slots, **kwargs)
    return prev, converted, slots


def assert_close(actual, expected, dtype):
    scale = expected.float().abs().max().clamp(min=1).item()
    tol = TOLERANCES[dtype] * scale
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=tol if tol else 0)


def inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=g) for _ in range(4)]  # model output, sample, noise, uncond
    return [t.to(dtype=dtype, device=device) for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("guided, noisy", [(False, False), (True, True)])
def test_kernel_matches_the_reference(kernel_device, launches, dtype, shape, guided, noisy):
    model_output, sample, noise, uncond = inputs(shape, dtype, kernel_device)
    g = torch.Generator().manual_seed(1)
    slots = slot_buffers(sample)
    slots.copy_(torch.randn(slots.shape, generator=g).to(dtype))
    plan = LinearPlan(pushes=3)  # every history slot holds an output
    row = plan.pack(random_step(g, 3, noisy))[:reference.ROW_SIZE]
    kwargs = dict(noise=noise if noisy else None, uncond_model_output=uncond if guided else None,
                  guidance_scale=2.5 if guided else 1.0, return_converted=True)
    fast = run_both((model_output, sample), row, slots, "triton", **kwargs)
    assert launches["multistep_update"] == 1
    upcast = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    expected = run_both((model_output.float(), sample.float()), row, slots.float(), "torch", **upcast)
    for actual, wanted in zip(fast, expected):
        assert actual.dtype == dtype
        assert_close(actual, wanted, dtype)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), pushes=st.integers(0, 5), noisy=st.booleans())
def test_any_step_of_any_plan_is_the_reference_bit_for_bit(seed, pushes, noisy):
    """fp32 on the interpreter (or within 1e-6 on a GPU): whatever the coefficients, flags and ring position."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_output, sample, noise, _ = inputs((2, 3, 4, 5), torch.float32, device, seed)
    g = torch.Generator().manual_seed(seed)
    slots = slot_buffers(sample)
    slots.copy_(torch.randn(slots.shape, generator=g))
    row = LinearPlan(pushes=pushes).pack(random_step(g, pushes, noisy))[:reference.ROW_SIZE]
    kwargs = dict(noise=noise if noisy else None, return_converted=True)
    fast = run_both((model_output, sample), row, slots, "triton", **kwargs)
    expected = run_both((model_output, sample), row, slots, "torch", **kwargs)
    for actual, wanted in zip(fast, expected):
        if device == "cpu":
            assert torch.equal(actual, wanted)
        else:
            torch.testing.assert_close(actual, wanted, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_step_does_what_its_coefficients_say(kernel_device, backend):
    """Spelled out: c = (a·x + b·m)/d, x_next over (x, c, m1), c pushed to the oldest slot, last set."""
    x, m = torch.full((1, 4), 2.0, device=kernel_device), torch.full((1, 4), 3.0, device=kernel_device)
    slots = slot_buffers(x)
    plan = LinearPlan()
    first = plan.pack(LinearStep(convert=(1.0, 1.0, 0.0, 5.0), out={"x": 1.0, "c": 10.0}, push=True))
    with fastdiff.use_backend(backend):
        prev, c = ops.multistep_update(m, x, first[:reference.ROW_SIZE], slots, return_converted=True)
        assert prev.tolist() == [[12.0] * 4] and c.tolist() == [[1.0] * 4]  # c = (2 + 3) / 5
        assert slots[0].tolist() == [[1.0] * 4] and not slots[1:].any()  # pushed to slot 0
        second = plan.pack(LinearStep(convert=(0.0, 2.0, 0.0, 1.0), out={"c": 1.0, "m1": -1.0}, last={"x": 0.5},
                                      push=True))
        prev, c = ops.multistep_update(m, x, second[:reference.ROW_SIZE], slots)
    assert c is None and prev.tolist() == [[5.0] * 4]  # c = 6, minus m1 = 1
    assert slots[1].tolist() == [[6.0] * 4] and slots[0].tolist() == [[1.0] * 4]  # m1 is now slot 1
    assert slots[3].tolist() == [[1.0] * 4] and not slots[4].any()  # last = 0.5·x; acc untouched


def test_the_plan_follows_the_ring():
    plan = LinearPlan()
    slots_of_m1 = []
    for _ in range(5):
        plan.pack(LinearStep(convert=(0, 1, 0, 1), out={"c": 1.0}, push=True))
        slots_of_m1.append(plan.slot("m1"))
    assert slots_of_m1 == [0, 1, 2, 0, 1]
    assert [plan.slot(name) for name in ("m1", "m2", "m3")] == [1, 0, 2]
    row = plan.pack(LinearStep(convert=(0, 1, 0, 1), out={"m3": 1.0}, push=True))
    assert row[reference.ROW_PUSH] == 2 and row[reference.ROW_OUT + 3 + 2] == 1.0  # m3 read, then overwritten
    assert row[reference.ROW_READS:reference.ROW_READS + 5].tolist() == [0, 0, 1, 0, 0]


def test_the_plan_refuses_what_cannot_be_right():
    with pytest.raises(ValueError, match="m2 is read before 2 converted outputs were pushed"):
        LinearPlan(pushes=1).pack(LinearStep(convert=(0, 1, 0, 1), out={"m2": 1.0}))
    with pytest.raises(ValueError, match="must set noise=True"):
        LinearPlan().pack(LinearStep(convert=(0, 1, 0, 1), out={"z": 1.0}))
    with pytest.raises(ValueError, match="unknown input 'm4'"):
        LinearPlan().pack(LinearStep(convert=(0, 1, 0, 1), out={"m4": 1.0}))
    assert NAMES == ("x", "c", "z", "m1", "m2", "m3", "last", "acc")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_channels_last_and_sliced_inputs_run_in_place(kernel_device, backend):
    """A channels_last sample with slots in its layout, and a learned-variance half as model output."""
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 4, 6, 5, generator=g).to(kernel_device).to(memory_format=torch.channels_last)
    model_output = torch.randn(2, 8, 6, 5, generator=g).to(kernel_device)[:, :4]
    slots = slot_buffers(sample)
    assert slots[0].is_contiguous(memory_format=torch.channels_last)
    row = LinearPlan().pack(LinearStep(convert=(0.3, 0.7, 0.0, 1.5), out={"x": 0.25, "c": 0.5}, push=True))
    with fastdiff.use_backend(backend):
        prev, _ = ops.multistep_update(model_output, sample, row[:reference.ROW_SIZE], slots)
    c = (0.3 * sample + 0.7 * model_output) / 1.5
    torch.testing.assert_close(prev, 0.25 * sample + 0.5 * c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(slots[0], c, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (dict(row=torch.zeros(3)), "row must have shape"),
    (dict(slots=torch.zeros(4, 2, 3)), "slots must be None or a torch.float32 tensor of shape (5, *(2, 3))"),
    (dict(slots=torch.zeros(5, 2, 3, dtype=torch.float64)), "slots must be None or a torch.float32 tensor"),
    (dict(guidance_scale=2.0), "guidance_scale=2 needs uncond_model_output"),
    (dict(noise=torch.zeros(2, 4)), "noise has shape (2, 4), expected sample's shape (2, 3)"),
])
def test_bad_input_is_refused_naming_it(bad, message):
    kwargs = {**dict(model_output=torch.zeros(2, 3), sample=torch.zeros(2, 3), row=torch.zeros(reference.ROW_SIZE),
                     slots=torch.zeros(5, 2, 3)), **bad}
    with pytest.raises((ValueError, TypeError)) as info:
        ops.multistep_update(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("reconvert", [(0.0, 1.0), (0.7, -1.3)], ids=["x0", "eps-from-x0"])
def test_thresholding_matches_the_reference(kernel_device, launches, reconvert):
    """Dynamic thresholding of c (x̂0) with per-sample scales, then c ← f·x + g·c."""
    shape = (3, 2, 5, 4)
    model_output, sample, noise, uncond = inputs(shape, torch.float32, kernel_device, seed=5)
    model_output = model_output * torch.arange(1, 4, device=kernel_device).reshape(3, 1, 1, 1)  # scales differ
    step = LinearStep(convert=(0.2, 1.5, 0.0, 0.9), out={"x": 0.6, "c": 0.4}, push=True, reconvert=reconvert)
    row = LinearPlan().pack(step)[:reference.ROW_SIZE]
    kwargs = dict(uncond_model_output=uncond, guidance_scale=1.5, dynamic_thresholding_ratio=0.8,
                  sample_max_value=2.5, return_converted=True)
    fast = run_both((model_output, sample), row, slot_buffers(sample), "triton", **kwargs)
    expected = run_both((model_output, sample), row, slot_buffers(sample), "torch", **kwargs)
    assert launches["multistep_update"] == 1
    for actual, wanted in zip(fast, expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-6, atol=1e-6)
    guided = uncond + 1.5 * (model_output - uncond)
    thresholded = reference.dynamic_threshold((0.2 * sample + 1.5 * guided) / 0.9, 0.8, 2.5)
    torch.testing.assert_close(expected[1], reconvert[0] * sample + reconvert[1] * thresholded, rtol=1e-6, atol=1e-6)
