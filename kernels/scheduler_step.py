"""One DDPM or DDIM sampling step in one kernel launch, writing prev_sample and pred_original_sample.

    DDPM (Ho et al. 2020):  x̂0 = clip(predict_x0(ε̂))                                      (eq. 15)
                            x_{t-1} = c0·x̂0 + ct·x_t + σ_t·z,  c0 = √ᾱ_{t-1}·β_t / (1 − ᾱ_t),
                                      ct = √α_t·(1 − ᾱ_{t-1}) / (1 − ᾱ_t)                  (eq. 7)
    DDIM (Song et al. 2021): x_{t-1} = √ᾱ_{t-1}·x̂0 + √(1 − ᾱ_{t-1} − σ_t²)·ε̂ + σ_t·z,
                            σ_t = η·√((1 − ᾱ_{t-1})/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_{t-1}))       (eqs. 12, 16)

with ε̂ first combined by classifier-free guidance when an unconditional output is given
(ε_u + w·(ε_c − ε_u)). Same signatures and semantics as ``fastdiff.reference.ddpm_step`` /
``ddim_step``: every prediction type (epsilon, v_prediction, sample), clipping, dynamic
thresholding, every DDPM variance type (fixed_small[_log], fixed_large[_log], learned,
learned_range), DDIM η and use_clipped_model_output, noise=None (no noise read).

Step coefficients (√ᾱ_t, c0, ct, σ_t, ...) come from ᾱ_t and ᾱ_{t-1} (0-d float32 tensors) by the
reference's expressions, computed where the reference computes them, so that fp32 results equal
the reference's (and so diffusers') wherever the same IEEE operations run:

* ᾱ on the CPU (the schedulers keep their table there): the reference computes the coefficients
  with PyTorch's CPU ops, whose fp32 sqrt/exp/log are not correctly rounded (up to 1 ulp off), so
  the launcher runs those same ops (~20 scalar CPU ops, no GPU sync) and the kernel loads the
  results from one small float32 vector (one non-blocking host-to-device copy). On a GPU, PyTorch
  divides a tensor by a CPU scalar as a multiplication by its reciprocal; the kernel does so too.
* ᾱ already on the sample's device (no copy, no sync: CUDA-graph friendly): the kernel loads them
  and computes the coefficients itself, in fp32, in the reference's order, with IEEE roots and
  divisions (tl.sqrt_rn, tl.div_rn) and libdevice's exp/log: what PyTorch's CUDA ops compute.

It matters: at high t x̂0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t cancels (√ᾱ_t ~ 1e-3 at the end of a sigmoid
schedule), so a 1-ulp difference in √(1−ᾱ_t) becomes ~1e-4 in x̂0 and breaks the 1e-5 parity with
diffusers over a sampling loop. For the same reason the kernels compile without FMA contraction
(mul + add rounds twice, as in PyTorch's separate ops). Where the two sides run different
elementwise math (the interpreter's numpy sqrt/exp vs PyTorch's CPU ones for the learned variance
types) results agree to ~1e-7 relative. fp16 and bf16 inputs are computed in fp32 and rounded
once on store (the reference rounds after every op: the kernel is the more accurate).

Dynamic thresholding takes the per-sample quantile s in PyTorch first (x̂0 in fp32 through
``reference.predict_x0``, then ``torch.quantile`` exactly as the reference takes it), then the
kernel clamps and divides by s: ~4 extra passes over the data, for that option only.

Mode switches that do not change the memory traffic (prediction type, clipping mode, variance type,
use_clipped_model_output, where the coefficients come from) and the optional tensors (uncond
output, noise, predicted variance: masked off, they move no bytes) are runtime ints, so each
kernel compiles once per dtype.

Limits: model_output, sample and the optional tensors float32, float16 or bfloat16, all the same
dtype and device (else ``Unsupported``; ``fastdiff.ops`` then runs the reference); ᾱ values 0-d
float32 tensors. Layouts: see ``_elementwise`` (contiguous, sliced views such as a learned-variance
half or a CFG half, channels_last: in place; anything else is copied first).

Cost per call, N = numel(sample): reads 2 to 5 tensors of N elements (model output and sample;
uncond output with guidance; noise unless last step / η = 0; predicted variance with a learned
variance type), writes 2 (prev_sample, pred_original_sample); ~10-30 FLOPs per element. Memory
bound: a DDIM step at η = 0 moves 4N elements (16 bytes per element in fp32) and should run at
~90% of copy bandwidth on an H100 (~3 TB/s: ~0.35 ms for 64M fp32 elements).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import reference
from ._common import KernelConfig
from ._elementwise import (BLOCK_CONFIGS, COMPILE_OPTIONS, as_rows, block_config, check_numbers,
                           check_schedule_values, check_tensors, clip_x0, divide, empty_rows_like, exp, flag_mask,
                           grid_size, guide, log, predict_x0, row_block, scalars_to, signature_pointer, use_libdevice)

PREDICTION_CODES = {"epsilon": 0, "v_prediction": 1, "sample": 2}
VARIANCE_CODES = {"fixed_small": 0, "fixed_small_log": 1, "fixed_large": 2, "fixed_large_log": 3,
                  "learned": 4, "learned_range": 5}
# runtime ints that must not be specialised (Triton would compile a variant for the value 1)
DDPM_MODE_ARGS = ["prediction", "clip_mode", "variance_type", "has_uncond", "has_noise", "has_variance",
                  "coefficients_given", "by_reciprocal"]
DDIM_MODE_ARGS = ["prediction", "clip_mode", "use_clipped", "has_uncond", "has_noise", "coefficients_given",
                  "by_reciprocal"]


# ----------------------------------------------------------------------------- DDPM
@triton.jit
def _ddpm_coefficients(coefficients_ptr, alpha_t_ptr, alpha_prev_ptr, variance_type, coefficients_given,
                       LIBDEVICE: tl.constexpr):
    """The DDPM step's scalars: loaded (computed by the launcher, see ``ddpm_coefficients``), or
    computed here from ᾱ_t and ᾱ_{t-1} in the reference's order (reference.ddpm_step, ddpm_std)."""
    if coefficients_given:
        sqrt_alpha_t = tl.load(coefficients_ptr + 0)
        sqrt_beta_t = tl.load(coefficients_ptr + 1)
        inv_sqrt_alpha_t = tl.load(coefficients_ptr + 2)
        x0_coeff = tl.load(coefficients_ptr + 3)
        sample_coeff = tl.load(coefficients_ptr + 4)
        std = tl.load(coefficients_ptr + 5)
        min_log = tl.load(coefficients_ptr + 6)
        max_log = tl.load(coefficients_ptr + 7)
    else:
        alpha_t = tl.load(alpha_t_ptr)
        alpha_prev = tl.load(alpha_prev_ptr)
        beta_t = 1.0 - alpha_t
        beta_prev = 1.0 - alpha_prev
        current_alpha = tl.div_rn(alpha_t, alpha_prev)
        current_beta = 1.0 - current_alpha
        sqrt_alpha_t = tl.sqrt_rn(alpha_t)
        sqrt_beta_t = tl.sqrt_rn(beta_t)
        inv_sqrt_alpha_t = tl.div_rn(1.0, sqrt_alpha_t)
        x0_coeff = tl.div_rn(tl.sqrt_rn(alpha_prev) * current_beta, beta_t)
        sample_coeff = tl.div_rn(tl.sqrt_rn(current_alpha) * beta_prev, beta_t)
        variance = tl.div_rn(beta_prev, beta_t) * current_beta  # β̃_t (eq. 7), clamped at 1e-20
        variance = tl.maximum(variance, 1e-20, propagate_nan=tl.PropagateNan.ALL)
        min_log = log(variance, LIBDEVICE)
        max_log = log(current_beta, LIBDEVICE)
        if variance_type == 0:  # fixed_small: σ² = β̃_t
            std = tl.sqrt_rn(variance)
        elif variance_type == 1:  # fixed_small_log
            std = exp(0.5 * min_log, LIBDEVICE)
        elif variance_type == 2:  # fixed_large: σ² = β_t
            std = tl.sqrt_rn(current_beta)
        else:  # fixed_large_log (learned types do not use std)
            std = exp(0.5 * max_log, LIBDEVICE)
    return sqrt_alpha_t, sqrt_beta_t, inv_sqrt_alpha_t, x0_coeff, sample_coeff, std, min_log, max_log


