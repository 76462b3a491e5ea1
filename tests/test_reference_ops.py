"""fastdiff.reference (the plain-PyTorch twin of every fused op), fastdiff.ops (the dispatch point
and its input checks) and fastdiff.backend (the switch between the two paths).

The reference ops are checked against independent definitions: PyTorch's own
scaled_dot_product_attention and group_norm, and the forward-noising formula written out by hand.
Low-precision inputs are compared with an fp32 computation on the same (rounded) inputs, the
flash-attention way: the reference may be off by no more than about twice what PyTorch's own
low-precision op is.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastdiff
from fastdiff import backend, ops, reference

TOLERANCES = {  # dtype -> rtol = atol, for results compared with an fp32 computation
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ----------------------------------------------------------------------------- attention
ATTENTION_SHAPES = [  # (B, H, Nq, Nk, D)
    (2, 4, 64, 64, 8),    # self attention
    (1, 2, 77, 77, 40),   # odd sequence length, SD's head dim
    (2, 3, 33, 77, 64),   # cross attention, Nq != Nk
    (3, 2, 17, 9, 40),    # Nk < Nq, nothing a power of two
    (1, 1, 1, 5, 8),      # a single query
    (2, 1, 100, 1, 64),   # a single key: the output is v
]


@pytest.mark.parametrize("impl", [reference.attention, ops.attention], ids=["reference", "ops"])
@pytest.mark.parametrize("B, H, Nq, Nk, D", ATTENTION_SHAPES)
def test_attention_matches_sdpa_fp32(impl, B, H, Nq, Nk, D):
    q, k, v = randn(B, H, Nq, D, seed=1), randn(B, H, Nk, D, seed=2), randn(B, H, Nk, D, seed=3)
    out = impl(q, k, v)
    assert out.shape == (B, H, Nq, D) and out.dtype == torch.float32
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=tol, atol=tol)


@pytest.mark.parametrize("scale", [0.05, 0.3, 1.0])
def test_attention_explicit_scale_matches_sdpa(scale):
    q, k, v = randn(2, 2, 20, 40, seed=1), randn(2, 2, 30, 40, seed=2), randn(2, 2, 30, 40, seed=3)
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(reference.attention(q, k, v, scale=scale),
                               F.scaled_dot_product_attention(q, k, v, scale=scale), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, H, Nq, Nk, D", ATTENTION_SHAPES)
def test_attention_low_precision_vs_fp32(dtype, B, H, Nq, Nk, D):
    q, k, v = (randn(B, H, n, D, dtype=dtype, seed=s) for s, n in ((1, Nq), (2, Nk), (3, Nk)))
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    out = reference.attention(q, k, v)
    assert out.dtype == dtype
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    # no worse than PyTorch's own attention in the same precision (flash-attention's criterion)
    ours = (out.float() - expected).abs().max()
    torch_error = (F.scaled_dot_product_attention(q, k, v).float() - expected).abs().max()
    assert ours <= 2 * torch_error + 1e-6


def test_attention_softmax_is_stable_for_large_scores():
    q, k, v = 100 * randn(1, 1, 8, 16, seed=1), 100 * randn(1, 1, 8, 16, seed=2), randn(1, 1, 8, 16, seed=3)
    out = reference.attention(q, k, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- group norm
GROUP_NORM_SHAPES = [  # (shape, num_groups)
    ((2, 32, 8, 8), 8),
    ((1, 6, 5, 7), 3),      # odd spatial size
    ((3, 4, 9), 2),         # (B, C, L)
    ((2, 12, 3, 4, 5), 4),  # (B, C, D, H, W)
    ((2, 3, 1, 1), 3),      # one element per group: normalises to 0
    ((1, 320, 4, 4), 32),   # SD's U-Net width
    ((5, 7, 3, 3), 1),      # one group: layer norm over (C, H, W)
]


@pytest.mark.parametrize("impl", [reference.group_norm, ops.group_norm], ids=["reference", "ops"])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("shape, num_groups", GROUP_NORM_SHAPES)
def test_group_norm_matches_torch_fp32(impl, shape, num_groups, affine, silu):
    x = 3 * randn(*shape, seed=1) + 0.5
    weight, bias = (randn(shape[1], seed=2), randn(shape[1], seed=3)) if affine else (None, None)
    expected = F.group_norm(x, num_groups, weight, bias, eps=1e-5)
    if silu:
        expected = F.silu(expected)
    out = impl(x, num_groups, weight, bias, eps=1e-5, silu=silu)
    assert out.shape == x.shape and out.dtype == x.dtype
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_channels_last(dtype, silu):
    x = randn(2, 16, 7, 5, seed=1).to(dtype).contiguous(memory_format=torch.channels_last)
    weight, bias = randn(16, seed=2).to(dtype), randn(16, seed=3).to(dtype)
    expected = F.group_norm(x.float(), 4, weight.float(), bias.float())
    if silu:
        expected = F.silu(expected)
    out = reference.group_norm(x, 4, weight, bias, silu=silu)
    assert out.dtype == dtype and out.shape == x.shape
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, num_groups", GROUP_NORM_SHAPES)
def test_group_norm_low_precision_vs_fp32(dtype, shape, num_groups):
    x = (3 * randn(*shape, seed=1) + 0.5).to(dtype)
    weight, bias = randn(shape[1], seed=2).to(dtype), randn(shape[1], seed=3).to(dtype)
    expected = F.silu(F.group_norm(x.float(), num_groups, weight.float(), bias.float()))
    out = reference.group_norm(x, num_groups, weight, bias, silu=True)
    assert out.dtype == dtype
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


def test_group_norm_statistics_survive_a_large_mean():
    """Two-pass statistics: E[x²] − E[x]² would cancel catastrophically at mean 1e4, std 1."""
    x = 1e4 + randn(2, 8, 6, 6, seed=1)
    exact = F.group_norm(x.double(), 4)
    ours = (reference.group_norm(x, 4).double() - exact).abs().max()
    torch_fp32 = (F.group_norm(x, 4).double() - exact).abs().max()
    assert ours <= 2 * torch_fp32 + 1e-6 and ours < 1e-2


# ----------------------------------------------------------------------------- forward noising
def q_sample_by_hand(x0, noise, timesteps, alphas_cumprod):
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε and v = √ᾱ_t·ε − √(1−ᾱ_t)·x0, one sample at a time, in float64."""
    x_t, v = torch.empty_like(x0, dtype=torch.float64), torch.empty_like(x0, dtype=torch.float64)
    timesteps = timesteps.expand(x0.shape[0]) if timesteps.ndim == 0 else timesteps
    for i, t in enumerate(timesteps.tolist()):
        a = alphas_cumprod[t].to(x0.dtype).double()  # ᾱ in the sample's dtype, as diffusers casts it
        x_t[i] = a.sqrt() * x0[i].double() + (1 - a).sqrt() * noise[i].double()
        v[i] = a.sqrt() * noise[i].double() - (1 - a).sqrt() * x0[i].double()
    return x_t, v


ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), dim=0)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 5),
    tail=st.lists(st.integers(1, 6), min_size=0, max_size=3),
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    target=st.sampled_from(reference.NOISING_TARGETS),
    scalar_t=st.booleans(),
)
def test_q_sample_matches_the_formula(batch, tail, data, dtype, target, scalar_t):
    shape = (batch, *tail)
    steps = st.integers(0, len(ALPHAS_CUMPROD) - 1)
    if scalar_t:
        timesteps = torch.tensor(data.draw(steps, label="t"))
    else:
        timesteps = torch.tensor(data.draw(st.lists(steps, min_size=batch, max_size=batch), label="t"))
    x0, noise = randn(*shape, dtype=dtype, seed=1), randn(*shape, dtype=dtype, seed=2)

    out = ops.q_sample(x0, noise, timesteps, ALPHAS_CUMPROD, target=target)
    x_t = out if target is None else out[0]
    expected_x_t, expected_v = q_sample_by_hand(x0, noise, timesteps, ALPHAS_CUMPROD)
    tol = TOLERANCES[dtype]
    assert x_t.dtype == dtype and x_t.shape == shape
    torch.testing.assert_close(x_t.double(), expected_x_t, rtol=tol, atol=tol)
    if target is None:
        return
    expected_target = {"epsilon": noise.double(), "sample": x0.double(), "v_prediction": expected_v}[target]
    assert out[1].dtype == dtype
    torch.testing.assert_close(out[1].double(), expected_target, rtol=tol, atol=tol)


