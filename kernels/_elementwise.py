"""What the elementwise kernels (``q_sample``, ``ddpm_step``, ``ddim_step``) share: the row layout,
the launch parameters, and the ``@triton.jit`` helpers for the equations both scheduler steps use.

Row layout. Every tensor of a call is seen as B rows of N = numel / B elements: row b starts at
``base + b * batch_stride`` and its N elements lie densely in memory, in the same order for every
tensor of the call. Each tensor keeps its own batch stride, so one launch reads in place:

* contiguous tensors (batch stride N);
* batch- or channel-sliced views, e.g. ``model_output[:, :C]`` of a (B, 2C, H, W) output
  (batch stride 2·C·H·W) or the uncond half of a CFG batch;
* channels_last tensors (rows in memory order, H·W·C), when all of the call's tensors share the
  layout, and any other dense layout that keeps the batch dimension outermost;
* batch-broadcast tensors (``x.expand(B, ...)``: batch stride 0).

Anything else (a transposed or step-sliced view, a tensor whose layout differs from the
sample's) is first copied into the output's layout: one extra read and write of that tensor.
Outputs take the sample's layout when its rows are dense, else they are contiguous.

Grid: flat, cdiv(N, BLOCK) programs per row; each program handles BLOCK consecutive elements of
one row, so per-sample values (a timestep, a threshold) are scalars in the program; with N and the
batch strides multiples of 16 (Triton specialises on that) and aligned tensors, every access is a
16-byte vector (checked in the PTX: ld/st.global.v4). Row offsets are int64,
offsets within a row int32 (N < 2^31).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._common import POINTER_TYPE, Unsupported, cdiv, check_device, check_float, interpreting

# (BLOCK, num_warps, num_stages) of every launch. One choice for now: 1024 elements per program, 8
# per thread (two 16-byte accesses per fp32 stream, one per 16-bit stream, 3-7 streams in flight),
# the vector-add tutorial's size; it wastes no lanes on rows whose length C·H·W is a multiple of
# 1024 (any C at 32×32 and up). Not yet measured on an H100 (no GPU here): add entries, and a rule
# to ``block_config``, after benchmarking. No loops, so num_stages does not matter.
BLOCK_CONFIGS = ((1024, 4, 1),)

# Compile option for every launch: no mul+add -> FMA contraction, so that the fp32 results round
# exactly like PyTorch's unfused elementwise ops (the reference). Free for memory-bound kernels.
COMPILE_OPTIONS = {"enable_fp_fusion": False}


# Use libdevice's exp/log (expf/logf: the functions PyTorch's CUDA exp/log call) except under the
# interpreter, which lacks libdevice: a constexpr whose GPU value, True, is what launch_configs lists.
def use_libdevice() -> bool:
    return not interpreting()


def block_config(n: int) -> tuple[int, int, int]:
    """(BLOCK, num_warps, num_stages) for rows of ``n`` elements; always one of ``BLOCK_CONFIGS``."""
    return BLOCK_CONFIGS[0]


def grid_size(batch: int, n: int, block: int) -> int:
    """Programs of the flat grid: cdiv(n, block) per row, rows one after the other."""
    programs = batch * cdiv(n, block)
    if n >= 2**31 or programs >= 2**31:
        raise Unsupported(f"{batch} rows of {n} elements are too many for one launch (int32 offsets)")
    return programs


# ----------------------------------------------------------------------------- host side: layouts
def _row_strides(x: torch.Tensor) -> tuple[int, ...]:
    """Strides of the per-sample dimensions that matter (size > 1)."""
    return tuple(stride for size, stride in zip(x.shape[1:], x.stride()[1:]) if size > 1)


def _rows_are_dense(x: torch.Tensor) -> bool:
    """True when each row x[b] fills a dense block of memory (in any dimension order)."""
    dims = sorted((stride, size) for size, stride in zip(x.shape[1:], x.stride()[1:]) if size > 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def empty_rows_like(sample: torch.Tensor) -> torch.Tensor:
    """An uninitialised output shaped like ``sample``: its layout when its rows are dense
    (contiguous, channels_last), contiguous otherwise (e.g. a channel-sliced sample)."""
    out = torch.empty_like(sample)  # preserve_format: a dense sample's strides are kept
    if not _rows_are_dense(out):
        out = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
    return out


def as_rows(x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` as rows in ``out``'s element order, and its batch stride: in place when x's rows are
    laid out like out's, else a copy of x in out's layout (see the module docstring)."""
    if _row_strides(x) != _row_strides(out):
        x = torch.empty_like(out).copy_(x)
    return x, (x.stride(0) if x.shape[0] > 1 else 0)


