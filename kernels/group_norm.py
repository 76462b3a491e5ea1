"""GroupNorm with the per-channel affine and the SiLU after it fused in (Wu & He 2018):

    μ_bg = mean(x[b, c, s] for c in group g, all s)          statistics in fp32, two-pass
    σ²_bg = mean((x[b, c, s] − μ_bg)²)                        (never E[x²] − E[x]²)
    y[b, c, s] = (x[b, c, s] − μ_bg) / √(σ²_bg + eps) · weight[c] + bias[c]
    y ← y · sigmoid(y)                                        (silu=True)

Same signature and semantics as ``fastdiff.reference.group_norm``; the output has x's dtype and
x's memory format.

How. x is seen as (B, C, S), S = the spatial dims flattened. One group of one sample is a matrix
of ``outer × inner`` elements whose ``inner`` axis is dense in memory: (C/G channels × S positions)
for NCHW, (S positions × C/G channels) for channels_last. A tile is ROWS rows of W dense elements,
W a power of two dividing ``inner`` and the strides, so each row sits inside one dense run (it is
one vector access), and its channel is known per row (NCHW) or per column (channels_last) without
a division per element. Statistics: each tile's mean and sum of squared deviations (two-pass,
in registers), merged across tiles with Chan's parallel update. Everything is computed relative to
a shift K = the group's first element (exact by Sterbenz' lemma for data near K), so data far from
zero (x = 10⁴ + N(0, 1)) keeps full precision: the output is accurate to ~1e-6 there, where an
fp32 two-pass over raw values loses ~1e-3 to the rounding of the mean itself.

Paths (``_plan``):
* one launch, one program per (sample, group): the statistics pass, then the apply pass over the
  same group. Taken whenever B·G ≥ 4 programs per SM, or the group is small.
* split, two launches, when B·G is small (B = 1 at 32 groups gives 32 programs for 132 SMs) and
  the group holds ≥ 4 tiles of 2048: ``_group_norm_stats_kernel`` writes (mean, M2) of each of
  ≤ 64 chunks per group, then ``_group_norm_kernel`` (grid B·G × chunks) merges the chunk
  statistics with Chan's formula and applies its chunk.

Limits. x float32 / float16 / bfloat16 (else ``Unsupported``); weight and bias in x's dtype (any
float dtype when x is float32: they are cast to it, as the reference casts them; else
``Unsupported``). Layouts read in place: any x whose spatial dims flatten to one stride with the
spatial stride 1 (NCHW-like, incl. batch- and channel-sliced views) or the channel stride 1
(channels_last, NHWC-like); any other layout (e.g. ``x[..., 1:]``) is first copied with
``.contiguous()``. Offsets are int32: x and the output must span < 2³¹ elements.

Cost per call, N = B·C·S elements of e bytes: the one-launch path reads x twice (the second read
from L1/L2: the program re-reads the group it has just read) and writes N; DRAM traffic ~2·N·e
plus C·2e of affine parameters. The split path reads x once per kernel (the second time from L2
when x fits in it; it is used only for small B·G, hence small tensors) plus B·G·64·8 bytes of
chunk statistics. ~10 FLOPs per element (+ exp and a division with SiLU): memory bound. Prediction
for an H100: ~80% of copy bandwidth for large tensors; eager PyTorch (F.group_norm, 3 kernels,
then F.silu) moves ~5·N·e bytes in 4 launches, so ≥ 2× with SiLU, ~1.5× without, more when
launch-bound (tiny tensors). Not yet measured: no GPU in this session.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, POINTER_TYPE, KernelConfig, Unsupported, cdiv, check_device, check_float

# Tile sizes (elements) and warps: BLOCK_LARGE for groups of ≥ BLOCK_LARGE elements, BLOCK_SMALL
# for smaller ones, so small groups (C = 512 at 4x4: 256 elements) waste no lanes; larger groups
# loop over tiles. 8 elements per thread either way (one 16-byte access per row in 16-bit dtypes;
# 32 registers on sm_90 when the JIT knows the pointers are 16-byte aligned). Row widths W: a power
# of two dividing the dense run (16: vector accesses; 1: odd sizes, a division per element).
# Untuned: chosen by counting, not measured (no GPU in this session).
BLOCK_LARGE, WARPS_LARGE = 2048, 8
BLOCK_SMALL, WARPS_SMALL = 256, 1
ROW_WIDTHS = (16, 4, 1)
MAX_SPLIT = 64            # most chunks per group on the split path (one vector load merges them)
MIN_SPLIT_TILES = 4       # split only groups of ≥ 4 BLOCK_LARGE tiles
PROGRAMS_PER_SM = 4       # no split once B·G reaches this many programs per SM


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _sum2d(x):
    return tl.sum(tl.sum(x, axis=1), axis=0)


@triton.jit
def _tile_rows(f0, end, inner, ROWS: tl.constexpr, W: tl.constexpr):
    """The tile of ROWS rows × W elements at group-flat index f0 (row r covers [f0 + r·W, f0 + r·W + W)):
    each row's (outer, inner) coordinates and whether it lies before ``end``. W divides ``inner``,
    so a row never leaves its dense run, and all rows are either wholly in or out of the group."""
    flat = f0 + tl.arange(0, ROWS) * W            # (ROWS,) group-flat index of each row's first element
    outer_idx = flat // inner                     # (ROWS,) NCHW: channel in group; NHWC: position
    inner_idx = flat - outer_idx * inner          # (ROWS,) NCHW: position; NHWC: channel in group
    return outer_idx, inner_idx, flat < end


@triton.jit
def _tile_offsets(outer_idx, inner_idx, stride_outer, W: tl.constexpr):
    """(ROWS, W) element offsets from the group's first element. Every row start is a multiple of
    W (the launcher picks W to divide ``inner`` and the strides), hence the hint: one vector access
    per row."""
    rows = tl.multiple_of(outer_idx * stride_outer + inner_idx, W)
    return rows[:, None] + tl.arange(0, W)[None, :]


@triton.jit
def _chunk_stats(x_group, shift, start, end, inner, stride_xo, BLOCK: tl.constexpr, W: tl.constexpr):
    """(mean − shift, M2) of the group's elements with flat index in [start, end): two-pass inside
    each tile, Chan's parallel update across tiles (count n, mean m, M2 = Σ(x − m)²):
        δ = m_t − m,  m ← m + δ·n_t/(n + n_t),  M2 ← M2 + M2_t + δ²·n·n_t/(n + n_t)."""
    ROWS: tl.constexpr = BLOCK // W
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for f0 in range(start, end, BLOCK):
        outer_idx, inner_idx, row_ok = _tile_rows(f0, end, inner, ROWS, W)
        mask = row_ok[:, None]
        x = tl.load(x_group + _tile_offsets(outer_idx, inner_idx, stride_xo, W), mask=mask, other=0.0)
        d = tl.where(mask, x.to(tl.float32) - shift, 0.0)             # (ROWS, W), shifted
        n = tl.minimum(end - f0, BLOCK).to(tl.float32)
        tile_mean = _sum2d(d) / n
        dev = tl.where(mask, d - tile_mean, 0.0)
        tile_m2 = _sum2d(dev * dev)
        total = count + n
        delta = tile_mean - mean
        mean += delta * (n / total)
        m2 += tile_m2 + delta * delta * (count * (n / total))
        count = total
    return mean, m2


@triton.jit
def _merge_chunks(partial_row, split, chunk_size, group_size, MAX_SPLIT: tl.constexpr):
    """(mean − shift, M2) of the whole group from its ``split`` chunks' (mean − shift, M2), Chan's
    formula for many parts: m = Σ n_k·m_k / n,  M2 = Σ M2_k + Σ n_k·(m_k − m)²."""
    k = tl.arange(0, MAX_SPLIT)
    valid = k < split
    means = tl.load(partial_row + 2 * k, mask=valid, other=0.0)
    m2s = tl.load(partial_row + 2 * k + 1, mask=valid, other=0.0)
    counts = tl.where(valid, tl.minimum(group_size - k * chunk_size, chunk_size), 0).to(tl.float32)
    mean = tl.sum(counts * means, axis=0) / group_size.to(tl.float32)
    dev = means - mean
    m2 = tl.sum(m2s + counts * dev * dev, axis=0)
    return mean, m2


@triton.jit
def _group_start(ptr, b, g, stride_b, stride_outer, group_channels, W: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Pointer to the first element of group g of sample b: channel g·C/G at position 0. The offset
    is a multiple of W (the launcher picks W to divide the batch and group strides)."""
    if CHANNELS_LAST:
        offset = b * stride_b + g * group_channels       # channel stride 1
    else:
        offset = b * stride_b + g * group_channels * stride_outer
    return ptr + tl.multiple_of(offset, W)


