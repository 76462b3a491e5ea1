"""DDPMScheduler: ancestral sampling of Ho et al. 2020, diffusers-compatible."""

from __future__ import annotations

import numpy as np
import torch

from .. import ops, validation
from .configuration import register_to_config
from ..reference import VARIANCE_TYPES
from .schedule import randn_tensor
from .base import SchedulerBase, SchedulerOutput, x0_limits

DDPMSchedulerOutput = SchedulerOutput


class DDPMScheduler(SchedulerBase):
    """Denoising diffusion probabilistic models (arXiv:2006.11239).

    Constructor keywords, defaults and outputs are those of ``diffusers.DDPMScheduler`` (0.42);
    results agree with it in float32 for the same generator. Differences, all deliberate:

    * ``step`` before ``set_timesteps`` is an error (diffusers silently uses all T timesteps);
    * ``variance_type="fixed_large_log"`` gives σ = √β_t (diffusers returns NaN: it takes the
      square root of log β_t);
    * ``step`` also takes ``uncond_model_output`` and ``guidance_scale`` (keyword-only) to fuse
      classifier-free guidance into the step.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        validation.one_of("variance_type", variance_type, VARIANCE_TYPES)
        self._setup(self.config)
        self.variance_type = variance_type
        self.custom_timesteps = False

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps: list[int] | None = None):
        """Visit ``num_inference_steps`` spaced timesteps, or exactly the descending ``timesteps`` given."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is None:
            self.custom_timesteps = False
            return super().set_timesteps(num_inference_steps, device)
        timesteps = np.asarray(timesteps, dtype=np.int64)
        if timesteps.ndim != 1 or len(timesteps) == 0 or np.any(timesteps[1:] >= timesteps[:-1]):
            raise ValueError("timesteps must be a non-empty, strictly descending list of integers")
        if timesteps[0] >= self.config.num_train_timesteps or timesteps[-1] < 0:
            raise ValueError(f"timesteps must lie in [0, {self.config.num_train_timesteps})")
        self.custom_timesteps = True
        self.num_inference_steps = len(timesteps)
        self.timesteps = torch.from_numpy(timesteps).to(device)

    def previous_timestep(self, timestep: int) -> int:
        """The timestep after ``timestep`` in ``self.timesteps``; -1 past the last one."""
        matches = (self.timesteps.cpu() == int(timestep)).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {int(timestep)} is not one of the scheduler's timesteps {self.timesteps.tolist()}")
        index = int(matches[0, 0])
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        *,
        uncond_model_output: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
    ) -> SchedulerOutput | tuple:
        """x_t -> x_{t-1}: predict x0, take the posterior mean (eq. 7), add σ_t·z unless t = 0.

        model_output: (B, C, H, W), or (B, 2C, H, W) for learned variance types (the second half is
        the variance prediction); sample: (B, C, H, W). The noise z is drawn from ``generator``
        like diffusers draws it, so equal seeds give equal samples.
        """
        t = self._check_step(model_output, timestep, sample)
        prev_t = self.previous_timestep(t)

        prev_sample, pred_original_sample = fused_ddpm_step(self, model_output, t, prev_t, sample, generator,
                                                            uncond_model_output, guidance_scale)
        if not return_dict:
            return prev_sample, pred_original_sample
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    # the sync-free sampling loop's hooks (see SchedulerBase.step_tables)
    def _step_alphas(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return ddpm_alphas(self, t, self.previous_timestep(t))

    def _draws_noise(self, t: int) -> bool:
        return t > 0

    def _update(self, model_output, sample, row, noise=None, slots=None, *, uncond_model_output=None,
                guidance_scale=1.0):
        alpha_prod_t, alpha_prod_t_prev = row.unbind()  # the row is (ᾱ_t, ᾱ_{t-1})
        return ddpm_update(self, model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise, uncond_model_output,
                           guidance_scale)


def fused_ddpm_step(scheduler, model_output, t: int, prev_t: int, sample, generator=None, uncond_model_output=None,
                    guidance_scale: float = 1.0):
    """The DDPM step on the fused op, for fastdiff's ``DDPMScheduler`` and for diffusers' (the drop-in
    ``fastdiff.compat.diffusers.FastDDPMScheduler``): both have ``config``, ``variance_type``,
    ``alphas_cumprod`` and ``one``. ``prev_t`` is -1 past the last step. Returns (x_{t-1}, x̂0)."""
    alpha_prod_t, alpha_prod_t_prev = ddpm_alphas(scheduler, t, prev_t)

    # σ_t·z is added on every step but the last (t = 0), z drawn as diffusers draws it (the sample's shape)
    noise = None
    if t > 0:
        noise = randn_tensor(sample.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
    return ddpm_update(scheduler, model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise, uncond_model_output,
                       guidance_scale)


def ddpm_alphas(scheduler, t: int, prev_t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ᾱ_t, ᾱ_{t-1}) of the step from ``t`` to ``prev_t``, 0-d float32; ᾱ is 1 past the last step."""
    return scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.one


def ddpm_update(scheduler, model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise=None,
                uncond_model_output=None, guidance_scale: float = 1.0):
    """x_{t-1} and x̂0 from the step's ᾱ values (0-d float32 tensors, on the CPU or on the sample's
    device) and the noise z (None on the last step): one ``ops.ddpm_step`` with the scheduler's options."""
    # a learned variance is the second half of the model output's channels
    predicted_variance = None
    learned = scheduler.variance_type in ("learned", "learned_range")
    if learned and model_output.shape[1] == sample.shape[1] * 2:
        model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        if uncond_model_output is not None:
            uncond_model_output = torch.split(uncond_model_output, sample.shape[1], dim=1)[0]

    # diffusers accepts any variance_type and computes the fixed_small σ for one it does not name
    # (its _get_variance falls through to the clamped β̃_t): the drop-in must take such configs too
    variance_type = scheduler.variance_type if scheduler.variance_type in VARIANCE_TYPES else "fixed_small"
    return ops.ddpm_step(
        model_output, sample, alpha_prod_t, alpha_prod_t_prev, noise,
        predicted_variance=predicted_variance, prediction_type=scheduler.config.prediction_type,
        variance_type=variance_type, uncond_model_output=uncond_model_output,
        guidance_scale=guidance_scale, **x0_limits(scheduler.config))