@triton.jit(do_not_specialize=DDPM_MODE_ARGS)
def _ddpm_step_kernel(
    model_output_ptr,        # (B, N) rows: ε̂ (or v̂, x̂0) of the conditional model; row stride stride_model
    uncond_ptr,              # (B, N) rows: unconditional model output (read when has_uncond)
    sample_ptr,              # (B, N) rows: x_t
    noise_ptr,               # (B, N) rows: z (read when has_noise)
    variance_ptr,            # (B, N) rows: the model's predicted variance (read when has_variance)
    coefficients_ptr,        # (8,) float32: the step's scalars, see ddpm_coefficients (read when coefficients_given)
    alpha_t_ptr,             # () float32: ᾱ_t (read when not coefficients_given)
    alpha_prev_ptr,          # () float32: ᾱ_{t-1} (read when not coefficients_given)
    threshold_ptr,           # (B,) float32: dynamic-threshold s per sample (read when clip_mode == 2)
    prev_sample_ptr,         # (B, N) out: x_{t-1}, row stride stride_out
    pred_x0_ptr,             # (B, N) out: x̂0, same layout as prev_sample
    N,                       # elements per sample
    stride_model,            # batch strides (elements) of the tensors above
    stride_uncond,
    stride_sample,
    stride_noise,
    stride_variance,
    stride_out,
    guidance_scale,          # fp32: w of classifier-free guidance
    clip_sample_range,       # fp32: x̂0 is clamped to ±this when clip_mode == 1
    prediction,              # 0 epsilon, 1 v_prediction, 2 sample
    clip_mode,               # 0 none, 1 clip to ±clip_sample_range, 2 dynamic threshold
    variance_type,           # VARIANCE_CODES
    has_uncond,              # 0/1: guide with uncond_ptr
    has_noise,               # 0/1: add σ_t·z (0 on the last step)
    has_variance,            # 0/1: read variance_ptr (learned variance types with noise)
    coefficients_given,      # 0/1: load the scalars from coefficients_ptr instead of computing them
    by_reciprocal,           # 0/1: divide by √ᾱ_t as x·(1/√ᾱ_t) (PyTorch on CUDA with a CPU scalar)
    BLOCK: tl.constexpr,     # elements per program
    LIBDEVICE: tl.constexpr,  # exp/log from libdevice (GPU) or tl (interpreter)
):
    b, offs, mask = row_block(N, BLOCK)
    sqrt_alpha_t, sqrt_beta_t, inv_sqrt_alpha_t, x0_coeff, sample_coeff, std, min_log, max_log = \
        _ddpm_coefficients(coefficients_ptr, alpha_t_ptr, alpha_prev_ptr, variance_type, coefficients_given,
                           LIBDEVICE)
    threshold = tl.load(threshold_ptr + b, mask=clip_mode == 2, other=1.0)

    # 0. classifier-free guidance
    model_output = tl.load(model_output_ptr + b * stride_model + offs, mask=mask).to(tl.float32)
    sample = tl.load(sample_ptr + b * stride_sample + offs, mask=mask).to(tl.float32)
    uncond = tl.load(uncond_ptr + b * stride_uncond + offs, mask=flag_mask(offs, N, has_uncond)).to(tl.float32)
    if has_uncond:
        model_output = guide(model_output, uncond, guidance_scale)

    # 1. x̂0, clipped or thresholded
    x0 = predict_x0(model_output, sample, sqrt_alpha_t, sqrt_beta_t, inv_sqrt_alpha_t, prediction, by_reciprocal)
    x0 = clip_x0(x0, clip_mode, clip_sample_range, threshold)

    # 2. posterior mean (eq. 7), 3. + σ_t·z
    prev = x0_coeff * x0 + sample_coeff * sample
    noise = tl.load(noise_ptr + b * stride_noise + offs, mask=flag_mask(offs, N, has_noise)).to(tl.float32)
    learned = tl.load(variance_ptr + b * stride_variance + offs,
                      mask=flag_mask(offs, N, has_variance)).to(tl.float32)
    if has_noise:
        if variance_type < 4:  # fixed types: σ_t is a scalar
            noise_term = std * noise
        elif variance_type == 4:  # learned: the model predicts σ²
            noise_term = tl.sqrt_rn(learned) * noise
        else:  # learned_range: log σ² = f·log β_t + (1 − f)·log β̃_t, f = (v + 1) / 2
            frac = (learned + 1.0) * 0.5
            noise_term = exp(0.5 * (frac * max_log + (1.0 - frac) * min_log), LIBDEVICE) * noise
        prev = prev + noise_term

    dtype = prev_sample_ptr.dtype.element_ty
    tl.store(prev_sample_ptr + b * stride_out + offs, prev.to(dtype), mask=mask)
    tl.store(pred_x0_ptr + b * stride_out + offs, x0.to(dtype), mask=mask)


