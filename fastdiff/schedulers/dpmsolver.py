"""DPMSolverMultistepScheduler: the multistep DPM-Solver / DPM-Solver++ samplers, diffusers-compatible.

Lu et al. 2022, "DPM-Solver" (arXiv:2206.00927) and Lu et al. 2022b, "DPM-Solver++"
(arXiv:2211.01095). The exact solution of the diffusion ODE from λ_s to λ_t (h = λ_t − λ_s) is

    noise prediction (DPM-Solver, eq. 3.4):  x_t = (α_t/α_s)·x_s − α_t ∫ e^(−λ) ε̂_λ dλ
    data prediction (DPM-Solver++, Sec. 4): x_t = (σ_t/σ_s)·x_s + σ_t ∫ e^(λ) x̂0_λ dλ

and the k-th order solvers replace the model output by its Taylor expansion in λ, estimated from the
last k converted outputs D0 = c, D1, D2 (backward differences in λ, ``model_differences``;
DPM-Solver++ Algorithm 2 is the second order); the SDE variants (SDE-DPM-Solver(++), DPM-Solver++
Sec. 5) add fresh noise z at each step. Each update is linear in
(x, c, z, m1, m2): one ``LinearStep``, one fused launch (``fastdiff.schedulers.linear``).
"""

from __future__ import annotations

import math
import warnings

import torch

from .. import validation
from .configuration import FrozenDict, register_to_config
from .linear import LinearStep
from .vp_sigmas import (VPMultistepScheduler, check_lambda_min_clipped, check_variance_type, conversion,
                        identity_step, noise_level, weighted)
from .base import SchedulerOutput

DPMSolverMultistepSchedulerOutput = SchedulerOutput

ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")
# what diffusers reads other solvers' option values as (configs cross-load): DEIS, UniPC's solver types
ALGORITHM_ALIASES = {"deis": "dpmsolver++"}
SOLVER_TYPE_ALIASES = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}
LEARNED_VARIANCES = ("learned", "learned_range")


# ----------------------------------------------------------------------------- the equations
def dpm_order(step_index: int, num_steps: int, lower_order_nums: int, solver_order: int, *, lower_order_final: bool,
              euler_at_final: bool, final_sigmas_type: str) -> int:
    """The order diffusers uses at ``step_index`` of ``num_steps``: warm-up (one more order per step
    taken, ``lower_order_nums``), first order at the last step (euler_at_final, lower_order_final
    with fewer than 15 steps, or a final σ of 0), at most second order one step before with
    lower_order_final and fewer than 15 steps."""
    short = lower_order_final and num_steps < 15
    last = step_index == num_steps - 1
    if solver_order == 1 or lower_order_nums < 1 or (last and (euler_at_final or short or final_sigmas_type == "zero")):
        return 1
    if solver_order == 2 or lower_order_nums < 2 or (step_index == num_steps - 2 and short):
        return 2
    return 3


def model_differences(order: int, h: float, h0: float = 0.0, h1: float = 0.0) -> list[dict[str, float]]:
    """D0, D1, D2 of the multistep solvers over (c, m1, m2) (DPM-Solver++ Algorithm 2 and its third-order
    analogue): with r0 = h0/h and r1 = h1/h the ratios of the previous steps' lengths in λ,

        D1_0 = (c − m1)/r0,  D1_1 = (m1 − m2)/r1,  D1 = D1_0 + r0/(r0 + r1)·(D1_0 − D1_1),  D2 = (D1_0 − D1_1)/(r0 + r1)

    (order 2: D1 = D1_0). Written with h/h0 for 1/r0, finite when h = 0."""
    d0 = {"c": 1.0}
    if order == 1:
        return [d0]
    d1_0 = {"c": h / h0, "m1": -h / h0}
    if order == 2:
        return [d0, d1_0]
    d1_1 = {"m1": h / h1, "m2": -h / h1}
    slope = weighted((1.0, d1_0), (-1.0, d1_1))
    return [d0, weighted((1.0, d1_0), (h0 / (h0 + h1), slope)), weighted((h / (h0 + h1), slope))]


