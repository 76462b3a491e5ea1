"""UniPCMultistepScheduler: the unified predictor-corrector sampler of Zhao et al. 2023, diffusers-compatible.

UniPC (arXiv:2302.04867) integrates the same exact solution as DPM-Solver(++) (vp_sigmas, Lu et al.
2022 eq. 3.4) in x0 (``predict_x0``) or ε. With hh = −h (x0) or h (ε), h = λ_t − λ_s, the
predictor UniP-p and the corrector UniC-p (Sec. 3, Algorithms 1-2; B(h) = hh for bh1, e^hh − 1 for bh2) are

    x_t = A·x_s − K·(e^hh − 1)·m0 − K·B(h)·Σ_k ρ_k·D1_k,     D1_k = (m_k − m0)/r_k,  r_k = (λ_{s_k} − λ_s)/h

with (A, K) = (σ_t/σ_s, α_t) in x0 or (α_t/α_s, σ_t) in ε, m0 the converted output at s and m_k those
k steps before; the corrector adds the new output at t as one more D1 (r = 1) and solves for one
more ρ (``uni_rhos``). diffusers runs, at step i: convert the model output with the sample it was
given, correct that sample with UniC (from the previous step's input sample, "last"), then predict
from the corrected sample with UniP. Both are linear in (last, c, m1, m2, m3), so a step is one
``LinearStep``: the predictor with the corrector substituted for its input (``unipc_step``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import validation
from .base import SchedulerOutput
from .configuration import FrozenDict, register_to_config
from .linear import LinearStep
from .vp_sigmas import VPMultistepScheduler, conversion, noise_level, weighted

UniPCMultistepSchedulerOutput = SchedulerOutput

SOLVER_TYPES = ("bh1", "bh2")
# DPM-Solver's solver types, read as bh2 (configs cross-load), as in diffusers
SOLVER_TYPE_ALIASES = {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}


# ----------------------------------------------------------------------------- the equations
def unipc_order(step_index: int, num_steps: int, lower_order_nums: int, solver_order: int, *,
                lower_order_final: bool, to_zero: bool = False) -> int:
    """The predictor's order at ``step_index`` (diffusers' ``this_order``): the configured order, at
    most the steps left with ``lower_order_final``, at most one more than the steps taken (warm-up).
    ``to_zero``: the step ends at σ = 0, where only the first order is finite (see the class notes)."""
    order = min(solver_order, num_steps - step_index) if lower_order_final else solver_order
    return 1 if to_zero else min(order, lower_order_nums + 1)


def b_of_h(hh: float, solver_type: str) -> float:
    """B(h) of UniPC's two variants: B1(h) = h (bh1), B2(h) = e^h − 1 (bh2)."""
    return hh if solver_type == "bh1" else math.expm1(hh)


