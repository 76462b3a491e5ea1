"""PNDMScheduler: pseudo numerical methods (Liu et al. 2022, arXiv:2202.09778), diffusers-compatible.

PNDM integrates the probability-flow ODE with the DDIM transfer φ (eq. 9) as its one-step map:
first three pseudo Runge-Kutta steps (PRK, eq. 13: four model evaluations each), then pseudo
linear multistep steps (PLMS, eq. 12: one evaluation each, the 4th-order Adams-Bashforth weights
on the last four ε's). With ``skip_prk_steps`` (Stable Diffusion's setting) the warm-up is
crowsonkb's instead: a first-order step, a Heun-like second stage, then PLMS of rising order.

Every step, Runge-Kutta stages and warm-up included, is one ``LinearStep``: φ is linear in
(x_t, ε'), so each stage is a function of plain numbers (ᾱ_t, ᾱ_{t−δ}, the stage or the PLMS
order) that returns its coefficients. The fused op keeps the state between steps:

    m1, m2, m3   diffusers' ``ets``: raw model outputs (after the guidance combine), most recent first
    last         PRK's ``cur_sample``: the sample a Runge-Kutta step starts from (and the warm-up's)
    acc          PRK's ``cur_model_output``: the running ε/6 + ε/3 + ε/3 of the four stages

``pndm_step`` maps diffusers' own state (its ``counter``, ``len(ets)``, the timestep passed) to the
step, so a drop-in built on diffusers' PNDMScheduler can call it as this scheduler's plan does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from .. import validation
from .base import SchedulerBase, SchedulerOutput
from .configuration import register_to_config
from .linear import HISTORY, LinearStep
from .schedule import spaced_timesteps
from .solver import LinearScheduler

PNDMSchedulerOutput = SchedulerOutput

PREDICTION_TYPES = ("epsilon", "v_prediction")  # PNDM steps ε; it has no x0 ("sample") parameterisation
PNDM_ORDER = 4  # diffusers' pndm_order: 4-stage Runge-Kutta, 4th-order linear multistep
PRK_STEPS = 3  # Runge-Kutta steps before PLMS takes over ...
PRK_STAGES = 4  # ... of four model evaluations each
RAW = (0.0, 1.0, 0.0, 1.0)  # c = m: the ring stores raw model outputs, as diffusers' ets does
# Adams-Bashforth weights of ε_t, ε_{t+δ}, ε_{t+2δ}, ε_{t+3δ} by how many are stored (eq. 12 at 4)
PLMS_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
PRK_WEIGHTS = (1 / 6, 1 / 3, 1 / 3, 1 / 6)  # of the four stages' ε in the Runge-Kutta average (eq. 13)


# ----------------------------------------------------------------------------- the equations
def pndm_transfer(alpha_prod_t: float, alpha_prod_t_prev: float, prediction_type: str) -> tuple[float, float]:
    """φ(x_t, ε, t, t−δ) = √(ᾱ_{t−δ}/ᾱ_t)·x_t − (ᾱ_{t−δ} − ᾱ_t)/(ᾱ_t·√(1−ᾱ_{t−δ}) + √(ᾱ_t(1−ᾱ_t)ᾱ_{t−δ}))·ε
    (eq. 9) as (coefficient of x_t, coefficient of the model output), in float64.

    For v_prediction the output is ε's v: ε = √ᾱ_t·v + √(1−ᾱ_t)·x_t, folded into the two."""
    beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
    sample_coef = math.sqrt(alpha_prod_t_prev / alpha_prod_t)
    denominator = alpha_prod_t * math.sqrt(beta_prod_t_prev) + math.sqrt(alpha_prod_t * beta_prod_t * alpha_prod_t_prev)
    eps_coef = -(alpha_prod_t_prev - alpha_prod_t) / denominator
    if prediction_type == "v_prediction":
        return sample_coef + eps_coef * math.sqrt(beta_prod_t), eps_coef * math.sqrt(alpha_prod_t)
    return sample_coef, eps_coef