def test_q_sample_endpoints():
    x0, noise = randn(3, 2, 4, seed=1), randn(3, 2, 4, seed=2)
    alphas_cumprod = torch.tensor([1.0, 0.5, 0.0])
    x_t, v = ops.q_sample(x0, noise, torch.tensor([0, 1, 2]), alphas_cumprod, target="v_prediction")
    torch.testing.assert_close(x_t[0], x0[0])  # ᾱ = 1: clean
    torch.testing.assert_close(x_t[2], noise[2])  # ᾱ = 0: pure noise
    torch.testing.assert_close(v[0], noise[0])
    torch.testing.assert_close(v[2], -x0[2])


def test_q_sample_int32_timesteps():
    x0, noise = randn(4, 3, seed=1), randn(4, 3, seed=2)
    t = torch.tensor([5, 900, 0, 321])
    torch.testing.assert_close(ops.q_sample(x0, noise, t.int(), ALPHAS_CUMPROD),
                               ops.q_sample(x0, noise, t, ALPHAS_CUMPROD), rtol=0, atol=0)


# ----------------------------------------------------------------------------- ops: dispatch is transparent
def test_ops_steps_equal_the_reference_twins():
    sample, model_output, noise = randn(2, 3, 5, 5, seed=1), randn(2, 3, 5, 5, seed=2), randn(2, 3, 5, 5, seed=3)
    a_t, a_prev = torch.tensor(0.3), torch.tensor(0.6)
    kwargs = dict(prediction_type="v_prediction", clip_sample_range=1.0)
    for op, extra in ((ops.ddpm_step, dict(variance_type="fixed_large")), (ops.ddim_step, dict(eta=0.5))):
        twin = getattr(reference, op.__name__)
        got = op(model_output, sample, a_t, a_prev, noise, **kwargs, **extra)
        want = twin(model_output, sample, a_t, a_prev, noise, **kwargs, **extra)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- ops: input checks