def ddpm_coefficients(alpha_prod_t, alpha_prod_t_prev, variance_type) -> torch.Tensor:
    """The DDPM step's scalars as the reference computes them (its PyTorch ops, on ᾱ's device):
    (√ᾱ_t, √(1−ᾱ_t), 1/√ᾱ_t, c0, ct, σ_t, log β̃_t, log β_t) as one float32 vector."""
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    sqrt_alpha_t = alpha_prod_t ** (0.5)
    x0_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
    sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
    variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
    min_log, max_log = torch.log(variance), torch.log(current_beta_t)
    std = {"fixed_small": lambda: variance**0.5, "fixed_small_log": lambda: torch.exp(0.5 * min_log),
           "fixed_large": lambda: current_beta_t**0.5, "fixed_large_log": lambda: torch.exp(0.5 * max_log)}.get(
        variance_type, lambda: variance)()  # learned types: σ is per element, this slot is unused
    return torch.stack([sqrt_alpha_t, beta_prod_t ** (0.5), 1 / sqrt_alpha_t, x0_coeff, sample_coeff, std,
                        min_log, max_log])


# ----------------------------------------------------------------------------- DDIM
@triton.jit
def _ddim_coefficients(coefficients_ptr, alpha_t_ptr, alpha_prev_ptr, eta, coefficients_given):
    """The DDIM step's scalars: loaded (computed by the launcher, see ``ddim_coefficients``), or
    computed here from ᾱ_t and ᾱ_{t-1} in the reference's order (reference.ddim_step)."""
    if coefficients_given:
        sqrt_alpha_t = tl.load(coefficients_ptr + 0)
        sqrt_beta_t = tl.load(coefficients_ptr + 1)
        inv_sqrt_alpha_t = tl.load(coefficients_ptr + 2)
        inv_sqrt_beta_t = tl.load(coefficients_ptr + 3)
        sqrt_alpha_prev = tl.load(coefficients_ptr + 4)
        direction_coeff = tl.load(coefficients_ptr + 5)
        std_dev = tl.load(coefficients_ptr + 6)
    else:
        alpha_t = tl.load(alpha_t_ptr)
        alpha_prev = tl.load(alpha_prev_ptr)
        beta_t = 1.0 - alpha_t
        sqrt_alpha_t = tl.sqrt_rn(alpha_t)
        sqrt_beta_t = tl.sqrt_rn(beta_t)
        inv_sqrt_alpha_t = tl.div_rn(1.0, sqrt_alpha_t)
        inv_sqrt_beta_t = tl.div_rn(1.0, sqrt_beta_t)
        beta_prev = 1.0 - alpha_prev
        variance = tl.div_rn(beta_prev, beta_t) * (1.0 - tl.div_rn(alpha_t, alpha_prev))  # eq. 16
        std_dev = eta * tl.sqrt_rn(variance)
        direction_coeff = tl.sqrt_rn(1.0 - alpha_prev - std_dev * std_dev)
        sqrt_alpha_prev = tl.sqrt_rn(alpha_prev)
    return sqrt_alpha_t, sqrt_beta_t, inv_sqrt_alpha_t, inv_sqrt_beta_t, sqrt_alpha_prev, direction_coeff, std_dev


