"""fastdiff's fused kernels inside diffusers' own pipelines and models.

    from diffusers import DDIMPipeline
    from fastdiff.compat.diffusers import accelerate

    pipe = accelerate(DDIMPipeline.from_pretrained("google/ddpm-cifar10-32"))  # same object, swapped in place
    images = pipe(num_inference_steps=50, eta=0.0).images

* ``FastDDPMScheduler``, ``FastDDIMScheduler``: subclasses of diffusers' ``DDPMScheduler`` and
  ``DDIMScheduler``, so config, ``from_config``, ``save_pretrained`` / ``from_pretrained``,
  ``compatibles`` and ``isinstance`` checks are diffusers' own. ``step``, ``add_noise`` and
  ``get_velocity`` run ``fastdiff.ops``' fused ops (a whole sampling step in one launch) with
  diffusers' semantics: the same generator draws in the same order, the same outputs.
* ``FastDPMSolverMultistepScheduler``, ``FastUniPCMultistepScheduler``, ``FastEulerDiscreteScheduler``,
  ``FastEulerAncestralDiscreteScheduler``, ``FastPNDMScheduler``: the same for the multistep
  schedulers; each step is one ``ops.multistep_update`` launch and leaves diffusers' own state
  (history lists, counters, step index), whose tensors are views of the op's slots. Their modules
  (``_dpmsolver``, ``_unipc``, ``_euler``, ``_pndm``) list what runs diffusers' code instead.
* ``FastAttnProcessor``: an attention processor that does what diffusers' ``AttnProcessor2_0`` does
  (spatial norm, group norm, cross-attention norm, q/k norms, mask, residual, rescale factor)
  with fastdiff's flash-attention kernel in place of ``scaled_dot_product_attention``.
* ``FastGroupNorm``, ``FastGroupNormSiLU``, ``FastResnetBlock2D`` (``_group_norm``): GroupNorm and
  the SiLU after it on fastdiff's GroupNorm kernel inside diffusers' models, by module class swap.
* ``accelerate(pipe_or_model, cuda_graph=False)``: swaps all of these in and returns the same
  object; any other scheduler stays (one warning). ``cuda_graph=True`` replays the UNet forward and
  the VAE decode from CUDA graphs (``_graphs``); ``reset_cuda_graphs`` after replacing weights.

The path follows fastdiff's backend switch (``FASTDIFF_BACKEND``, ``fastdiff.use_backend``): under
'auto' CUDA tensors take the kernels. Where a kernel would not give diffusers' result, diffusers'
own code (the stock path) runs instead, whatever the backend:

* schedulers: float64 or mixed-dtype/mixed-device input (the kernels take fp32/fp16/bf16 alike),
  ``variance_type="fixed_large_log"`` (diffusers returns NaN there, fastdiff's op deliberately
  does not), noise or timesteps that only broadcast;
* attention: an attention mask, float64, a head dim over 256, or autograd (no kernel backward):
  ``scaled_dot_product_attention`` runs, as in ``AttnProcessor2_0``. On the 'torch' path it runs
  too, so a torch-backend accelerated pipeline computes exactly what the stock one does;
* GroupNorm: the same cases (autograd, the 'torch' path, other dtypes, torch.compile) run
  ``F.group_norm`` and the stock activation.

This module imports diffusers; ``import fastdiff`` never imports this module.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F

try:
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, ModelMixin,
                           UNet2DConditionModel, UNet2DModel)
    from diffusers.configuration_utils import FrozenDict
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    # diffusers' pipeline loader looks a component's base class up by name in the module that
    # model_index.json names for it (this one, after accelerate): with SchedulerMixin importable
    # from here, a saved accelerated pipeline loads back.
    from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
    from diffusers.utils import deprecate
except ImportError as error:  # diffusers is an optional extra
    raise ImportError("fastdiff.compat.diffusers needs diffusers (tested with 0.42): pip install diffusers") from error

from .. import ops, validation
from ..backend import resolve
from ..schedulers.ddim import fused_ddim_step
from ..unet import UNet2D
from ..schedulers.ddpm import fused_ddpm_step
from . import _dpmsolver, _euler, _graphs, _group_norm, _pndm, _unipc
from ._dpmsolver import FastDPMSolverMultistepScheduler
from ._euler import FastEulerAncestralDiscreteScheduler, FastEulerDiscreteScheduler
from ._group_norm import FastGroupNorm, FastGroupNormSiLU, FastResnetBlock2D
from ._pndm import FastPNDMScheduler
from ._slots import KERNEL_DTYPES
from ._unipc import FastUniPCMultistepScheduler

__all__ = ["FastAttnProcessor", "FastDDIMScheduler", "FastDDPMScheduler", "FastDPMSolverMultistepScheduler",
           "FastEulerAncestralDiscreteScheduler", "FastEulerDiscreteScheduler", "FastGroupNorm", "FastGroupNormSiLU",
           "FastPNDMScheduler", "FastResnetBlock2D", "FastUniPCMultistepScheduler", "accelerate", "reset_cuda_graphs"]

logger = logging.getLogger("fastdiff")

MAX_HEAD_DIM = 256  # kernels/attention.py: MAX_HEAD_DIM (imported there with triton; kept in step by a test)


def _kernel_inputs(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels take these tensors together: one kernel dtype, one device."""
    if not all(isinstance(x, torch.Tensor) for x in tensors):
        return False
    first = tensors[0]
    return first.dtype in KERNEL_DTYPES and all(x.dtype == first.dtype and x.device == first.device for x in tensors)


