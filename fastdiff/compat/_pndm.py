"""``FastPNDMScheduler``: diffusers' ``PNDMScheduler`` whose steps are fastdiff's fused op.

A subclass of ``diffusers.PNDMScheduler``: config, ``from_config``, ``save_pretrained`` /
``from_pretrained``, ``compatibles``, ``set_timesteps`` and ``step`` (which dispatches by ``counter``)
are diffusers' own. ``step_prk`` and ``step_plms`` build each Runge-Kutta stage or linear multistep
step from diffusers' state with the equations of ``fastdiff.schedulers.pndm`` (``prk_stage``,
``plms_step``, ``plms_second_stage``, the timesteps of ``prk_step_timesteps`` /
``plms_step_timesteps``) and run it as one ``ops.multistep_update`` launch. diffusers' state lives in
fastdiff's slots (``compat._slots.SlotMirror``) and is handed back as views of them:

    ets               the last three outputs: ring slots m3, m2, m1 (oldest first, as diffusers lists them)
    cur_sample        slot 'last' (the sample the Runge-Kutta step or the skip-PRK warm-up started from)
    cur_model_output  slot 'acc' (PRK's running ε/6 + ε/3 + ε/3), 0 where diffusers resets it
    counter           diffusers' own, one more per step

State set or changed between steps (diffusers' tests assign ``scheduler.ets = [...]``; a stock step
in between) is copied into the slots by ``SlotMirror.load`` before the next fused step.

diffusers' own ``step_prk`` / ``step_plms`` run instead (``super()``, exact) for:

* float64, or model output, sample and the state the step reads not of one kernel dtype
  (fp32/fp16/bf16), one device and one shape (diffusers would promote or broadcast);
* autograd recording (an input requires grad): the op writes its slots in place;
* a timestep that is not an integer (a Python or numpy int, or a 0-d integer tensor): diffusers
  fails on floats, and a 1-element 1-D tensor changes the dtype its arithmetic promotes to;
* where eq. 9 divides by zero (ᾱ_t = 0 from a trained β of 1, or ᾱ_t = ᾱ_{t−δ} = 1): diffusers'
  inf / NaN kept;
* what diffusers refuses or fails on, so its own error is raised: before ``set_timesteps``, a
  prediction_type other than epsilon / v_prediction, PLMS before three PRK outputs, ``step_prk``
  past the Runge-Kutta timesteps, a timestep outside the ᾱ table (diffusers' IndexError);
* states diffusers' code takes but the fused equations do not model: a PRK stage 0 whose
  ``cur_model_output`` is not 0, a stage 1-3 without ``cur_sample`` or with ``cur_model_output`` 0,
  the skip-PRK second step (counter 1) with other than one stored output, a PLMS step with no stored
  output after counter 0.

Kept from diffusers: its numbers (float32 to ~1e-6 relative where its own float32 is well conditioned;
see ``fastdiff.schedulers.pndm``), its ``counter`` dispatch, its timesteps, its errors. Different:

* ``ets``, ``cur_sample`` and ``cur_model_output`` hold views of the slots with diffusers' values,
  not the very tensors passed in; a later step overwrites them (clone one to keep it). ``ets`` is a
  new list after each fused step (diffusers appends to its list during PRK).
* After a PLMS step diffusers' ``ets`` holds four outputs, the oldest of which no later step reads
  (the next PLMS step drops it before reading, and counter 1 only follows counter 0): its slot
  already holds the new output, so the drop-in's list holds the other three. Outputs older than the
  ring that the caller put in (injected lists) are kept as they are.
* fp16/bf16 are computed in float32 and rounded once (diffusers rounds every operation).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from diffusers import PNDMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from .. import ops
from ..reference import ROW_SIZE
from ..schedulers.linear import HISTORY, LinearStep
from ..schedulers.pndm import (PNDM_ORDER, PRK_STAGES, PRK_STEPS, PREDICTION_TYPES, plms_second_stage, plms_step,
                               plms_step_timesteps, prk_stage, prk_step_timesteps, step_alphas)
from ._slots import SlotMirror, fusable

__all__ = ["FAST", "FastPNDMScheduler"]

FLOAT32_MAX = torch.finfo(torch.float32).max  # the row the op reads is float32


def _integer_timestep(timestep) -> int | None:
    """The timestep as a Python int where the fused step takes it (see the module docstring), else None."""
    if isinstance(timestep, (bool, np.bool_)):
        return None
    if isinstance(timestep, (int, np.integer)):
        return int(timestep)
    if (isinstance(timestep, torch.Tensor) and timestep.ndim == 0 and not timestep.is_floating_point()
            and not timestep.is_complex() and timestep.dtype != torch.bool):
        return int(timestep)
    return None


def _is_zero(value) -> bool:
    """diffusers' reset ``cur_model_output``: the number 0 (not a tensor)."""
    return isinstance(value, numbers.Number) and not isinstance(value, torch.Tensor) and value == 0