@triton.jit(do_not_specialize=DDIM_MODE_ARGS)
def _ddim_step_kernel(
    model_output_ptr,        # (B, N) rows: ε̂ (or v̂, x̂0) of the conditional model; row stride stride_model
    uncond_ptr,              # (B, N) rows: unconditional model output (read when has_uncond)
    sample_ptr,              # (B, N) rows: x_t
    noise_ptr,               # (B, N) rows: z of eq. 12 (read when has_noise)
    coefficients_ptr,        # (7,) float32: the step's scalars, see ddim_coefficients (read when coefficients_given)
    alpha_t_ptr,             # () float32: ᾱ_t (read when not coefficients_given)
    alpha_prev_ptr,          # () float32: ᾱ_{t-1} (read when not coefficients_given)
    threshold_ptr,           # (B,) float32: dynamic-threshold s per sample (read when clip_mode == 2)
    prev_sample_ptr,         # (B, N) out: x_{t-1}, row stride stride_out
    pred_x0_ptr,             # (B, N) out: x̂0, same layout as prev_sample
    N,                       # elements per sample
    stride_model,            # batch strides (elements) of the tensors above
    stride_uncond,
    stride_sample,
    stride_noise,
    stride_out,
    guidance_scale,          # fp32: w of classifier-free guidance
    eta,                     # fp32: η of eq. 16
    clip_sample_range,       # fp32: x̂0 is clamped to ±this when clip_mode == 1
    prediction,              # 0 epsilon, 1 v_prediction, 2 sample
    clip_mode,               # 0 none, 1 clip to ±clip_sample_range, 2 dynamic threshold
    use_clipped,             # 0/1: recompute ε̂ from the clipped x̂0
    has_uncond,              # 0/1: guide with uncond_ptr
    has_noise,               # 0/1: add σ_t·z (η > 0 and noise given)
    coefficients_given,      # 0/1: load the scalars from coefficients_ptr instead of computing them
    by_reciprocal,           # 0/1: divide by √ᾱ_t, √(1−ᾱ_t) as multiplications by their reciprocals
    BLOCK: tl.constexpr,     # elements per program
):
    b, offs, mask = row_block(N, BLOCK)
    sqrt_alpha_t, sqrt_beta_t, inv_sqrt_alpha_t, inv_sqrt_beta_t, sqrt_alpha_prev, direction_coeff, std_dev = \
        _ddim_coefficients(coefficients_ptr, alpha_t_ptr, alpha_prev_ptr, eta, coefficients_given)
    threshold = tl.load(threshold_ptr + b, mask=clip_mode == 2, other=1.0)

    # 0. classifier-free guidance
    model_output = tl.load(model_output_ptr + b * stride_model + offs, mask=mask).to(tl.float32)
    sample = tl.load(sample_ptr + b * stride_sample + offs, mask=mask).to(tl.float32)
    uncond = tl.load(uncond_ptr + b * stride_uncond + offs, mask=flag_mask(offs, N, has_uncond)).to(tl.float32)
    if has_uncond:
        model_output = guide(model_output, uncond, guidance_scale)

    # 1. x̂0 and ε̂
    x0 = predict_x0(model_output, sample, sqrt_alpha_t, sqrt_beta_t, inv_sqrt_alpha_t, prediction, by_reciprocal)
    if prediction == 0:
        eps = model_output
    elif prediction == 1:
        eps = sqrt_alpha_t * model_output + sqrt_beta_t * sample
    else:
        eps = divide(sample - sqrt_alpha_t * x0, sqrt_beta_t, inv_sqrt_beta_t, by_reciprocal)

    # 2. clip or threshold x̂0; 3. ε̂ from the clipped x̂0 if asked
    x0 = clip_x0(x0, clip_mode, clip_sample_range, threshold)
    if use_clipped:
        eps = divide(sample - sqrt_alpha_t * x0, sqrt_beta_t, inv_sqrt_beta_t, by_reciprocal)

    # 4. x_{t-1} (eq. 12)
    prev = sqrt_alpha_prev * x0 + direction_coeff * eps
    noise = tl.load(noise_ptr + b * stride_noise + offs, mask=flag_mask(offs, N, has_noise)).to(tl.float32)
    if has_noise:
        prev = prev + std_dev * noise

    dtype = prev_sample_ptr.dtype.element_ty
    tl.store(prev_sample_ptr + b * stride_out + offs, prev.to(dtype), mask=mask)
    tl.store(pred_x0_ptr + b * stride_out + offs, x0.to(dtype), mask=mask)


