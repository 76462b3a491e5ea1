"""The fused forward-noising kernel (fastdiff.kernels.q_sample) against its plain-PyTorch twin,
fastdiff.reference.q_sample, on the CPU through Triton's interpreter or on CUDA when there is one.

Tolerance: rtol = atol = tol · max|expected| with tol by dtype (fp32 1e-5, fp16 1e-3, bf16 1e-2).
The reference rounds ᾱ and the two roots to x0's dtype, then every op; the kernel rounds ᾱ and the
roots the same way but computes x_t in fp32 and rounds once. So fp32 is compared with the reference
itself, fp16/bf16 with the reference's math in fp32 after the reference's own rounding of the roots.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastdiff
from fastdiff import ops, reference
from fastdiff.kernels import Unsupported
from fastdiff.kernels.q_sample import launch_configs, q_sample

TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = list(TOLERANCES)
SHAPES = [(3, 3, 7, 5), (1, 1, 1, 1), (2, 4, 33, 17), (5, 1030), (4, 3, 16, 16), (2, 3)]
TARGETS = [None, "epsilon", "v_prediction", "sample"]
T = 1000


def randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype=dtype, device=device)


def alphas_cumprod(num_steps=T):
    """A linear-β ᾱ table (DDPM's), float32 on the CPU as the schedulers keep it."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, num_steps), dim=0)


def random_timesteps(batch, seed=0, device="cpu"):
    return torch.randint(0, T, (batch,), generator=torch.Generator().manual_seed(seed)).to(device)


def assert_matches(actual, expected, dtype, what=""):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = TOLERANCES[dtype]
    scale = max(expected.float().abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what}: {m}")


def reference_in_fp32(x0, noise, timesteps, table, target):
    """The reference's result computed in fp32 after its own rounding of √ᾱ and √(1−ᾱ) to x0's
    dtype: the roots come from the reference itself (x0 = 1, ε = 0 gives √ᾱ exactly, and the other
    way round √(1−ᾱ)), the rest is the formula on the upcast inputs."""
    ones, zeros = torch.ones_like(x0), torch.zeros_like(x0)
    sqrt_alpha = reference.q_sample(ones, zeros, timesteps, table).float()
    sqrt_one_minus_alpha = reference.q_sample(zeros, ones, timesteps, table).float()
    x0, noise = x0.float(), noise.float()
    x_t = sqrt_alpha * x0 + sqrt_one_minus_alpha * noise
    targets = {"epsilon": noise, "v_prediction": sqrt_alpha * noise - sqrt_one_minus_alpha * x0, "sample": x0}
    return x_t if target is None else (x_t, targets[target])


def check(x0, noise, timesteps, table, target=None):
    """The launcher equals the reference on these inputs; returns the launcher's output.

    fp32 is compared with the reference itself; fp16/bf16 with the reference's math in fp32 (the
    reference rounds every product and sum to the low precision, so near cancellations it is off by
    many ulps of the result; the kernel rounds once)."""
    out = q_sample(x0, noise, timesteps, table, target)
    if x0.dtype == torch.float32:
        expected = reference.q_sample(x0, noise, timesteps, table, target)
    else:
        expected = reference_in_fp32(x0, noise, timesteps, table, target)
        like = reference.q_sample(x0, noise, timesteps, table, target)
        expected = expected.to(x0.dtype) if target is None else tuple(e.to(x0.dtype) for e in expected)
        assert (out.shape if target is None else out[1].shape) == (like.shape if target is None else like[1].shape)
    if target is None:
        assert_matches(out, expected, x0.dtype, "x_t")
    else:
        assert_matches(out[0], expected[0], x0.dtype, "x_t")
        assert_matches(out[1], expected[1], x0.dtype, f"target {target}")
    return out


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, target, kernel_device):
    x0 = randn(*shape, dtype=dtype, device=kernel_device, seed=1)
    noise = randn(*shape, dtype=dtype, device=kernel_device, seed=2)
    check(x0, noise, random_timesteps(shape[0], device=kernel_device), alphas_cumprod(), target)


def test_fp32_is_the_formula(kernel_device):
    """x_t and v written out by hand in float64 from the same float32 ᾱ: 1e-6 relative."""
    x0, noise = randn(4, 3, 9, 7, device=kernel_device, seed=1), randn(4, 3, 9, 7, device=kernel_device, seed=2)
    timesteps = torch.tensor([0, 1, 500, 999])
    table = alphas_cumprod()
    x_t, v = q_sample(x0, noise, timesteps, table, "v_prediction")
    a = table[timesteps].double().to(kernel_device).reshape(4, 1, 1, 1)
    expected_x_t = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    expected_v = a.sqrt() * noise.double() - (1 - a).sqrt() * x0.double()
    for out, expected in ((x_t, expected_x_t), (v, expected_v)):
        scale = expected.abs().max().item()
        torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6 * scale)


