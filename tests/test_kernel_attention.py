"""The flash attention kernel (fastdiff.kernels.attention) against fastdiff.reference.attention and
torch.nn.functional.scaled_dot_product_attention.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py), so the CPU shapes are
small but odd: sequence lengths that leave a tail in both the query and the key blocks, head dims
that are not powers of two (padded to BLOCK_D), cross attention, one key, one query. Low precision
follows flash attention's criterion: on the same rounded inputs, the kernel's error against an fp32
computation is at most twice PyTorch's own (SDPA in that precision), plus a tiny epsilon.
``@pytest.mark.gpu`` tests run U-Net sizes with ``pytest -m gpu`` on a CUDA machine.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import fastdiff  # noqa: E402
from fastdiff import ops, reference  # noqa: E402
from fastdiff.kernels import Unsupported  # noqa: E402
# the module, then its launcher (``fastdiff.kernels.launcher("attention")`` would do the same)
attention_module = importlib.import_module("fastdiff.kernels.attention")
attention = attention_module.attention

TOLERANCES = {  # dtype -> rtol = atol against an fp32 computation on the same inputs
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}
LOW_PRECISION = [torch.float16, torch.bfloat16]

SHAPES = [  # (B, H, Nq, Nk, D)
    (1, 1, 1, 1, 16),  # one query, one key
    (2, 3, 33, 77, 40),  # cross attention, Stable Diffusion's head dim (padded to 64)
    (1, 2, 77, 77, 80),  # self attention, odd length, D padded to 128
    (1, 1, 17, 130, 160),  # many key blocks with a 2-key tail, D padded to 256
    (1, 1, 64, 64, 256),  # the DDPM CIFAR-10 head dim
    (2, 2, 100, 1, 64),  # a single key: the output is v
    (3, 2, 17, 9, 3),  # Nk < Nq, tiny D (padded to 16, unaligned path)
]


def randn(*shape, dtype=torch.float32, seed=0, device="cpu"):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def qkv(B, H, Nq, Nk, D, dtype=torch.float32, device="cpu", scale=1.0):
    return (scale * randn(B, H, Nq, D, seed=1, device=device).to(dtype),
            scale * randn(B, H, Nk, D, seed=2, device=device).to(dtype),
            randn(B, H, Nk, D, seed=3, device=device).to(dtype))


def assert_close_fp32(out, q, k, v, scale=None):
    """fp32 output against the reference and SDPA, both in fp32."""
    assert out.dtype == torch.float32 and out.shape == q.shape[:3] + (v.shape[-1],)
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out, reference.attention(q, k, v, scale=scale), rtol=tol, atol=tol)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=scale), rtol=tol, atol=tol)


def assert_flash_criterion(out, q, k, v, scale=None):
    """Low-precision output: within the dtype's tolerance of fp32 attention on the same rounded
    inputs, and no more than twice as far from it as SDPA in the same precision."""
    dtype = q.dtype
    assert out.dtype == dtype
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    ours = (out.float() - expected).abs().max().item()
    torch_error = (F.scaled_dot_product_attention(q, k, v, scale=scale).float() - expected).abs().max().item()
    assert ours <= 2 * torch_error + 1e-6, f"kernel error {ours:.3g} vs SDPA's {torch_error:.3g}"


# ----------------------------------------------------------------------------- against the references
@pytest.mark.parametrize("B, H, Nq, Nk, D", SHAPES)
def test_fp32_matches_reference_and_sdpa(kernel_device, B, H, Nq, Nk, D):
    q, k, v = qkv(B, H, Nq, Nk, D, device=kernel_device)
    assert_close_fp32(attention(q, k, v), q, k, v)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("B, H, Nq, Nk, D", SHAPES)
def test_low_precision_flash_criterion(kernel_device, dtype, B, H, Nq, Nk, D):
    q, k, v = qkv(B, H, Nq, Nk, D, dtype=dtype, device=kernel_device)
    assert_flash_criterion(attention(q, k, v), q, k, v)


@pytest.mark.parametrize("scale", [0.05, 1.0, -0.3, "tensor"])
def test_explicit_scale(kernel_device, scale):
    q, k, v = qkv(2, 2, 20, 45, 40, device=kernel_device)
    if scale == "tensor":  # a 0-d tensor, as a schedule value would arrive
        scale = torch.tensor(0.3)
    out = attention(q, k, v, scale=scale)
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out, reference.attention(q, k, v, scale=scale), rtol=tol, atol=tol)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=float(scale)), rtol=tol, atol=tol)


def test_explicit_scale_bf16(kernel_device):
    q, k, v = qkv(1, 2, 33, 70, 64, dtype=torch.bfloat16, device=kernel_device)
    assert_flash_criterion(attention(q, k, v, scale=0.5), q, k, v, scale=0.5)


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), Nq=st.integers(1, 70), Nk=st.integers(1, 140),
       D=st.integers(1, 96), seed=st.integers(0, 2**16))
def test_property_fp32_matches_reference(B, H, Nq, Nk, D, seed):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (randn(B, H, n, D, seed=seed + i, device=device) for i, n in enumerate((Nq, Nk, Nk)))
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(attention(q, k, v), reference.attention(q, k, v), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- layouts
def unet_views(B, N, H, D, dtype, device, seed):
    """q as the U-Net makes it: a (B, N, H·D) projection viewed as (B, H, N, D)."""
    return randn(B, N, H * D, seed=seed, device=device).to(dtype).reshape(B, N, H, D).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_views_as_the_unet_makes_them(kernel_device, dtype):
    B, H, Nq, Nk, D = 2, 3, 37, 50, 40
    q = unet_views(B, Nq, H, D, dtype, kernel_device, seed=1)
    k, v = unet_views(B, Nk, H, D, dtype, kernel_device, seed=2), unet_views(B, Nk, H, D, dtype, kernel_device, seed=3)
    assert not q.is_contiguous() and q.stride() == (Nq * H * D, D, H * D, 1)
    assert attention_module._is_aligned(D, q, k, v)  # D = 40 and its strides: the vectorised path
    out = attention(q, k, v)
    if dtype == torch.float32:
        assert_close_fp32(out, q, k, v)
    else:
        assert_flash_criterion(out, q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sliced_head_dims_and_misaligned_storage(kernel_device, dtype):
    """Slices of wider tensors: the row stride is not D, and starting at column 3 the base pointer
    is not 16-byte aligned (the unaligned path)."""
    B, H, Nq, Nk, D = 1, 2, 29, 41, 40
    wide_q = randn(B, H, Nq, D + 8, seed=1, device=kernel_device).to(dtype)
    wide_k = randn(B, H, Nk, D + 11, seed=2, device=kernel_device).to(dtype)
    wide_v = randn(B, H, Nk, D + 8, seed=3, device=kernel_device).to(dtype)
    q, k, v = wide_q[..., :D], wide_k[..., 3:3 + D], wide_v[..., 8:]
    assert not attention_module._is_aligned(D, q, k, v)
    assert attention_module._is_aligned(D, wide_q[..., :D], wide_v[..., 8:])
    out = attention(q, k, v)
    if dtype == torch.float32:
        assert_close_fp32(out, q, k, v)
    else:
        assert_flash_criterion(out, q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_d", attention_module.BLOCK_DS)
@pytest.mark.parametrize("aligned", [True, False])
def test_every_table_entry_computes_attention(kernel_device, dtype, block_d, aligned):
    """Each (dtype, BLOCK_D, aligned) entry of the launcher's tables, as it launches: D = BLOCK_D
    takes the aligned entry, D = BLOCK_D − 1 (odd) the unaligned one, with a tail in both the query
    and the key blocks of every entry's tiles."""
    D = block_d if aligned else block_d - 1
    q, k, v = qkv(1, 2, 70, 45, D, dtype=dtype, device=kernel_device)
    assert attention_module.block_d_for(D) == block_d and attention_module._is_aligned(D, q, k, v) == aligned
    out = attention(q, k, v)
    if dtype == torch.float32:
        assert_close_fp32(out, q, k, v)
    else:
        assert_flash_criterion(out, q, k, v)