def ddim_coefficients(alpha_prod_t, alpha_prod_t_prev, eta) -> torch.Tensor:
    """The DDIM step's scalars as the reference computes them (its PyTorch ops, on ᾱ's device):
    (√ᾱ_t, √(1−ᾱ_t), 1/√ᾱ_t, 1/√(1−ᾱ_t), √ᾱ_{t-1}, √(1 − ᾱ_{t-1} − σ_t²), σ_t), one float32 vector."""
    beta_prod_t = 1 - alpha_prod_t
    sqrt_alpha_t, sqrt_beta_t = alpha_prod_t ** (0.5), beta_prod_t ** (0.5)
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** (0.5)
    direction_coeff = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5)
    return torch.stack([sqrt_alpha_t, sqrt_beta_t, 1 / sqrt_alpha_t, 1 / sqrt_beta_t, alpha_prod_t_prev ** (0.5),
                        direction_coeff, std_dev_t])


# ----------------------------------------------------------------------------- configurations
def _signature(kernel, dtype: torch.dtype) -> dict[str, str]:
    """Triton types of every argument of ``kernel`` for tensors of ``dtype``."""
    types = {}
    for name in kernel.arg_names:
        if name in ("BLOCK", "LIBDEVICE"):
            types[name] = "constexpr"
        elif name in ("coefficients_ptr", "alpha_t_ptr", "alpha_prev_ptr", "threshold_ptr"):
            types[name] = "*fp32"
        elif name.endswith("_ptr"):
            types[name] = signature_pointer(dtype)
        elif name in ("guidance_scale", "eta", "clip_sample_range"):
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


