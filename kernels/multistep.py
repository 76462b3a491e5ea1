"""One step of a linear multistep sampler (DPM-Solver, UniPC, Euler, PNDM) in one kernel launch.

Every step of these samplers is linear in what it combines (``fastdiff.schedulers.linear`` derives
the coefficients of each one; ``fastdiff.reference.multistep_update`` is the PyTorch twin):

    m      = m_u + w·(m_c − m_u)                        classifier-free guidance, when m_u is given
    c      = (a·x + b·m + e·z) / d                      x̂0 or ε̂, what the solver integrates
    v      = (x, c, z, slot 0, ..., slot 4)
    x_next = Σ_j out_j·v_j;  slot 3 ← Σ_j last_j·v_j;  slot 4 ← Σ_j acc_j·v_j;  ring slot p ← c

The step's ~40 scalars are one packed float32 row (layout: ``reference.ROW_*``), loaded from device
memory: the sync-free loop indexes its device table of rows with the device step counter, so a
CUDA graph replays every step of a multistep schedule, first and last lower-order steps included,
with no host branching. The flags in the row (which slots are read, which are written, where c
goes) are runtime values: a slot that a step does not read is a masked load (no bytes move), one
it does not write a masked store.

Same arithmetic as the reference: float32, the sums in the same order j = 0, 1, ..., IEEE division,
no FMA contraction (``COMPILE_OPTIONS``), so under the interpreter the two agree bit for bit in
fp32; fp16/bf16 inputs are computed in fp32 and rounded once on store.

Limits: model_output, sample, noise, uncond and the slots float32, float16 or bfloat16, one dtype
and device (else ``Unsupported``: ``fastdiff.ops`` runs the reference); row float32 with
``reference.ROW_SIZE`` entries (on the CPU it is copied to the device, non-blocking); slots (5, B, ...)
whose slot tensors share the sample's row layout. Layouts as in ``_elementwise``.

Cost per element: reads m, x, [m_u], [z] and the slots the step uses, writes x_next and the slots
it sets. DPM-Solver++(2M) with guidance: reads m_c, m_u, x, m1 and writes x_next, c: 6 streams,
24 bytes per element in fp32 — against diffusers' ~12 separate elementwise passes per step
(conversion, history shift, the update's terms); memory bound like the DDIM step.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import reference
from ._common import KernelConfig, Unsupported
from ._elementwise import (BLOCK_CONFIGS, COMPILE_OPTIONS, as_rows, block_config, check_numbers, check_tensors, clamp,
                           empty_rows_like, flag_mask, grid_size, guide, row_block, signature_pointer)

# runtime ints that must not be specialised (Triton would compile a variant for the value 1)
MODE_ARGS = ["has_uncond", "has_noise", "writes_converted", "thresholds"]
# the row layout (reference.ROW_*), as constexprs a @triton.jit function may read
CONVERT = tl.constexpr(reference.ROW_CONVERT)
OUT = tl.constexpr(reference.ROW_OUT)
LAST = tl.constexpr(reference.ROW_LAST)
ACC = tl.constexpr(reference.ROW_ACC)
PUSH = tl.constexpr(reference.ROW_PUSH)
SETS = tl.constexpr(reference.ROW_SETS)
READS = tl.constexpr(reference.ROW_READS)
RECONVERT = tl.constexpr(reference.ROW_RECONVERT)


@triton.jit
def _load_slot(slots_ptr, k: tl.constexpr, slot_stride, b, stride_slot, offs, N, row_ptr):
    """Slot k of row b as float32, or zeros (no bytes read) when the step does not read it."""
    read = (tl.load(row_ptr + READS + k) > 0).to(tl.int32)
    return tl.load(slots_ptr + k * slot_stride + b * stride_slot + offs, mask=flag_mask(offs, N, read),
                   other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=MODE_ARGS)
def _multistep_kernel(
    model_output_ptr,        # (B, N) rows: m of the conditional model; row stride stride_model
    uncond_ptr,              # (B, N) rows: unconditional model output (read when has_uncond)
    sample_ptr,              # (B, N) rows: x
    noise_ptr,               # (B, N) rows: z (read when has_noise)
    slots_ptr,               # (5, B, N): the sampler's memory, slot k at slots_ptr + k·slot_stride; read and written
    row_ptr,                 # (ROW_SIZE,) float32: the step's packed scalars (layout: reference.ROW_*)
    threshold_ptr,           # (B,) float32: dynamic-threshold s per sample (read when thresholds)
    prev_sample_ptr,         # (B, N) out: x_next, row stride stride_out
    converted_ptr,           # (B, N) out: c, same layout as prev_sample (written when writes_converted)
    N,                       # elements per sample
    stride_model,            # batch strides (elements) of the tensors above
    stride_uncond,
    stride_sample,
    stride_noise,
    stride_slot,
    slot_stride,             # elements from one slot to the next
    stride_out,
    guidance_scale,          # fp32: w of classifier-free guidance
    has_uncond,              # 0/1: guide with uncond_ptr
    has_noise,               # 0/1: read z
    writes_converted,        # 0/1: store c to converted_ptr
    thresholds,              # 0/1: c ← clamp(c, −s, s)/s, then c ← f·x + g·c (the row's RECONVERT)
    BLOCK: tl.constexpr,     # elements per program
):
    b, offs, mask = row_block(N, BLOCK)

    # 0. classifier-free guidance
    model_output = tl.load(model_output_ptr + b * stride_model + offs, mask=mask).to(tl.float32)
    sample = tl.load(sample_ptr + b * stride_sample + offs, mask=mask).to(tl.float32)
    uncond = tl.load(uncond_ptr + b * stride_uncond + offs, mask=flag_mask(offs, N, has_uncond)).to(tl.float32)
    if has_uncond:
        model_output = guide(model_output, uncond, guidance_scale)
    noise = tl.load(noise_ptr + b * stride_noise + offs, mask=flag_mask(offs, N, has_noise),
                    other=0.0).to(tl.float32)

    # 1. c, the converted model output
    converted = tl.load(row_ptr + CONVERT) * sample + tl.load(row_ptr + CONVERT + 1) * model_output
    if has_noise:
        converted = converted + tl.load(row_ptr + CONVERT + 2) * noise
    converted = tl.div_rn(converted, tl.load(row_ptr + CONVERT + 3))
    if thresholds:  # reference.dynamic_threshold with s precomputed, then back to what the solver integrates
        threshold = tl.load(threshold_ptr + b)
        converted = tl.div_rn(clamp(converted, -threshold, threshold), threshold)
        converted = tl.load(row_ptr + RECONVERT) * sample + tl.load(row_ptr + RECONVERT + 1) * converted

    # 2. x_next and the new slot values: Σ_j row[j]·v_j over v = (x, c, z, slot 0, ..., slot 4), summed in
    # order (reference._combine). Each slot is loaded, added to the three sums and dropped (a live slot
    # per sum, not five: Triton 3.6's ptxas spilled at 8 elements per thread otherwise); every slot is
    # read before any is written
    prev = tl.load(row_ptr + OUT) * sample + tl.load(row_ptr + OUT + 1) * converted
    last = tl.load(row_ptr + LAST) * sample + tl.load(row_ptr + LAST + 1) * converted
    acc = tl.load(row_ptr + ACC) * sample + tl.load(row_ptr + ACC + 1) * converted
    prev = prev + tl.load(row_ptr + OUT + 2) * noise
    last = last + tl.load(row_ptr + LAST + 2) * noise
    acc = acc + tl.load(row_ptr + ACC + 2) * noise
    for k in tl.static_range(5):
        slot = _load_slot(slots_ptr, k, slot_stride, b, stride_slot, offs, N, row_ptr)
        prev = prev + tl.load(row_ptr + OUT + 3 + k) * slot
        last = last + tl.load(row_ptr + LAST + 3 + k) * slot
        acc = acc + tl.load(row_ptr + ACC + 3 + k) * slot

    dtype = prev_sample_ptr.dtype.element_ty
    tl.store(prev_sample_ptr + b * stride_out + offs, prev.to(dtype), mask=mask)
    tl.store(converted_ptr + b * stride_out + offs, converted.to(dtype), mask=flag_mask(offs, N, writes_converted))
    push = tl.load(row_ptr + PUSH).to(tl.int32)
    for k in tl.static_range(3):
        tl.store(slots_ptr + k * slot_stride + b * stride_slot + offs, converted.to(dtype),
                 mask=flag_mask(offs, N, (push == k).to(tl.int32)))
    sets_last = (tl.load(row_ptr + SETS) > 0).to(tl.int32)
    sets_acc = (tl.load(row_ptr + SETS + 1) > 0).to(tl.int32)
    tl.store(slots_ptr + 3 * slot_stride + b * stride_slot + offs, last.to(dtype), mask=flag_mask(offs, N, sets_last))
    tl.store(slots_ptr + 4 * slot_stride + b * stride_slot + offs, acc.to(dtype), mask=flag_mask(offs, N, sets_acc))


# ----------------------------------------------------------------------------- configurations
def _signature(dtype: torch.dtype) -> dict[str, str]:
    """Triton types of every argument of the kernel for tensors of ``dtype``."""
    types = {}
    for name in _multistep_kernel.arg_names:
        if name == "BLOCK":
            types[name] = "constexpr"
        elif name in ("row_ptr", "threshold_ptr"):
            types[name] = "*fp32"
        elif name.endswith("_ptr"):
            types[name] = signature_pointer(dtype)
        elif name == "guidance_scale":
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


@functools.cache  # one per key: the launcher asks on every call
def _config(dtype: torch.dtype, block: tuple[int, int, int]) -> KernelConfig:
    BLOCK, num_warps, num_stages = block
    signature = _signature(dtype)
    return KernelConfig(_multistep_kernel, signature, {"BLOCK": BLOCK}, num_warps=num_warps, num_stages=num_stages,
                        aligned_ints=tuple(name for name in signature
                                           if name == "N" or name.startswith("stride_") or name == "slot_stride"),
                        options=COMPILE_OPTIONS, tags={"dtype": str(dtype).removeprefix("torch.")})


def launch_configs() -> list[KernelConfig]:
    """Every configuration ``multistep_update`` can launch on a GPU: dtype × block."""
    return [_config(dtype, block) for dtype in (torch.float32, torch.float16, torch.bfloat16) for block in BLOCK_CONFIGS]


# ----------------------------------------------------------------------------- launcher
def _slot_layout(slots: torch.Tensor, out: torch.Tensor) -> tuple[int, int]:
    """(batch stride, slot stride) of ``slots`` when each slot's rows are laid out like ``out``'s
    (the kernel reads and writes them in place), else Unsupported."""
    if slots.ndim != out.ndim + 1 or slots.shape[0] != reference.MULTISTEP_SLOTS or slots.shape[1:] != out.shape:
        raise Unsupported(f"slots must have shape ({reference.MULTISTEP_SLOTS}, *sample.shape), got {tuple(slots.shape)}")
    if slots[0].stride()[1:] != out.stride()[1:] or (out.shape[0] > 1 and slots[0].stride(0) != out.stride(0)):
        raise Unsupported("the slots' layout differs from the sample's; allocate them with linear.slot_buffers")
    return (slots.stride(1) if out.shape[0] > 1 else 0), slots.stride(0)


def _threshold_scales(model_output, sample, row, noise, uncond_model_output, guidance_scale, ratio,
                      sample_max_value) -> torch.Tensor:
    """Per-sample s = clamp(quantile(|c|, ratio), 1, max), (B,) float32, from c computed as the
    reference computes it (fp32, the row's conversion), as reference.dynamic_threshold takes it."""
    f = row.to(sample.device, torch.float32).unbind()
    m = model_output.float()
    if uncond_model_output is not None:
        m = reference.guide(m, uncond_model_output.float(), guidance_scale)
    c = f[reference.ROW_CONVERT] * sample.float() + f[reference.ROW_CONVERT + 1] * m
    if noise is not None:
        c = c + f[reference.ROW_CONVERT + 2] * noise.float()
    c = c / f[reference.ROW_CONVERT + 3]
    s = torch.quantile(c.reshape(c.shape[0], -1).abs(), ratio, dim=1)
    return torch.clamp(s, min=1, max=sample_max_value).contiguous()


def multistep_update(model_output, sample, row, slots, noise=None, *, uncond_model_output=None,
                     guidance_scale=1.0, dynamic_thresholding_ratio=None, sample_max_value=1.0,
                     return_converted=False):
    """One linear multistep step; the signature and results of ``fastdiff.reference.multistep_update``."""
    check_tensors("sample", sample, model_output=model_output, noise=noise, uncond_model_output=uncond_model_output,
                  slots=slots)  # slots None: a sampler without memory, whose rows read and write no slot
    check_numbers(guidance_scale=guidance_scale, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                  sample_max_value=sample_max_value)
    if not isinstance(row, torch.Tensor) or row.dtype != torch.float32 or row.shape != (reference.ROW_SIZE,):
        raise Unsupported(f"row must be a ({reference.ROW_SIZE},) float32 tensor (a packed step), got "
                          f"{getattr(row, 'dtype', type(row).__name__)} {tuple(getattr(row, 'shape', ()))}")
    batch = sample.shape[0]
    n = sample.numel() // batch if batch else 0
    prev_sample = empty_rows_like(sample)
    converted = torch.empty_like(prev_sample) if return_converted else prev_sample  # a stand-in, never written
    stride_out = prev_sample.stride(0) if batch > 1 else 0
    stride_slot, slot_stride = (0, 0) if slots is None else _slot_layout(slots, prev_sample)
    inputs = dict(model_output=model_output, uncond=uncond_model_output, sample=sample, noise=noise)
    rows, strides = {}, {}
    for name, x in inputs.items():
        rows[name], strides[name] = as_rows(x, prev_sample) if x is not None else (sample, 0)
    row = row.to(sample.device, non_blocking=True)  # no copy when the loop's table row is already there
    threshold = row  # a float32 stand-in, never read unless thresholding
    if dynamic_thresholding_ratio is not None and sample.numel():
        threshold = _threshold_scales(model_output, sample, row, noise, uncond_model_output, guidance_scale,
                                      dynamic_thresholding_ratio, sample_max_value)
    if sample.numel():
        BLOCK, num_warps, num_stages = block_config(n)
        config = _config(sample.dtype, (BLOCK, num_warps, num_stages))
        _multistep_kernel[(grid_size(batch, n, BLOCK),)](
            rows["model_output"], rows["uncond"], rows["sample"], rows["noise"], sample if slots is None else slots,
            row, threshold, prev_sample,
            converted,
            n, strides["model_output"], strides["uncond"], strides["sample"], strides["noise"], stride_slot,
            slot_stride, stride_out, float(guidance_scale), int(uncond_model_output is not None),
            int(noise is not None), int(return_converted), int(dynamic_thresholding_ratio is not None),
            **config.constexprs, num_warps=config.num_warps, num_stages=config.num_stages, **config.options)
    return prev_sample, converted if return_converted else None