def step_args(shape=(2, 3, 4, 4)):
    return randn(*shape, seed=1), randn(*shape, seed=2), torch.tensor(0.5), torch.tensor(0.7)


@pytest.mark.parametrize("op", [ops.ddpm_step, ops.ddim_step])
def test_step_ops_reject_bad_tensors(op):
    model_output, sample, a_t, a_prev = step_args()
    with pytest.raises(TypeError, match="sample"):
        op(model_output, sample.long(), a_t, a_prev)
    with pytest.raises(TypeError, match="model_output"):
        op(model_output.int(), sample, a_t, a_prev)
    with pytest.raises(ValueError, match="model_output"):
        op(model_output[:, :2], sample, a_t, a_prev)
    with pytest.raises(ValueError, match="noise"):
        op(model_output, sample, a_t, a_prev, randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="uncond_model_output"):
        op(model_output, sample, a_t, a_prev, uncond_model_output=randn(1, 3, 4, 4), guidance_scale=2.0)
    with pytest.raises(ValueError, match="prediction_type"):
        op(model_output, sample, a_t, a_prev, prediction_type="x0")


def test_ddpm_step_op_rejects_bad_variance():
    model_output, sample, a_t, a_prev = step_args()
    noise = randn(2, 3, 4, 4, seed=3)
    with pytest.raises(ValueError, match="variance_type"):
        ops.ddpm_step(model_output, sample, a_t, a_prev, noise, variance_type="fixed")
    with pytest.raises(ValueError, match="variance_type"):  # learned, but no predicted variance
        ops.ddpm_step(model_output, sample, a_t, a_prev, noise, variance_type="learned_range")
    with pytest.raises(ValueError, match="predicted_variance"):
        ops.ddpm_step(model_output, sample, a_t, a_prev, noise, variance_type="learned",
                      predicted_variance=randn(2, 1, 4, 4))


def test_ddim_step_op_rejects_negative_eta():
    model_output, sample, a_t, a_prev = step_args()
    with pytest.raises(ValueError, match="eta"):
        ops.ddim_step(model_output, sample, a_t, a_prev, eta=-1.0)


def test_q_sample_op_rejects_bad_input():
    x0, noise = randn(2, 3, 4, seed=1), randn(2, 3, 4, seed=2)
    t = torch.tensor([1, 2])
    with pytest.raises(TypeError, match="x0"):
        ops.q_sample(x0.long(), noise, t, ALPHAS_CUMPROD)
    with pytest.raises(ValueError, match="noise"):
        ops.q_sample(x0, noise[:, :2], t, ALPHAS_CUMPROD)
    with pytest.raises(TypeError, match="timesteps"):
        ops.q_sample(x0, noise, t.float(), ALPHAS_CUMPROD)
    with pytest.raises(TypeError, match="timesteps"):
        ops.q_sample(x0, noise, [1, 2], ALPHAS_CUMPROD)
    with pytest.raises(ValueError, match="timesteps"):
        ops.q_sample(x0, noise, torch.tensor([1, 2, 3]), ALPHAS_CUMPROD)
    with pytest.raises(ValueError, match="timesteps"):
        ops.q_sample(x0, noise, torch.tensor([[1, 2]]), ALPHAS_CUMPROD)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        ops.q_sample(x0, noise, t, ALPHAS_CUMPROD.reshape(10, 100))
    with pytest.raises(TypeError, match="alphas_cumprod"):
        ops.q_sample(x0, noise, t, torch.arange(1000))
    with pytest.raises(ValueError, match="target"):
        ops.q_sample(x0, noise, t, ALPHAS_CUMPROD, target="x0")