@functools.cache  # one per key: the launcher asks on every call
def _config(kernel, dtype: torch.dtype, block: tuple[int, int, int], libdevice: bool) -> KernelConfig:
    """The compiled configuration of ``kernel`` for tensors of ``dtype`` and a ``block_config`` entry."""
    BLOCK, num_warps, num_stages = block
    constexprs = {"BLOCK": BLOCK}
    if "LIBDEVICE" in kernel.arg_names:
        constexprs["LIBDEVICE"] = libdevice
    signature = _signature(kernel, dtype)
    return KernelConfig(kernel, signature, constexprs, num_warps=num_warps, num_stages=num_stages,
                        aligned_ints=tuple(name for name in signature if name == "N" or name.startswith("stride_")),
                        options=COMPILE_OPTIONS, tags={"dtype": str(dtype).removeprefix("torch.")})


def launch_configs() -> list[KernelConfig]:
    """Every configuration ``ddpm_step`` and ``ddim_step`` can launch on a GPU: kernel × dtype × block."""
    return [_config(kernel, dtype, block, libdevice=True) for kernel in (_ddpm_step_kernel, _ddim_step_kernel)
            for dtype in (torch.float32, torch.float16, torch.bfloat16) for block in BLOCK_CONFIGS]


# ----------------------------------------------------------------------------- launchers
def _clip_mode(clip_sample_range, dynamic_thresholding_ratio) -> int:
    """reference.clip_x0's choice: thresholding wins over clipping."""
    if dynamic_thresholding_ratio is not None:
        return 2
    return 0 if clip_sample_range is None else 1