# ----------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=["num_groups", "group_channels", "inner", "group_size", "chunk_size", "split",
                               "weight_size", "bias_size", "apply_silu"])
def _group_norm_kernel(
    x_ptr,           # x: (B, C, S) view; sample b at x_ptr + b*stride_xb; dense axis stride 1 (see CHANNELS_LAST)
    y_ptr,           # out: (B, C, S), x's dtype, same layout class as x (own strides)
    weight_ptr,      # (weight_size,) contiguous, x's dtype (any pointer of that type when weight_size = 0)
    bias_ptr,        # (bias_size,) contiguous, x's dtype
    partial_ptr,     # (B·G, split, 2) fp32 chunk (mean − shift, M2) from the stats kernel; read when split > 1
    stride_xb,       # x batch stride (elements; 0 when B = 1)
    stride_xo,       # x stride of the outer axis: channel stride (NCHW) or position stride (NHWC)
    stride_yb,       # out batch stride
    stride_yo,       # out outer stride
    num_groups,      # G
    group_channels,  # C/G
    inner,           # length of the dense axis inside a group: S (NCHW) or C/G (NHWC)
    group_size,      # C/G·S elements per group
    chunk_size,      # group-flat elements per chunk (a multiple of BLOCK); group_size when split = 1
    split,           # chunks per group (grid axis 1); 1: this program computes its group's statistics
    eps,             # fp32
    weight_size,     # C when weight is given, else 0 (nothing read: y·1)
    bias_size,       # C when bias is given, else 0 (nothing read: y + 0)
    apply_silu,      # 1: y · sigmoid(y) after the affine
    BLOCK: tl.constexpr,          # elements per tile
    W: tl.constexpr,              # elements per tile row (divides inner and the strides)
    CHANNELS_LAST: tl.constexpr,  # False: dense axis = positions (NCHW); True: = channels (NHWC)
    MAX_SPLIT: tl.constexpr,      # capacity of the chunk merge (≥ split)
):
    """Program (b·G + g, k): the statistics of group g of sample b (its own pass, or the merge of
    the stats kernel's chunks), then the normalised, affine, SiLU output of chunk k of the group."""
    ROWS: tl.constexpr = BLOCK // W
    pid = tl.program_id(0)        # sample·G + group
    chunk = tl.program_id(1)
    b = pid // num_groups
    g = pid - b * num_groups
    x_group = _group_start(x_ptr, b, g, stride_xb, stride_xo, group_channels, W, CHANNELS_LAST)
    y_group = _group_start(y_ptr, b, g, stride_yb, stride_yo, group_channels, W, CHANNELS_LAST)
    shift = tl.load(x_group).to(tl.float32)      # K: the group's first element

    # 1. statistics of the whole group, relative to K
    if split == 1:
        mean, m2 = _chunk_stats(x_group, shift, 0, group_size, inner, stride_xo, BLOCK, W)
    else:
        mean, m2 = _merge_chunks(partial_ptr + pid * split * 2, split, chunk_size, group_size, MAX_SPLIT)
    rstd = tl.math.rsqrt(m2 / group_size.to(tl.float32) + eps)

    # 2. normalise, affine, SiLU: this program's chunk of the group
    start = chunk * chunk_size
    end = tl.minimum(start + chunk_size, group_size)
    for f0 in range(start, end, BLOCK):
        outer_idx, inner_idx, row_ok = _tile_rows(f0, end, inner, ROWS, W)
        mask = row_ok[:, None]
        x = tl.load(x_group + _tile_offsets(outer_idx, inner_idx, stride_xo, W), mask=mask, other=0.0)
        y = ((x.to(tl.float32) - shift) - mean) * rstd              # (ROWS, W)
        # channels: per row (NCHW) or W consecutive ones per row (NHWC), from the row's first one
        if CHANNELS_LAST:
            first = tl.multiple_of(g * group_channels + inner_idx, W)              # (ROWS,)
            channel = first[:, None] + tl.arange(0, W)[None, :]                     # (ROWS, W)
        else:
            first = g * group_channels + outer_idx
            channel = first[:, None]                                                # (ROWS, 1)
        # masks constant along a row (one vector access): no weight/bias given -> size 0 -> y·1 + 0
        weight = tl.load(weight_ptr + channel, mask=(row_ok & (first < weight_size))[:, None], other=1.0)
        bias = tl.load(bias_ptr + channel, mask=(row_ok & (first < bias_size))[:, None], other=0.0)
        y = y * weight.to(tl.float32) + bias.to(tl.float32)
        if apply_silu != 0:
            y = y / (1.0 + tl.exp(-y))           # silu, written as PyTorch's kernel writes it
        tl.store(y_group + _tile_offsets(outer_idx, inner_idx, stride_yo, W), y.to(y_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit(do_not_specialize=["num_groups", "group_channels", "inner", "group_size", "chunk_size", "split"])
def _group_norm_stats_kernel(
    x_ptr,           # x: (B, C, S) view, as in _group_norm_kernel
    partial_ptr,     # out: (B·G, split, 2) fp32, (mean − K, M2) of each chunk; K = the group's first element
    stride_xb,       # x batch stride (0 when B = 1)
    stride_xo,       # x outer stride
    num_groups,      # G
    group_channels,  # C/G
    inner,           # dense-axis length inside a group
    group_size,      # elements per group
    chunk_size,      # elements per chunk (a multiple of BLOCK)
    split,           # chunks per group (grid axis 1)
    BLOCK: tl.constexpr,
    W: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
):
    """Program (b·G + g, k): (mean − K, M2) of chunk k of group g of sample b (split path)."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    b = pid // num_groups
    g = pid - b * num_groups
    x_group = _group_start(x_ptr, b, g, stride_xb, stride_xo, group_channels, W, CHANNELS_LAST)
    shift = tl.load(x_group).to(tl.float32)
    start = chunk * chunk_size
    end = tl.minimum(start + chunk_size, group_size)
    mean, m2 = _chunk_stats(x_group, shift, start, end, inner, stride_xo, BLOCK, W)
    out = partial_ptr + (pid * split + chunk) * 2
    tl.store(out, mean)
    tl.store(out + 1, m2)


# ----------------------------------------------------------------------------- configurations
@functools.cache  # one per key: the launcher asks on every call
def _main_config(dtype: torch.dtype, block: int, row_width: int, channels_last: bool) -> KernelConfig:
    """The compiled configuration of ``_group_norm_kernel``."""
    pointer = POINTER_TYPE[dtype]
    signature = {
        "x_ptr": pointer, "y_ptr": pointer, "weight_ptr": pointer, "bias_ptr": pointer, "partial_ptr": "*fp32",
        "stride_xb": "i32", "stride_xo": "i32", "stride_yb": "i32", "stride_yo": "i32",
        "num_groups": "i32", "group_channels": "i32", "inner": "i32", "group_size": "i32", "chunk_size": "i32",
        "split": "i32", "eps": "fp32", "weight_size": "i32", "bias_size": "i32", "apply_silu": "i32",
        "BLOCK": "constexpr", "W": "constexpr", "CHANNELS_LAST": "constexpr", "MAX_SPLIT": "constexpr",
    }
    constexprs = {"BLOCK": block, "W": row_width, "CHANNELS_LAST": channels_last, "MAX_SPLIT": MAX_SPLIT}
    return KernelConfig(_group_norm_kernel, signature, constexprs, num_warps=_warps(block), num_stages=1,
                        tags={"dtype": str(dtype).removeprefix("torch.")})


@functools.cache
def _stats_config(dtype: torch.dtype, row_width: int, channels_last: bool) -> KernelConfig:
    """The compiled configuration of ``_group_norm_stats_kernel`` (split path: always BLOCK_LARGE)."""
    signature = {
        "x_ptr": POINTER_TYPE[dtype], "partial_ptr": "*fp32", "stride_xb": "i32", "stride_xo": "i32",
        "num_groups": "i32", "group_channels": "i32", "inner": "i32", "group_size": "i32", "chunk_size": "i32",
        "split": "i32", "BLOCK": "constexpr", "W": "constexpr", "CHANNELS_LAST": "constexpr",
    }
    constexprs = {"BLOCK": BLOCK_LARGE, "W": row_width, "CHANNELS_LAST": channels_last}
    return KernelConfig(_group_norm_stats_kernel, signature, constexprs, num_warps=WARPS_LARGE, num_stages=1,
                        tags={"dtype": str(dtype).removeprefix("torch.")})


def _warps(block: int) -> int:
    return WARPS_LARGE if block == BLOCK_LARGE else WARPS_SMALL


def launch_configs() -> list[KernelConfig]:
    """Every configuration ``group_norm`` can launch: dtype × layout × row width × (main kernel at
    both tile sizes, stats kernel at the large one) = 3·2·3·3 = 54."""
    configs = []
    for dtype in FLOAT_DTYPES:
        for channels_last in (False, True):
            for row_width in ROW_WIDTHS:
                for block in (BLOCK_LARGE, BLOCK_SMALL):
                    configs.append(_main_config(dtype, block, row_width, channels_last))
                configs.append(_stats_config(dtype, row_width, channels_last))
    return configs


# ----------------------------------------------------------------------------- host side
@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def _no_partials(device: torch.device) -> torch.Tensor:
    """A tiny fp32 tensor passed as ``partial_ptr`` on the one-launch path (never read): the
    argument keeps its '*fp32' type, so no second compiled variant."""
    return torch.empty(2, dtype=torch.float32, device=device)


def _programs_wanted(x: torch.Tensor) -> int:
    """Programs that fill the GPU (PROGRAMS_PER_SM per SM); a small fixed number under the
    interpreter, so that the CPU tests reach the split path with small shapes."""
    if not x.is_cuda:
        return 16
    return PROGRAMS_PER_SM * _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())


def _plan(batch: int, num_groups: int, group_size: int, programs_wanted: int, split: int | None = None):
    """(BLOCK, split, chunk_size) for groups of ``group_size`` elements. ``split`` forces the number
    of chunks (tests); None picks it: split only when B·G programs cannot fill the GPU and a group
    holds ≥ MIN_SPLIT_TILES tiles, into about programs_wanted / (B·G) chunks of whole tiles."""
    block = BLOCK_LARGE if group_size >= BLOCK_LARGE or (split or 1) > 1 else BLOCK_SMALL
    tiles = cdiv(group_size, block)
    if split is None:
        split = 1
        if batch * num_groups < programs_wanted and tiles >= MIN_SPLIT_TILES:
            split = min(cdiv(programs_wanted, batch * num_groups), tiles, MAX_SPLIT)
    split = max(1, min(split, tiles, MAX_SPLIT))
    tiles_per_chunk = cdiv(tiles, split)
    split = cdiv(tiles, tiles_per_chunk)       # no empty chunk
    chunk_size = tiles_per_chunk * block if split > 1 else group_size
    return block, split, chunk_size


def _spatial_stride(x: torch.Tensor) -> int | None:
    """Stride of x's spatial dims flattened to one axis; None when they do not flatten (a slice
    like x[..., 1:]). 1 when there is at most one spatial position."""
    dims = [(size, stride) for size, stride in zip(x.shape[2:], x.stride()[2:]) if size != 1]
    for (_, outer_stride), (inner_size, inner_stride) in zip(dims, dims[1:]):
        if outer_stride != inner_size * inner_stride:
            return None
    return dims[-1][1] if dims else 1


def _layout(x: torch.Tensor, group_channels: int) -> tuple[bool, int, int] | None:
    """(channels_last, inner, outer stride) when the kernel can read x in place, else None.
    NCHW-like: positions dense (spatial stride 1); NHWC-like: channels dense (channel stride 1)."""
    channels, spatial = x.shape[1], math.prod(x.shape[2:])
    stride_s = _spatial_stride(x)
    if stride_s is None:
        return None
    if spatial > 1 and stride_s == 1:
        return False, spatial, x.stride(1)
    if x.stride(1) == 1 or channels == 1:
        return True, group_channels, stride_s
    if spatial == 1:
        return False, 1, x.stride(1)
    return None


def _empty_in_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The output: x's memory format (``empty_like`` keeps a dense x's strides), densely packed
    in the same layout class when x is a strided view."""
    y = torch.empty_like(x)
    layout = _layout(y, 1)
    if layout is not None and layout[0] == channels_last:
        return y
    if not channels_last:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return torch.empty((x.shape[0], *x.shape[2:], x.shape[1]), dtype=x.dtype, device=x.device).movedim(-1, 1)


def _row_width(inner: int, *strides: int) -> int:
    """Largest of ROW_WIDTHS dividing the dense-run length and every stride a row start is built
    from, so that every row start is a multiple of W (the kernel's alignment hint)."""
    common = math.gcd(inner, *strides)
    return next(w for w in ROW_WIDTHS if common % w == 0)


def _affine(name: str, p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """weight / bias as a contiguous tensor of x's dtype, or Unsupported."""
    if p is None:
        return None
    check_device(name, p)
    if p.device != x.device:
        raise Unsupported(f"{name} is on {p.device} but x is on {x.device}")
    if p.dtype != x.dtype:
        if x.dtype != torch.float32 or not p.is_floating_point():
            raise Unsupported(f"{name} has dtype {p.dtype} but x has {x.dtype}: the kernel reads the affine "
                              f"parameters in x's dtype (any float dtype only when x is float32)")
        p = p.float()  # what the reference does with it
    return p.contiguous()


def _span(t: torch.Tensor) -> int:
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False):
    """GroupNorm(+SiLU) of x (B, C, ...) over ``num_groups`` groups; the signature and results of
    ``fastdiff.reference.group_norm``."""
    return _group_norm(x, num_groups, weight, bias, eps, silu)


def _group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False, split=None):
    """``group_norm`` with the split path's chunk count forced when ``split`` is given (tests)."""
    check_float("x", x)
    check_device("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must have shape (B, C, ...), got {tuple(x.shape)}")
    if not isinstance(num_groups, int) or num_groups < 1 or x.shape[1] % num_groups:
        raise ValueError(f"num_groups must be a positive divisor of the {x.shape[1]} channels, got {num_groups!r}")
    weight, bias = _affine("weight", weight, x), _affine("bias", bias, x)
    batch, channels = x.shape[:2]
    spatial = math.prod(x.shape[2:])
    if x.numel() == 0:
        return torch.empty_like(x)
    group_channels = channels // num_groups
    group_size = group_channels * spatial

    layout = _layout(x, group_channels)
    if layout is None:  # spatial dims that do not flatten to one stride: read a dense copy
        x = x.contiguous()
        layout = _layout(x, group_channels)
    channels_last, inner, stride_xo = layout
    y = _empty_in_layout(x, channels_last)
    stride_yo = y.stride(1) if not channels_last else _spatial_stride(y)
    if max(_span(x), _span(y)) >= 2**31:
        raise Unsupported(f"x of shape {tuple(x.shape)} spans ≥ 2³¹ elements; the kernel uses int32 offsets")

    # strides that only ever multiply index 0 are passed as 0 (no value-1 specialisation, no false
    # limit on the row width): the batch stride when B = 1, the outer stride when that axis has one
    # entry in x (NCHW: channel index g·C/G + o, NHWC: position index)
    stride_xb, stride_yb = (x.stride(0), y.stride(0)) if batch > 1 else (0, 0)
    if (spatial if channels_last else channels) == 1:
        stride_xo, stride_yo = 0, 0
    # (a group starts at g·C/G·outer stride (NCHW) or g·C/G (NHWC, C/G = inner): multiples of these too)
    row_width = _row_width(inner, stride_xb, stride_yb, stride_xo, stride_yo)

    block, split, chunk_size = _plan(batch, num_groups, group_size, _programs_wanted(x), split)
    grid = (batch * num_groups, split)
    partials = _no_partials(x.device)  # never read when split == 1
    if split > 1:
        partials = torch.empty((batch * num_groups, split, 2), dtype=torch.float32, device=x.device)
        stats = _stats_config(x.dtype, row_width, channels_last)
        _group_norm_stats_kernel[grid](
            x, partials, stride_xb, stride_xo, num_groups, group_channels, inner, group_size, chunk_size, split,
            **stats.constexprs, num_warps=stats.num_warps, num_stages=stats.num_stages)
    config = _main_config(x.dtype, block, row_width, channels_last)
    _group_norm_kernel[grid](
        x, y, x if weight is None else weight, x if bias is None else bias, partials,
        stride_xb, stride_xo, stride_yb, stride_yo,
        num_groups, group_channels, inner, group_size, chunk_size, split,
        float(eps), 0 if weight is None else channels, 0 if bias is None else channels, int(bool(silu)),
        **config.constexprs, num_warps=config.num_warps, num_stages=config.num_stages)
    return y
