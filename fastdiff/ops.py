"""The one dispatch point for every op fastdiff fuses.

Schedulers, the U-Net and the pipeline call these functions only. Each checks its input, then runs
the Triton kernel (``fastdiff.kernels``) or the plain-PyTorch twin (``fastdiff.reference``, same
signature) as ``fastdiff.backend.resolve`` decides; ``kernel_ops()`` lists the ops with a kernel.

No kernel has a backward pass: whenever autograd has to record an op (an input requires grad and
grad mode is on, i.e. training), the reference runs, on every backend. Input a kernel cannot take
(float64, a head dim over 256, ...) runs the reference under 'auto' and raises a ``ValueError``
(``fastdiff.kernels.Unsupported``) saying why under an explicit 'triton'. Inside ``torch.compile``
the reference is what gets compiled, so a compiled U-Net is one graph.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from . import reference, validation
from .backend import get_backend, resolve
from .reference import NOISING_TARGETS, PREDICTION_TYPES, VARIANCE_TYPES

OP_NAMES = ("q_sample", "ddpm_step", "ddim_step", "multistep_update", "attention", "group_norm")


def _kernel(name: str, strict: bool = False) -> Callable | None:
    """The Triton launcher of op ``name``; None when it cannot load (triton missing or broken), or
    the import error itself when ``strict`` (an explicit 'triton' backend must not quietly fall back)."""
    try:
        return importlib.import_module(".kernels", __package__).launcher(name)
    except (ImportError, AttributeError):
        if strict:
            raise
        return None


def kernel_ops() -> list[str]:
    """Names of the ops that have a Triton kernel in this install."""
    return [name for name in OP_NAMES if callable(_kernel(name))]


def _needs_autograd(args) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _run(name: str, tensor: torch.Tensor, *args, **kwargs):
    """Run op ``name`` on the path ``resolve(tensor)`` picks.

    The kernels have no backward: when autograd has to record the op (training), the reference
    runs on every backend. Input a kernel cannot take (``kernels.Unsupported``: a dtype, a size)
    runs the reference under 'auto' and is an error under an explicit 'triton'.

    Under ``torch.compile`` the reference is traced (Inductor fuses it into its own kernels): the
    backend switch reads a ContextVar, which dynamo cannot trace, and would break the graph at
    every op.
    """
    if torch.compiler.is_compiling():
        return getattr(reference, name)(*args, **kwargs)
    if resolve(tensor) == "triton" and not _needs_autograd(args + tuple(kwargs.values())):
        explicit = get_backend() == "triton"
        kernel = _kernel(name, strict=explicit)
        if kernel is not None:
            from .kernels import Unsupported

            try:
                return kernel(*args, **kwargs)
            except Unsupported:
                if explicit:
                    raise
    return getattr(reference, name)(*args, **kwargs)


# ----------------------------------------------------------------------------- input checks
def _same_shape(name: str, x, like_name: str, like: torch.Tensor) -> None:
    validation.tensor(name, x, floating=True)
    if x.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {like_name}'s shape {tuple(like.shape)}")


def _alpha_bar(name: str, value) -> None:
    """ᾱ in [0, 1], checked where that costs no device sync: a number or a CPU tensor. On a GPU the
    sampling loop's ᾱ come from step tables built on the host from a checked schedule."""
    if not isinstance(value, torch.Tensor):
        validation.real(name, value, 0, 1)
    elif value.device.type == "cpu":
        validation.in_range(name, value, 0, 1, " (a cumulative product of alphas)")