def _threshold_scales(model_output, uncond_model_output, guidance_scale, sample, alpha_prod_t, prediction_type,
                      ratio, sample_max_value) -> torch.Tensor:
    """Per-sample s = clamp(quantile(|x̂0|, ratio), 1, max), (B,) float32, as
    reference.dynamic_threshold takes it, from x̂0 in fp32 (upcast inputs) through the reference."""
    model_output = model_output.float()
    if uncond_model_output is not None:
        model_output = reference.guide(model_output, uncond_model_output.float(), guidance_scale)
    x0 = reference.predict_x0(model_output, sample.float(), alpha_prod_t, prediction_type)
    s = torch.quantile(x0.reshape(x0.shape[0], -1).abs(), ratio, dim=1)
    return torch.clamp(s, min=1, max=sample_max_value).contiguous()


def coefficients_on_host(alpha_prod_t, alpha_prod_t_prev) -> bool:
    """Whether the launcher computes the step's scalars with PyTorch (ᾱ values on the CPU, where the
    reference computes them too) rather than the kernel (ᾱ values on a device)."""
    return alpha_prod_t.device.type == "cpu" and alpha_prod_t_prev.device.type == "cpu"


class _Step:
    """What both launchers prepare before the launch: checks, outputs, rows, the schedule scalars,
    the threshold. Absent inputs stand in as the sample (never read: their flags are 0)."""

    def __init__(self, model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise, uncond_model_output,
                 guidance_scale, prediction_type, clip_sample_range, dynamic_thresholding_ratio, sample_max_value,
                 host_coefficients, numbers=None, **others):
        check_tensors("sample", sample, model_output=model_output, noise=noise,
                      uncond_model_output=uncond_model_output, **others)
        check_schedule_values(alpha_prod_t=alpha_prod_t, alpha_prod_t_prev=alpha_prod_t_prev)
        check_numbers(guidance_scale=guidance_scale, clip_sample_range=clip_sample_range, **(numbers or {}))
        if prediction_type not in PREDICTION_CODES:
            raise ValueError(f"prediction_type must be one of {', '.join(map(repr, PREDICTION_CODES))}; "
                             f"got {prediction_type!r}")
        self.batch = sample.shape[0]
        self.n = sample.numel() // self.batch if self.batch else 0
        self.prev_sample = empty_rows_like(sample)
        self.pred_x0 = torch.empty_like(self.prev_sample)
        self.stride_out = self.prev_sample.stride(0) if self.batch > 1 else 0
        inputs = dict(model_output=model_output, uncond=uncond_model_output, sample=sample, noise=noise, **others)
        self.rows, self.strides, self.flags = {}, {}, {}
        for name, x in inputs.items():
            self.flags[name] = int(x is not None)
            self.rows[name], self.strides[name] = as_rows(x, self.prev_sample) if x is not None else (sample, 0)

        # the coefficients where the reference computes them (see the module docstring)
        device = sample.device
        if coefficients_on_host(alpha_prod_t, alpha_prod_t_prev):
            self.coefficients = host_coefficients(alpha_prod_t.reshape(()), alpha_prod_t_prev.reshape(())).to(
                device, non_blocking=True)
            self.alpha_t = self.alpha_prev = self.coefficients  # stand-ins, never read
            self.coefficients_given, self.by_reciprocal = 1, int(device.type == "cuda")
        else:
            self.alpha_t, self.alpha_prev = scalars_to(device, alpha_prod_t, alpha_prod_t_prev)
            self.coefficients = self.alpha_t  # a stand-in, never read
            self.coefficients_given, self.by_reciprocal = 0, 0

        self.clip_mode = _clip_mode(clip_sample_range, dynamic_thresholding_ratio)
        self.clip_range = 0.0 if clip_sample_range is None else float(clip_sample_range)
        self.threshold = self.coefficients  # a float32 stand-in, never read unless clip_mode == 2
        if self.clip_mode == 2 and sample.numel():
            self.threshold = _threshold_scales(model_output, uncond_model_output, guidance_scale, sample,
                                               alpha_prod_t, prediction_type, dynamic_thresholding_ratio,
                                               sample_max_value)

    def launch_params(self, kernel, dtype):
        """(grid, config) for ``kernel`` over this step's rows."""
        config = _config(kernel, dtype, block_config(self.n), libdevice=use_libdevice())
        return (grid_size(self.batch, self.n, config.constexprs["BLOCK"]),), config


