"""FastDPMSolverMultistepScheduler: diffusers' ``DPMSolverMultistepScheduler`` whose step is one fused launch.

    pipe.scheduler = FastDPMSolverMultistepScheduler.from_config(pipe.scheduler.config)

A subclass of diffusers' class: config, ``set_timesteps``, σ tables, ``add_noise``, ``from_config``,
``save_pretrained`` / ``from_pretrained`` and ``compatibles`` are diffusers' own. ``step`` keeps
diffusers' signature and state and runs the update as ``fastdiff.ops.multistep_update``: the
conversion (x̂0 or ε̂, thresholding), the history push and the DPM-Solver(++) update of the order
diffusers picks, in one launch. The coefficients are ``fastdiff.schedulers.dpmsolver.dpm_solver_step``
on diffusers' own ``self.sigmas``, ``step_index`` and ``lower_order_nums`` (float64 from the float32
table, rounded once); the SDE noise is drawn as diffusers draws it (float32, one draw per step).

diffusers' state after a fused step is what its own step leaves: ``model_outputs`` shifted, its
newest entries views of the op's slots (``_slots.SlotMirror``: nothing copied), ``lower_order_nums``
and ``_step_index`` advanced. State set or changed between steps (diffusers' tests assign
``model_outputs``; a fallback step writes its own tensors) is copied into the slots first; an input
that is a view of the slots (state passed back in) is cloned first; a copy or pickle holds plain
tensors and makes new slots at its next step.

diffusers' own ``step`` runs instead (exact diffusers numbers, errors and NaNs) for:

* float64, or model output, sample, stored outputs and noise not of one kernel dtype (fp32/fp16/bf16),
  one device and the sample's shape; a σ table not float32;
* ``variance_type`` "learned"/"learned_range" (diffusers slices 3 channels, for ε-prediction only);
* flow matching: ``use_flow_sigmas``, ``use_dynamic_shifting``, ``prediction_type="flow_prediction"``;
* option values diffusers itself rejects at the step (an unknown prediction type), ``solver_order``
  above 3, "sde-dpmsolver" at third order (diffusers fails there), a history entry the step reads
  that is None, a step index without the σ's its order reads, thresholding values the op refuses
  (``dynamic_thresholding_ratio`` 0, as diffusers' own fp16 test uses, or above 1);
* a step whose λ's (diffusers' float32 λ = log α − log σ) repeat, the last step of a
  ``final_sigmas_type="sigma_min"`` run ending at σ_min already: diffusers' result is the sample itself
  or, for heun and third order, NaN; fastdiff's equations would give the finite exact solution.

Differences: the op computes in float32 with the coefficients rounded once (diffusers rounds each
operation; ~1 ulp apart, more where float32 is ill-conditioned: noise prediction of sample/v models
near σ_max, tests/test_scheduler_dpmsolver.py); fp16/bf16 inputs are converted and combined in float32
and rounded once (diffusers computes x̂0 in half precision first); the noise is rounded to the sample's
dtype. A ``model_outputs`` entry is a view: rewritten by a later step after it has left the list.
"""

from __future__ import annotations

import torch

try:
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.schedulers.scheduling_utils import SchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as error:  # diffusers is an optional extra
    raise ImportError("fastdiff.compat needs diffusers (tested with 0.42): pip install diffusers") from error

from .. import ops
from ..reference import ROW_SIZE
from ..schedulers.dpmsolver import ALGORITHM_TYPES, SOLVER_TYPES, dpm_order, dpm_solver_step
from ._slots import SlotMirror, fusable

__all__ = ["FastDPMSolverMultistepScheduler"]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
HISTORY_NAMES = ("m1", "m2", "m3")


# ----------------------------------------------------------------------------- shared with _unipc
def lambdas_distinct(scheduler, indices) -> bool:
    """Whether diffusers' float32 λ_t = log α_t − log σ_t of ``scheduler.sigmas[indices]`` are pairwise
    distinct (computed with the scheduler's own ``_sigma_to_alpha_sigma_t``, on the σ table's device)."""
    lambdas = []
    for index in indices:
        alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[index])
        lambdas.append(float(torch.log(alpha_t) - torch.log(sigma_t)))
    return len(set(lambdas)) == len(lambdas)


def thresholding_options(config) -> dict | None:
    """The op's dynamic-thresholding keywords for ``config`` ({} without thresholding), None where the
    op would refuse its values (diffusers' own step then runs)."""
    if not config.thresholding:
        return {}
    ratio, max_value = config.dynamic_thresholding_ratio, config.sample_max_value
    if not (0 < ratio <= 1 and max_value > 0):
        return None
    return {"dynamic_thresholding_ratio": ratio, "sample_max_value": max_value}


def slot_mirror(scheduler) -> SlotMirror:
    """The drop-in's SlotMirror, made on first use (the drop-ins keep diffusers' ``__init__``, whose
    signature diffusers' config machinery reads)."""
    mirror = scheduler.__dict__.get("_fastdiff_slots")
    if mirror is None:
        mirror = scheduler.__dict__["_fastdiff_slots"] = SlotMirror()
    return mirror