def test_triton_3_6_interpreter_gets_a_scalar_index(monkeypatch):
    """Triton 3.6's interpreter gives a kernel's int argument a (1,) array and ``__index__ =
    int(array)``, which NumPy 2 refuses: the key loop ``range(0, seq_k, BLOCK_N)`` raised there.
    ``fastdiff.kernels._common`` replaces that ``__index__`` under 3.6, and leaves other versions alone."""
    import types

    import numpy as np
    import triton
    from triton.runtime import interpreter

    common = importlib.import_module("fastdiff.kernels._common")

    calls = []

    def triton_3_6_patch(tensor, scope):  # what 3.6 sets, among other attributes
        calls.append(tensor)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    scope = types.SimpleNamespace(attrs={})
    scope.set_attr = lambda obj, name, value: scope.attrs.__setitem__(name, value)
    seq_k = types.SimpleNamespace(handle=types.SimpleNamespace(data=np.array([77], dtype=np.int32)))
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", triton_3_6_patch)
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    common._fix_interpreter_index()
    assert interpreter._patch_lang_tensor is triton_3_6_patch
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    common._fix_interpreter_index()
    common._fix_interpreter_index()  # wraps once, however often it is called
    interpreter._patch_lang_tensor("tensor", scope)
    assert calls == ["tensor"] and scope.attrs["__index__"](seq_k) == 77


