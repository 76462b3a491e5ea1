"""Plain-PyTorch twins of every op fastdiff fuses, written for reading.

Each function here is the definition the Triton kernels in ``fastdiff.kernels`` are tested
against, and the path ``fastdiff.ops`` takes under ``FASTDIFF_BACKEND=torch``. The signatures are
the ones ``fastdiff.ops`` exposes; input checking happens there, not here.

The scheduler steps follow diffusers 0.42 expression by expression (same operand order, same
dtypes: the schedule values arrive as 0-d float32 tensors), so that fp32 results agree with
diffusers to rounding. Equation numbers refer to Ho et al. 2020 (DDPM, arXiv:2006.11239) and
Song et al. 2021 (DDIM, arXiv:2010.02502).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
NOISING_TARGETS = (None, "epsilon", "v_prediction", "sample")


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) or () -> (B, 1, 1, ...) so it broadcasts against a (B, ...) tensor of ``ndim`` dims."""
    values = values.flatten()
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


# ----------------------------------------------------------------------------- forward noising
def q_sample(x0, noise, timesteps, alphas_cumprod, target=None):
    """Forward noising q(x_t | x_0) (eq. 4): x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, per-sample t.

    x0, noise: (B, ...) clean samples and Gaussian noise; timesteps: (B,) or () integer;
    alphas_cumprod: (T,) the ᾱ table. Returns x_t, or (x_t, target) when ``target`` names the
    training target: 'epsilon' (ε), 'v_prediction' (v = √ᾱ·ε − √(1−ᾱ)·x0, Salimans & Ho 2022)
    or 'sample' (x0). Like diffusers' ``add_noise``, ᾱ is cast to x0's dtype before the roots.
    """
    alpha_bar = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[timesteps.to(x0.device)]
    sqrt_alpha_bar = _per_sample(alpha_bar**0.5, x0.ndim)
    sqrt_one_minus_alpha_bar = _per_sample((1 - alpha_bar) ** 0.5, x0.ndim)
    x_t = sqrt_alpha_bar * x0 + sqrt_one_minus_alpha_bar * noise
    if target is None:
        return x_t
    if target == "epsilon":
        return x_t, noise
    if target == "v_prediction":
        return x_t, sqrt_alpha_bar * noise - sqrt_one_minus_alpha_bar * x0
    return x_t, x0


# ----------------------------------------------------------------------------- scheduler steps
def guide(model_output, uncond_model_output, guidance_scale):
    """Classifier-free guidance (Ho & Salimans 2022): ε_u + w·(ε_c − ε_u)."""
    return uncond_model_output + guidance_scale * (model_output - uncond_model_output)