def prk_stage(stage: int, alpha_prod_t: float, alpha_prod_t_prev: float, prediction_type: str) -> LinearStep:
    """Stage 0-3 of a pseudo Runge-Kutta step (eq. 13), from the step's start x_t (ᾱ_t) to ᾱ_{t−δ}.

    0: ε1 at x_t: x_next = φ(x_t, ε1, t, t−δ/2); x_t is kept ("last"), ε1/6 starts the sum ("acc"),
       ε1 is stored (diffusers' ets keeps it for PLMS).
    1, 2: ε2, ε3 at the previous stage's result: x_next = φ(x_t, ε, t, t−δ/2 or t−δ); the sum gains ε/3.
    3: ε4: x_{t−δ} = φ(x_t, ε1/6 + ε2/3 + ε3/3 + ε4/6, t, t−δ).
    """
    x_coef, eps_coef = pndm_transfer(alpha_prod_t, alpha_prod_t_prev, prediction_type)
    weight = PRK_WEIGHTS[stage]
    if stage == 0:
        return LinearStep(RAW, out={"x": x_coef, "c": eps_coef}, last={"x": 1.0}, acc={"c": weight}, push=True)
    if stage < PRK_STAGES - 1:
        return LinearStep(RAW, out={"last": x_coef, "c": eps_coef}, acc={"acc": 1.0, "c": weight})
    # the sum is not reset: the next stage 0 overwrites it
    return LinearStep(RAW, out={"last": x_coef, "acc": eps_coef, "c": eps_coef * weight})


def plms_step(order: int, alpha_prod_t: float, alpha_prod_t_prev: float, prediction_type: str) -> LinearStep:
    """A pseudo linear multistep step (eq. 12): x_{t−δ} = φ(x_t, ε', t, t−δ) with ε' the order-``order``
    Adams-Bashforth combination of this output (stored) and the ``order`` − 1 stored before it.
    Order 1 (the skip-PRK warm-up's first step) also keeps x_t for the step after it."""
    x_coef, eps_coef = pndm_transfer(alpha_prod_t, alpha_prod_t_prev, prediction_type)
    out = {"x": x_coef, **{name: eps_coef * w for name, w in zip(("c", *HISTORY), PLMS_WEIGHTS[order])}}
    return LinearStep(RAW, out=out, last={"x": 1.0} if order == 1 else None, push=True)


def plms_second_stage(alpha_prod_t: float, alpha_prod_t_prev: float, prediction_type: str) -> LinearStep:
    """The skip-PRK warm-up's second step: back at the first step's start x_t ("last"),
    x_{t−δ} = φ(x_t, (ε + ε_prev)/2, t, t−δ), a Heun-like correction. Its ε is not stored."""
    x_coef, eps_coef = pndm_transfer(alpha_prod_t, alpha_prod_t_prev, prediction_type)
    return LinearStep(RAW, out={"last": x_coef, "c": eps_coef / 2, "m1": eps_coef / 2})


# ----------------------------------------------------------------------------- diffusers' bookkeeping
def runs_prk(counter: int, num_prk_timesteps: int, skip_prk_steps: bool) -> bool:
    """Whether diffusers' ``step`` dispatches its ``counter``-th call to ``step_prk``."""
    return not skip_prk_steps and counter < num_prk_timesteps