def data_prediction_weights(order: int, solver_type: str, h: float, t, s0) -> tuple[float, list[float], float]:
    """DPM-Solver++ (ODE): x_t = (σ_t/σ_s)·x − α_t(e^(−h) − 1)·D0 + w1·D1 + w2·D2, with w1 = −½α_t(e^(−h) − 1)
    (midpoint) or α_t((e^(−h) − 1)/h + 1) (heun, and third order), w2 = −α_t((e^(−h) − 1 + h)/h² − ½).
    Returns (weight of x, weights of D0..D_{order−1}, weight of z)."""
    em = math.expm1(-h)
    weights = [-t.alpha * em]
    if order == 2 and solver_type == "midpoint":
        weights.append(-0.5 * t.alpha * em)
    elif order >= 2:
        weights.append(t.alpha * (em / h + 1.0))
    if order == 3:
        weights.append(-t.alpha * ((em + h) / h**2 - 0.5))
    return t.sigma / s0.sigma, weights, 0.0


def noise_prediction_weights(order: int, solver_type: str, h: float, t, s0) -> tuple[float, list[float], float]:
    """DPM-Solver (ODE): x_t = (α_t/α_s)·x − σ_t(e^h − 1)·D0 + w1·D1 + w2·D2, with w1 = −½σ_t(e^h − 1)
    (midpoint) or −σ_t((e^h − 1)/h − 1) (heun, and third order), w2 = −σ_t((e^h − 1 − h)/h² − ½)."""
    em = math.expm1(h)
    weights = [-t.sigma * em]
    if order == 2 and solver_type == "midpoint":
        weights.append(-0.5 * t.sigma * em)
    elif order >= 2:
        weights.append(-t.sigma * (em / h - 1.0))
    if order == 3:
        weights.append(-t.sigma * ((em - h) / h**2 - 0.5))
    return t.alpha / s0.alpha, weights, 0.0


def sde_data_prediction_weights(order: int, solver_type: str, h: float, t, s0) -> tuple[float, list[float], float]:
    """SDE-DPM-Solver++ (DPM-Solver++ Sec. 5): x_t = (σ_t/σ_s)e^(−h)·x + α_t(1 − e^(−2h))·D0 + w1·D1
    + w2·D2 + σ_t√(1 − e^(−2h))·z, with w1 = ½α_t(1 − e^(−2h)) (midpoint) or α_t((1 − e^(−2h))/(−2h) + 1)
    (heun, and third order), w2 = α_t((1 − e^(−2h) − 2h)/(2h)² − ½). A step up in σ (h < 0 in
    float64: a final σ_min a rounding above a σ family's last σ) adds no noise (diffusers' float32 h is 0)."""
    one_minus = -math.expm1(-2.0 * h)  # 1 − e^(−2h)
    weights = [t.alpha * one_minus]
    if order == 2 and solver_type == "midpoint":
        weights.append(0.5 * t.alpha * one_minus)
    elif order >= 2:
        weights.append(t.alpha * (one_minus / (-2.0 * h) + 1.0))
    if order == 3:
        weights.append(t.alpha * ((one_minus - 2.0 * h) / (2.0 * h) ** 2 - 0.5))
    return t.sigma / s0.sigma * math.exp(-h), weights, t.sigma * math.sqrt(max(one_minus, 0.0))