def _computable(equation, *args) -> LinearStep | None:
    """``equation(*args)`` where its coefficients are finite float32 numbers, else None: at ᾱ_t = 0
    (a trained β of 1) or ᾱ_t = ᾱ_{t−δ} = 1 eq. 9 divides by zero, and diffusers returns inf / NaN."""
    try:
        step = equation(*args)
    except (ZeroDivisionError, ValueError, OverflowError):
        return None
    values = [*step.convert, *step.out.values(), *(step.last or {}).values(), *(step.acc or {}).values()]
    return step if all(math.isfinite(v) and abs(v) <= FLOAT32_MAX for v in values) else None


def _views_of(tensor: torch.Tensor, slots: torch.Tensor | None) -> bool:
    return (slots is not None and tensor.device == slots.device
            and tensor.untyped_storage().data_ptr() == slots.untyped_storage().data_ptr())


class FastPNDMScheduler(PNDMScheduler):
    """diffusers' ``PNDMScheduler`` whose ``step_prk`` / ``step_plms`` (and so ``step``) run each
    Runge-Kutta stage or linear multistep step as one fused ``ops.multistep_update`` launch.
    Same config, outputs and state as diffusers (module docstring: where it falls back, what differs)."""

    def step_prk(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
                 return_dict: bool = True) -> SchedulerOutput | tuple:
        """A stage of a pseudo Runge-Kutta step (Liu et al. 2022, eq. 13); diffusers' ``step_prk``."""
        linear = self._prk_linear(timestep)
        stage = self.counter % PRK_STAGES
        prev_sample = None if linear is None else self._fused(linear, model_output, sample, trim=False,
                                                             clears_acc=stage == PRK_STAGES - 1)
        if prev_sample is None:
            return super().step_prk(model_output=model_output, timestep=timestep, sample=sample,
                                    return_dict=return_dict)
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def step_plms(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
                  return_dict: bool = True) -> SchedulerOutput | tuple:
        """A pseudo linear multistep step (eq. 12), or the skip-PRK warm-up's; diffusers' ``step_plms``."""
        linear = self._plms_linear(timestep)
        prev_sample = None if linear is None else self._fused(linear, model_output, sample, trim=self.counter != 1,
                                                             clears_last=self.counter == 1)
        if prev_sample is None:
            return super().step_plms(model_output=model_output, timestep=timestep, sample=sample,
                                     return_dict=return_dict)
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    # --------------------------------------------------------------------- diffusers' state -> the step
    def _ready(self, timestep) -> int | None:
        """The timestep as an int if diffusers' step would compute (not raise) with it, else None."""
        if self.num_inference_steps is None or self.config.prediction_type not in PREDICTION_TYPES:
            return None
        return _integer_timestep(timestep)

    def _alphas(self, t: int, prev_t: int) -> tuple[float, float] | None:
        """(ᾱ_t, ᾱ_{t−δ}) where diffusers' table lookups succeed (a negative t wraps there too)."""
        size = len(self.alphas_cumprod)
        return step_alphas(self, t, prev_t) if -size <= t < size and prev_t < size else None

    def _prk_linear(self, timestep) -> LinearStep | None:
        t_passed, counter = self._ready(timestep), self.counter
        if t_passed is None or counter // PRK_STAGES * PRK_STAGES >= len(self.prk_timesteps):
            return None
        stage = counter % PRK_STAGES
        if stage == 0 and not _is_zero(self.cur_model_output):
            return None  # diffusers adds ε/6 to whatever is there (stages 1-3 without cur_sample or a
            # running sum start from the sample passed or from 0 there: _fused finds nothing to read)
        step_ratio = self.config.num_train_timesteps // self.num_inference_steps
        alphas = self._alphas(*prk_step_timesteps(counter, t_passed, self.prk_timesteps, step_ratio))
        return None if alphas is None else _computable(prk_stage, stage, *alphas, self.config.prediction_type)

    def _plms_linear(self, timestep) -> LinearStep | None:
        t_passed, counter, stored = self._ready(timestep), self.counter, len(self.ets)
        if t_passed is None or (not self.config.skip_prk_steps and stored < PRK_STEPS):
            return None
        step_ratio = self.config.num_train_timesteps // self.num_inference_steps
        alphas = self._alphas(*plms_step_timesteps(counter, t_passed, step_ratio))
        if alphas is None:
            return None
        if counter == 1:  # the warm-up's second step: back at cur_sample with (ε + ε_prev)/2
            return _computable(plms_second_stage, *alphas, self.config.prediction_type) if stored == 1 else None
        order = min(stored, PNDM_ORDER - 1) + 1  # diffusers keeps the last 3, then appends this output
        if order == 1 and counter != 0:
            return None  # diffusers reads a 4th stored output it does not have
        return _computable(plms_step, order, *alphas, self.config.prediction_type)

    # --------------------------------------------------------------------- the fused step
    def _mirror(self) -> SlotMirror:
        mirror = self.__dict__.get("_slot_mirror")
        if mirror is None:
            mirror = self._slot_mirror = SlotMirror()
        return mirror

    def _fused(self, linear: LinearStep, model_output, sample, trim: bool, clears_acc: bool = False,
               clears_last: bool = False) -> torch.Tensor | None:
        """Run ``linear`` on diffusers' state and leave that state as diffusers' step would; None
        (nothing changed) where the op would not give diffusers' result.

        ``trim``: the step keeps diffusers' last three outputs before appending (PLMS) rather than
        all (PRK). ``clears_acc`` / ``clears_last``: diffusers resets cur_model_output to 0 (PRK's
        last stage) / cur_sample to None (the warm-up's second step) after the step."""
        stored = list(self.ets)[-3:] if trim and linear.push else list(self.ets)
        state = self._slot_state(linear, stored, model_output, sample)
        if state is None:
            return None
        mirror = self._mirror()
        kept = self._kept_outputs(linear, stored, state, mirror)
        model_output, sample = mirror.outside(model_output), mirror.outside(sample)  # a view of the slots: cloned
        plan = mirror.load(sample, **state)
        row = plan.pack(linear)[:ROW_SIZE]
        prev_sample, _ = ops.multistep_update(model_output, sample, row, mirror.slots)
        mirror.stepped()

        # diffusers' state after its step, as views of the slots (a push renames m1 -> m2 -> m3)
        renamed = {"m1": "m2", "m2": "m3"} if linear.push else {}
        ets = [mirror.view(renamed.get(entry, entry)) if isinstance(entry, str) else entry for entry in kept]
        self.ets = ets + [mirror.view("m1")] if linear.push else ets
        if clears_last:
            self.cur_sample = None
        elif linear.last is not None or "last" in state:
            self.cur_sample = mirror.view("last")
        if clears_acc:
            self.cur_model_output = 0
        elif linear.acc is not None or "acc" in state:
            self.cur_model_output = mirror.view("acc")
        self.counter += 1
        return prev_sample

    def _slot_state(self, linear: LinearStep, stored: list, model_output, sample) -> dict | None:
        """What the slots must hold, by slot name: the state ``linear`` reads and the state that
        survives it (so it can be handed back as views), where it fits the sample; None where the
        step cannot run fused (module docstring)."""
        if not fusable(sample, model_output):
            return None
        history = dict(zip(HISTORY, reversed(stored[-3:])))  # m1 = the last output
        survives = {"m1", "m2"} | ({"m3"} if not linear.push else set())  # a push overwrites m3's slot
        state = {name: value for name, value in history.items() if linear.uses(name) or name in survives}
        if isinstance(self.cur_sample, torch.Tensor) and (linear.uses("last") or linear.last is None):
            state["last"] = self.cur_sample
        if isinstance(self.cur_model_output, torch.Tensor) and (linear.uses("acc") or linear.acc is None):
            state["acc"] = self.cur_model_output
        reads = [name for name in (*HISTORY, "last", "acc") if linear.uses(name)]
        if any(name not in state or not fusable(sample, state[name]) for name in reads):
            return None
        state = {name: value for name, value in state.items() if fusable(sample, value)}
        if torch.is_grad_enabled() and any(x.requires_grad for x in (model_output, sample, *state.values())):
            return None
        return state

    def _kept_outputs(self, linear: LinearStep, stored: list, state: dict, mirror: SlotMirror) -> list:
        """diffusers' list before this step's output is appended: slot names for the outputs the ring
        holds after the step (handed back as views), the other entries as they are, except views of
        the slots, which the step may overwrite: the one its push overwrites is dropped (no later step
        reads it; module docstring) unless the next step is counter 1 (which reads a 4th output), and
        any other is cloned before the step."""
        kept = []
        for back, value in zip(range(len(stored), 0, -1), stored):  # back: 1 for the last output
            name = HISTORY[back - 1] if back <= len(HISTORY) else None
            pushed_out = linear.push and name == HISTORY[-1]
            if name in state and not pushed_out:
                kept.append(name)
            elif not (isinstance(value, torch.Tensor) and _views_of(value, mirror.slots)):
                kept.append(value)
            elif not pushed_out or self.counter == 0:
                kept.append(value.clone())
        return kept


# diffusers scheduler class -> its fused twin (exact classes: a user's subclass may change step)
FAST = {PNDMScheduler: FastPNDMScheduler}