def predict_x0(model_output, sample, alpha_prod_t, prediction_type):
    """x̂0 from the model output (eq. 15 for ε; v- and x0-parameterisations likewise)."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    if prediction_type == "v_prediction":
        return (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
    return model_output


def dynamic_threshold(x0, ratio, sample_max_value):
    """Imagen's dynamic thresholding (Saharia et al. 2022): per sample, s = clamp(quantile(|x0|,
    ratio), 1, max); x0 ← clamp(x0, −s, s) / s. The quantile is taken in float32."""
    dtype = x0.dtype
    flat = x0.float().reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1)
    s = torch.clamp(s, min=1, max=sample_max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


def clip_x0(x0, clip_sample_range=None, dynamic_thresholding_ratio=None, sample_max_value=1.0):
    """Thresholding when a ratio is given (it wins, as in diffusers), else clipping when a range is."""
    if dynamic_thresholding_ratio is not None:
        return dynamic_threshold(x0, dynamic_thresholding_ratio, sample_max_value)
    if clip_sample_range is not None:
        return x0.clamp(-clip_sample_range, clip_sample_range)
    return x0


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
    """One ancestral DDPM step x_t -> x_{t-1}; returns (prev_sample, pred_original_sample).

    model_output, sample, noise, predicted_variance: (B, C, ...); alpha_prod_t(_prev): ᾱ at t and
    at the previous timestep (1 past the end), 0-d float32 tensors. ``noise`` None means no noise
    (the last step). ``predicted_variance`` is the second half of a learned-variance model output.
    """
    # 0. classifier-free guidance on the mean prediction
    if uncond_model_output is not None:
        model_output = guide(model_output, uncond_model_output, guidance_scale)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t

    # 1. predicted x0 (eq. 15), then clip or threshold it
    pred_original_sample = predict_x0(model_output, sample, alpha_prod_t, prediction_type)
    pred_original_sample = clip_x0(pred_original_sample, clip_sample_range, dynamic_thresholding_ratio, sample_max_value)

    # 2. mean of the posterior q(x_{t-1} | x_t, x0) (eq. 7)
    pred_original_sample_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
    current_sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
    pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample

    # 3. add σ_t·z
    if noise is not None:
        std = ddpm_std(alpha_prod_t, alpha_prod_t_prev, variance_type, predicted_variance)
        pred_prev_sample = pred_prev_sample + std * noise
    return pred_prev_sample, pred_original_sample


def ddpm_std(alpha_prod_t, alpha_prod_t_prev, variance_type, predicted_variance=None):
    """σ_t of the DDPM step. fixed_small: β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t (eq. 7, clamped at 1e-20);
    fixed_large: β_t; *_log: the same through log/exp; learned: the model output is σ²;
    learned_range: log σ² = f·log β_t + (1−f)·log β̃_t with f = (v+1)/2 (Nichol & Dhariwal 2021).

    fixed_large_log differs from diffusers 0.42 on purpose: diffusers takes the square root of
    log β_t (negative) and returns NaN; here σ = exp(½·log β_t), i.e. the fixed_large value.
    """
    current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
    variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t
    variance = torch.clamp(variance, min=1e-20)
    if variance_type == "fixed_small":
        return variance**0.5
    if variance_type == "fixed_small_log":
        return torch.exp(0.5 * torch.log(variance))
    if variance_type == "fixed_large":
        return current_beta_t**0.5
    if variance_type == "fixed_large_log":
        return torch.exp(0.5 * torch.log(current_beta_t))
    if variance_type == "learned":
        return predicted_variance**0.5
    min_log = torch.log(variance)
    max_log = torch.log(current_beta_t)
    frac = (predicted_variance + 1) / 2
    return torch.exp(0.5 * (frac * max_log + (1 - frac) * min_log))


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
    """One DDIM step x_t -> x_{t-1} (eq. 12 of Song et al.); returns (prev_sample, pred_original_sample).

    Shapes and schedule arguments as in ``ddpm_step``; ``noise`` is z of eq. 12 and is only used
    when eta > 0. With ``uncond_model_output`` the two model outputs are combined by
    classifier-free guidance first.
    """
    # 0. classifier-free guidance
    if uncond_model_output is not None:
        model_output = guide(model_output, uncond_model_output, guidance_scale)
    beta_prod_t = 1 - alpha_prod_t

    # 1. predicted x0 ("predicted x_0" of eq. 12) and predicted ε
    pred_original_sample = predict_x0(model_output, sample, alpha_prod_t, prediction_type)
    if prediction_type == "epsilon":
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
    else:
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample

    # 2. clip or threshold x0
    pred_original_sample = clip_x0(pred_original_sample, clip_sample_range, dynamic_thresholding_ratio, sample_max_value)

    # 3. σ_t(η) (eq. 16)
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** (0.5)
    if use_clipped_model_output:
        pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)

    # 4. "direction pointing to x_t" and x_{t-1} (eq. 12)
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
    prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
    if noise is not None and eta > 0:
        prev_sample = prev_sample + std_dev_t * noise
    return prev_sample, pred_original_sample


# ----------------------------------------------------------------------------- linear multistep steps
# A step of DPM-Solver, UniPC, Euler or PNDM is linear in what it combines (see
# fastdiff.schedulers.linear for the derivations). The sampler's memory between steps is
# MULTISTEP_SLOTS tensors shaped like the sample: slots 0-2 a ring of converted model outputs,
# slot 3 "last" and slot 4 "acc". A step is one packed float32 row:
MULTISTEP_SLOTS = 5
MULTISTEP_INPUTS = 3 + MULTISTEP_SLOTS  # v = (x, c, z, slot 0, ..., slot 4)
ROW_CONVERT = 0  # a, b, e, d: c = (a·x + b·m + e·z) / d
ROW_OUT = 4  # MULTISTEP_INPUTS coefficients of x_next over v
ROW_LAST = ROW_OUT + MULTISTEP_INPUTS  # ... of slot 3's new value
ROW_ACC = ROW_LAST + MULTISTEP_INPUTS  # ... of slot 4's new value
ROW_PUSH = ROW_ACC + MULTISTEP_INPUTS  # the ring slot (0-2) c is written to, or -1
ROW_SETS = ROW_PUSH + 1  # 1.0 where slot 3, slot 4 take their new value
ROW_READS = ROW_SETS + 2  # 1.0 for each slot the step reads (others are neither read nor combined)
ROW_RECONVERT = ROW_READS + MULTISTEP_SLOTS  # f, g: c ← f·x + g·c after thresholding (ε from a thresholded x̂0)
ROW_SIZE = ROW_RECONVERT + 2


def _combine(row, offset, inputs):
    """Σ_j row[offset + j]·v_j, summed in order j = 0, 1, ... (as the kernel sums); absent inputs skipped."""
    total = row[offset] * inputs[0]
    for j, value in enumerate(inputs[1:], start=1):
        if value is not None:
            total = total + row[offset + j] * value
    return total


def multistep_update(model_output, sample, row, slots, noise=None, *, uncond_model_output=None,
                     guidance_scale=1.0, dynamic_thresholding_ratio=None, sample_max_value=1.0,
                     return_converted=False):
    """One step of a linear multistep sampler: returns (x_next, c or None) and updates ``slots``.

    model_output, sample, noise: (B, ...); row: (ROW_SIZE,) float32, a step packed by
    ``fastdiff.schedulers.linear``; slots: (MULTISTEP_SLOTS, B, ...) in the sample's dtype, read,
    then written in place, or None for a sampler without memory (Euler: its rows read and write
    none). With ``dynamic_thresholding_ratio`` the converted output (x̂0) is thresholded
    (``dynamic_threshold``), then re-expressed as f·x + g·c (the row's ROW_RECONVERT: ε-space
    solvers take ε back from the thresholded x̂0). Computed in float32, rounded once to the
    sample's dtype. No value is read back to the host (the row's flags act through
    ``torch.where``), so this runs inside a CUDA graph too.
    """
    f = row.to(device=sample.device, dtype=torch.float32).unbind()  # 0-d tensors
    x, m = sample.float(), model_output.float()
    if uncond_model_output is not None:
        m = guide(m, uncond_model_output.float(), guidance_scale)
    z = None if noise is None else noise.float()
    if slots is None:
        values = [None] * MULTISTEP_SLOTS
    else:
        reads = [f[ROW_READS + k] > 0 for k in range(MULTISTEP_SLOTS)]
        values = [torch.where(read, slot.float(), 0.0) for read, slot in zip(reads, slots)]

    # the model output converted to what the solver integrates (x̂0 or ε̂), then x_next and the slots
    converted = f[ROW_CONVERT] * x + f[ROW_CONVERT + 1] * m
    if z is not None:
        converted = converted + f[ROW_CONVERT + 2] * z
    converted = converted / f[ROW_CONVERT + 3]
    if dynamic_thresholding_ratio is not None:
        converted = dynamic_threshold(converted, dynamic_thresholding_ratio, sample_max_value)
        converted = f[ROW_RECONVERT] * x + f[ROW_RECONVERT + 1] * converted
    inputs = [x, converted, z, *values]
    prev_sample = _combine(f, ROW_OUT, inputs)
    last, acc = _combine(f, ROW_LAST, inputs), _combine(f, ROW_ACC, inputs)

    if slots is None:
        return prev_sample.to(sample.dtype), converted.to(sample.dtype) if return_converted else None
    stored = converted.to(slots.dtype)
    for k in range(3):
        slots[k].copy_(torch.where(f[ROW_PUSH] == k, stored, slots[k]))
    slots[3].copy_(torch.where(f[ROW_SETS] > 0, last.to(slots.dtype), slots[3]))
    slots[4].copy_(torch.where(f[ROW_SETS + 1] > 0, acc.to(slots.dtype), slots[4]))
    return prev_sample.to(sample.dtype), converted.to(sample.dtype) if return_converted else None


# ----------------------------------------------------------------------------- U-Net ops
def attention(q, k, v, scale=None):
    """softmax(q·kᵀ·scale)·v over (B, H, Nq, D) × (B, H, Nk, D) -> (B, H, Nq, D), in float32.

    ``scale`` defaults to 1/√D, as in ``torch.nn.functional.scaled_dot_product_attention``.
    The Nq×Nk score matrix is materialised here; the fused kernel never does.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
    probs = scores.softmax(dim=-1)
    return (probs @ v.float()).to(q.dtype)  # (B, H, Nq, D)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False):
    """GroupNorm over (B, C, ...) with optional affine and SiLU, statistics in float32.

    Two-pass statistics (mean, then mean of squared deviations), never E[x²]−E[x]².
    """
    batch, channels = x.shape[:2]
    groups = x.float().reshape(batch, num_groups, -1)  # (B, G, C/G·spatial)
    mean = groups.mean(dim=-1, keepdim=True)
    var = ((groups - mean) ** 2).mean(dim=-1, keepdim=True)
    y = ((groups - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    affine_shape = (1, channels) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.float().reshape(affine_shape)
    if bias is not None:
        y = y + bias.float().reshape(affine_shape)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)