def sde_noise_prediction_weights(order: int, solver_type: str, h: float, t, s0) -> tuple[float, list[float], float]:
    """SDE-DPM-Solver (DPM-Solver++ Sec. 5, in ε): x_t = (α_t/α_s)·x − 2σ_t(e^h − 1)·D0 + w1·D1
    + σ_t√(e^(2h) − 1)·z, with w1 = −σ_t(e^h − 1) (midpoint) or −2σ_t((e^h − 1)/h − 1) (heun).
    There is no third order (diffusers has none either)."""
    em = math.expm1(h)
    weights = [-2.0 * t.sigma * em]
    if order == 2:
        weights.append(-t.sigma * em if solver_type == "midpoint" else -2.0 * t.sigma * (em / h - 1.0))
    return t.alpha / s0.alpha, weights, t.sigma * math.sqrt(max(math.expm1(2.0 * h), 0.0))


UPDATE_WEIGHTS = {"dpmsolver++": data_prediction_weights, "dpmsolver": noise_prediction_weights,
                  "sde-dpmsolver++": sde_data_prediction_weights, "sde-dpmsolver": sde_noise_prediction_weights}


def dpm_solver_step(sigmas: torch.Tensor, step_index: int, order: int, *, algorithm_type: str, solver_type: str,
                    prediction_type: str, thresholding: bool = False, push: bool = True) -> LinearStep:
    """The step from σ = sigmas[step_index] to sigmas[step_index + 1] at ``order`` (``dpm_order``),
    reading the converted outputs of the ``order − 1`` steps before (m1, m2) and their σ."""
    t, s0 = noise_level(sigmas, step_index + 1), noise_level(sigmas, step_index)
    predicts = "x0" if algorithm_type.endswith("++") else "epsilon"
    convert, reconvert = conversion(prediction_type, predicts, s0, thresholding)
    noisy = algorithm_type.startswith("sde")
    h = t.lam - s0.lam
    if h == 0:
        return identity_step(convert, reconvert, push=push, noise=noisy)
    lambdas = [noise_level(sigmas, step_index - k).lam for k in range(order)]  # λ_s0, λ_s1, λ_s2
    steps = [lambdas[k] - lambdas[k + 1] for k in range(order - 1)]  # h0, h1
    x_weight, d_weights, z_weight = UPDATE_WEIGHTS[algorithm_type](order, solver_type, h, t, s0)
    out = weighted((x_weight, {"x": 1.0}), *zip(d_weights, model_differences(order, h, *steps)))
    if noisy:
        out["z"] = z_weight
    return LinearStep(convert=convert, out=out, reconvert=reconvert, push=push, noise=noisy)