# ----------------------------------------------------------------------------- schedulers
class _FusedNoising:
    """add_noise and get_velocity through fastdiff's fused ``q_sample`` (one read of x0 and ε, one
    write), for the samples it takes; diffusers' own code for the rest."""

    def _noising_fusable(self, samples, noise, timesteps) -> bool:
        return (_kernel_inputs(samples, noise) and noise.shape == samples.shape
                and isinstance(timesteps, torch.Tensor) and not timesteps.is_floating_point()
                and timesteps.dtype != torch.bool and timesteps.ndim <= 1 and timesteps.numel() in (1, len(samples)))

    def _alphas_cumprod_on(self, device: torch.device) -> torch.Tensor:
        # as diffusers does: keep the table on the samples' device, so later calls copy nothing
        self.alphas_cumprod = self.alphas_cumprod.to(device=device)
        return self.alphas_cumprod

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.IntTensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε for per-sample ``timesteps`` (Ho et al. 2020, eq. 4)."""
        if not self._noising_fusable(original_samples, noise, timesteps):
            return super().add_noise(original_samples, noise, timesteps)
        validation.timesteps("timesteps", timesteps, len(self.alphas_cumprod))  # -1 would wrap to the last ᾱ
        device = original_samples.device
        return ops.q_sample(original_samples, noise, timesteps.to(device), self._alphas_cumprod_on(device))

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """The v-prediction target v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (Salimans & Ho 2022)."""
        if not self._noising_fusable(sample, noise, timesteps):
            return super().get_velocity(sample, noise, timesteps)
        validation.timesteps("timesteps", timesteps, len(self.alphas_cumprod))
        device = sample.device
        table = self._alphas_cumprod_on(device)
        return ops.q_sample(sample, noise, timesteps.to(device), table, target="v_prediction")[1]


class FastDDPMScheduler(_FusedNoising, DDPMScheduler):
    """diffusers' ``DDPMScheduler`` whose ``step`` is fastdiff's fused DDPM step: x̂0, clip or
    threshold, posterior mean and σ_t·z in one kernel launch. Same config, same outputs."""

    def _fusable(self, model_output, sample) -> bool:
        # fixed_large_log: diffusers takes √(log β_t) = NaN; fastdiff's op gives √β_t on purpose, so
        # the drop-in leaves that option to diffusers. A variance_type edited after construction
        # would make diffusers mix the attribute and the config: also left to diffusers.
        return (self.variance_type == self.config.variance_type != "fixed_large_log"
                and _kernel_inputs(model_output, sample))

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True) -> DDPMSchedulerOutput | tuple:
        """x_t -> x_{t-1} (Ho et al. 2020, eqs. 7 and 15); diffusers' ``DDPMScheduler.step``."""
        if not self._fusable(model_output, sample):
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        prev_t = self.previous_timestep(timestep)  # diffusers': t − 1 before set_timesteps
        prev_sample, pred_original_sample = fused_ddpm_step(self, model_output, timestep, prev_t, sample, generator)
        if not return_dict:
            return prev_sample, pred_original_sample
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class FastDDIMScheduler(_FusedNoising, DDIMScheduler):
    """diffusers' ``DDIMScheduler`` whose ``step`` is fastdiff's fused DDIM step: x̂0 and ε̂, clip or
    threshold, σ_t(η) and x_{t-1} in one kernel launch. Same config, same outputs."""

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True) -> DDIMSchedulerOutput | tuple:
        """x_t -> x_{t-1} (Song et al. 2021, eqs. 12 and 16); diffusers' ``DDIMScheduler.step``."""
        noisy = eta > 0 and variance_noise is not None
        fusable = _kernel_inputs(model_output, sample, *([variance_noise] if noisy else []))
        if (self.num_inference_steps is None or not fusable  # diffusers raises its own error for the first
                or (noisy and variance_noise.shape != sample.shape)):
            return super().step(model_output, timestep, sample, eta=eta,
                                use_clipped_model_output=use_clipped_model_output, generator=generator,
                                variance_noise=variance_noise, return_dict=return_dict)

        prev_sample, pred_original_sample = fused_ddim_step(
            self, model_output, timestep, sample, eta, use_clipped_model_output, generator, variance_noise)
        if not return_dict:
            return prev_sample, pred_original_sample
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


