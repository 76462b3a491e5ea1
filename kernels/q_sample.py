"""Forward noising q(x_t | x_0) in one pass, with the training target fused (Ho et al. 2020, eq. 4):

    x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε              per sample b, t = timesteps[b]
    v   = √ᾱ_t · ε  − √(1 − ᾱ_t) · x0             (target='v_prediction'; Salimans & Ho 2022)

Same signature and semantics as ``fastdiff.reference.q_sample``: the ᾱ table is cast to x0's dtype
before the roots (like diffusers' ``add_noise``), and the roots are rounded to that dtype as the
reference's ops round them; the elementwise part runs in fp32 with one rounding on store, without
FMA contraction. In fp32 on a GPU that is the reference's arithmetic exactly (IEEE roots, like
PyTorch's CUDA sqrt); on the CPU PyTorch's vectorised sqrt can be 1 ulp off, so ~1e-7 relative.
The table and the timesteps are read on the device inside the kernel (moved to x0's device first
when they are elsewhere, without a sync). target='epsilon' / 'sample' return ``noise`` / ``x0``
themselves, as the reference does: nothing is copied.

Limits: x0 and noise float32, float16 or bfloat16, the same dtype and device (else ``Unsupported``,
and ``fastdiff.ops`` runs the reference); timesteps int32 or int64. Layouts: see
``_elementwise`` (contiguous, sliced views and channels_last read in place, others copied).
Timesteps outside [−T, T) raise IndexError when they are on the CPU (as the reference does); on
the GPU they are not checked (that would need a sync) and give NaN.

Cost per call, N = numel(x0): reads 2N elements (x0, ε) plus 2B scalars, writes N (x_t) or 2N
(x_t, v); 3 FLOPs per element per output. Memory bound (< 0.4 FLOP/byte in fp32): 12-16 bytes
per element in fp32, so the target is ≥ 90% of copy bandwidth on an H100 for large tensors
(~3 TB/s: ~0.34 ms for 64M fp32 elements with v; not measured yet, no GPU here).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import KernelConfig, Unsupported
from ._elementwise import (BLOCK_CONFIGS, COMPILE_OPTIONS, as_rows, block_config, check_tensors, empty_rows_like,
                           flag_mask, grid_size, row_block, signature_pointer)

INDEX_DTYPES = (torch.int32, torch.int64)  # what PyTorch indexing (the reference) takes
TARGETS = (None, "epsilon", "v_prediction", "sample")


@triton.jit(do_not_specialize=["write_v"])
def _q_sample_kernel(
    x0_ptr,         # (B, N) rows of clean samples x0; row b at x0_ptr + b * stride_x0
    noise_ptr,      # (B, N) rows of Gaussian noise ε; row b at noise_ptr + b * stride_noise
    timesteps_ptr,  # (B,) int64 timesteps; stride_t = 0 when all samples share one
    table_ptr,      # (T,) contiguous ᾱ table, in x0's dtype
    x_t_ptr,        # (B, N) out: x_t, row b at x_t_ptr + b * stride_out
    v_ptr,          # (B, N) out: v, same layout as x_t (written only when write_v)
    N,              # elements per sample
    T,              # length of the ᾱ table
    stride_x0,      # batch stride of x0 (elements)
    stride_noise,   # batch stride of noise
    stride_t,       # stride of timesteps: 1, or 0 for one shared timestep
    stride_out,     # batch stride of x_t and v
    write_v,        # 1: also write v (a runtime flag: a masked-off store moves no bytes)
    BLOCK: tl.constexpr,  # elements per program (one row segment)
):
    b, offs, mask = row_block(N, BLOCK)

    # ᾱ_t for this sample, then the two roots, each rounded to x0's dtype as the reference rounds
    # them (a no-op in fp32); Python's negative indices are honoured, other bad indices give NaN
    dtype = x_t_ptr.dtype.element_ty
    t = tl.load(timesteps_ptr + b * stride_t)
    t = tl.where(t < 0, t + T, t)
    alpha_bar = tl.load(table_ptr + t, mask=(t >= 0) & (t < T), other=float("nan")).to(tl.float32)
    sqrt_alpha_bar = tl.sqrt_rn(alpha_bar).to(dtype).to(tl.float32)
    one_minus_alpha_bar = (1.0 - alpha_bar).to(dtype).to(tl.float32)
    sqrt_one_minus_alpha_bar = tl.sqrt_rn(one_minus_alpha_bar).to(dtype).to(tl.float32)

    x0 = tl.load(x0_ptr + b * stride_x0 + offs, mask=mask).to(tl.float32)
    noise = tl.load(noise_ptr + b * stride_noise + offs, mask=mask).to(tl.float32)
    x_t = sqrt_alpha_bar * x0 + sqrt_one_minus_alpha_bar * noise
    tl.store(x_t_ptr + b * stride_out + offs, x_t.to(dtype), mask=mask)
    v = sqrt_alpha_bar * noise - sqrt_one_minus_alpha_bar * x0
    tl.store(v_ptr + b * stride_out + offs, v.to(dtype), mask=flag_mask(offs, N, write_v))


@functools.cache  # one per key: the launcher asks on every call
def _config(dtype: torch.dtype, block: tuple[int, int, int]) -> KernelConfig:
    """The compiled configuration for x0 of ``dtype`` and a ``block_config`` entry."""
    pointer = signature_pointer(dtype)
    BLOCK, num_warps, num_stages = block
    signature = {
        "x0_ptr": pointer, "noise_ptr": pointer, "timesteps_ptr": "*i64", "table_ptr": pointer,
        "x_t_ptr": pointer, "v_ptr": pointer, "N": "i32", "T": "i32", "stride_x0": "i32",
        "stride_noise": "i32", "stride_t": "i32", "stride_out": "i32", "write_v": "i32", "BLOCK": "constexpr",
    }
    return KernelConfig(_q_sample_kernel, signature, {"BLOCK": BLOCK}, num_warps=num_warps, num_stages=num_stages,
                        aligned_ints=("N", "stride_x0", "stride_noise", "stride_out"),  # not stride_t: 0 or 1
                        options=COMPILE_OPTIONS, tags={"dtype": str(dtype).removeprefix("torch.")})


def launch_configs() -> list[KernelConfig]:
    """Every configuration ``q_sample`` can launch: dtype × block choice."""
    return [_config(dtype, block) for dtype in (torch.float32, torch.float16, torch.bfloat16)
            for block in BLOCK_CONFIGS]


def _timesteps_on(device: torch.device, timesteps: torch.Tensor, table_size: int) -> torch.Tensor:
    """timesteps as a flat int64 tensor on ``device``; CPU timesteps are range-checked first."""
    if timesteps.dtype not in INDEX_DTYPES:
        raise Unsupported(f"timesteps has dtype {timesteps.dtype}; the kernel takes int32 or int64 indices")
    timesteps = timesteps.flatten()
    if timesteps.device.type == "cpu" and timesteps.numel():
        low, high = int(timesteps.min()), int(timesteps.max())
        if low < -table_size or high >= table_size:
            bad = low if low < -table_size else high
            raise IndexError(f"timestep {bad} is out of bounds for alphas_cumprod of size {table_size}")
    return timesteps.to(device=device, dtype=torch.int64, non_blocking=True)


def q_sample(x0, noise, timesteps, alphas_cumprod, target=None):
    """x_t (and the training target) for clean samples ``x0`` (B, ...) and noise of the same shape;
    the signature and results of ``fastdiff.reference.q_sample``."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(map(repr, TARGETS))}; got {target!r}")
    check_tensors("x0", x0, noise=noise)
    batch = x0.shape[0]
    if timesteps.numel() not in (1, batch):
        raise ValueError(f"timesteps must hold 1 or {batch} values, got shape {tuple(timesteps.shape)}")
    n = x0.numel() // batch if batch else 0

    table = alphas_cumprod.to(device=x0.device, dtype=x0.dtype, non_blocking=True).contiguous()  # the reference's cast
    steps = _timesteps_on(x0.device, timesteps, table.shape[0])
    x_t = empty_rows_like(x0)
    v = torch.empty_like(x_t) if target == "v_prediction" else x_t  # x_t is a placeholder, never written
    if x0.numel():
        x0_rows, stride_x0 = as_rows(x0, x_t)
        noise_rows, stride_noise = as_rows(noise, x_t)
        stride_out = x_t.stride(0) if batch > 1 else 0
        config = _config(x0.dtype, block_config(n))
        BLOCK = config.constexprs["BLOCK"]
        _q_sample_kernel[(grid_size(batch, n, BLOCK),)](
            x0_rows, noise_rows, steps, table, x_t, v,
            n, table.shape[0], stride_x0, stride_noise, 0 if steps.numel() == 1 else 1, stride_out,
            int(target == "v_prediction"),
            BLOCK=BLOCK, num_warps=config.num_warps, num_stages=config.num_stages, **config.options)
    if target is None:
        return x_t
    if target == "epsilon":
        return x_t, noise
    if target == "v_prediction":
        return x_t, v
    return x_t, x0  # target == "sample"