def test_epsilon_and_sample_targets_are_the_inputs_themselves(kernel_device):
    x0, noise = randn(2, 3, 4, 4, device=kernel_device, seed=1), randn(2, 3, 4, 4, device=kernel_device, seed=2)
    timesteps = random_timesteps(2, device=kernel_device)
    assert q_sample(x0, noise, timesteps, alphas_cumprod(), "epsilon")[1] is noise
    assert q_sample(x0, noise, timesteps, alphas_cumprod(), "sample")[1] is x0


def test_low_precision_rounds_alpha_bar_like_the_reference(kernel_device):
    """ᾱ close to 1 in bf16 rounds to 1 (√(1−ᾱ) = 0): the kernel must do what the reference does."""
    table = torch.tensor([0.9999, 0.999, 0.5, 1e-4])
    x0 = randn(4, 2, 8, dtype=torch.bfloat16, device=kernel_device, seed=1)
    noise = randn(4, 2, 8, dtype=torch.bfloat16, device=kernel_device, seed=2)
    out = check(x0, noise, torch.arange(4), table, "v_prediction")
    assert torch.equal(out[0][0], x0[0])  # ᾱ = 0.9999 -> 1.0 in bf16: x_t = x0 exactly


# ----------------------------------------------------------------------------- timesteps and the ᾱ table
@pytest.mark.parametrize("timesteps", [
    torch.tensor(17),                           # 0-d: one timestep for the whole batch
    torch.tensor([17]),                         # (1,)
    torch.tensor([0, 999, 500]),                # per sample, both ends of the table
    torch.tensor([-1, -1000, 3]),               # negative indices count from the end, as in Python
    torch.tensor([5, 6, 7], dtype=torch.int32),
], ids=["0d", "one", "per_sample", "negative", "int32"])
def test_timesteps_forms(timesteps, kernel_device):
    x0, noise = randn(3, 2, 5, 5, device=kernel_device, seed=1), randn(3, 2, 5, 5, device=kernel_device, seed=2)
    check(x0, noise, timesteps, alphas_cumprod(), "v_prediction")
    check(x0, noise, timesteps.to(kernel_device), alphas_cumprod().to(kernel_device))


def test_scalar_timestep_equals_repeating_it(kernel_device):
    x0, noise = randn(3, 2, 5, 5, device=kernel_device, seed=1), randn(3, 2, 5, 5, device=kernel_device, seed=2)
    shared = q_sample(x0, noise, torch.tensor(123), alphas_cumprod())
    repeated = q_sample(x0, noise, torch.full((3,), 123), alphas_cumprod())
    assert torch.equal(shared, repeated)


@pytest.mark.parametrize("table_dtype", [torch.float64, torch.float16])
def test_table_is_cast_to_the_samples_dtype(table_dtype, kernel_device):
    x0, noise = randn(3, 4, 6, device=kernel_device, seed=1), randn(3, 4, 6, device=kernel_device, seed=2)
    check(x0, noise, random_timesteps(3), alphas_cumprod().to(table_dtype), "v_prediction")


def test_out_of_range_cpu_timesteps_raise_index_error(kernel_device):
    x0 = randn(2, 3, device=kernel_device)
    for bad in ([0, 1000], [-1001, 0]):
        with pytest.raises(IndexError, match="out of bounds"):
            q_sample(x0, x0, torch.tensor(bad), alphas_cumprod())


def test_timesteps_count_must_be_one_or_batch(kernel_device):
    x0 = randn(3, 4, device=kernel_device)
    with pytest.raises(ValueError, match="timesteps"):
        q_sample(x0, x0, torch.tensor([1, 2]), alphas_cumprod())