def test_attention_op_rejects_bad_input():
    q, k, v = randn(2, 2, 5, 8, seed=1), randn(2, 2, 7, 8, seed=2), randn(2, 2, 7, 8, seed=3)
    with pytest.raises(ValueError, match="q"):
        ops.attention(q[0], k, v)
    with pytest.raises(TypeError, match="k"):
        ops.attention(q, k.long(), v)
    with pytest.raises(TypeError, match="dtype"):
        ops.attention(q, k, v.half())
    with pytest.raises(ValueError, match="attention expects"):
        ops.attention(q, k, v[:, :, :6])  # k and v of different lengths
    with pytest.raises(ValueError, match="attention expects"):
        ops.attention(q, k[..., :4], v[..., :4])  # head dims differ
    with pytest.raises(ValueError, match="attention expects"):
        ops.attention(q, k[:1], v[:1])  # batch differs


def test_group_norm_op_rejects_bad_input():
    x = randn(2, 6, 4, 4)
    with pytest.raises(TypeError, match="x"):
        ops.group_norm(x.long(), 3)
    with pytest.raises(ValueError, match="x"):
        ops.group_norm(randn(6), 3)
    for bad in (4, 0, -3, 3.0, None):
        with pytest.raises(ValueError, match="num_groups"):
            ops.group_norm(x, bad)
    with pytest.raises(ValueError, match="weight"):
        ops.group_norm(x, 3, weight=randn(5))
    with pytest.raises(ValueError, match="bias"):
        ops.group_norm(x, 3, bias=randn(6, 1))


# ----------------------------------------------------------------------------- backend switch
@pytest.fixture
def no_backend_env(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


def test_default_backend_is_auto(no_backend_env):
    assert fastdiff.get_backend() == "auto"


@pytest.mark.parametrize("value, expected", [("torch", "torch"), ("TRITON", "triton"), ("auto", "auto"), ("", "auto")])
def test_backend_from_environment(no_backend_env, value, expected):
    no_backend_env.setenv("FASTDIFF_BACKEND", value)
    assert fastdiff.get_backend() == expected


def test_invalid_backend_environment_is_an_error(no_backend_env):
    no_backend_env.setenv("FASTDIFF_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND"):
        fastdiff.get_backend()


def test_use_backend_overrides_the_environment_and_nests(no_backend_env):
    no_backend_env.setenv("FASTDIFF_BACKEND", "triton")
    with fastdiff.use_backend("torch") as name:
        assert name == "torch" and fastdiff.get_backend() == "torch"
        with fastdiff.use_backend("AUTO"):
            assert fastdiff.get_backend() == "auto"
        assert fastdiff.get_backend() == "torch"
    assert fastdiff.get_backend() == "triton"


def test_use_backend_restores_after_an_exception(no_backend_env):
    with pytest.raises(KeyError):
        with fastdiff.use_backend("torch"):
            raise KeyError("boom")
    assert fastdiff.get_backend() == "auto"


@pytest.mark.parametrize("name", ["cuda", "Torch2", "", None, 1])
def test_use_backend_with_an_invalid_name_is_an_error(name):
    with pytest.raises(ValueError, match="backend"):
        with fastdiff.use_backend(name):
            pass


def test_use_backend_is_per_thread(no_backend_env):
    seen = []
    with fastdiff.use_backend("torch"):
        thread = threading.Thread(target=lambda: seen.append(fastdiff.get_backend()))
        thread.start()
        thread.join()
    assert seen == ["auto"]


def test_auto_and_torch_resolve_to_the_reference_for_cpu_tensors(no_backend_env):
    x = randn(2, 3)
    for name in ("auto", "torch"):
        with fastdiff.use_backend(name):
            assert backend.resolve(x) == "torch"


@pytest.mark.skipif(not backend.triton_available(), reason="triton is not installed")
def test_auto_takes_triton_under_the_interpreter(no_backend_env):
    no_backend_env.setenv("TRITON_INTERPRET", "1")
    with fastdiff.use_backend("auto"):
        assert backend.resolve(randn(2, 3)) == "triton"
    with fastdiff.use_backend("torch"):
        assert backend.resolve(randn(2, 3)) == "torch"


def test_forcing_triton_on_a_cpu_tensor_is_a_clear_error(no_backend_env):
    x = randn(2, 3, 4, 4)
    with fastdiff.use_backend("triton"):
        with pytest.raises(RuntimeError, match="backend 'triton'.*(TRITON_INTERPRET|not installed)"):
            backend.resolve(x)
        with pytest.raises(RuntimeError, match="backend 'triton'"):
            ops.group_norm(x, 3)
        with pytest.raises(RuntimeError, match="backend 'triton'"):
            ops.q_sample(x, x, torch.tensor([1, 2]), ALPHAS_CUMPROD)
    no_backend_env.setenv("FASTDIFF_BACKEND", "triton")  # the same through the environment
    with pytest.raises(RuntimeError, match="backend 'triton'"):
        ops.attention(x, x, x)


def test_kernel_ops_names_known_ops():
    assert set(ops.kernel_ops()) <= set(ops.OP_NAMES)
