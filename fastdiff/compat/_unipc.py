"""FastUniPCMultistepScheduler: diffusers' ``UniPCMultistepScheduler`` whose step is one fused launch.

    pipe.scheduler = FastUniPCMultistepScheduler.from_config(pipe.scheduler.config)

A subclass of diffusers' class: config, ``set_timesteps``, σ tables, ``add_noise``, ``from_config``,
``save_pretrained`` / ``from_pretrained`` and ``compatibles`` are diffusers' own. ``step`` keeps
diffusers' signature ``step(model_output, timestep, sample, return_dict=True)`` and state, and runs
diffusers' sequence (convert the model output with the given sample, correct that sample with UniC,
predict from the corrected one with UniP) as one ``fastdiff.ops.multistep_update``: both are linear in
(last_sample, the new output, the history), ``fastdiff.schedulers.unipc.unipc_step``, whose
coefficients come from diffusers' own ``self.sigmas``, ``step_index``, ``lower_order_nums``,
``this_order`` (the corrector's order), ``disable_corrector`` and ``predict_x0`` (attributes, as
diffusers reads them; thresholding applies with ``predict_x0`` only, as in diffusers).

diffusers' state after a fused step is what its own step leaves: ``model_outputs`` and
``timestep_list`` shifted, ``this_order``, ``lower_order_nums`` and ``_step_index`` set, and
``last_sample`` the (corrected) sample the predictor started from. The newest ``model_outputs``
entries and ``last_sample`` are views of the op's slots (``_slots.SlotMirror``: nothing copied); on a
step without correction diffusers' ``last_sample`` is the very tensor passed as ``sample``, here a
slot holding its values. State set or changed between steps is copied into the slots first; an input
that is a view of the slots (state passed back in) is cloned first; a copy or pickle holds plain
tensors and makes new slots at its next step.

diffusers' own ``step`` runs instead (exact diffusers numbers, errors and NaNs) for:

* float64, or model output, sample, stored outputs and ``last_sample`` not of one kernel dtype
  (fp32/fp16/bf16), one device and the sample's shape; a σ table not float32;
* ``solver_p`` (another scheduler as the predictor);
* flow matching: ``use_flow_sigmas``, ``use_dynamic_shifting``, ``prediction_type="flow_prediction"``;
* option values diffusers rejects at the step (an unknown prediction or solver type), ``solver_order``
  above 3, a history entry or ``this_order`` the step reads that is missing, a step index without the
  σ's its orders read, thresholding values the op refuses
  (``dynamic_thresholding_ratio`` 0, as diffusers' own fp16 test uses, or above 1);
* the last step into σ = 0 (``final_sigmas_type="zero"``) with ``solver_type="bh1"``, with
  ``predict_x0=False``, or at an order above 1 (``lower_order_final=False``): diffusers multiplies
  ∞ by 0 there and returns NaN or ∞ (at third order its ρ system is singular: it raises), where
  fastdiff's own UniPC takes the finite first-order limit x̂0;
* a step whose λ's (diffusers' float32 λ = log α − log σ) repeat (the last step of a
  ``final_sigmas_type="sigma_min"`` run ending at σ_min already): diffusers' result is the sample
  itself or, at third order, NaN. These λ are computed on the σ table's device (the CPU); diffusers
  computes them on the sample's.

Differences: the op computes in float32 with the coefficients (ρ of UniP/UniC solved in float64)
rounded once, where diffusers rounds each operation and solves ρ in float32; fp16/bf16 inputs are
combined in float32 and rounded once (diffusers computes in the sample's dtype throughout). A
``model_outputs`` entry or ``last_sample`` is a view: rewritten by a later step after it left the state.
"""

from __future__ import annotations

import torch

try:
    from diffusers import UniPCMultistepScheduler
    from diffusers.schedulers.scheduling_utils import SchedulerOutput
except ImportError as error:  # diffusers is an optional extra
    raise ImportError("fastdiff.compat needs diffusers (tested with 0.42): pip install diffusers") from error

from .. import ops
from ..reference import ROW_SIZE
from ..schedulers.unipc import SOLVER_TYPES, unipc_order, unipc_step
from ._dpmsolver import (HISTORY_NAMES, PREDICTION_TYPES, compact_state, lambdas_distinct, slot_mirror,
                         thresholding_options)
from ._slots import fusable

__all__ = ["FastUniPCMultistepScheduler"]