# ----------------------------------------------------------------------------- the scheduler
class DPMSolverMultistepScheduler(VPMultistepScheduler):
    """Multistep DPM-Solver and DPM-Solver++ (arXiv:2206.00927, arXiv:2211.01095).

    Constructor keywords, defaults and outputs are those of ``diffusers.DPMSolverMultistepScheduler``
    (0.42); samples agree with it in float32 for the same model outputs and, for the SDE variants,
    the same generator or ``variance_noise`` (drawn in float32 as diffusers draws it). Each step is one
    fused launch; ``step_tables`` gives the sync-free loop the same steps.

    diffusers' behaviour kept:

    * the step index: from the first ``step``'s timestep (its second occurrence when it appears twice:
      a σ family on the cosine or zero-SNR schedule can repeat the first timestep, and a loop over all
      timesteps then has one call too many, an error) or ``set_begin_index``; the warm-up counts the
      steps taken since ``set_timesteps`` (a run started mid-schedule begins at first order);
    * first order at the last step with ``euler_at_final``, with ``lower_order_final`` and fewer than 15
      steps, and always when ``final_sigmas_type="zero"``; at most second order one step before the
      last with ``lower_order_final`` and fewer than 15 steps;
    * ``algorithm_type`` "dpmsolver" / "sde-dpmsolver" (deprecated in diffusers, FutureWarning here too)
      need ``final_sigmas_type="sigma_min"``; "deis" is read as "dpmsolver++" and ``solver_type``
      "logrho", "bh1", "bh2" as "midpoint" (the config records the replacement), and like diffusers
      "deis" also needs ``final_sigmas_type="sigma_min"`` (diffusers checks the name before replacing it);
    * karras and Lu timesteps are rounded except for ``beta_schedule="squaredcos_cap_v2"``,
      exponential and beta ones truncated; ``lambda_min_clipped`` cuts only the spaced timesteps;
      ``rescale_betas_zero_snr`` sets ᾱ_{T−1} = 2⁻²⁴ so σ_max is finite;
    * ``solver_order=3`` is diffusers' recommendation for unconditional sampling, 2 for guided; both work.

    Deliberate differences:

    * 'trailing' timesteps: diffusers' list can end in an invalid −1 (``schedule.solver_timesteps``); it
      is dropped, so such a run has n steps where diffusers takes n + 1;
    * learned variance (``variance_type`` "learned"/"learned_range"): the first half of the model
      output's channels is the model output, for every prediction type (diffusers takes the first 3
      channels, and only for ε-prediction); other values of DDPM's ``variance_type`` are accepted (configs
      cross-load) and change nothing;
    * a step of length 0 in λ (the last step of a final_sigmas_type="sigma_min" run whose last visited
      σ is σ_min already, e.g. karras σ) is x_next = x, its exact solution (diffusers' third-order and
      heun weights are 0/0 = NaN there); a step up in σ by a rounding (Lu σ on the cosine schedule) adds
      no SDE noise rather than √(negative);
    * refused up front, with a ValueError: more than one of use_karras_sigmas, use_exponential_sigmas,
      use_beta_sigmas, use_lu_lambdas (diffusers lets karras win over Lu silently); solver_order 3 with
      "sde-dpmsolver" (diffusers has no such update and fails at the first third-order step); step
      counts that repeat a noise level (NaN in diffusers); flow-matching options off their defaults;
    * ``beta_schedule`` "sigmoid" and "laplace" work here too; before ``set_timesteps``, ``add_noise``
      uses σ of the given timestep (diffusers' ascending table gives σ_{T−1−t}).
    * ``step`` also takes ``uncond_model_output`` and ``guidance_scale`` (keyword-only): the
      classifier-free guidance combine is fused into the step.

    Numerics: coefficients in float64 from diffusers' float32 σ table, rounded once; the conversions
    keep diffusers' operations (x̂0 = (x − σ·ε̂)/α). Noise prediction ("dpmsolver", "sde-dpmsolver") of
    a sample- or v-predicting model is ill-conditioned in float32 near σ_max (large cancelling weights,
    worst on the cosine and zero-SNR schedules): there fastdiff and diffusers differ by their rounding,
    up to ~1e-2, each as far from the float64 result (tests/test_scheduler_dpmsolver.py).
    """

    noise_dtype = torch.float32  # diffusers draws the SDE noise in float32 whatever the model's dtype
    sigma_families = {"use_karras_sigmas": "karras", "use_lu_lambdas": "lu", "use_exponential_sigmas": "exponential",
                      "use_beta_sigmas": "beta"}
    clips_lambda = True

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
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        validation.one_of("algorithm_type", algorithm_type, (*ALGORITHM_TYPES, *ALGORITHM_ALIASES))
        validation.one_of("solver_type", solver_type, (*SOLVER_TYPES, *SOLVER_TYPE_ALIASES))
        validation.one_of("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        if algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") and final_sigmas_type == "zero":
            raise ValueError(f"final_sigmas_type='zero' is not supported with algorithm_type={algorithm_type!r} "
                             "(as in diffusers); use final_sigmas_type='sigma_min'")
        if algorithm_type in ("dpmsolver", "sde-dpmsolver"):
            warnings.warn(f"algorithm_type={algorithm_type!r} is deprecated in diffusers; use 'dpmsolver++' or "
                          "'sde-dpmsolver++'", FutureWarning, stacklevel=3)
        replaced = {}
        if algorithm_type in ALGORITHM_ALIASES:
            replaced["algorithm_type"] = ALGORITHM_ALIASES[algorithm_type]
        if solver_type in SOLVER_TYPE_ALIASES:
            replaced["solver_type"] = SOLVER_TYPE_ALIASES[solver_type]
        if replaced:  # diffusers' register_to_config(...): the config records what is used
            self._internal_dict = FrozenDict({**self.config, **replaced})
        if validation.integer("solver_order", solver_order, 1, 3) == 3 and algorithm_type == "sde-dpmsolver":
            raise ValueError("solver_order=3 is not supported with algorithm_type='sde-dpmsolver' (there is no "
                             "third-order SDE-DPM-Solver; diffusers fails at its first third-order step); use "
                             "solver_order 1 or 2, or algorithm_type='sde-dpmsolver++'")
        validation.boolean("euler_at_final", euler_at_final)
        check_lambda_min_clipped(lambda_min_clipped)
        check_variance_type(variance_type)
        self._setup_vp()

    def _rounds_family_timesteps(self, family: str) -> bool:
        return family in ("karras", "lu") and self.config.beta_schedule != "squaredcos_cap_v2"

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      mu: float | None = None, timesteps: list[int] | None = None) -> None:
        """The ``num_inference_steps`` timesteps to visit (or the custom descending ``timesteps``) and their σ."""
        self._set_schedule(num_inference_steps, device, timesteps=timesteps, mu=mu)

    # --------------------------------------------------------------------- sampling
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True, *,
             uncond_model_output: torch.Tensor | None = None, guidance_scale: float = 1.0):
        """x_t -> the next sample (diffusers' ``step``); returns ``SchedulerOutput(prev_sample)`` or
        ``(prev_sample,)``. model_output: (B, C, ...) or, with a learned variance, (B, 2C, ...)."""
        model_output, uncond_model_output = self._mean_half(model_output, sample, uncond_model_output)
        return self._linear_step(model_output, timestep, sample, generator, return_dict, variance_noise,
                                 uncond_model_output, guidance_scale)

    def _update(self, model_output, sample, row, noise=None, slots=None, *, uncond_model_output=None,
                guidance_scale=1.0, **options):
        model_output, uncond_model_output = self._mean_half(model_output, sample, uncond_model_output)
        return super()._update(model_output, sample, row, noise, slots, uncond_model_output=uncond_model_output,
                               guidance_scale=guidance_scale, **options)

    def _mean_half(self, model_output, sample, uncond_model_output=None):
        """With a learned variance the model output's first half of channels (a view: the op reads it in place)."""
        if self.config.variance_type not in LEARNED_VARIANCES:
            return model_output, uncond_model_output
        validation.tensor("model_output", model_output, floating=True)
        validation.tensor("sample", sample, floating=True)
        channels = sample.shape[1]
        if model_output.ndim != sample.ndim or model_output.shape[1] != 2 * channels:
            raise ValueError(f"variance_type={self.config.variance_type!r} needs a model output with twice the "
                             f"sample's {channels} channels (mean, variance), got shape {tuple(model_output.shape)}")
        halves = [m if m is None or m.shape[1] != 2 * channels else m[:, :channels]
                  for m in (model_output, uncond_model_output)]
        return halves[0], halves[1]

    def _plan(self, start: int):
        config, num_steps = self.config, len(self.timesteps)
        lower_order_nums = 0  # steps taken in this run, capped at the order: the warm-up
        for i in range(start, num_steps):
            order = dpm_order(i, num_steps, lower_order_nums, config.solver_order,
                              lower_order_final=config.lower_order_final, euler_at_final=config.euler_at_final,
                              final_sigmas_type=config.final_sigmas_type)
            yield dpm_solver_step(self.sigmas, i, order, algorithm_type=config.algorithm_type,
                                  solver_type=config.solver_type, prediction_type=config.prediction_type,
                                  thresholding=config.thresholding,
                                  push=config.solver_order > 1 and i + 1 < num_steps)
            lower_order_nums = min(lower_order_nums + 1, config.solver_order)