def prk_step_timesteps(counter: int, timestep: int, prk_timesteps, step_ratio: int) -> tuple[int, int]:
    """(t, t−δ') of a PRK stage: t is where its Runge-Kutta step starts (the stage-0 entry of
    ``prk_timesteps``); even stages go half a step, t_passed − (T//n)//2, odd ones to t_passed."""
    start = int(prk_timesteps[counter // PRK_STAGES * PRK_STAGES])
    return start, timestep - (0 if counter % 2 else step_ratio // 2)


def plms_step_timesteps(counter: int, timestep: int, step_ratio: int) -> tuple[int, int]:
    """(t, t−δ) of a PLMS step: t − T//n whatever the spacing; the warm-up's second step (counter 1)
    redoes the step before it, from timestep + T//n to timestep."""
    if counter == 1:
        return timestep + step_ratio, timestep
    return timestep, timestep - step_ratio


def step_alphas(scheduler, t: int, prev_t: int) -> tuple[float, float]:
    """(ᾱ_t, ᾱ_{t−δ}) as Python floats from the scheduler's float32 table; before timestep 0,
    ``final_alpha_cumprod``."""
    alphas_cumprod = scheduler.alphas_cumprod
    alpha_prod_t_prev = alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    return float(alphas_cumprod[t]), float(alpha_prod_t_prev)


def pndm_step(scheduler, counter: int, ets: int, timestep: int) -> LinearStep:
    """diffusers' ``PNDMScheduler.step`` at its ``counter``-th call, with ``ets`` model outputs
    stored (``len(scheduler.ets)`` before the call) and ``timestep`` passed, as one ``LinearStep``.
    ``scheduler`` holds ``config``, ``num_inference_steps``, ``prk_timesteps``, ``alphas_cumprod``
    and ``final_alpha_cumprod`` (this module's scheduler or diffusers' own)."""
    config = scheduler.config
    step_ratio = config.num_train_timesteps // scheduler.num_inference_steps
    if runs_prk(counter, len(scheduler.prk_timesteps), config.skip_prk_steps):
        t, prev_t = prk_step_timesteps(counter, timestep, scheduler.prk_timesteps, step_ratio)
        return prk_stage(counter % PRK_STAGES, *step_alphas(scheduler, t, prev_t), config.prediction_type)
    if not config.skip_prk_steps and ets < PRK_STEPS:
        raise ValueError(f"PLMS steps need the {PRK_STEPS} model outputs of the {PRK_STEPS * PRK_STAGES} Runge-Kutta "
                         f"steps first (skip_prk_steps=False); got {ets}")
    t, prev_t = plms_step_timesteps(counter, timestep, step_ratio)
    alphas = step_alphas(scheduler, t, prev_t)
    if counter == 1:
        return plms_second_stage(*alphas, config.prediction_type)
    return plms_step(min(ets, PNDM_ORDER - 1) + 1, *alphas, config.prediction_type)


def prk_timestep_layout(ascending: np.ndarray, half: int) -> np.ndarray:
    """diffusers' PRK timesteps: over the four largest timesteps t_a < t_b < t_c < t_d, the stages
    (t_d, t_c + h, t_c + h, t_c), (t_c, t_b + h, t_b + h, t_b), (t_b, t_a + h, t_a + h, t_a), h = half."""
    top = ascending[-PNDM_ORDER:][::-1]
    stages = [(start, end + half, end + half, end) for start, end in zip(top[:-1], top[1:])]
    return np.array(stages, dtype=np.int64).reshape(-1)


def plms_timestep_layout(ascending: np.ndarray, skip_prk_steps: bool) -> np.ndarray:
    """diffusers' PLMS timesteps, descending: after PRK, all but the three largest (so t_a, PRK's
    last, comes again); skipping PRK, every timestep with the second largest twice (the warm-up's
    second step)."""
    descending = ascending[::-1]
    if not skip_prk_steps:
        return descending[PRK_STEPS:].astype(np.int64)
    return np.concatenate([descending[:2], descending[1:]]).astype(np.int64)


# ----------------------------------------------------------------------------- the scheduler
class PNDMScheduler(LinearScheduler):
    """Pseudo numerical methods for diffusion models (arXiv:2202.09778): F-PNDM (PRK, then PLMS),
    or PLMS alone with ``skip_prk_steps``.

    Constructor keywords, defaults, timesteps and outputs are those of ``diffusers.PNDMScheduler``
    (0.42); results agree with it in float32. Each step is one fused ``ops.multistep_update``.

    diffusers' quirks, kept:

    * the timesteps: with PRK (``skip_prk_steps=False``, the default) 12 Runge-Kutta timesteps over
      the four largest t_a < t_b < t_c < t_d, (t_d, t_c+h, t_c+h, t_c, t_c, t_b+h, t_b+h, t_b, t_b,
      t_a+h, t_a+h, t_a) with h = (T//n)//2, then the n − 3 smallest, t_a again first: n + 9 in all.
      Skipping PRK, the n timesteps with the second one twice: n + 1 (1 for n = 1).
      ``prk_timesteps`` and ``plms_timesteps`` are the two parts (numpy int64, as diffusers has them).
    * the step goes from t to t − T//n whatever the ``timestep_spacing`` (PRK's half stages to
      t − (T//n)//2), not to the next entry of ``timesteps``; with odd T//n PRK's stage 0 lands one
      timestep off the one its next stage's model is evaluated at.
    * PRK stages 1-3 restart from the Runge-Kutta step's first sample, and the skip-PRK second step
      (diffusers' counter == 1) from the first step's: they ignore the ``sample`` passed. That second
      step redoes the first (t + T//n → t) with the two outputs' mean, and its output is never
      stored: the second-order step combines the third output with the first.
    * the last step goes to ᾱ = ``final_alpha_cumprod``: 1 with ``set_alpha_to_one``, else ᾱ_0
      (diffusers' PNDM default is False, unlike DDIM's).
    * v_prediction converts the *combined* output (Runge-Kutta average, multistep sum) to ε with
      ᾱ of the step's start and the sample the step starts from.
    * a run is counted from its first ``step`` (``counter``): started part-way (image-to-image, with
      ``set_begin_index`` or from a timestep), it begins with the skip-PRK warm-up again, or with PRK
      stages whose Runge-Kutta start ᾱ is still that of ``prk_timesteps[counter // 4 * 4]``, the
      full schedule's largest timesteps.

    Deliberately different:

    * 'trailing' spacing visits n valid timesteps: diffusers' ``np.arange(T, 0, -T/n)`` is n + 1 long
      for some (T, n) (T=1000, n=61) and ends the loop at t = −1 (ᾱ of the last training step).
    * refused up front: prediction_type "sample" (diffusers fails at the first step), fewer than 4
      steps with PRK (a numpy broadcast error), a ``steps_offset`` that pushes a timestep past
      T − 1 (an IndexError mid-loop), a ``timestep`` other than the schedule's next one (diffusers
      computes with whatever it is passed; checked where it is a Python int or a CPU tensor),
      ``step_prk`` / ``step_plms`` called for a step of the other kind.
    * ``ets`` holds the last three stored outputs, oldest first: diffusers' list also keeps a
      fourth, which it never reads again.
    * "sigmoid" and "laplace" beta schedules work here too (diffusers' PNDM rejects them).
    * before ``set_timesteps``, ``timesteps`` is T−1 … 0 (diffusers: None).
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
        skip_prk_steps: bool = False,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ):
        validation.boolean("skip_prk_steps", skip_prk_steps)
        validation.boolean("set_alpha_to_one", set_alpha_to_one)
        validation.one_of("prediction_type", prediction_type, PREDICTION_TYPES)
        self._setup(self.config)
        # ᾱ "before" timestep 0: 1 (a clean image) or ᾱ_0
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.pndm_order = PNDM_ORDER
        self.prk_timesteps: np.ndarray | None = None
        self.plms_timesteps: np.ndarray | None = None
        self._schedule = self.timesteps.numpy()  # the timesteps on the host, for the plan
        self._reset()

    # --------------------------------------------------------------------- sampling schedule
    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """PRK's timesteps then PLMS's, laid out as diffusers lays them (class docstring)."""
        T, skip = self.config.num_train_timesteps, self.config.skip_prk_steps
        n = validation.integer("num_inference_steps", num_inference_steps, 1, T)
        if not skip and n < PNDM_ORDER:
            raise ValueError(f"num_inference_steps must be >= {PNDM_ORDER} with skip_prk_steps=False (the Runge-Kutta "
                             f"warm-up runs over the {PNDM_ORDER} largest timesteps), got {n}; "
                             "or use skip_prk_steps=True")
        ascending = spaced_timesteps(T, n, self.config.timestep_spacing, self.config.steps_offset)[::-1]
        prk = np.zeros(0, dtype=np.int64) if skip else prk_timestep_layout(ascending, T // n // 2)
        plms = plms_timestep_layout(ascending, skip)
        schedule = np.concatenate([prk, plms])
        if schedule.max() >= T:
            raise ValueError(f"steps_offset={self.config.steps_offset} puts timestep {schedule.max()} past the last "
                             f"training timestep {T - 1} (num_inference_steps={n}, num_train_timesteps={T})")
        self.num_inference_steps = n
        self.prk_timesteps, self.plms_timesteps = prk, plms
        self._schedule = schedule
        self.timesteps = torch.from_numpy(schedule.copy()).to(device)
        self._begin_index = None  # a new run starts at the first timestep unless set_begin_index says otherwise
        self._reset()

    # --------------------------------------------------------------------- diffusers' running state
    @property
    def counter(self) -> int:
        """diffusers' counter: the steps taken since the run began (``set_timesteps`` resets it)."""
        return 0 if self._ring is None else len(self._ring.steps)

    @property
    def ets(self) -> list[torch.Tensor]:
        """The stored model outputs, oldest first (copies): the last three of diffusers' ``ets``."""
        if self._ring is None or self._slots is None:
            return []
        held = HISTORY[:min(self._ring.pushes, len(HISTORY))]
        return [self._slots[self._ring.slot(name)].clone() for name in reversed(held)]

    def _plan(self, start: int) -> Iterator[LinearStep]:
        """The steps from timestep index ``start`` on, counted from 0 there as diffusers counts."""
        ets = 0  # len(diffusers' ets) before the step
        for counter, timestep in enumerate(self._schedule[start:].tolist()):
            step = pndm_step(self, counter, ets, timestep)
            if step.push:
                ets = min(ets, PNDM_ORDER - 1) + 1
            yield step

    # --------------------------------------------------------------------- sampling
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, *,
             uncond_model_output: torch.Tensor | None = None, guidance_scale: float = 1.0):
        """x_t -> the next sample: a PRK stage or a PLMS step by diffusers' ``counter`` (one fused launch).

        model_output, sample: (B, C, H, W); ``timestep`` the schedule's next one. Returns
        ``SchedulerOutput(prev_sample)`` or, with ``return_dict=False``, ``(prev_sample,)``.
        ``uncond_model_output`` and ``guidance_scale`` fuse classifier-free guidance into the step.
        """
        if self.num_inference_steps is not None:
            self._follow(timestep)
        return self._linear_step(model_output, timestep, sample, None, return_dict, None, uncond_model_output,
                                 guidance_scale)

    def step_prk(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """``step`` where the next step is a Runge-Kutta stage (diffusers' counter < 12, PRK on)."""
        self._check_phase("step_prk", prk=True)
        return self.step(model_output, timestep, sample, return_dict)

    def step_plms(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """``step`` where the next step is a linear multistep one."""
        self._check_phase("step_plms", prk=False)
        return self.step(model_output, timestep, sample, return_dict)

    def _check_phase(self, method: str, prk: bool) -> None:
        if self.num_inference_steps is None:
            return  # step says so
        if runs_prk(self.counter, len(self.prk_timesteps), self.config.skip_prk_steps) != prk:
            kind = "a Runge-Kutta stage" if not prk else "a linear multistep step"
            raise ValueError(f"{method} called at counter {self.counter}, where the next step is {kind} "
                             f"(skip_prk_steps={self.config.skip_prk_steps}: Runge-Kutta stages are counters "
                             f"0-{len(self.prk_timesteps) - 1 if len(self.prk_timesteps) else 'none'}); call step")

    def _follow(self, timestep) -> None:
        """Check that ``timestep`` is the schedule's next one (the step computes with that one)."""
        if isinstance(timestep, torch.Tensor) and timestep.numel() != 1:
            raise ValueError(f"timestep must be a single integer, got a tensor of shape {tuple(timestep.shape)}")
        validation.timesteps("timestep", timestep, self.config.num_train_timesteps, on_device=False)
        if self._step_index is None:
            self._init_step_index(timestep)
        readable = not isinstance(timestep, torch.Tensor) or timestep.device.type == "cpu"
        index = self._step_index
        if readable and index < len(self._schedule) and int(timestep) != self._schedule[index]:
            raise ValueError(f"timestep {int(timestep)} is not the scheduler's next timestep {self._schedule[index]} "
                             f"(scheduler.timesteps[{index}]): PNDM's steps follow scheduler.timesteps in order; "
                             "to start part-way, call set_begin_index(index) after set_timesteps")

    def _init_step_index(self, timestep) -> None:
        """Where the run starts: the begin index, else the first occurrence of ``timestep`` (a repeated
        timestep's first: the tail that starts there holds both)."""
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        t = int(timestep)
        matches = np.flatnonzero(self._schedule == t)
        if not len(matches):
            raise ValueError(f"timestep {t} is not one of the scheduler's timesteps (scheduler.timesteps)")
        self._step_index = int(matches[0])

    # --------------------------------------------------------------------- training side
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε for per-sample ``timesteps``, as DDPM noises (fused op
        ``q_sample``); no step index is involved."""
        return SchedulerBase.add_noise(self, original_samples, noise, timesteps)