class FastUniPCMultistepScheduler(UniPCMultistepScheduler):
    """diffusers' ``UniPCMultistepScheduler`` whose ``step`` (UniC corrector and UniP predictor) is one
    fused launch of fastdiff's ``multistep_update``. Same config, same state, same outputs (see the
    module docstring for where diffusers' code runs)."""

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """x_t -> the next sample by UniPC (Zhao et al. 2023, arXiv:2302.04867): corrector, then predictor;
        diffusers' ``step``."""
        if self.num_inference_steps is not None and self.step_index is None:
            self._init_step_index(timestep)  # diffusers' rule, as its own step would apply it
        orders = self._fused_orders(model_output, sample)
        if orders is None:
            return super().step(model_output, timestep, sample, return_dict=return_dict)
        prev_sample = self._fused_step(*orders, model_output, timestep, sample)
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def _corrects(self) -> bool:
        """diffusers' ``use_corrector``: not at the run's first step, nor after a step in disable_corrector."""
        i = self.step_index
        return i > 0 and i - 1 not in self.disable_corrector and self.last_sample is not None

    def _fused_orders(self, model_output, sample) -> tuple[int, int | None] | None:
        """(predictor order, corrector order or None) of this step as diffusers takes them, or None where
        the fused op would not give diffusers' result."""
        config = self.config
        if self.num_inference_steps is None or self.solver_p is not None or not fusable(sample, model_output):
            return None
        if (config.use_flow_sigmas or config.use_dynamic_shifting or config.prediction_type not in PREDICTION_TYPES
                or config.solver_type not in SOLVER_TYPES or not 1 <= config.solver_order <= 3
                or len(self.model_outputs) != config.solver_order or len(self.timestep_list) != config.solver_order
                or self.sigmas.dtype != torch.float32 or thresholding_options(config) is None):
            return None
        i, n = self.step_index, len(self.timesteps)
        if not 0 <= i < n or i + 1 >= len(self.sigmas):
            return None
        corrector = None
        if self._corrects():
            corrector = getattr(self, "this_order", None)  # the previous step's predictor order
            if not isinstance(corrector, int) or not 1 <= corrector <= config.solver_order or i - corrector < 0:
                return None
        order = unipc_order(i, n, self.lower_order_nums, config.solver_order,
                            lower_order_final=config.lower_order_final)
        if i - (order - 1) < 0:
            return None
        if float(self.sigmas[i + 1]) == 0 and (config.solver_type == "bh1" or not self.predict_x0 or order > 1):
            return None  # diffusers' ∞·0 at σ = 0 (see the module docstring)
        history = self.model_outputs[::-1]  # m1, m2, m3 before the push
        read = max(order - 1, corrector or 0)
        if any(m is None for m in history[:read]) or not fusable(sample, *history):
            return None
        if corrector is not None and not fusable(sample, self.last_sample):
            return None
        if not lambdas_distinct(self, range(i - max(order - 1, corrector or 0), i + 2)):
            return None
        return order, corrector

    def _fused_step(self, order: int, corrector: int | None, model_output, timestep, sample) -> torch.Tensor:
        """One fused launch, then diffusers' state as its own step leaves it."""
        config, i = self.config, self.step_index
        history = self.model_outputs[::-1]
        mirror = slot_mirror(self)
        model_output, sample = mirror.outside(model_output), mirror.outside(sample)
        plan = mirror.load(sample, **dict(zip(HISTORY_NAMES, history)),
                           last=self.last_sample if corrector is not None else None)
        thresholds = config.thresholding and self.predict_x0  # diffusers thresholds x̂0 only
        # last ← the corrected sample and push=True at every step: diffusers' last_sample and model_outputs[-1]
        linear = unipc_step(self.sigmas, i, order, corrector, predict_x0=self.predict_x0,
                            solver_type=config.solver_type, prediction_type=config.prediction_type,
                            thresholding=thresholds, sets_last=True, push=True)
        row = plan.pack(linear)[:ROW_SIZE]
        prev_sample, _ = ops.multistep_update(model_output, sample, row, mirror.slots,
                                              **(thresholding_options(config) if thresholds else {}))
        mirror.stepped()

        # diffusers' state: the lists shifted (the oldest entries dropped), c and timestep the newest
        outputs, kept = self.model_outputs, [m is not None for m in history[:config.solver_order - 1]]
        outputs[-1] = mirror.view("m1")
        for k, present in enumerate(kept, start=2):
            outputs[-k] = mirror.view(HISTORY_NAMES[k - 1]) if present else None
        timesteps = self.timestep_list
        timesteps[:-1] = timesteps[1:]
        timesteps[-1] = timestep
        self.this_order = order
        self.last_sample = mirror.view("last")
        if self.lower_order_nums < config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return prev_sample

    def __getstate__(self) -> dict:
        return compact_state(self.__dict__, "model_outputs", "last_sample")


# diffusers scheduler class -> its fused twin (fastdiff.compat.diffusers' FAST_SCHEDULERS)
FAST = {UniPCMultistepScheduler: FastUniPCMultistepScheduler}
