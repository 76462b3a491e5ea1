"""``FastEulerDiscreteScheduler``, ``FastEulerAncestralDiscreteScheduler``: diffusers' Euler schedulers
whose ``step`` is fastdiff's fused op.

Subclasses of ``diffusers.EulerDiscreteScheduler`` and ``diffusers.EulerAncestralDiscreteScheduler``:
config, ``from_config``, ``save_pretrained`` / ``from_pretrained``, ``compatibles``, ``set_timesteps``
(σ families, interpolation, final σ, custom timesteps or σ's), ``scale_model_input``, ``add_noise``
and the step-index rules are diffusers' own. ``step`` reads σ_i, σ_{i+1} from diffusers' ``sigmas``
at its ``step_index``, builds the step with the equations of ``fastdiff.schedulers.euler``
(``churn_gamma``, ``euler_step``) or ``euler_ancestral`` (``euler_ancestral_step``) and runs it as
one ``ops.multistep_update`` launch (no slots: an Euler step keeps no history).

Kept from diffusers: the numbers (float32 to ~1e-6 relative where diffusers' own float32 is well
conditioned; see ``fastdiff.schedulers.euler``), the noise (diffusers' ``randn_tensor`` with the same
shape, dtype, device and generator, drawn on the same steps: churn steps with γ > 0, every
ancestral step), the ``scale_model_input`` warning, ``step_index`` / ``begin_index``, the output
dataclasses and dtypes (prev_sample in the model output's dtype; pred_original_sample float32, or
the model output itself for prediction_type 'sample'). Different: fp16/bf16 are computed in float32
and rounded once, so pred_original_sample is the fp16/bf16 result upcast (diffusers' own carries
the fp16 rounding of σ̂·m).

diffusers' own ``step`` runs instead (``super()``, exact) for:

* float64, or a model output and sample not of one kernel dtype (fp32/fp16/bf16), one device and one
  shape (diffusers upcasts the sample to float32 and promotes or broadcasts);
* what diffusers refuses, so its own error is raised: an integer timestep, a prediction_type it does
  not know ('sample' for Euler-ancestral), a step past the last σ, a timestep not in the schedule;
* where diffusers divides by σ̂ = 0 or reads a σ that is not finite (custom σ's): its NaN / inf kept;
  an ancestral step whose σ_{i+1} is not in [0, σ_i] (diffusers' σ_up is NaN there);
* churn keywords that are not finite numbers (s_churn, s_noise) or not numbers (s_tmin, s_tmax).

Under autograd the op runs its PyTorch reference (differentiable), as everywhere in fastdiff.
"""

from __future__ import annotations

import math
import numbers

import torch

from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from diffusers.schedulers import scheduling_euler_ancestral_discrete as stock_ancestral
from diffusers.schedulers import scheduling_euler_discrete as stock_euler
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

from .. import ops
from ..reference import ROW_SIZE
from ..schedulers.euler import churn_gamma, churned_sigma, euler_step
from ..schedulers.euler_ancestral import euler_ancestral_step
from ..schedulers.linear import LinearPlan, LinearStep
from ._slots import fusable

__all__ = ["FAST", "FastEulerAncestralDiscreteScheduler", "FastEulerDiscreteScheduler"]

X0_PREDICTIONS = ("sample", "original_sample")  # x̂0 = the model output (diffusers' legacy name too)
SCALE_INPUT_WARNING = ("The `scale_model_input` function should be called before `step` to ensure correct "
                       "denoising. See `StableDiffusionPipeline` for a usage example.")


def _fusable(model_output, sample, timestep) -> bool:
    """One kernel dtype, device and shape, and a timestep diffusers accepts (not an integer index)."""
    return fusable(sample, model_output) and not isinstance(timestep, (int, torch.IntTensor, torch.LongTensor))


