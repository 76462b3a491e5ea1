"""DDIMScheduler: the deterministic (η = 0) or stochastic sampler of Song et al. 2021, diffusers-compatible."""

from __future__ import annotations

import torch

from .. import ops, validation
from .configuration import register_to_config
from .schedule import randn_tensor
from .base import SchedulerBase, SchedulerOutput, x0_limits

DDIMSchedulerOutput = SchedulerOutput


class DDIMScheduler(SchedulerBase):
    """Denoising diffusion implicit models (arXiv:2010.02502).

    Constructor keywords, defaults and outputs are those of ``diffusers.DDIMScheduler`` (0.42);
    results agree with it in float32 for the same generator or ``variance_noise``. Notes:

    * diffusers' quirk, kept: the previous timestep is always t − T // n, whatever the
      ``timestep_spacing``; with 'trailing' or 'linspace' spacing that is not the next timestep in
      ``self.timesteps``, exactly as in diffusers.
    * ``beta_schedule="sigmoid"`` and "laplace" work here too (diffusers' DDIM rejects them).
    * ``step`` also takes ``uncond_model_output`` and ``guidance_scale`` (keyword-only): the
      classifier-free guidance combine is fused into the step.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        validation.boolean("set_alpha_to_one", set_alpha_to_one)
        self._setup(self.config)
        # ᾱ "before" step 0: 1 (a clean image) or ᾱ_0
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        *,
        uncond_model_output: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
    ) -> SchedulerOutput | tuple:
        """x_t -> x_{t-1} by eq. 12 with σ_t = η·√((1−ᾱ_{t−1})/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_{t−1})) (eq. 16).

        model_output, sample, variance_noise: (B, C, H, W). With η > 0 the noise is
        ``variance_noise`` if given, else drawn from ``generator`` as diffusers draws it.
        """
        t = self._check_step(model_output, timestep, sample)
        prev_sample, pred_original_sample = fused_ddim_step(
            self, model_output, t, sample, eta, use_clipped_model_output, generator, variance_noise,
            uncond_model_output, guidance_scale)
        if not return_dict:
            return prev_sample, pred_original_sample
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    # the sync-free sampling loop's hooks (see SchedulerBase.step_tables)
    def _step_alphas(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return ddim_alphas(self, t)

    def _draws_noise(self, t: int, eta: float = 0.0, use_clipped_model_output: bool | None = None) -> bool:
        return eta > 0

    def _update(self, model_output, sample, row, noise=None, slots=None, eta: float = 0.0,
                use_clipped_model_output: bool | None = None, *, uncond_model_output=None, guidance_scale=1.0):
        alpha_prod_t, alpha_prod_t_prev = row.unbind()  # the row is (ᾱ_t, ᾱ_{t-1})
        return ddim_update(self, model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise, eta,
                           use_clipped_model_output, uncond_model_output, guidance_scale)


def fused_ddim_step(scheduler, model_output, t: int, sample, eta: float = 0.0, use_clipped_model_output: bool = False,
                    generator=None, variance_noise=None, uncond_model_output=None, guidance_scale: float = 1.0):
    """The DDIM step on the fused op, for fastdiff's ``DDIMScheduler`` and for diffusers' (the drop-in
    ``fastdiff.compat.diffusers.FastDDIMScheduler``): both have ``config``, ``num_inference_steps``,
    ``alphas_cumprod`` and ``final_alpha_cumprod``. Returns (x_{t-1}, x̂0)."""
    if eta > 0 and variance_noise is not None and generator is not None:
        raise ValueError("pass either generator or variance_noise, not both")
    alpha_prod_t, alpha_prod_t_prev = ddim_alphas(scheduler, t)

    # z for σ_t·z: given, or drawn as diffusers draws it, only when η > 0
    noise = None
    if eta > 0:
        noise = variance_noise
        if noise is None:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
    return ddim_update(scheduler, model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise, eta,
                       use_clipped_model_output, uncond_model_output, guidance_scale)


def ddim_alphas(scheduler, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ᾱ_t, ᾱ_{t-1}) of the step from ``t``, 0-d float32. diffusers' rule: the previous timestep is
    t − T // n whatever the spacing; before the first timestep ᾱ is ``final_alpha_cumprod``."""
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_prod_t_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    return scheduler.alphas_cumprod[t], alpha_prod_t_prev


def ddim_update(scheduler, model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise=None, eta: float = 0.0,
                use_clipped_model_output: bool = False, uncond_model_output=None, guidance_scale: float = 1.0):
    """x_{t-1} and x̂0 from the step's ᾱ values (0-d float32 tensors, on the CPU or on the sample's
    device) and the noise z (None when η = 0): one ``ops.ddim_step`` with the scheduler's options."""
    return ops.ddim_step(
        model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise, eta=eta,
        prediction_type=scheduler.config.prediction_type, use_clipped_model_output=bool(use_clipped_model_output),
        uncond_model_output=uncond_model_output, guidance_scale=guidance_scale, **x0_limits(scheduler.config))
