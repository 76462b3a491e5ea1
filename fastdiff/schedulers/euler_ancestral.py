"""EulerAncestralDiscreteScheduler: Euler steps with fresh noise ("ancestral" sampling) in the σ view.

Each step σ → σ_next splits into a deterministic Euler step down to σ_down and fresh noise of
scale σ_up, with σ_down² + σ_up² = σ_next² and σ_up² the variance of the Gaussian posterior
q(x_{σ_next} | x_σ, x0) of x = x0 + σ·ε (DDPM's ancestral step, Ho et al. 2020, written in σ;
Crowson's k-diffusion ``sample_euler_ancestral``). The Euler step and the U-Net scalings are
Karras et al. 2022's (arXiv:2206.00364), shared with EulerDiscreteScheduler in ``euler.py``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import SchedulerOutput
from .configuration import register_to_config
from .euler import EulerSchedulerBase, denoiser, input_scale
from .linear import LinearStep

EulerAncestralDiscreteSchedulerOutput = SchedulerOutput


# ----------------------------------------------------------------------------- the equations
def ancestral_sigmas(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(σ_up, σ_down): σ_up² = σ_next²·(σ² − σ_next²)/σ² (the posterior variance of the step) and
    σ_down² = σ_next² − σ_up², i.e. σ_down = σ_next²/σ (diffusers' √(σ_next² − σ_up²) without
    its cancellation)."""
    return math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2), sigma_next**2 / sigma


def euler_ancestral_step(sigma: float, sigma_next: float, prediction_type: str) -> LinearStep:
    """x_next = x + (σ_down − σ)·(x − x̂0)/σ + σ_up·z = r·x + (1 − r)·x̂0 + σ_up·z with r = σ_down/σ
    (an Euler step to σ_down, Karras et al. 2022 eq. 3, then noise up to σ_next). Every step draws
    z, the last one too (σ_up = 0 there), so the generator advances as in diffusers."""
    sigma_up, sigma_down = ancestral_sigmas(sigma, sigma_next)
    ratio = sigma_down / sigma
    return LinearStep(convert=denoiser(prediction_type, sigma, sigma),
                      out={"x": ratio, "c": 1.0 - ratio, "z": sigma_up}, noise=True, input_scale=input_scale(sigma))


class EulerAncestralDiscreteScheduler(EulerSchedulerBase):
    """Ancestral sampling with Euler steps (``euler_ancestral_step``), diffusers-compatible.

    Constructor keywords, defaults and outputs are those of
    ``diffusers.EulerAncestralDiscreteScheduler`` (0.42). For the same generator (noise drawn on
    every step, in the model output's dtype, as diffusers draws it), float32 loops agree with
    diffusers' equations to < 1e-6 relative, and with its float32 run to < 1e-5 except where that
    run loses more to cancellation (EulerDiscreteScheduler's note). ``step`` returns
    (prev_sample, pred_original_sample).

    diffusers' rules, kept: ``init_noise_sigma`` (σ_max, or √(σ_max² + 1) with 'leading' spacing);
    σ interpolated linearly in t at the spaced timesteps (fractional with 'linspace'), then 0;
    the step on the sample upcast to float32, prev_sample in the model output's dtype; the step
    index rule (``EulerDiscreteScheduler``'s); rescale_betas_zero_snr's ᾱ_{T−1} = 2⁻²⁴.

    Deliberate differences: prediction_type='sample' works (x̂0 = m; diffusers raises
    NotImplementedError); the trailing-spacing timestep −1 is dropped, the timestep checks and
    float64 coefficients are EulerDiscreteScheduler's; beta_schedule 'sigmoid' and 'laplace' work;
    the timesteps before ``set_timesteps`` are float32 (diffusers: float64). ``step`` also takes
    ``uncond_model_output``/``guidance_scale`` (fused classifier-free guidance) and
    ``variance_noise`` (the step's z), keyword-only.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self._setup_sigmas()

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``num_inference_steps`` timesteps spaced by ``config.timestep_spacing``, σ at each, then 0."""
        timesteps, sigmas = self._spaced_schedule(num_inference_steps)
        self.num_inference_steps = len(timesteps)
        self._use_tables(timesteps, torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)), device)

    def _plan(self, start: int):
        sigmas, prediction_type = self.sigmas.tolist(), self.config.prediction_type
        return (euler_ancestral_step(sigmas[i], sigmas[i + 1], prediction_type)
                for i in range(start, len(self.timesteps)))

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        *,
        variance_noise: torch.Tensor | None = None,
        uncond_model_output: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
    ) -> SchedulerOutput | tuple:
        """x at σ_i -> x at σ_{i+1}: x̂0, an Euler step to σ_down, plus σ_up·z, in one fused launch.

        model_output, sample: (B, C, H, W); ``timestep`` one of ``self.timesteps``; z is
        ``variance_noise`` if given, else drawn from ``generator`` as diffusers draws it.
        """
        return self._euler_step(model_output, timestep, sample, generator, return_dict, variance_noise,
                                uncond_model_output, guidance_scale)