class _FusedEuler:
    """What both drop-ins share: diffusers' step index, then one ``LinearStep`` in one launch."""

    _stock = stock_euler  # the diffusers module whose logger and randn_tensor the step uses
    _output = EulerDiscreteSchedulerOutput

    def _sigmas_at_step(self, timestep) -> tuple[float, float] | None:
        """(σ_i, σ_{i+1}) at diffusers' step index (set from ``timestep`` on the first step, by
        diffusers' own rule); None where diffusers' step raises instead (its index left as diffusers
        leaves it: unset for a timestep not in the schedule, set past the last σ)."""
        if self.step_index is None:
            try:
                self._init_step_index(timestep)
            except (IndexError, RuntimeError, TypeError):  # diffusers raises these itself
                return None
        index = self.step_index
        if index + 1 >= len(self.sigmas):
            return None
        return float(self.sigmas[index]), float(self.sigmas[index + 1])

    def _run(self, linear: LinearStep, model_output, sample, generator, return_dict):
        """The fused step, with diffusers' warning, noise draw and outputs."""
        if not self.is_scale_input_called:
            self._stock.logger.warning(SCALE_INPUT_WARNING)
        noise = None
        if linear.noise:  # diffusers' draw: its randn_tensor, the model output's dtype and device
            noise = self._stock.randn_tensor(model_output.shape, dtype=model_output.dtype,
                                             device=model_output.device, generator=generator)
        returns_x0 = self.config.prediction_type not in X0_PREDICTIONS
        row = LinearPlan().pack(linear)[:ROW_SIZE]
        prev_sample, pred_original_sample = ops.multistep_update(model_output, sample, row, None, noise,
                                                                 return_converted=returns_x0)
        # diffusers: x̂0 float32 (from the upcast sample), or the model output itself
        pred_original_sample = pred_original_sample.float() if returns_x0 else model_output
        self._step_index += 1
        if not return_dict:
            return prev_sample, pred_original_sample
        return self._output(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class FastEulerDiscreteScheduler(_FusedEuler, EulerDiscreteScheduler):
    """diffusers' ``EulerDiscreteScheduler`` whose ``step`` (churn, x̂0, the Euler step) is one fused
    ``ops.multistep_update`` launch. Same config, outputs, noise and state (module docstring)."""

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: torch.Generator | None = None,
             return_dict: bool = True) -> EulerDiscreteSchedulerOutput | tuple:
        """x at σ_i -> x at σ_{i+1} (Karras et al. 2022, Algorithm 2 without its 2nd-order step);
        diffusers' ``EulerDiscreteScheduler.step``."""
        linear = self._linear(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise)
        if linear is None:
            return super().step(model_output, timestep, sample, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                                s_noise=s_noise, generator=generator, return_dict=return_dict)
        return self._run(linear, model_output, sample, generator, return_dict)

    def _linear(self, model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise) -> LinearStep | None:
        reals = all(isinstance(x, numbers.Real) for x in (s_churn, s_tmin, s_tmax, s_noise))
        if (not reals or not math.isfinite(s_churn) or not math.isfinite(s_noise)
                or not _fusable(model_output, sample, timestep)
                or self.config.prediction_type not in ("epsilon", "v_prediction", *X0_PREDICTIONS)):
            return None
        sigmas = self._sigmas_at_step(timestep)
        if sigmas is None or not all(map(math.isfinite, sigmas)):
            return None
        sigma, sigma_next = sigmas
        gamma = churn_gamma(sigma, s_churn, s_tmin, s_tmax, len(self.sigmas) - 1)  # diffusers' N
        if churned_sigma(sigma, gamma) == 0:
            return None  # diffusers divides by σ̂ = 0
        return euler_step(sigma, sigma_next, self.config.prediction_type, gamma, s_noise)


class FastEulerAncestralDiscreteScheduler(_FusedEuler, EulerAncestralDiscreteScheduler):
    """diffusers' ``EulerAncestralDiscreteScheduler`` whose ``step`` (x̂0, the Euler step to σ_down,
    σ_up·z) is one fused ``ops.multistep_update`` launch. Same config, outputs, noise and state."""

    _stock = stock_ancestral
    _output = EulerAncestralDiscreteSchedulerOutput

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None,
             return_dict: bool = True) -> EulerAncestralDiscreteSchedulerOutput | tuple:
        """x at σ_i -> x at σ_{i+1}: an Euler step to σ_down, then fresh noise σ_up·z;
        diffusers' ``EulerAncestralDiscreteScheduler.step``."""
        linear = self._linear(model_output, timestep, sample)
        if linear is None:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        return self._run(linear, model_output, sample, generator, return_dict)

    def _linear(self, model_output, timestep, sample) -> LinearStep | None:
        if (not _fusable(model_output, sample, timestep)
                or self.config.prediction_type not in ("epsilon", "v_prediction")):
            return None
        sigmas = self._sigmas_at_step(timestep)
        if sigmas is None or not all(map(math.isfinite, sigmas)) or not 0 <= sigmas[1] <= sigmas[0] or sigmas[0] == 0:
            return None
        return euler_ancestral_step(*sigmas, self.config.prediction_type)


# diffusers scheduler class -> its fused twin (exact classes: a user's subclass may change step)
FAST = {EulerDiscreteScheduler: FastEulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler: FastEulerAncestralDiscreteScheduler}