def check_tensors(sample_name: str, sample: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Raise ``Unsupported`` unless ``sample`` is a float tensor a kernel can read and every other
    given tensor has its dtype and device (mixed dtypes run on the reference)."""
    check_float(sample_name, sample)
    check_device(sample_name, sample)
    if sample.ndim == 0:
        raise Unsupported(f"{sample_name} must have a batch dimension, got a 0-d tensor")
    for name, x in others.items():
        if x is None:
            continue
        if x.dtype != sample.dtype:
            raise Unsupported(f"{name} has dtype {x.dtype} but {sample_name} has {sample.dtype}: "
                              "the kernel takes one dtype for all of them")
        if x.device != sample.device:
            raise Unsupported(f"{name} is on {x.device} but {sample_name} is on {sample.device}")


def check_numbers(**values) -> None:
    """Raise ``Unsupported`` unless each value is a Python number (or None): the kernels take
    guidance scale, η and the clip range as fp32 arguments; a tensor (e.g. a per-sample guidance
    scale) runs on the reference."""
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise Unsupported(f"{name} must be a Python number for the kernel, got {type(value).__name__}")


def check_schedule_values(**values) -> None:
    """Raise ``Unsupported`` unless each value is a float32 tensor of one element, as the
    schedulers pass ᾱ_t and ᾱ_{t-1} (0-d); a Python float or a float64 tensor runs the reference."""
    for name, value in values.items():
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32 or value.numel() != 1:
            what = f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) \
                else type(value).__name__
            raise Unsupported(f"{name} must be a 0-d float32 tensor (as the schedulers pass it), got {what}")


def scalars_to(device: torch.device, *values: torch.Tensor) -> list[torch.Tensor]:
    """One-element tensors on ``device`` for a kernel to load: as they are when already there (no
    copy, no sync: CUDA-graph friendly), else in one non-blocking host-to-device copy."""
    values = [value.reshape(()) for value in values]
    if all(value.device == device for value in values):
        return values
    if all(value.device == values[0].device for value in values):
        return list(torch.stack(values).to(device, non_blocking=True).unbind(0))
    return [value.to(device, non_blocking=True) for value in values]


def signature_pointer(dtype: torch.dtype) -> str:
    """The Triton signature type of a pointer to ``dtype`` elements."""
    return POINTER_TYPE[dtype]


# ----------------------------------------------------------------------------- device side
@triton.jit
def row_block(N, BLOCK: tl.constexpr):
    """This program's sample b (int64) and its BLOCK offsets into row b, with their mask.

    The grid is flat: cdiv(N, BLOCK) programs per row, rows one after the other."""
    blocks_per_row = tl.cdiv(N, BLOCK)
    pid = tl.program_id(0)
    b = pid // blocks_per_row
    offs = (pid - b * blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    return b.to(tl.int64), offs, offs < N


@triton.jit
def flag_mask(offs, N, flag):
    """The row mask when ``flag`` (a runtime 0/1 int) is 1, all-false when it is 0.

    Optional inputs and outputs are switched by such flags rather than by constexprs: a load or
    store under an all-false mask moves no bytes, so one compiled kernel serves every combination
    at no cost (and the PTX keeps its 16-byte vector accesses). Written as ``offs < N * flag``
    because the triton 3.9 interpreter turns ``mask & (flag != 0)`` into an int32 tensor that
    tl.load and tl.store reject as a mask.
    """
    return offs < N * flag


@triton.jit
def clamp(x, lo, hi):
    """torch.clamp(x, lo, hi) = min(max(x, lo), hi), NaN in x propagated as PyTorch does."""
    return tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def guide(model_output, uncond_model_output, guidance_scale):
    """Classifier-free guidance: ε_u + w·(ε_c − ε_u) (reference.guide)."""
    return uncond_model_output + guidance_scale * (model_output - uncond_model_output)


@triton.jit
def divide(x, divisor, reciprocal, by_reciprocal):
    """x / divisor rounded as PyTorch rounds the reference's division by a schedule scalar: IEEE
    division (tl.div_rn), or x · (1/divisor) (``reciprocal``) when ``by_reciprocal``, which is what
    PyTorch's CUDA kernel does when the divisor is a CPU scalar (div_true_kernel_cuda)."""
    if by_reciprocal:
        quotient = x * reciprocal
    else:
        quotient = tl.div_rn(x, divisor)
    return quotient


@triton.jit
def exp(x, LIBDEVICE: tl.constexpr):
    """e^x as PyTorch's CUDA exp computes it (libdevice's expf) on a GPU; tl.exp (numpy's) under the
    interpreter, which has no libdevice."""
    if LIBDEVICE:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def log(x, LIBDEVICE: tl.constexpr):
    """ln x, like ``exp``."""
    if LIBDEVICE:
        y = libdevice.log(x)
    else:
        y = tl.log(x)
    return y


@triton.jit
def predict_x0(model_output, sample, sqrt_alpha_prod_t, sqrt_beta_prod_t, inv_sqrt_alpha_prod_t, prediction,
               by_reciprocal):
    """x̂0 from the model output (reference.predict_x0; eq. 15 for ε).

    prediction: 0 epsilon, 1 v_prediction, 2 sample (a runtime int: same traffic for all three).
    """
    if prediction == 0:
        x0 = divide(sample - sqrt_beta_prod_t * model_output, sqrt_alpha_prod_t, inv_sqrt_alpha_prod_t,
                    by_reciprocal)
    elif prediction == 1:
        x0 = sqrt_alpha_prod_t * sample - sqrt_beta_prod_t * model_output
    else:
        x0 = model_output
    return x0


@triton.jit
def clip_x0(x0, clip_mode, clip_sample_range, threshold):
    """reference.clip_x0 with the per-sample threshold s precomputed: clip_mode 0 leaves x̂0 alone,
    1 clamps it to ±clip_sample_range, 2 thresholds it: clamp(x̂0, −s, s) / s."""
    if clip_mode == 1:
        x0 = clamp(x0, -clip_sample_range, clip_sample_range)
    elif clip_mode == 2:
        x0 = tl.div_rn(clamp(x0, -threshold, threshold), threshold)
    return x0