def _check_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise, prediction_type, uncond_model_output,
                guidance_scale, clip_sample_range, dynamic_thresholding_ratio, sample_max_value) -> None:
    validation.tensor("sample", sample, floating=True)
    _same_shape("model_output", model_output, "sample", sample)
    if noise is not None:
        _same_shape("noise", noise, "sample", sample)
    _alpha_bar("alpha_prod_t", alpha_prod_t)
    _alpha_bar("alpha_prod_t_prev", alpha_prod_t_prev)
    guidance_scale = validation.real("guidance_scale", guidance_scale)
    if uncond_model_output is not None:
        _same_shape("uncond_model_output", uncond_model_output, "model_output", model_output)
    elif guidance_scale != 1:
        raise ValueError(f"guidance_scale={guidance_scale:g} needs uncond_model_output (classifier-free guidance "
                         "combines it with model_output); pass it, or leave guidance_scale at 1")
    validation.one_of("prediction_type", prediction_type, PREDICTION_TYPES)
    if clip_sample_range is not None:
        validation.real("clip_sample_range", clip_sample_range, 0, min_open=True)
    if dynamic_thresholding_ratio is not None:
        validation.real("dynamic_thresholding_ratio", dynamic_thresholding_ratio, 0, 1, min_open=True)
        validation.real("sample_max_value", sample_max_value, 0, min_open=True)


# ----------------------------------------------------------------------------- the ops
def q_sample(x0, noise, timesteps, alphas_cumprod, target=None):
    """Forward noising x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε; see ``reference.q_sample``."""
    validation.tensor("x0", x0, floating=True)
    _same_shape("noise", noise, "x0", x0)
    validation.tensor("timesteps", timesteps, integer=True)
    if timesteps.numel() not in (1, x0.shape[0]) or timesteps.ndim > 1:
        raise ValueError(f"timesteps must have shape () or ({x0.shape[0]},), got {tuple(timesteps.shape)}")
    validation.tensor("alphas_cumprod", alphas_cumprod, floating=True)
    if alphas_cumprod.ndim != 1:
        raise ValueError(f"alphas_cumprod must be 1-D, got shape {tuple(alphas_cumprod.shape)}")
    # values checked on the CPU only: a GPU read-back would stall every training step (the
    # schedulers' add_noise, the public entry, checks device timesteps too)
    validation.timesteps("timesteps", timesteps, len(alphas_cumprod), on_device=False)
    validation.one_of("target", target, NOISING_TARGETS)
    return _run("q_sample", x0, x0, noise, timesteps, alphas_cumprod, target=target)


def ddpm_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise=None, *, predicted_variance=None,
              prediction_type="epsilon", variance_type="fixed_small", clip_sample_range=None,
              dynamic_thresholding_ratio=None, sample_max_value=1.0, uncond_model_output=None, guidance_scale=1.0):
    """One DDPM step; see ``reference.ddpm_step``."""
    _check_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise, prediction_type, uncond_model_output,
                guidance_scale, clip_sample_range, dynamic_thresholding_ratio, sample_max_value)
    validation.one_of("variance_type", variance_type, VARIANCE_TYPES)
    if variance_type in ("learned", "learned_range") and noise is not None:
        if predicted_variance is None:
            raise ValueError(f"variance_type={variance_type!r} needs the model's predicted variance: "
                             "a model output with twice the sample's channels")
        _same_shape("predicted_variance", predicted_variance, "sample", sample)
    return _run("ddpm_step", sample,
        model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise, predicted_variance=predicted_variance,
        prediction_type=prediction_type, variance_type=variance_type, clip_sample_range=clip_sample_range,
        dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
        uncond_model_output=uncond_model_output, guidance_scale=guidance_scale)


def ddim_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise=None, *, eta=0.0,
              prediction_type="epsilon", clip_sample_range=None, dynamic_thresholding_ratio=None,
              sample_max_value=1.0, use_clipped_model_output=False, uncond_model_output=None, guidance_scale=1.0):
    """One DDIM step; see ``reference.ddim_step``."""
    _check_step(model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise, prediction_type, uncond_model_output,
                guidance_scale, clip_sample_range, dynamic_thresholding_ratio, sample_max_value)
    validation.real("eta", eta, minimum=0)
    validation.boolean("use_clipped_model_output", use_clipped_model_output)
    return _run("ddim_step", sample,
        model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise, eta=eta, prediction_type=prediction_type,
        clip_sample_range=clip_sample_range, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
        sample_max_value=sample_max_value, use_clipped_model_output=use_clipped_model_output,
        uncond_model_output=uncond_model_output, guidance_scale=guidance_scale)