# diffusers scheduler class -> its fused twin (exact classes: a user's subclass may change step)
FAST_SCHEDULERS = {DDPMScheduler: FastDDPMScheduler, DDIMScheduler: FastDDIMScheduler,
                   **_dpmsolver.FAST, **_unipc.FAST, **_euler.FAST, **_pndm.FAST}


# ----------------------------------------------------------------------------- attention
def _kernel_takes(query, key, value) -> bool:
    """Whether fastdiff's attention kernel computes what SDPA would for these (B, H, N, D) tensors."""
    if torch.compiler.is_compiling():  # compiled: the stock SDPA, which Inductor knows
        return False
    if not _kernel_inputs(query, key, value) or query.ndim != 4:
        return False
    if key.shape != value.shape or key.shape[:2] != query.shape[:2] or key.shape[-1] != query.shape[-1]:
        return False
    if not 1 <= query.shape[-1] <= MAX_HEAD_DIM:
        return False
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return False  # no kernel backward; SDPA's is the stock one (fastdiff's reference would materialise N²)
    return resolve(query) == "triton"


def _project(attn: Attention, hidden_states, encoder_hidden_states, attention_mask):
    """AttnProcessor2_0's steps before the attention: mask, group norm, projections, heads, q/k norms.

    hidden_states: (B, N, C). Returns q (B, H, Nq, D), k and v (B, H, Nk, D), and the mask in
    SDPA's (B, H, Nq, Nk) layout, or None.
    """
    batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:  # GroupNorm wants channels second: (B, N, C) -> (B, C, N) and back
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)

    head_dim = key.shape[-1] // attn.heads
    query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, attention_mask


class FastAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` with fastdiff's flash-attention kernel for the attention itself.

    Same call signature as diffusers' processors; set it with ``attn.set_processor(FastAttnProcessor())``
    or ``unet.set_attn_processor(FastAttnProcessor())``, or let ``accelerate`` do it. Like
    ``AttnProcessor2_0`` it uses SDPA's scale 1/√D (not ``attn.scale``) and ignores ``upcast_*``.
    """

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            deprecate("scale", "1.0.0", "The `scale` argument is deprecated and will be ignored. Please remove it; "
                      "pass it to the pipeline through `cross_attention_kwargs` instead.")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = None
        if hidden_states.ndim == 4:  # (B, C, H, W) -> (B, H·W, C)
            image_shape = hidden_states.shape
            batch, channels, height, width = image_shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)

        query, key, value, attention_mask = _project(attn, hidden_states, encoder_hidden_states, attention_mask)
        if attention_mask is None and _kernel_takes(query, key, value):
            hidden_states = ops.attention(query, key, value)  # (B, H, Nq, D), the fused kernel
        else:  # the stock path
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=0.0, is_causal=False)

        batch, heads, _, head_dim = hidden_states.shape
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # output projection, then dropout
        if image_shape is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# ----------------------------------------------------------------------------- accelerate
_PROCESSOR = FastAttnProcessor()  # stateless: one instance serves every module, as set_attn_processor does


def _swap_processors(model: torch.nn.Module) -> tuple[int, list[str]]:
    """Put FastAttnProcessor on every Attention module of ``model`` whose processor is the stock
    AttnProcessor2_0. Returns (modules now on FastAttnProcessor, names of processors left alone)."""
    fast, left = 0, []
    for module in model.modules():
        if not isinstance(module, Attention):
            continue
        if type(module.processor) is AttnProcessor2_0:
            module.set_processor(_PROCESSOR)
        if isinstance(module.processor, FastAttnProcessor):
            fast += 1
        else:  # another processor (classic, LoRA, IP-adapter, ...): FastAttnProcessor only reproduces 2_0
            left.append(type(module.processor).__name__)
    return fast, left


def _fast_scheduler(scheduler):
    """``scheduler`` as its Fast* twin (itself if it already is one), or None where there is none.

    Built from the stock scheduler's *effective* config: diffusers' ``from_config`` would drop the
    keys listed in ``_use_default_values`` (those the constructor took by default) and so lose
    values a pipeline patched into the config afterwards (StableDiffusionPipeline sets
    ``steps_offset=1`` and ``clip_sample=False`` on legacy configs that way). The twin's config is
    then the stock one verbatim, so ``from_config(pipe.scheduler.config)`` elsewhere behaves the same.
    """
    if type(scheduler) in FAST_SCHEDULERS.values():
        return scheduler
    fast_class = FAST_SCHEDULERS.get(type(scheduler))
    if fast_class is None:
        return None
    stock_config = dict(scheduler.config)
    fast = fast_class.from_config({k: v for k, v in stock_config.items() if k != "_use_default_values"})
    fast._internal_dict = FrozenDict(stock_config)
    return fast


def _graph_model(model: torch.nn.Module, max_graphs: int) -> str | None:
    """Install CUDA-graph replay on a diffusers model: a UNet's forward, an AutoencoderKL's decode,
    any other module's forward. Returns what was graphed ('forward', 'decode')."""
    if isinstance(model, AutoencoderKL):
        _graphs.install(model, "decode", max_graphs=max_graphs, ignore=("generator",))  # decode ignores it
        return "decode"
    normalize = None
    if isinstance(model, UNet2DModel):
        normalize = _graphs.timestep_as_tensor(long_for_float=True)
    elif isinstance(model, UNet2DConditionModel):
        normalize = _graphs.timestep_as_tensor(long_for_float=False)
    _graphs.install(model, "forward", max_graphs=max_graphs, normalize=normalize)
    return "forward"


def _accelerate_model(model: torch.nn.Module, cuda_graph: bool, max_graphs: int) -> tuple[dict, list[str]]:
    """Attention processors, GroupNorm(+SiLU) and optionally CUDA graphs into one model, in place.
    Returns (counts for the summary, attention processors left alone)."""
    attention, left = _swap_processors(model)
    counts = {"attention": attention, **_group_norm.swap(model)}
    if cuda_graph:
        counts["graphed"] = _graph_model(model, max_graphs)
    return counts, left


def _describe(counts: dict) -> str:
    text = (f"{counts['attention']} attention, {counts['group_norm']} GroupNorm "
            f"({counts['silu_fused']} with their SiLU)")
    return text + (f", CUDA graphs on {counts['graphed']}" if counts.get("graphed") else "")


def _warn_left(owner: str, left: list[str]) -> None:
    if left:
        names = ", ".join(sorted(set(left)))
        warnings.warn(f"accelerate: {len(left)} attention module(s) of {owner} keep their processor ({names}); "
                      "FastAttnProcessor replaces AttnProcessor2_0 only", stacklevel=3)


def accelerate(pipe_or_model, *, cuda_graph: bool = False, max_graphs: int = _graphs.MAX_GRAPHS):
    """Run a diffusers pipeline's or model's hot path on fastdiff's fused kernels; returns the same object.

    * a ``DiffusionPipeline``: its scheduler becomes its ``Fast*`` twin when it is one of diffusers'
      DDPM, DDIM, PNDM, EulerDiscrete, EulerAncestralDiscrete, DPMSolverMultistep or UniPCMultistep
      schedulers (built from the scheduler's effective config); any other scheduler stays, with one
      warning. Every diffusers model the pipeline holds (unet, vae, any other ``ModelMixin``) is
      accelerated as below; other components (a transformers text encoder, a tokenizer) stay as they are;
    * a model (``UNet2DConditionModel``, ``AutoencoderKL``, any ``torch.nn.Module`` holding diffusers
      modules): every attention module with the stock ``AttnProcessor2_0`` gets ``FastAttnProcessor``
      (others keep theirs, with a warning); every ``nn.GroupNorm`` runs on fastdiff's GroupNorm kernel,
      the SiLU after it fused in where the model applies one right away (``_group_norm``).
    * ``cuda_graph=True``: the UNet forward and the VAE decode (any other model's forward) are
      captured into CUDA graphs per input signature and replayed, at most ``max_graphs`` signatures
      per model (``_graphs``: limits, and ``reset_cuda_graphs`` after replacing weights). On CPU
      tensors they simply run eagerly.

    One INFO line on the ``fastdiff`` logger says what was swapped and what was left alone.
    Idempotent: a second call changes nothing. Same images as before, for the same generator.
    """
    validation.boolean("cuda_graph", cuda_graph)
    if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
        raise ValueError(f"max_graphs must be a positive int, got {max_graphs!r}")
    if isinstance(pipe_or_model, DiffusionPipeline):
        return _accelerate_pipeline(pipe_or_model, cuda_graph, max_graphs)
    if isinstance(pipe_or_model, UNet2D):
        raise ValueError("accelerate takes diffusers pipelines and models; fastdiff's own UNet2D already runs "
                         "its fused ops (sample it with fastdiff.DiffusionPipeline, cuda_graph=True for graphs)")
    if isinstance(pipe_or_model, torch.nn.Module):
        counts, left = _accelerate_model(pipe_or_model, cuda_graph, max_graphs)
        if counts["attention"] == 0 and counts["group_norm"] == 0 and not cuda_graph:
            found = f"only {', '.join(sorted(set(left)))} attention processors" if left else \
                "no diffusers Attention modules and no GroupNorm"
            raise ValueError(f"accelerate found {found} in {type(pipe_or_model).__name__}: nothing to run on "
                             "fastdiff's kernels (fastdiff's own UNet2D already runs its fused ops)")
        _warn_left(type(pipe_or_model).__name__, left)
        logger.info("accelerate(%s): %s", type(pipe_or_model).__name__, _describe(counts))
        return pipe_or_model
    raise TypeError(f"pipe_or_model must be a diffusers DiffusionPipeline or a torch.nn.Module (UNet2DModel, "
                    f"UNet2DConditionModel, AutoencoderKL, ...), got {type(pipe_or_model).__name__}")


def _accelerate_pipeline(pipe: DiffusionPipeline, cuda_graph: bool, max_graphs: int) -> DiffusionPipeline:
    owner = type(pipe).__name__
    stock = getattr(pipe, "scheduler", None)
    parts = []
    if stock is not None:
        fast = _fast_scheduler(stock)
        if fast is None:
            names = ", ".join(sorted(cls.__name__ for cls in FAST_SCHEDULERS))
            warnings.warn(f"accelerate: {owner}'s scheduler {type(stock).__name__} has no fastdiff drop-in "
                          f"(there are drop-ins for {names}); it stays as it is, the models are still "
                          "accelerated", stacklevel=3)
            parts.append(f"scheduler {type(stock).__name__} left as it is")
        elif fast is not stock:
            # assigned after construction: DDIMPipeline's constructor would rebuild a DDIMScheduler
            pipe.scheduler = fast
            parts.append(f"scheduler {type(stock).__name__} -> {type(fast).__name__}")
    left, alone = [], []
    for name, component in pipe.components.items():
        if isinstance(component, ModelMixin):
            counts, model_left = _accelerate_model(component, cuda_graph, max_graphs)
            left += model_left
            parts.append(f"{name}: {_describe(counts)}")
        elif isinstance(component, torch.nn.Module):
            alone.append(f"{name} ({type(component).__name__}: not a diffusers model)")
    if alone:
        parts.append("left alone: " + ", ".join(alone))
    _warn_left(owner, left)
    logger.info("accelerate(%s): %s", owner, "; ".join(parts))
    return pipe


def reset_cuda_graphs(pipe_or_model) -> int:
    """Drop the CUDA graphs ``accelerate(..., cuda_graph=True)`` recorded, so the next calls capture
    again: needed after a model's parameters were *replaced* by new tensors (a replay reads the old
    ones; weights changed in place need nothing). Returns how many graphed callables were reset."""
    if isinstance(pipe_or_model, DiffusionPipeline):
        models = [c for c in pipe_or_model.components.values() if isinstance(c, torch.nn.Module)]
    elif isinstance(pipe_or_model, torch.nn.Module):
        models = [pipe_or_model]
    else:
        raise TypeError(f"pipe_or_model must be a diffusers DiffusionPipeline or a torch.nn.Module, "
                        f"got {type(pipe_or_model).__name__}")
    graphed = [g for model in models for g in _graphs.graphed(model)]
    for g in graphed:
        g.reset()
    return len(graphed)