# ----------------------------------------------------------------------------- layouts
def test_channels_last_stays_channels_last(kernel_device):
    x0 = randn(2, 5, 6, 7, device=kernel_device, seed=1).to(memory_format=torch.channels_last)
    noise = randn(2, 5, 6, 7, device=kernel_device, seed=2).to(memory_format=torch.channels_last)
    x_t, v = check(x0, noise, random_timesteps(2), alphas_cumprod(), "v_prediction")
    assert x_t.is_contiguous(memory_format=torch.channels_last)
    assert v.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["channel_slice", "batch_slice", "transposed", "batch_broadcast",
                                    "mixed_channels_last", "step_slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_inputs(layout, dtype, kernel_device):
    """Views are read in place where their rows are dense, copied otherwise; values are the same."""
    big = randn(6, 8, 9, 5, dtype=dtype, device=kernel_device, seed=1)
    noise = randn(3, 4, 9, 5, dtype=dtype, device=kernel_device, seed=2)
    x0 = {
        "channel_slice": big[:3, 2:6],                                  # batch stride 8·9·5
        "batch_slice": big[1:4, :4],
        "transposed": big[:3, :4].transpose(2, 3).contiguous().transpose(2, 3),
        "batch_broadcast": big[:1, :4].expand(3, 4, 9, 5),              # batch stride 0
        "mixed_channels_last": big[:3, :4].contiguous(memory_format=torch.channels_last),
        "step_slice": big[::2, ::2],                                    # rows not dense: copied
    }[layout]
    assert x0.shape == noise.shape
    check(x0, noise, random_timesteps(3), alphas_cumprod(), "v_prediction")
    check(noise, x0, random_timesteps(3, seed=1), alphas_cumprod())     # the view as the noise


def test_empty_batch(kernel_device):
    x0 = randn(0, 3, 4, device=kernel_device)
    x_t, v = q_sample(x0, x0, torch.zeros(0, dtype=torch.int64), alphas_cumprod(), "v_prediction")
    assert x_t.shape == v.shape == (0, 3, 4)


# ----------------------------------------------------------------------------- property tests
@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4),
    inner=st.lists(st.integers(1, 9), min_size=0, max_size=3),
    alpha_bars=st.lists(st.floats(2**-20, 1.0, width=32), min_size=1, max_size=8),
    dtype=st.sampled_from(DTYPES),
    target=st.sampled_from(TARGETS),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(batch, inner, alpha_bars, dtype, target, seed):
    """Any shape, any ᾱ in (0, 1], any dtype and target."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = (batch, *inner)
    x0 = randn(*shape, dtype=dtype, device=device, seed=seed)
    noise = randn(*shape, dtype=dtype, device=device, seed=seed + 1)
    table = torch.tensor(alpha_bars)
    timesteps = torch.randint(0, len(alpha_bars), (batch,), generator=torch.Generator().manual_seed(seed))
    check(x0, noise, timesteps, table, target)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("x0_dtype, noise_dtype", [
    (torch.float64, torch.float64),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.float32),
])
def test_unsupported_dtypes_raise(x0_dtype, noise_dtype, kernel_device):
    x0, noise = randn(2, 3, dtype=x0_dtype, device=kernel_device), randn(2, 3, dtype=noise_dtype, device=kernel_device)
    with pytest.raises(Unsupported, match="dtype"):
        q_sample(x0, noise, torch.tensor([1, 2]), alphas_cumprod())


def test_unsupported_timestep_dtype_raises(kernel_device):
    x0 = randn(2, 3, device=kernel_device)
    with pytest.raises(Unsupported, match="timesteps"):
        q_sample(x0, x0, torch.tensor([1, 2], dtype=torch.int16), alphas_cumprod())


def test_unknown_target_raises(kernel_device):
    x0 = randn(2, 3, device=kernel_device)
    with pytest.raises(ValueError, match="target"):
        q_sample(x0, x0, torch.tensor([1, 2]), alphas_cumprod(), "x0")


# ----------------------------------------------------------------------------- dispatch and configs
def test_ops_dispatches_to_the_kernel(monkeypatch, kernel_device):
    module = importlib.import_module("fastdiff.kernels.q_sample")
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return q_sample(*args, **kwargs)

    monkeypatch.setattr(module, "q_sample", counted)
    x0, noise = randn(3, 2, 5, 5, device=kernel_device, seed=1), randn(3, 2, 5, 5, device=kernel_device, seed=2)
    timesteps = random_timesteps(3, device=kernel_device)
    for _ in range(2):  # the second call must still find the launcher
        with fastdiff.use_backend("triton"):
            x_t, v = ops.q_sample(x0, noise, timesteps, alphas_cumprod(), target="v_prediction")
    assert len(calls) == 2
    expected = reference.q_sample(x0, noise, timesteps, alphas_cumprod(), "v_prediction")
    assert_matches(x_t, expected[0], x0.dtype)
    assert_matches(v, expected[1], x0.dtype)


def test_launch_configs_cover_every_dtype():
    configs = launch_configs()
    assert {c.tags["dtype"] for c in configs} == {"float32", "float16", "bfloat16"}
    for config in configs:
        assert set(config.signature) == set(config.kernel.arg_names)
        assert config.signature["x0_ptr"] == {"float32": "*fp32", "float16": "*fp16",
                                              "bfloat16": "*bf16"}[config.tags["dtype"]]


# ----------------------------------------------------------------------------- realistic sizes (GPU)
@pytest.mark.gpu
@pytest.mark.parametrize("target", [None, "v_prediction"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_training_batch(dtype, target):
    """A CIFAR-sized training batch: 256 × 3 × 32 × 32, per-sample timesteps on the device."""
    x0 = randn(256, 3, 32, 32, dtype=dtype, device="cuda", seed=1)
    noise = randn(256, 3, 32, 32, dtype=dtype, device="cuda", seed=2)
    check(x0, noise, random_timesteps(256, device="cuda"), alphas_cumprod().cuda(), target)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_64m_elements(dtype):
    """64M elements (4 × 4 × 2048 × 2048), ᾱ table and timesteps on the CPU as schedulers keep them."""
    x0 = torch.randn(4, 4, 2048, 2048, device="cuda").to(dtype)
    noise = torch.randn(4, 4, 2048, 2048, device="cuda").to(dtype)
    check(x0, noise, torch.tensor([0, 10, 500, 999]), alphas_cumprod(), "v_prediction")