def multistep_update(model_output, sample, row, slots, noise=None, *, uncond_model_output=None, guidance_scale=1.0,
                     dynamic_thresholding_ratio=None, sample_max_value=1.0, return_converted=False):
    """One step of DPM-Solver, UniPC, Euler or PNDM, packed as ``row``; see ``reference.multistep_update``.

    The row's values are not checked here (they come from ``fastdiff.schedulers.linear``, and on a
    GPU reading them would stall the queue); their shape and dtype are."""
    validation.tensor("sample", sample, floating=True)
    _same_shape("model_output", model_output, "sample", sample)
    if noise is not None:
        _same_shape("noise", noise, "sample", sample)
    guidance_scale = validation.real("guidance_scale", guidance_scale)
    if uncond_model_output is not None:
        _same_shape("uncond_model_output", uncond_model_output, "model_output", model_output)
    elif guidance_scale != 1:
        raise ValueError(f"guidance_scale={guidance_scale:g} needs uncond_model_output (classifier-free guidance "
                         "combines it with model_output); pass it, or leave guidance_scale at 1")
    validation.tensor("row", row, floating=True)
    if row.shape != (reference.ROW_SIZE,):
        raise ValueError(f"row must have shape ({reference.ROW_SIZE},) (a step packed by fastdiff.schedulers.linear), "
                         f"got {tuple(row.shape)}")
    if slots is not None and (validation.tensor("slots", slots, floating=True).shape != (
            reference.MULTISTEP_SLOTS, *sample.shape) or slots.dtype != sample.dtype):
        raise ValueError(f"slots must be None or a {sample.dtype} tensor of shape ({reference.MULTISTEP_SLOTS}, "
                         f"*{tuple(sample.shape)}), got {slots.dtype} {tuple(slots.shape)}")
    if dynamic_thresholding_ratio is not None:
        validation.real("dynamic_thresholding_ratio", dynamic_thresholding_ratio, 0, 1, min_open=True)
        validation.real("sample_max_value", sample_max_value, 0, min_open=True)
    return _run("multistep_update", sample, model_output, sample, row, slots, noise,
                uncond_model_output=uncond_model_output, guidance_scale=guidance_scale,
                dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
                return_converted=validation.boolean("return_converted", return_converted))


def attention(q, k, v, scale=None):
    """softmax(q·kᵀ·scale)·v over (B, H, Nq, D) × (B, H, Nk, D); see ``reference.attention``.

    Kernel: flash-style forward, head dims up to 256. Under autograd (q, k or v requiring grad)
    the reference runs: the kernel has no backward."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        validation.tensor(name, x, floating=True)
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape (B, H, N, D), got {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"attention expects q (B, H, Nq, D) and k, v (B, H, Nk, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if scale is not None:
        validation.real("scale", scale)
    return _run("attention", q, q, k, v, scale=scale)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, silu=False):
    """GroupNorm over (B, C, ...) with optional fused SiLU; see ``reference.group_norm``.

    Under autograd (x, weight or bias requiring grad) the reference runs: the kernel has no backward."""
    validation.tensor("x", x, floating=True)
    if x.ndim < 2:
        raise ValueError(f"x must have shape (B, C, ...), got {tuple(x.shape)}")
    if not isinstance(num_groups, int) or num_groups < 1 or x.shape[1] % num_groups:
        raise ValueError(f"num_groups must be a positive divisor of the {x.shape[1]} channels, got {num_groups!r}")
    validation.real("eps", eps, 0, min_open=True)
    validation.boolean("silu", silu)
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (x.shape[1],):
            raise ValueError(f"{name} must have shape ({x.shape[1]},), got {tuple(p.shape)}")
    return _run("group_norm", x, x, num_groups, weight, bias, eps=eps, silu=silu)