def uni_rhos(rks: list[float], hh: float, solver_type: str) -> np.ndarray:
    """ρ of UniP-p (rks = r_1..r_{p−1}) or UniC-p (rks = r_1..r_{p−1}, then 1 for the new output): the
    solution of R·ρ = b with R_ij = r_j^(i−1) and b_i = i!·φ_{i+1}(hh)·hh/B(h) (the φ-functions of
    exponential integrators, by their recurrence), in float64. One unknown (UniP-2, UniC-1): diffusers'
    fixed ρ = ½."""
    size = len(rks)
    if size == 1:  # UniP-2 (one earlier output) or UniC-1 (the new output only)
        return np.array([0.5])
    b_h = b_of_h(hh, solver_type)
    h_phi_k, factorial, b = math.expm1(hh) / hh - 1.0, 1, []
    for i in range(1, size + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R = np.array([[r ** (i - 1) for r in rks] for i in range(1, size + 1)], dtype=np.float64)
    return np.linalg.solve(R, np.array(b, dtype=np.float64))


def uni_bh_update(t, s0, history, m0: str, x: str, order: int, *, predict_x0: bool, solver_type: str,
                  new_output: str | None = None) -> dict[str, float]:
    """x_t of UniP-``order`` (``new_output`` None) or UniC-``order`` (the converted output at t named
    ``new_output``) as coefficients over the named inputs: ``x`` the sample at s0, ``m0`` the converted
    output at s0, ``history`` [(level, name)] of the ``order − 1`` outputs before it, newest first."""
    h = t.lam - s0.lam
    hh = -h if predict_x0 else h
    if predict_x0:
        x_weight, scale, m0_weight = t.sigma / s0.sigma, t.alpha, -t.alpha * math.expm1(hh)
    else:  # −σ_t(e^h − 1), written α_t·σ_s/α_s's way so that it stays finite at σ_t = 0 (h = ∞)
        x_weight, scale, m0_weight = t.alpha / s0.alpha, t.sigma, t.sigma - t.alpha * s0.sigma / s0.alpha
    out = {x: x_weight, m0: m0_weight}
    terms = [((level.lam - s0.lam) / h, name) for level, name in history[:order - 1]]
    if new_output is not None:
        terms.append((1.0, new_output))
    if terms:
        rhos = uni_rhos([r for r, _ in terms], hh, solver_type)
        k = -scale * b_of_h(hh, solver_type)
        out = weighted((1.0, out), *((k * rho / r, {name: 1.0, m0: -1.0}) for rho, (r, name) in zip(rhos, terms)))
    return out


def unipc_step(sigmas: torch.Tensor, step_index: int, order: int, corrector_order: int | None, *, predict_x0: bool,
               solver_type: str, prediction_type: str, thresholding: bool = False, sets_last: bool = True,
               push: bool = True) -> LinearStep:
    """Step ``step_index`` of UniPC as one ``LinearStep``: c = the model output converted with the
    given sample x and σ_i; the corrected sample x^c = UniC-``corrector_order`` from σ_{i−1} (x^c over
    last = x^c_{i−1}, m1 = c_{i−1}, m2, m3 and c; None: no correction, x^c = x); x_next = UniP-``order``
    from x^c at σ_i to σ_{i+1} over (x^c, c, m1, m2). ``sets_last``: store x^c for the next corrector."""
    t, s0 = noise_level(sigmas, step_index + 1), noise_level(sigmas, step_index)
    convert, reconvert = conversion(prediction_type, "x0" if predict_x0 else "epsilon", s0, thresholding)
    options = dict(predict_x0=predict_x0, solver_type=solver_type)
    corrected = {"x": 1.0}
    if corrector_order is not None:  # UniC: from σ_{i−1} (m0 = c_{i−1} = m1) to σ_i, with c the new output
        history = [(noise_level(sigmas, step_index - 1 - k), f"m{k + 1}") for k in range(1, corrector_order)]
        corrected = uni_bh_update(s0, noise_level(sigmas, step_index - 1), history, "m1", "last", corrector_order,
                                  new_output="c", **options)
    last = corrected if sets_last else None
    if t.lam == s0.lam:  # h = 0: the exact solution is x^c itself
        return LinearStep(convert=convert, out=dict(corrected), reconvert=reconvert, last=last, push=push)
    history = [(noise_level(sigmas, step_index - k), f"m{k}") for k in range(1, order)]
    predicted = uni_bh_update(t, s0, history, "c", "x", order, **options)
    x_weight = predicted.pop("x")
    out = weighted((x_weight, corrected), (1.0, predicted))
    return LinearStep(convert=convert, out=out, reconvert=reconvert, last=last, push=push)


# ----------------------------------------------------------------------------- the scheduler
class UniPCMultistepScheduler(VPMultistepScheduler):
    """UniPC: unified predictor-corrector multistep sampling (arXiv:2302.04867).

    Constructor keywords, defaults and outputs are those of ``diffusers.UniPCMultistepScheduler``
    (0.42); samples agree with it in float32 for the same model outputs. Each step (corrector and
    predictor together) is one fused launch; ``step_tables`` gives the sync-free loop the same steps.

    diffusers' behaviour kept:

    * the model output is converted with the sample ``step`` is given (the uncorrected one); the
      corrector after step i uses the predictor order of step i; ``disable_corrector`` lists steps
      whose predictions are not corrected (the corrector at step i + 1 is skipped for i in it);
    * the first step of a run (step index 0, or the first after ``set_begin_index``) is not corrected;
      the warm-up counts the steps taken since ``set_timesteps``; ``lower_order_final`` lowers the order
      to the steps left; UniP-2 and UniC-1 use the fixed ρ = ½;
    * karras timesteps are rounded, exponential and beta ones truncated; with final_sigmas_type=
      "sigma_min" after a σ family the final σ is the family's last one; ``sigma_min``/``sigma_max``
      bound the σ families; ``rescale_betas_zero_snr`` sets ᾱ_{T−1} = 2⁻²⁴; ``solver_type``
      "midpoint", "heun", "logrho" are read as "bh2" (the config records the replacement).

    Deliberate differences (where diffusers' result is NaN, or an option cannot work):

    * the last step into σ = 0 (final_sigmas_type="zero") is first order, computed in its finite
      form: x_next = x̂0. diffusers multiplies ∞ by 0 there and returns NaN with solver_type="bh1",
      with predict_x0=False, and with lower_order_final=False (its higher orders diverge at σ = 0);
    * a step of length 0 in λ (the last step of a final_sigmas_type="sigma_min" run whose last visited
      σ is σ_min already) is x_next = x^c, its exact solution;
    * 'trailing' timesteps: diffusers' invalid trailing −1 is dropped (``schedule.solver_timesteps``);
    * refused with a ValueError: ``solver_p`` other than None (a second scheduler as predictor is not
      supported), thresholding with predict_x0=False (diffusers ignores it silently), solver_order
      above 3 (the history holds three outputs), more than one σ family, step counts that repeat a
      noise level, flow-matching options off their defaults and custom ``sigmas`` (flow-only);
    * ``beta_schedule`` "sigmoid" and "laplace" work here too; before ``set_timesteps``, ``add_noise``
      uses σ of the given timestep (diffusers' ascending table gives σ_{T−1−t});
    * ``step`` also takes ``uncond_model_output`` and ``guidance_scale`` (keyword-only): the
      classifier-free guidance combine is fused into the step.
    """

    final_from_family = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] = (),
        solver_p=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        shift_terminal: float | None = None,
    ):
        validation.one_of("solver_type", solver_type, (*SOLVER_TYPES, *SOLVER_TYPE_ALIASES))
        if solver_type in SOLVER_TYPE_ALIASES:  # diffusers' register_to_config(solver_type="bh2")
            self._internal_dict = FrozenDict({**self.config, "solver_type": SOLVER_TYPE_ALIASES[solver_type]})
        if solver_p is not None:
            raise ValueError(f"solver_p={type(solver_p).__name__} is not supported by fastdiff (a second scheduler "
                             "as the predictor); leave solver_p=None")
        if validation.boolean("thresholding", thresholding) and not validation.boolean("predict_x0", predict_x0):
            raise ValueError("thresholding=True needs predict_x0=True (it thresholds x̂0; diffusers ignores it "
                             "when predict_x0=False)")
        validation.boolean("predict_x0", predict_x0)
        if isinstance(disable_corrector, (str, bytes)) or not hasattr(disable_corrector, "__iter__"):
            raise TypeError(f"disable_corrector must be a list of step indices, got {type(disable_corrector).__name__}")
        self.disable_corrector = frozenset(validation.integer("disable_corrector", i, 0) for i in disable_corrector)
        for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
            if value is not None:
                validation.real(name, value, 0, min_open=True)
        if sigma_min is not None and sigma_max is not None and sigma_min >= sigma_max:
            raise ValueError(f"sigma_min must be below sigma_max, got {sigma_min} >= {sigma_max}")
        self._setup_vp()

    @property
    def predict_x0(self) -> bool:
        return self.config.predict_x0

    def _rounds_family_timesteps(self, family: str) -> bool:
        return family == "karras"

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | None = None, mu: float | None = None) -> None:
        """The ``num_inference_steps`` timesteps to visit and their σ (custom ``sigmas``: flow models only)."""
        if sigmas is not None:
            raise ValueError("custom sigmas are only for flow-matching models in diffusers, not supported by fastdiff")
        self._set_schedule(num_inference_steps, device, mu=mu)

    # --------------------------------------------------------------------- sampling
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, *,
             uncond_model_output: torch.Tensor | None = None, guidance_scale: float = 1.0):
        """x_t -> the next sample (diffusers' ``step``: corrector, then predictor); returns
        ``SchedulerOutput(prev_sample)`` or ``(prev_sample,)``."""
        return self._linear_step(model_output, timestep, sample, None, return_dict, None, uncond_model_output,
                                 guidance_scale)

    def _plan(self, start: int):
        config, num_steps = self.config, len(self.timesteps)
        lower_order_nums, previous_order = 0, None  # the warm-up; the order of the step before (None: first)
        for i in range(start, num_steps):
            corrects = previous_order is not None and i - 1 not in self.disable_corrector
            order = unipc_order(i, num_steps, lower_order_nums, config.solver_order,
                                lower_order_final=config.lower_order_final, to_zero=bool(self.sigmas[i + 1] == 0))
            yield unipc_step(self.sigmas, i, order, previous_order if corrects else None, predict_x0=config.predict_x0,
                             solver_type=config.solver_type, prediction_type=config.prediction_type,
                             thresholding=config.thresholding,
                             sets_last=i + 1 < num_steps and i not in self.disable_corrector, push=i + 1 < num_steps)
            lower_order_nums, previous_order = min(lower_order_nums + 1, config.solver_order), order