def test_non_unit_head_dim_stride_and_broadcast_heads(kernel_device):
    """q stored (B, H, D, N) and transposed (head-dim stride N); k, v one head expanded to H (stride 0)."""
    B, H, Nq, Nk, D = 2, 3, 21, 33, 24
    q = randn(B, H, D, Nq, seed=1, device=kernel_device).transpose(-1, -2)
    k = randn(B, 1, Nk, D, seed=2, device=kernel_device).expand(B, H, Nk, D)
    v = randn(B, 1, Nk, D, seed=3, device=kernel_device).expand(B, H, Nk, D)
    assert q.stride(-1) == Nq and k.stride(1) == 0
    assert_close_fp32(attention(q, k, v), q, k, v)


def test_memory_past_the_views_is_never_read(kernel_device):
    """Keys past Nk and head-dim columns past D hold NaN in the underlying storage: a masked key
    must contribute exactly 0 and a padded column must not be loaded."""
    B, H, Nq, Nk, D = 1, 2, 19, 70, 40
    q_full = randn(B, H, Nq, 64, seed=1, device=kernel_device)
    k_full = randn(B, H, Nk + 30, 64, seed=2, device=kernel_device)
    v_full = randn(B, H, Nk + 30, 64, seed=3, device=kernel_device)
    for full in (q_full, k_full, v_full):
        full[..., D:] = float("nan")
    k_full[:, :, Nk:] = float("nan")
    v_full[:, :, Nk:] = float("nan")
    q, k, v = q_full[..., :D], k_full[:, :, :Nk, :D], v_full[:, :, :Nk, :D]
    out = attention(q, k, v)
    assert torch.isfinite(out).all()
    assert_close_fp32(out, q, k, v)


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_scores_do_not_overflow(kernel_device, dtype):
    """Scores ~ 1e4 (exp would overflow fp32 without the running max). The score gaps are so large
    that softmax is one-hot: the output is the v row of each query's best key, to rounding."""
    B, H, Nq, Nk, D = 1, 2, 9, 150, 16  # several key blocks: the running max moves between them
    q, k, v = qkv(B, H, Nq, Nk, D, dtype=dtype, device=kernel_device, scale=100.0)
    out = attention(q, k, v, scale=0.25)
    scores = (q.double() @ k.double().transpose(-2, -1)) * 0.25  # (B, H, Nq, Nk)
    top2 = scores.topk(2, dim=-1).values
    assert scores.abs().max() > 5e3 and (top2[..., 0] - top2[..., 1]).min() > 50  # the premise: one-hot
    assert torch.isfinite(out).all()
    best = v.gather(2, scores.argmax(-1, keepdim=True).expand(B, H, Nq, D))
    torch.testing.assert_close(out, best, rtol=0, atol=0)  # weights 1 and < 2**-70: exactly v
    torch.testing.assert_close(out.float(), reference.attention(q, k, v, scale=0.25).float(), rtol=0, atol=0)


def test_single_key_returns_v_and_uniform_scores_average(kernel_device):
    q, k, v = qkv(2, 1, 70, 1, 40, device=kernel_device)
    torch.testing.assert_close(attention(q, k, v), v.expand(2, 1, 70, 40), rtol=0, atol=0)
    q, k, v = qkv(1, 1, 5, 100, 32, device=kernel_device)
    tol = TOLERANCES[torch.float32]
    torch.testing.assert_close(attention(q, k, v, scale=0.0), v.mean(dim=2, keepdim=True).expand(1, 1, 5, 32),
                               rtol=tol, atol=tol)


def test_empty_inputs_match_the_reference(kernel_device):
    for shape_q, shape_kv in (((2, 3, 0, 16), (2, 3, 5, 16)), ((0, 3, 4, 16), (0, 3, 5, 16)),
                              ((2, 3, 4, 16), (2, 3, 0, 16))):
        q = torch.randn(shape_q, device=kernel_device)
        k = torch.randn(shape_kv, device=kernel_device)
        out = attention(q, k, k)
        torch.testing.assert_close(out, reference.attention(q, k, k))


# ----------------------------------------------------------------------------- input the kernel refuses
def test_head_dim_over_256_is_unsupported(kernel_device):
    q = torch.randn(1, 1, 4, 300, device=kernel_device)
    with pytest.raises(Unsupported, match=r"head dim D = 300.*<= 256"):
        attention(q, q, q)