def ddpm_step(
    model_output,
    sample,
    alpha_prod_t,
    alpha_prod_t_prev,
    noise=None,
    *,
    predicted_variance=None,
    prediction_type="epsilon",
    variance_type="fixed_small",
    clip_sample_range=None,
    dynamic_thresholding_ratio=None,
    sample_max_value=1.0,
    uncond_model_output=None,
    guidance_scale=1.0,
):
    """One ancestral DDPM step; the signature and results of ``fastdiff.reference.ddpm_step``."""
    if variance_type not in VARIANCE_CODES:
        raise ValueError(f"variance_type must be one of {', '.join(map(repr, VARIANCE_CODES))}; got {variance_type!r}")
    has_variance = noise is not None and variance_type in ("learned", "learned_range")
    if has_variance and predicted_variance is None:
        raise ValueError(f"variance_type={variance_type!r} needs predicted_variance")
    step = _Step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise, uncond_model_output, guidance_scale,
                 prediction_type, clip_sample_range, dynamic_thresholding_ratio, sample_max_value,
                 lambda a, a_prev: ddpm_coefficients(a, a_prev, variance_type),
                 predicted_variance=predicted_variance if has_variance else None)
    if sample.numel():
        grid, config = step.launch_params(_ddpm_step_kernel, sample.dtype)
        rows, strides, flags = step.rows, step.strides, step.flags
        _ddpm_step_kernel[grid](
            rows["model_output"], rows["uncond"], rows["sample"], rows["noise"], rows["predicted_variance"],
            step.coefficients, step.alpha_t, step.alpha_prev, step.threshold, step.prev_sample, step.pred_x0,
            step.n, strides["model_output"], strides["uncond"], strides["sample"], strides["noise"],
            strides["predicted_variance"], step.stride_out, float(guidance_scale), step.clip_range,
            PREDICTION_CODES[prediction_type], step.clip_mode, VARIANCE_CODES[variance_type],
            flags["uncond"], flags["noise"], flags["predicted_variance"], step.coefficients_given,
            step.by_reciprocal,
            **config.constexprs, num_warps=config.num_warps, num_stages=config.num_stages, **config.options)
    return step.prev_sample, step.pred_x0


def ddim_step(
    model_output,
    sample,
    alpha_prod_t,
    alpha_prod_t_prev,
    noise=None,
    *,
    eta=0.0,
    prediction_type="epsilon",
    clip_sample_range=None,
    dynamic_thresholding_ratio=None,
    sample_max_value=1.0,
    use_clipped_model_output=False,
    uncond_model_output=None,
    guidance_scale=1.0,
):
    """One DDIM step; the signature and results of ``fastdiff.reference.ddim_step``."""
    noise = noise if eta > 0 else None  # the reference reads z only when η > 0
    step = _Step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise, uncond_model_output, guidance_scale,
                 prediction_type, clip_sample_range, dynamic_thresholding_ratio, sample_max_value,
                 lambda a, a_prev: ddim_coefficients(a, a_prev, eta), numbers=dict(eta=eta))
    if sample.numel():
        grid, config = step.launch_params(_ddim_step_kernel, sample.dtype)
        rows, strides, flags = step.rows, step.strides, step.flags
        _ddim_step_kernel[grid](
            rows["model_output"], rows["uncond"], rows["sample"], rows["noise"],
            step.coefficients, step.alpha_t, step.alpha_prev, step.threshold, step.prev_sample, step.pred_x0,
            step.n, strides["model_output"], strides["uncond"], strides["sample"], strides["noise"],
            step.stride_out, float(guidance_scale), float(eta), step.clip_range,
            PREDICTION_CODES[prediction_type], step.clip_mode, int(bool(use_clipped_model_output)),
            flags["uncond"], flags["noise"], step.coefficients_given, step.by_reciprocal,
            **config.constexprs, num_warps=config.num_warps, num_stages=config.num_stages, **config.options)
    return step.prev_sample, step.pred_x0
