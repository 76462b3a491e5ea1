"""The fused GroupNorm(+SiLU) kernel against ``fastdiff.reference.group_norm`` and PyTorch's own
``F.group_norm`` + ``F.silu``: odd shapes and group sizes, the three dtypes, SiLU and every affine
combination, NCHW / channels_last / strided views, the split (multi-program) statistics path, data
far from zero (where E[x²] − E[x]² fails), random shapes (hypothesis), the input the kernel refuses,
the dispatch through ``fastdiff.ops``, and (``-m gpu``) U-Net sizes.

Without a GPU the kernel runs in Triton's interpreter, which rounds fp32 -> bf16 by truncation
instead of to-nearest-even: bf16 results may then differ from the reference by one bf16 ulp
(2⁻⁸ relative), inside the bf16 tolerance.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import fastdiff  # noqa: E402
from fastdiff import ops, reference  # noqa: E402
from fastdiff.kernels import Unsupported  # noqa: E402
from fastdiff.kernels.group_norm import _group_norm, _plan, group_norm, launch_configs  # noqa: E402

group_norm_module = importlib.import_module("fastdiff.kernels.group_norm")

# SiLU of y < −88 computes exp(−y) = inf (then y / inf = −0, as on the GPU); numpy warns about it
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

# (dtype, rtol, atol) for outputs of unit scale (normalised, times N(0, 1) weights)
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-3, 1e-3), (torch.bfloat16, 1e-2, 1e-2)]
TOL = {dtype: (rtol, atol) for dtype, rtol, atol in DTYPES}

# (shape, groups): odd channels per group (3 -> 4 lanes), one channel per group, U-Net-like,
# 3-D (B, C, L), a 1x1 spatial map, and no spatial dims at all
SHAPES = [
    ((2, 12, 7, 5), 3),
    ((1, 6, 3, 3), 6),
    ((3, 64, 8, 8), 32),
    ((2, 32, 17), 8),
    ((1, 128, 16, 16), 32),
    ((4, 32, 1, 1), 8),
    ((3, 10), 5),
]


def randn(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + offset).to(device=device, dtype=dtype)


def affine(channels, dtype, device, which="both"):
    weight = randn(channels, dtype=dtype, device=device, seed=11) if which in ("both", "weight") else None
    bias = randn(channels, dtype=dtype, device=device, seed=12) if which in ("both", "bias") else None
    return weight, bias


def assert_matches_reference(y, x, groups, weight=None, bias=None, eps=1e-5, silu=False):
    expected = reference.group_norm(x, groups, weight, bias, eps, silu)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    rtol, atol = TOL[x.dtype]
    torch.testing.assert_close(y, expected, rtol=rtol, atol=atol)


def group_norm_float64(x, groups, eps=1e-5):
    """GroupNorm of x's values computed in float64 (the reference itself computes in float32)."""
    g = x.double().reshape(x.shape[0], groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = ((g - mean) ** 2).mean(-1, keepdim=True)
    return ((g - mean) / torch.sqrt(var + eps)).reshape(x.shape)


# ----------------------------------------------------------------------------- against the references
@pytest.mark.parametrize("dtype", [d for d, _, _ in DTYPES], ids=str)
@pytest.mark.parametrize("shape, groups", SHAPES, ids=str)
def test_matches_reference(shape, groups, dtype, kernel_device):
    x = randn(*shape, dtype=dtype, device=kernel_device)
    weight, bias = affine(shape[1], dtype, kernel_device)
    y = group_norm(x, groups, weight, bias, 1e-5, silu=True)
    assert_matches_reference(y, x, groups, weight, bias, silu=True)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("which", ["both", "weight", "bias", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_affine_and_silu_options(which, silu, dtype, kernel_device):
    x = randn(2, 12, 7, 5, dtype=dtype, device=kernel_device, scale=3.0, offset=-1.0)
    weight, bias = affine(12, dtype, kernel_device, which)
    y = group_norm(x, 3, weight, bias, eps=1e-3, silu=silu)
    assert_matches_reference(y, x, 3, weight, bias, eps=1e-3, silu=silu)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("dtype", [d for d, _, _ in DTYPES], ids=str)
@pytest.mark.parametrize("shape, groups", [((2, 12, 7, 5), 3), ((2, 32, 17), 8), ((4, 32, 1, 1), 8)], ids=str)
def test_matches_torch_group_norm(shape, groups, dtype, silu, kernel_device):
    """PyTorch's F.group_norm (+ F.silu) in fp32 on the same values, rounded to the dtype once."""
    x = randn(*shape, dtype=dtype, device=kernel_device, seed=3)
    weight, bias = affine(shape[1], dtype, kernel_device)
    expected = F.group_norm(x.float(), groups, weight.float(), bias.float(), eps=1e-6)
    expected = (F.silu(expected) if silu else expected).to(dtype)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(group_norm(x, groups, weight, bias, 1e-6, silu), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- layouts
def test_channels_last_is_read_in_place_and_kept(kernel_device):
    x = randn(2, 12, 7, 5, device=kernel_device).to(memory_format=torch.channels_last)
    weight, bias = affine(12, x.dtype, kernel_device)
    y = group_norm(x, 3, weight, bias, silu=True)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.stride() == x.stride()
    assert_matches_reference(y, x, 3, weight, bias, silu=True)


@pytest.mark.parametrize("dtype", [d for d, _, _ in DTYPES], ids=str)
@pytest.mark.parametrize("shape, groups", [((2, 64, 4, 4), 4), ((2, 16, 3, 5), 4), ((1, 24, 5, 5), 8)], ids=str)
def test_channels_last_dtypes_and_group_sizes(shape, groups, dtype, kernel_device):
    """16, 4 and 3 channels per group: row widths 16, 4 and 1 along the dense channel axis."""
    x = randn(*shape, dtype=dtype, device=kernel_device, seed=4).to(memory_format=torch.channels_last)
    weight, bias = affine(shape[1], dtype, kernel_device)
    assert_matches_reference(group_norm(x, groups, weight, bias, silu=True), x, groups, weight, bias, silu=True)


def test_channels_last_3d(kernel_device):
    """(B, C, L) with C dense (a transposed (B, L, C) tensor): read in place, output keeps it."""
    x = randn(2, 17, 32, device=kernel_device).transpose(1, 2)  # (2, 32, 17), strides (544, 1, 32)
    y = group_norm(x, 8, silu=True)
    assert y.stride() == x.stride()
    assert_matches_reference(y, x, 8, silu=True)


@pytest.mark.parametrize("view", ["spatial_slice", "batch_stride", "channel_slice", "batch_broadcast",
                                  "channels_last_batch_stride"])
def test_strided_views(view, kernel_device):
    base = randn(4, 24, 7, 6, device=kernel_device, seed=5)
    x = {
        "spatial_slice": base[:, :12, :, 1:],             # spatial dims do not flatten: copied first
        "batch_stride": base[::2, :12],                    # batch stride 2·24·42, read in place
        "channel_slice": base[:, 6:18],                    # channel offset, read in place
        "batch_broadcast": base[:1, :12].expand(3, -1, -1, -1),   # batch stride 0
        "channels_last_batch_stride": base.to(memory_format=torch.channels_last)[::2, :12],
    }[view]
    weight, bias = affine(12, x.dtype, kernel_device)
    y = group_norm(x, 3, weight, bias, silu=True)
    assert_matches_reference(y, x, 3, weight, bias, silu=True)
    if view == "channels_last_batch_stride":
        assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()


# ----------------------------------------------------------------------------- split statistics
@pytest.mark.parametrize("split", [2, 3, 64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_split_statistics(split, channels_last, kernel_device):
    """Each group's statistics in several chunks (several programs), merged with Chan's formula;
    the last chunk is partial (5 tiles of 2048, the last 1/4 full)."""
    x = randn(1, 4, 66, 66, device=kernel_device, seed=6, scale=2.0, offset=0.5)  # 2 groups of 8712
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = affine(4, x.dtype, kernel_device)
    block, chunks, chunk_size = _plan(1, 2, 8712, programs_wanted=16, split=split)
    assert chunks == min(split, 5) and chunk_size % block == 0
    y = _group_norm(x, 2, weight, bias, 1e-5, True, split=split)
    assert_matches_reference(y, x, 2, weight, bias, silu=True)


def test_plan_splits_only_when_the_groups_cannot_fill_the_gpu():
    assert _plan(1, 32, 4096 * 4, programs_wanted=528)[1] == 8      # B = 1, C = 128 at 64x64: 8 tiles
    assert _plan(2, 32, 4096 * 4, programs_wanted=528)[1] == 8
    assert _plan(4, 32, 4096 * 4, programs_wanted=528)[1] == 4      # 2 tiles per chunk
    assert _plan(32, 32, 4096 * 4, programs_wanted=528)[1] == 1     # 1024 programs already
    assert _plan(1, 32, 2048, programs_wanted=528)[1] == 1          # one tile: nothing to split
    assert _plan(1, 32, 8 * 256, programs_wanted=528) == (2048, 1, 2048)
    assert _plan(256, 32, 16 * 16, programs_wanted=528) == (256, 1, 256)   # small groups: small tiles


def test_auto_split_under_the_interpreter(kernel_device):
    """The launcher's own choice: under the interpreter it asks for 16 programs, so B·G = 2
    groups of 6400 elements (4 tiles) split in 4."""
    x = randn(1, 8, 40, 40, device=kernel_device, seed=7)
    if kernel_device == "cpu":
        assert _plan(1, 2, 6400, group_norm_module._programs_wanted(x))[1] == 4
    assert_matches_reference(group_norm(x, 2, silu=True), x, 2, silu=True)


# ----------------------------------------------------------------------------- precision
@pytest.mark.parametrize("split", [1, 4])
def test_data_far_from_zero_matches_float64(split, kernel_device):
    """x = 10⁴ + N(0, 1): E[x²] − E[x]² cancels catastrophically in fp32 (it even goes negative);
    the kernel's shifted two-pass statistics keep the fp32 tolerance against a float64 computation."""
    x = randn(2, 8, 48, 48, device=kernel_device, seed=8, offset=1e4)         # 2 groups of 9216
    expected = group_norm_float64(x, 2)
    y = _group_norm(x, 2, None, None, 1e-5, False, split=split)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)

    # the test has teeth: the naive one-pass variance in fp32 is far off (or NaN)
    g = x.reshape(2, 2, -1)
    mean = g.mean(-1, keepdim=True)
    naive_var = (g * g).mean(-1, keepdim=True) - mean * mean
    naive = ((g - mean) * torch.rsqrt(naive_var + 1e-5)).reshape(x.shape).double()
    assert not torch.allclose(naive, expected, rtol=1e-2, atol=1e-2)


def test_constant_groups_give_zero(kernel_device):
    """σ² = 0: y = 0·rsqrt(eps) exactly (then + bias), as the reference."""
    x = torch.full((2, 6, 5, 5), 3.25, device=kernel_device)
    weight, bias = affine(6, x.dtype, kernel_device)
    y = group_norm(x, 3, weight, bias)
    torch.testing.assert_close(y, bias.reshape(1, 6, 1, 1).expand_as(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- property test
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(
    batch=st.integers(1, 3), groups=st.integers(1, 4), group_channels=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 9), min_size=0, max_size=2), dtype_index=st.integers(0, 2),
    channels_last=st.booleans(), silu=st.booleans(), which=st.sampled_from(["both", "weight", "bias", "none"]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(batch, groups, group_channels, spatial, dtype_index, channels_last, silu, which, seed):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # kernel_device (no fixtures under hypothesis)
    dtype = DTYPES[dtype_index][0]
    x = randn(batch, groups * group_channels, *spatial, dtype=dtype, device=device, seed=seed,
              scale=2.0, offset=seed % 7 - 3)
    if channels_last and x.ndim == 4:
        x = x.to(memory_format=torch.channels_last)
    weight, bias = affine(x.shape[1], dtype, device, which)
    assert_matches_reference(group_norm(x, groups, weight, bias, 1e-5, silu), x, groups, weight, bias, silu=silu)


# ----------------------------------------------------------------------------- refused input
def test_float64_is_unsupported(kernel_device):
    with pytest.raises(Unsupported, match="x has dtype torch.float64"):
        group_norm(randn(2, 4, 3, 3, dtype=torch.float64, device=kernel_device), 2)


def test_half_x_with_float32_affine_is_unsupported(kernel_device):
    x = randn(2, 4, 3, 3, dtype=torch.bfloat16, device=kernel_device)
    with pytest.raises(Unsupported, match="weight has dtype torch.float32 but x has torch.bfloat16"):
        group_norm(x, 2, torch.ones(4, device=kernel_device))


def test_float32_x_takes_affine_parameters_of_any_float_dtype(kernel_device):
    """The reference casts weight and bias to float32; so does the launcher (exact from bf16)."""
    x = randn(2, 4, 3, 3, device=kernel_device)
    weight, bias = affine(4, torch.bfloat16, kernel_device)
    assert_matches_reference(group_norm(x, 2, weight, bias), x, 2, weight, bias)


def test_cpu_tensor_without_the_interpreter_is_unsupported(monkeypatch):
    from fastdiff.kernels import _common

    monkeypatch.setattr(_common, "interpreting", lambda: False)
    with pytest.raises(Unsupported, match="x is on cpu"):
        group_norm(randn(2, 4, 3, 3), 2)


def test_bad_group_count_is_a_value_error(kernel_device):
    with pytest.raises(ValueError, match="num_groups must be a positive divisor"):
        group_norm(randn(2, 6, 3, 3, device=kernel_device), 4)


def test_empty_input(kernel_device):
    x = randn(0, 4, 3, 3, device=kernel_device)
    assert group_norm(x, 2).shape == x.shape


# ----------------------------------------------------------------------------- dispatch and configs
def test_dispatch_through_ops(kernel_device, monkeypatch):
    calls = []
    launcher = group_norm_module.group_norm
    monkeypatch.setattr(group_norm_module, "group_norm", lambda *a, **k: calls.append(1) or launcher(*a, **k))
    x = randn(2, 12, 7, 5, device=kernel_device)
    weight, bias = affine(12, x.dtype, kernel_device)
    with fastdiff.use_backend("triton"):
        y = ops.group_norm(x, 3, weight, bias, 1e-5, silu=True)
    assert calls == [1]
    assert_matches_reference(y, x, 3, weight, bias, silu=True)


def test_launch_configs_cover_every_launch():
    """Every (dtype, layout, row width, tile) the launcher can pick is in launch_configs()."""
    names = {config.name for config in launch_configs()}
    assert len(names) == len(launch_configs()) == 54
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for channels_last in (False, True):
            for row_width in group_norm_module.ROW_WIDTHS:
                for group_size, split in ((256, None), (2048, None), (4096 * 4, 8)):
                    block, chunks, _ = _plan(1, 32, group_size, programs_wanted=528, split=split)
                    assert group_norm_module._main_config(dtype, block, row_width, channels_last).name in names
                    if chunks > 1:
                        assert group_norm_module._stats_config(dtype, row_width, channels_last).name in names


@pytest.mark.parametrize("shape, groups, channels_last, expected", [
    ((2, 32, 8, 8), 32, False, 16),     # NCHW, S = 64
    ((2, 12, 7, 5), 3, False, 1),       # S = 35
    ((2, 8, 2, 2), 2, False, 4),        # S = 4
    ((2, 128, 4, 4), 32, True, 4),      # channels_last, C/G = 4
    ((2, 512, 4, 4), 32, True, 16),     # channels_last, C/G = 16
    ((2, 320, 4, 4), 32, True, 1),      # channels_last, C/G = 10
])
def test_row_width_divides_every_row_start(shape, groups, channels_last, expected):
    """W must divide the dense run and every stride: the kernel's alignment hint relies on it."""
    x = torch.empty(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    layout, inner, stride_o = group_norm_module._layout(x, shape[1] // groups)
    assert layout == channels_last
    assert group_norm_module._row_width(inner, x.stride(0), stride_o) == expected


# ----------------------------------------------------------------------------- GPU: U-Net sizes
@pytest.mark.gpu
@pytest.mark.parametrize("shape, dtype, memory_format", [
    ((128, 256, 16, 16), torch.bfloat16, torch.contiguous_format),   # training batch, mid level
    ((1, 128, 32, 32), torch.float32, torch.contiguous_format),      # sampling, B = 1 (split path)
    ((1, 128, 32, 32), torch.float16, torch.contiguous_format),
    ((1, 128, 64, 64), torch.bfloat16, torch.contiguous_format),     # B = 1, 64x64: split in 8
    ((16, 512, 8, 8), torch.bfloat16, torch.channels_last),
    ((2, 320, 64, 64), torch.float16, torch.channels_last),          # SD-sized latent, CFG batch
    ((256, 512, 4, 4), torch.bfloat16, torch.contiguous_format),     # small groups, many programs
])
def test_unet_sizes_on_gpu(shape, dtype, memory_format):
    x = randn(*shape, dtype=dtype, device="cuda", seed=9).to(memory_format=memory_format)
    weight, bias = affine(shape[1], dtype, "cuda")
    for silu in (False, True):
        y = group_norm(x, 32, weight, bias, 1e-6, silu)
        assert_matches_reference(y, x, 32, weight, bias, eps=1e-6, silu=silu)
        assert y.stride() == x.stride()


@pytest.mark.gpu
def test_data_far_from_zero_on_gpu():
    x = randn(1, 128, 64, 64, device="cuda", seed=10, offset=1e4)
    torch.testing.assert_close(group_norm(x, 32).double(), group_norm_float64(x, 32), rtol=1e-5, atol=1e-5)
