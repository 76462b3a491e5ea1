"""What DPM-Solver, UniPC, Euler, Euler-ancestral and PNDM share: diffusers' step-index bookkeeping,
σ-based noising, and a ``step`` that runs each step as one ``LinearStep`` (``fastdiff.schedulers.linear``)
through the fused op ``ops.multistep_update``.

A subclass writes its equations once, as functions of plain numbers (σ's, orders, options) that
return ``LinearStep``s, which the diffusers drop-ins can call on diffusers' own state too, and
``_plan(start, **options)``: a generator of the ``LinearStep``s of the steps from step index
``start`` on, in order, holding whatever the solver counts between steps (lower-order warm-up,
Runge-Kutta stages) as local state. ``step`` (diffusers' API, one call per model evaluation) and
``step_tables`` (the sync-free loop's device table) both consume it, so the two cannot drift apart.
``options`` are ``step``'s own keywords (Euler's s_churn, ...): fixed for a run of the loop, and
per call of ``step`` for a scheduler whose plan keeps no state between steps (``restartable``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .. import ops, validation
from ..reference import ROW_SIZE
from .base import SchedulerBase, SchedulerOutput, StepTables
from .linear import INPUT_SCALE, LinearPlan, LinearStep, slot_buffers
from .schedule import alpha_sigma, randn_tensor


class LinearScheduler(SchedulerBase):
    """Base of the schedulers whose step is linear. Subclasses set ``self.timesteps`` in
    ``set_timesteps`` (then call ``self._reset()``) and implement ``_plan``; the σ-based ones also set
    ``self.sigmas`` (float32, one more than the timesteps: the σ after the last step), which the
    σ-form ``add_noise`` reads (PNDM, which has none, noises like DDPM instead)."""

    # the scheduler's step returns x̂0 as pred_original_sample (Euler) or only prev_sample (DPM-Solver, ...)
    returns_pred_original = False
    # the dtype its noise is drawn in (None: the model output's); diffusers' DPM-Solver draws float32
    noise_dtype: torch.dtype | None = None
    # its plan keeps no state between steps, so ``step``'s options may change from call to call (Euler)
    restartable = False
    # its steps read and write slots (history, last, acc); False: no slot buffers are made (Euler)
    memory = True

    def _reset(self) -> None:
        """Forget the steps taken and the begin index (set_timesteps, as diffusers): the next ``step``
        starts a plan."""
        self._step_index = None
        self._begin_index = None
        self._plan_steps: Iterator[LinearStep] | None = None
        self._plan_start, self._plan_options = None, None
        self._ring: LinearPlan | None = None  # None: no run in progress
        self._run: tuple | None = None  # (shape, dtype, device) of the run's first sample
        self._slots: torch.Tensor | None = None

    # --------------------------------------------------------------------- diffusers' step index
    @property
    def step_index(self) -> int | None:
        """The index of the next step in ``self.timesteps`` (None before the first ``step``)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Where sampling starts (set by image-to-image pipelines); None: from the first ``step``'s timestep."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = validation.integer("begin_index", begin_index, 0)

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """diffusers' rule: the position of ``timestep`` in the schedule; the second one when it occurs
        twice (so a run started mid-schedule does not skip a σ); the last step when it is absent."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        candidates = (schedule == torch.as_tensor(timestep, device=schedule.device)).nonzero()
        if len(candidates) == 0:
            return len(self.timesteps) - 1
        return int(candidates[1 if len(candidates) > 1 else 0].item())

    def _init_step_index(self, timestep) -> None:
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    # --------------------------------------------------------------------- sampling
    def _plan(self, start: int, **options) -> Iterator[LinearStep]:
        raise NotImplementedError

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, *, variance_noise: torch.Tensor | None = None,
             uncond_model_output: torch.Tensor | None = None, guidance_scale: float = 1.0):
        """x_t -> the next sample, one ``LinearStep`` in one fused launch; diffusers' ``step``.

        The noise of a stochastic step is ``variance_noise`` if given, else drawn from ``generator``
        as diffusers draws it. ``uncond_model_output`` and ``guidance_scale`` (keyword-only) fuse
        classifier-free guidance into the step. The history lives in fixed buffers shaped like the
        first sample: a batch that changes shape mid-run is an error.
        """
        return self._linear_step(model_output, timestep, sample, generator, return_dict, variance_noise,
                                 uncond_model_output, guidance_scale)

    def _linear_step(self, model_output, timestep, sample, generator, return_dict, variance_noise,
                     uncond_model_output, guidance_scale, **options):
        """``step`` with the plan's ``options`` (a subclass's own ``step`` keywords). Everything is
        checked before the plan advances, so a refused call leaves the run where it was."""
        self._check_call(model_output, sample, variance_noise, uncond_model_output)
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self.timesteps):
            raise ValueError(f"{type(self).__name__}.step called {self._step_index + 1} times for "
                             f"{len(self.timesteps)} timesteps; call set_timesteps again for a new run")
        if self._ring is None or (self.restartable and options != self._plan_options):
            self._plan_start, self._plan_options, self._ring = self._step_index, options, LinearPlan()
            self._plan_steps = self._plan(self._step_index, **options)
        elif options != self._plan_options:
            raise ValueError(f"{type(self).__name__}.step got {options}, but this run started with "
                             f"{self._plan_options}; call set_timesteps to start a new run")
        if self._run is None:
            self._run = (sample.shape, sample.dtype, sample.device)
            self._slots = slot_buffers(sample) if self.memory else None
        linear = self._checked(next(self._planned_steps()))
        row = self._ring.pack(linear)[:ROW_SIZE]
        noise = None
        if linear.noise:
            noise = variance_noise if variance_noise is not None else randn_tensor(
                model_output.shape, generator=generator, device=model_output.device,
                dtype=self.noise_dtype or model_output.dtype)
            noise = noise.to(device=model_output.device, dtype=sample.dtype)
        prev_sample, converted = ops.multistep_update(
            model_output, sample, row, self._slots, noise, uncond_model_output=uncond_model_output,
            guidance_scale=guidance_scale, return_converted=self.returns_pred_original, **self._thresholding())
        self._step_index += 1
        if not return_dict:
            return (prev_sample, converted) if self.returns_pred_original else (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=converted)

    def _check_call(self, model_output, sample, variance_noise, uncond_model_output) -> None:
        """What a ``step`` call must hold: set timesteps, float tensors of the sample's shape, and the
        run's shape, dtype and device (its history lives in buffers made for the first sample)."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}.step called before set_timesteps(num_inference_steps)")
        validation.tensor("sample", sample, floating=True)
        for name, x in (("model_output", model_output), ("variance_noise", variance_noise),
                        ("uncond_model_output", uncond_model_output)):
            if x is not None and validation.tensor(name, x, floating=True).shape != sample.shape:
                raise ValueError(f"{name} has shape {tuple(x.shape)}, expected sample's shape {tuple(sample.shape)}")
        if self._run is not None and self._run != (sample.shape, sample.dtype, sample.device):
            shape, dtype, device = self._run
            raise ValueError(f"sample is a {sample.dtype} tensor of shape {tuple(sample.shape)} on {sample.device}, but "
                             f"this run started with {dtype} {tuple(shape)} on {device}; call set_timesteps to start "
                             "a new run")

    def _checked(self, linear: LinearStep) -> LinearStep:
        """A step of a scheduler without memory must not touch the slots it does not have."""
        if not self.memory and linear.needs_memory:
            raise RuntimeError(f"{type(self).__name__} planned a step that uses slots, but it keeps none (memory=False)")
        return linear

    def _planned_steps(self) -> Iterator[LinearStep]:
        """The run's plan; after a copy or unpickling (a generator cannot be copied) it is rebuilt
        and replayed to where the run is: the plan is a function of its start and options."""
        if self._plan_steps is None:
            self._plan_steps = self._plan(self._plan_start, **self._plan_options)
            for _ in self._ring.steps:
                next(self._plan_steps)
        return self._plan_steps

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_plan_steps"] = None  # rebuilt on the next step (_planned_steps)
        return state

    def step_tables(self, timesteps, **step_kwargs) -> StepTables:
        """The sync-free loop's tables for ``timesteps``, the tail of ``self.timesteps`` from some index
        on (all of it, or SDEdit's last steps): one packed ``LinearStep`` per step, from the same
        ``_plan`` that ``step`` runs."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}.step_tables called before set_timesteps(num_inference_steps)")
        timesteps = torch.as_tensor(timesteps)
        start = len(self.timesteps) - len(timesteps)
        if len(timesteps) == 0 or not torch.equal(timesteps.cpu(), self.timesteps[start:].cpu()):
            raise ValueError("timesteps must be a non-empty tail of the scheduler's timesteps")
        plan, ring = self._plan(start, **step_kwargs), LinearPlan()
        steps = [self._checked(next(plan)) for _ in range(len(timesteps))]
        rows = torch.stack([ring.pack(step) for step in steps])
        host = tuple(timesteps.tolist())
        return StepTables(timesteps.clone(), rows, tuple(step.noise for step in steps), host, slots=self.memory,
                          scales_input=any(step.input_scale != 1 for step in steps))

    def _update(self, model_output, sample, row, noise=None, slots=None, *, uncond_model_output=None,
                guidance_scale=1.0, **options):
        """The sync-free loop's step: ``row`` is the step's device table row, ``slots`` the loop's
        buffers (``options`` are in the rows already)."""
        return ops.multistep_update(model_output, sample, row[:ROW_SIZE], slots, noise,
                                    uncond_model_output=uncond_model_output, guidance_scale=guidance_scale,
                                    return_converted=self.returns_pred_original, **self._thresholding())

    def _thresholding(self) -> dict:
        """The op's dynamic-thresholding keywords when the config asks for it (c is then x̂0, thresholded
        per sample; ``LinearStep.reconvert`` takes an ε-space solver back to ε)."""
        if not self.config.get("thresholding", False):
            return {}
        return {"dynamic_thresholding_ratio": self.config.dynamic_thresholding_ratio,
                "sample_max_value": self.config.sample_max_value}

    # --------------------------------------------------------------------- training side
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = α_t·x0 + σ_t·ε at the σ of each timestep's step index (diffusers' rule: the begin
        index, the current step index, or the timestep's position in the schedule)."""
        sigma = self._noising_sigmas(original_samples, timesteps)
        alpha_t, sigma_t = alpha_sigma(sigma)
        return alpha_t * original_samples + sigma_t * noise

    def _noising_sigmas(self, original_samples, timesteps) -> torch.Tensor:
        """σ per sample, shaped to broadcast against ``original_samples``."""
        validation.tensor("original_samples", original_samples, floating=True)
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        timesteps = torch.as_tensor(timesteps, device=original_samples.device).reshape(-1)
        schedule = self.timesteps.to(original_samples.device)
        if self._begin_index is None:
            indices = [self.index_for_timestep(t, schedule) for t in timesteps]
        elif self._step_index is not None:
            indices = [self._step_index] * len(timesteps)
        else:
            indices = [self._begin_index] * len(timesteps)
        sigma = sigmas[indices].flatten()
        return sigma.reshape(-1, *([1] * (original_samples.ndim - 1)))