def test_float64_is_unsupported(kernel_device):
    q = torch.randn(1, 1, 4, 16, dtype=torch.float64, device=kernel_device)
    with pytest.raises(Unsupported, match=r"q has dtype torch.float64"):
        attention(q, q, q)


def test_non_scalar_scale_is_unsupported(kernel_device):
    q = torch.randn(1, 1, 4, 16, device=kernel_device)
    with pytest.raises(Unsupported, match=r"scale must be a number or a one-element tensor"):
        attention(q, q, q, scale=torch.ones(2))


def test_explicit_triton_backend_raises_unsupported_and_auto_falls_back(kernel_device):
    q = torch.randn(1, 1, 4, 300, device=kernel_device)
    with fastdiff.use_backend("triton"), pytest.raises(Unsupported, match="head dim"):
        ops.attention(q, q, q)
    with fastdiff.use_backend("auto"):
        torch.testing.assert_close(ops.attention(q, q, q), reference.attention(q, q, q))


# ----------------------------------------------------------------------------- dispatch and configs
def test_ops_attention_dispatches_to_the_kernel(kernel_device, monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return attention(*args, **kwargs)

    monkeypatch.setattr(attention_module, "attention", counted)
    q, k, v = qkv(2, 2, 33, 20, 40, dtype=torch.bfloat16, device=kernel_device)
    with fastdiff.use_backend("triton"):
        out = ops.attention(q, k, v, scale=0.2)
    assert calls == [1]
    assert_flash_criterion(out, q, k, v, scale=0.2)


def test_launch_configs_cover_every_choice_the_launcher_makes():
    configs = attention_module.launch_configs()
    listed = {(c.tags["dtype"], c.constexprs["BLOCK_D"], c.constexprs["ALIGNED"]):
              (c.constexprs["BLOCK_M"], c.constexprs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs}
    assert len(listed) == len(configs) == 3 * len(attention_module.BLOCK_DS) * 2
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for head_dim in range(1, attention_module.MAX_HEAD_DIM + 1):
            block_d = attention_module.block_d_for(head_dim)
            assert head_dim <= block_d and block_d in attention_module.BLOCK_DS
            for aligned in (True, False):
                key = (str(dtype).removeprefix("torch."), block_d, aligned)
                assert listed[key] == attention_module._choose(block_d, dtype, aligned)
    for c in configs:
        block_m, block_n = c.constexprs["BLOCK_M"], c.constexprs["BLOCK_N"]
        assert c.constexprs["UPCAST"] is False and c.num_warps in (4, 8)
        assert min(block_m, block_n) >= 16 and (block_m & (block_m - 1)) == 0 and (block_n & (block_n - 1)) == 0
        assert c.tensor_cores == (c.tags["dtype"] != "float32")


# ----------------------------------------------------------------------------- GPU, U-Net sizes
GPU_SHAPES = [  # (B, H, Nq, Nk, D)
    (16, 1, 256, 256, 256),  # DDPM CIFAR-10 U-Net: one head over 256 channels at 16x16
    (2, 8, 4096, 77, 40),  # Stable Diffusion cross attention at 64x64 (77 text tokens)
    (2, 8, 4096, 4096, 40),  # Stable Diffusion self attention at 64x64
    (2, 8, 1024, 1024, 80),  # ... at 32x32
    (2, 8, 256, 256, 160),  # ... at 16x16
    (64, 4, 1024, 1024, 64),  # many heads of 64
    (8, 2, 2000, 3001, 128),  # odd lengths, D = 128
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, H, Nq, Nk, D", GPU_SHAPES)
def test_gpu_unet_sizes(dtype, B, H, Nq, Nk, D):
    q, k, v = qkv(B, H, Nq, Nk, D, dtype=dtype, device="cuda")
    out = attention(q, k, v)
    if dtype == torch.float32:
        expected = F.scaled_dot_product_attention(q, k, v)
        tol = TOLERANCES[torch.float32]
        torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    else:
        assert_flash_criterion(out, q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_unet_views(dtype):
    B, N, H, D = 4, 4096, 8, 40
    q, k, v = (unet_views(B, N, H, D, dtype, "cuda", seed=s) for s in (1, 2, 3))
    assert attention_module._is_aligned(D, q, k, v)
    assert_flash_criterion(attention(q, k, v), q, k, v)


@pytest.mark.gpu
def test_gpu_large_batch_times_heads():
    """B·H = 70000 programs' worth of heads: more than a grid's y/z limit (65535)."""
    q, k, v = qkv(7000, 10, 16, 16, 16, dtype=torch.float16, device="cuda")
    assert_flash_criterion(attention(q, k, v), q, k, v)