def compact_state(state: dict, *names: str) -> dict:
    """``__getstate__``'s dict with the slot views among ``names`` (tensors or lists of them) cloned:
    a copy or pickle holds plain tensors, not views that would each carry the whole slot buffer."""
    state = dict(state)
    for name in names:
        value = state.get(name)
        if isinstance(value, list):
            state[name] = [x.clone() if isinstance(x, torch.Tensor) else x for x in value]
        elif isinstance(value, torch.Tensor):
            state[name] = value.clone()
    return state


# ----------------------------------------------------------------------------- the scheduler
class FastDPMSolverMultistepScheduler(DPMSolverMultistepScheduler):
    """diffusers' ``DPMSolverMultistepScheduler`` whose ``step`` is one fused launch of fastdiff's
    ``multistep_update``: conversion, history push and the DPM-Solver(++) update of diffusers' order.
    Same config, same state, same outputs (see the module docstring for where diffusers' code runs)."""

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """x_t -> x_{t−1} by multistep DPM-Solver(++) (Lu et al. 2022, arXiv:2211.01095); diffusers' ``step``."""
        if self.num_inference_steps is not None and self.step_index is None:
            self._init_step_index(timestep)  # diffusers' rule, as its own step would apply it
        order = self._fused_order(model_output, sample, variance_noise)
        if order is None:
            return super().step(model_output, timestep, sample, generator=generator, variance_noise=variance_noise,
                                 return_dict=return_dict)
        prev_sample = self._fused_step(order, model_output, sample, generator, variance_noise)
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def _fused_order(self, model_output, sample, variance_noise) -> int | None:
        """The order diffusers takes at this step, or None where the fused op would not give diffusers' result."""
        config = self.config
        if self.num_inference_steps is None or not fusable(sample, model_output):
            return None
        if (config.variance_type in ("learned", "learned_range") or config.use_flow_sigmas
                or config.use_dynamic_shifting or config.prediction_type not in PREDICTION_TYPES
                or config.algorithm_type not in ALGORITHM_TYPES or config.solver_type not in SOLVER_TYPES
                or not 1 <= config.solver_order <= 3 or len(self.model_outputs) != config.solver_order
                or self.sigmas.dtype != torch.float32 or thresholding_options(config) is None):
            return None
        noisy = config.algorithm_type.startswith("sde")
        if noisy and variance_noise is not None and not (
                isinstance(variance_noise, torch.Tensor) and variance_noise.is_floating_point()
                and variance_noise.shape == sample.shape and variance_noise.device == sample.device):
            return None
        i, n = self.step_index, len(self.timesteps)
        if not 0 <= i < n or i + 1 >= len(self.sigmas):
            return None
        order = dpm_order(i, n, self.lower_order_nums, config.solver_order, lower_order_final=config.lower_order_final,
                          euler_at_final=config.euler_at_final, final_sigmas_type=config.final_sigmas_type)
        if (config.algorithm_type == "sde-dpmsolver" and order == 3) or i - (order - 1) < 0:
            return None
        history = self.model_outputs[::-1][:config.solver_order - 1]  # m1, m2: what the update reads, what is kept
        if any(m is None for m in history[:order - 1]) or not fusable(sample, *history):
            return None
        if not lambdas_distinct(self, range(i - order + 1, i + 2)):
            return None
        return order

    def _fused_step(self, order: int, model_output, sample, generator, variance_noise) -> torch.Tensor:
        """One fused launch, then diffusers' state as its own step leaves it."""
        config, i = self.config, self.step_index
        history = self.model_outputs[::-1][:config.solver_order - 1]
        mirror = slot_mirror(self)
        model_output, sample, variance_noise = map(mirror.outside, (model_output, sample, variance_noise))
        plan = mirror.load(sample, **dict(zip(HISTORY_NAMES, history)))
        # push=True at every step, the last included: diffusers' model_outputs[-1] is each step's x̂0 (or ε̂)
        linear = dpm_solver_step(self.sigmas, i, order, algorithm_type=config.algorithm_type,
                                 solver_type=config.solver_type, prediction_type=config.prediction_type,
                                 thresholding=config.thresholding, push=True)
        row = plan.pack(linear)[:ROW_SIZE]
        noise = None
        if linear.noise:  # diffusers' draw: float32, the model output's shape and device
            noise = variance_noise if variance_noise is not None else randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=torch.float32)
            noise = noise.to(device=sample.device, dtype=sample.dtype)
        prev_sample, _ = ops.multistep_update(model_output, sample, row, mirror.slots, noise,
                                              **thresholding_options(config))
        mirror.stepped()

        # diffusers' state: the list shifted (the oldest entry dropped), c the newest; None stays None
        outputs, kept = self.model_outputs, [m is not None for m in history]
        outputs[-1] = mirror.view("m1")
        for k, present in enumerate(kept, start=2):
            outputs[-k] = mirror.view(HISTORY_NAMES[k - 1]) if present else None
        if self.lower_order_nums < config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return prev_sample

    def __getstate__(self) -> dict:
        return compact_state(self.__dict__, "model_outputs")


# diffusers scheduler class -> its fused twin (fastdiff.compat.diffusers' FAST_SCHEDULERS)
FAST = {DPMSolverMultistepScheduler: FastDPMSolverMultistepScheduler}
