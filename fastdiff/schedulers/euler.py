"""EulerDiscreteScheduler, and what it shares with EulerAncestralDiscreteScheduler (euler_ancestral.py).

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
(arXiv:2206.00364), treat a variance-preserving model in the variance-exploding form
x = x0 + σ·ε, σ = √((1 − ᾱ)/ᾱ), whose sample is √(σ² + 1) times the VP one (Sec. 2, Table 1). The
U-Net sees c_in·x, c_in = 1/√(σ² + 1); the denoiser is D(x; σ) = c_skip·x + c_out·F(c_in·x); and
one step of the probability-flow ODE dx/dσ = (x − D(x; σ))/σ (eqs. 1 and 3 with σ(t) = t), with
the optional "churn" of their stochastic sampler (Algorithm 2), is

    σ̂ = (1 + γ)·σ,   x̂ = x + √(σ̂² − σ²)·S_noise·z            churn: raise the noise level to σ̂
    x_next = x̂ + (σ_next − σ̂)·(x̂ − D(x̂; σ̂))/σ̂              Euler (Algorithm 2 without its 2nd-order step)

Every step is linear in (x, m, z) (m: the model output): the functions below write each equation
once, from plain numbers to a ``LinearStep`` (``fastdiff.schedulers.linear``) whose conversion
c = (a·x + b·m + e·z)/d is x̂0 = D(x̂; σ̂) and whose output is x_next = Σ out·(x, c, z);
``ops.multistep_update`` runs it in one launch. The coefficients are computed in float64 from the
float32 σ's diffusers holds and rounded to float32 once, when the step is packed.
"""

from __future__ import annotations

import importlib.util
import math
import numbers

import numpy as np
import torch

from .. import validation
from .base import SchedulerOutput
from .configuration import register_to_config
from .linear import LinearStep
from .schedule import euler_timesteps, respaced_sigmas, sigma_to_t, train_sigmas
from .solver import LinearScheduler

EulerDiscreteSchedulerOutput = SchedulerOutput

INTERPOLATION_TYPES = ("linear", "log_linear")
TIMESTEP_TYPES = ("discrete", "continuous")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
SIGMA_FAMILY_FLAGS = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential",
                      "use_beta_sigmas": "beta"}
MAX_GAMMA = 2**0.5 - 1  # γ ≤ √2 − 1: churn at most doubles the noise variance (Karras et al. 2022, Algorithm 2)


# ----------------------------------------------------------------------------- the equations
def input_scale(sigma: float) -> float:
    """c_in = 1/√(σ² + 1): the U-Net sees the VP sample x/√(σ² + 1) (Karras et al. 2022, Table 1)."""
    return 1.0 / math.sqrt(sigma * sigma + 1.0)


def churn_gamma(sigma: float, s_churn: float, s_tmin: float, s_tmax: float, num_steps: int) -> float:
    """γ_i = min(S_churn/N, √2 − 1) where S_tmin ≤ σ_i ≤ S_tmax, else 0 (Karras et al. 2022,
    Algorithm 2). N is diffusers' len(sigmas) − 1, and the bounds are compared with σ in
    float32, as diffusers compares them (a float32 tensor against Python floats)."""
    with np.errstate(over="ignore"):  # a huge finite bound rounds to ±inf in float32, as in torch
        inside = np.float32(s_tmin) <= np.float32(sigma) <= np.float32(s_tmax)
    return min(s_churn / num_steps, MAX_GAMMA) if inside else 0.0


def churned_sigma(sigma: float, gamma: float) -> float:
    """σ̂ = (γ + 1)·σ (Algorithm 2), rounded to float32: diffusers holds σ̂ as a float32 tensor."""
    return float(np.float32(sigma) * np.float32(gamma + 1))


def denoiser(prediction_type: str, sigma: float, sigma_hat: float, noise_scale: float = 0.0):
    """x̂0 = D(x̂; σ̂) as (a, b, e, d) of c = (a·x + b·m + e·z)/d, where x̂ = x + noise_scale·z:

    epsilon       x̂ − σ̂·m                       c_skip = 1, c_out = −σ̂ (Table 1, VP column)
    v_prediction  (x̂ − σ·√(σ² + 1)·m)/(σ² + 1)   c_skip = 1/(σ² + 1), c_out = −σ/√(σ² + 1) (Table 1's
                                                 EDM column with σ_data = 1 and F = −v)
    sample        m

    v_prediction takes σ, not σ̂ (diffusers' rule, kept), and divides by σ² + 1 where diffusers does.
    """
    if prediction_type == "epsilon":
        return (1.0, -sigma_hat, noise_scale, 1.0)
    if prediction_type == "v_prediction":
        return (1.0, -sigma * math.sqrt(sigma * sigma + 1.0), noise_scale, sigma * sigma + 1.0)
    return (0.0, 1.0, 0.0, 1.0)


def euler_step(sigma: float, sigma_next: float, prediction_type: str, gamma: float = 0.0,
               s_noise: float = 1.0) -> LinearStep:
    """One (churned) Euler step σ → σ_next (Karras et al. 2022, Algorithm 2 without its 2nd-order step):
    x_next = x̂ + (σ_next − σ̂)·(x̂ − x̂0)/σ̂ = r·x̂ + (1 − r)·x̂0 with r = σ_next/σ̂, x̂ = x + k·z,
    k = S_noise·√(σ̂² − σ²); z is drawn only when γ > 0."""
    sigma_hat = churned_sigma(sigma, gamma)
    churned = gamma > 0
    noise_scale = s_noise * math.sqrt(sigma_hat * sigma_hat - sigma * sigma) if churned else 0.0
    ratio = sigma_next / sigma_hat
    out = {"x": ratio, "c": 1.0 - ratio}
    if churned:
        out["z"] = ratio * noise_scale
    return LinearStep(convert=denoiser(prediction_type, sigma, sigma_hat, noise_scale), out=out, noise=churned,
                      input_scale=input_scale(sigma))


# ----------------------------------------------------------------------------- σ tables
def linear_sigmas(train: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """σ at (fractional) ``timesteps``, linear in t between the training σ's (float64, as np.interp)."""
    return np.interp(timesteps, np.arange(0, len(train)), train)


def log_linear_sigmas(train: np.ndarray, n: int) -> np.ndarray:
    """n + 1 σ evenly spaced in log σ from σ_{T−1} down to σ_0, float32 (diffusers' torch.linspace)."""
    return torch.linspace(float(np.log(train[-1])), float(np.log(train[0])), n + 1).exp().numpy()


def continuous_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
    """EDM's noise conditioning c_noise = ¼·ln σ (Karras et al. 2022, Table 1), float32: the
    timesteps of timestep_type='continuous' with v_prediction."""
    return 0.25 * sigmas.log()


def _descending(argument: str, values, minimum: float, maximum: float | None = None, *,
                size: int = 1) -> np.ndarray:
    """A 1-D list of at least ``size`` finite reals, strictly descending, within [minimum, maximum]."""
    try:
        array = np.asarray(values)
    except (TypeError, ValueError):  # ragged lists
        array = np.asarray(None)
    if array.dtype.kind not in "iuf" and not (array.size == 0 and array.dtype.kind == "f"):
        raise TypeError(f"{argument} must be a list of numbers, got {type(values).__name__} {values!r}")
    array = array.astype(np.float64)
    if array.ndim != 1 or len(array) < size:
        raise ValueError(f"{argument} must be a 1-D list of at least {size} numbers, got shape {array.shape}")
    if not np.isfinite(array).all() or array.min() < minimum or (maximum is not None and array.max() > maximum):
        raise ValueError(f"{argument} must be finite and in [{minimum}, {'∞' if maximum is None else maximum}], "
                         f"got values in [{array.min()}, {array.max()}]")
    if np.any(array[1:] >= array[:-1]):
        raise ValueError(f"{argument} must be strictly descending, got {array.tolist()}")
    return array


def churn_options(s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0) -> dict:
    """``step``'s churn keywords, checked: S_churn ≥ 0, S_noise ≥ 0 finite, S_tmin and S_tmax reals or ±∞."""
    def bound(argument, value):
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isinf(value):
            return float(value)
        return validation.real(argument, value)

    return {"s_churn": validation.real("s_churn", s_churn, 0), "s_tmin": bound("s_tmin", s_tmin),
            "s_tmax": bound("s_tmax", s_tmax), "s_noise": validation.real("s_noise", s_noise, 0)}


# ----------------------------------------------------------------------------- the shared scheduler
class EulerSchedulerBase(LinearScheduler):
    """What the Euler schedulers share: the σ tables, the U-Net input scale, VE noising, and a step
    that upcasts the sample to float32 and returns the model output's dtype, as diffusers does.

    ``self.sigmas`` (float32, CPU) holds one σ more than ``self.timesteps``: σ_i is the σ of step i,
    the last one the σ the last step ends at.
    """

    returns_pred_original = True
    restartable = True  # no state between steps: step's options may change from call to call
    memory = False  # no history: no slot buffers

    def _setup_sigmas(self) -> None:
        """Shared tables, then the state before set_timesteps (diffusers'): every training σ, descending."""
        self._setup(self.config)
        if self.config.rescale_betas_zero_snr:
            # ᾱ_{T−1} = 0 would make σ_max infinite: diffusers' 2⁻²⁴ (fp16's smallest subnormal)
            self.alphas_cumprod[-1] = 2**-24
        T = self.config.num_train_timesteps
        sigmas = np.concatenate([train_sigmas(self.alphas_cumprod)[::-1], [0.0]]).astype(np.float32)
        timesteps = np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy()
        self._use_tables(timesteps, torch.from_numpy(sigmas))

    def _model_timesteps(self, timesteps: np.ndarray, sigmas: torch.Tensor) -> torch.Tensor:
        """What the model is told at each step: the timesteps themselves (float32)."""
        return torch.from_numpy(np.asarray(timesteps).astype(np.float32))

    def _use_tables(self, timesteps: np.ndarray, sigmas: torch.Tensor, device=None) -> None:
        """Start a new run on ``sigmas`` (float32, kept on the CPU) and the model timesteps of
        ``timesteps`` (float32, on ``device``). A σ past the one the last step ends at (diffusers'
        log_linear lists one) is never read: dropped."""
        timesteps = self._model_timesteps(timesteps, sigmas)
        self.timesteps = timesteps.to(device=device)
        self.sigmas = sigmas[:len(timesteps) + 1].to(device="cpu", dtype=torch.float32)
        self._reset()

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """The initial noise's scale: σ_max, or √(σ_max² + 1) with 'leading' spacing (diffusers' rule)."""
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    def _input_scale(self, index: int) -> float:
        """c_in of step ``index`` rounded to float32: the value of the step's row (linear.INPUT_SCALE)."""
        return float(np.float32(input_scale(float(self.sigmas[index]))))

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The U-Net's input c_in·x, c_in = 1/√(σ² + 1) at the current step (found from ``timestep``
        as ``step`` finds it, if no step ran yet)."""
        validation.tensor("sample", sample, floating=True)
        if self._step_index is None:
            self._check_timestep(timestep)
            self._init_step_index(timestep)
        return sample * self._input_scale(self._step_index)

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """The step index of ``timestep`` (diffusers' rule, ``LinearScheduler.index_for_timestep``);
        a timestep that is not in the schedule is an error."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        if not bool((schedule == torch.as_tensor(timestep, device=schedule.device)).any()):
            raise ValueError(f"timestep {float(timestep):g} is not one of the scheduler's timesteps; pass the "
                             "values of scheduler.timesteps")
        return super().index_for_timestep(timestep, schedule)

    def _check_timestep(self, timestep) -> None:
        """A timestep is a value of ``self.timesteps`` (float), never an integer step index (diffusers' rule)."""
        if isinstance(timestep, numbers.Integral) or (isinstance(timestep, torch.Tensor) and not
                                                      timestep.is_floating_point()):
            raise ValueError(f"timestep must be one of scheduler.timesteps (floats), got the integer {timestep!r}; "
                             "an index from enumerate(timesteps) is not a timestep")
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"timestep must be a single value, got a tensor of shape {tuple(timestep.shape)}")
        else:
            validation.real("timestep", timestep)

    def _euler_step(self, model_output, timestep, sample, generator, return_dict, variance_noise,
                    uncond_model_output, guidance_scale, **options):
        """``_linear_step`` on the float32 sample; x_next in the model output's dtype (diffusers')."""
        self._check_timestep(timestep)
        validation.tensor("sample", sample, floating=True)
        out = self._linear_step(model_output, timestep, sample.to(torch.float32), generator, True, variance_noise,
                                uncond_model_output, guidance_scale, **options)
        prev_sample = out.prev_sample.to(model_output.dtype)
        if not return_dict:
            return prev_sample, out.pred_original_sample
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=out.pred_original_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x = x0 + σ·ε, the VE form (Karras et al. 2022, Sec. 2), σ at each timestep's step index
        (diffusers' rule: the begin index, the current step index, or the timestep's position)."""
        sigma = self._noising_sigmas(original_samples, timesteps)
        validation.tensor("noise", noise, floating=True)
        if noise.shape != original_samples.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected original_samples' shape "
                             f"{tuple(original_samples.shape)}")
        return original_samples + noise * sigma

    def _spaced_schedule(self, num_inference_steps) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps float32, σ float64) of ``num_inference_steps`` steps spaced by the config, σ
        interpolated linearly in t; diffusers' trailing −1 is dropped (``schedule.euler_timesteps``)."""
        config = self.config
        n = validation.integer("num_inference_steps", num_inference_steps, 1, config.num_train_timesteps)
        timesteps = euler_timesteps(config.num_train_timesteps, n, config.timestep_spacing, config.steps_offset)
        return timesteps, linear_sigmas(train_sigmas(self.alphas_cumprod), timesteps)


class EulerDiscreteScheduler(EulerSchedulerBase):
    """Euler's method on the probability-flow ODE in σ, with optional churn (Karras et al. 2022,
    arXiv:2206.00364, Algorithm 2 without its second-order correction).

    Constructor keywords, defaults and outputs are those of ``diffusers.EulerDiscreteScheduler``
    (0.42). For the same generator, float32 sampling loops agree with diffusers' equations (run in
    float64) to < 1e-6 relative, and with diffusers' float32 run to < 1e-5 wherever that run is
    itself accurate: a step from a large σ to a small one with an O(1) x̂0 (v_prediction or sample
    from σ_max ≈ 157 and up) costs diffusers' x + (x − x̂0)/σ̂·(σ_next − σ̂) ~eps·|x| of cancellation
    (up to 1e-3 of the result); fastdiff's r·x + (1 − r)·x̂0 has none. ``step`` returns
    (prev_sample, pred_original_sample).

    diffusers' rules, kept:

    * ``init_noise_sigma`` is σ_max for 'linspace' and 'trailing' spacing, √(σ_max² + 1) for 'leading'.
    * ``step`` computes on the sample upcast to float32 and returns prev_sample in the model output's
      dtype; pred_original_sample is float32.
    * The first step's index is the position of its timestep (the second one if it occurs twice),
      or ``begin_index`` when set; the index then advances by one per ``step``.
    * With churn, v_prediction's scalings take σ, not σ̂; γ = min(S_churn/N, √2 − 1) with N = the
      length of diffusers' σ list − 1 (one more than the steps with 'log_linear'); S_tmin ≤ σ ≤ S_tmax
      is compared in float32; noise is drawn (``randn_tensor``, the model output's dtype) on the
      steps with γ > 0 only.
    * interpolation_type='log_linear' spaces n + 1 σ's in log σ from σ_max to σ_0 while the timesteps
      keep their spacing: the last step ends at σ_0 (final_sigmas_type has no effect); diffusers'
      trailing σ after it, never read, is dropped. With timestep_type='continuous' and
      v_prediction, the timesteps are ¼·ln σ (EDM's c_noise), n + 1 of them with 'log_linear'.
    * A σ family (Karras, exponential, beta) spans σ_min..σ_max (the config's, else the ends of the
      interpolated σ's) and its timesteps are the fractional ones ``schedule.sigma_to_t`` finds;
      timesteps are float32 and go to the model as such.
    * ``set_timesteps(sigmas=...)`` takes the whole σ list, final σ included (no family, final σ or
      interpolation applied); ``timesteps=`` is refused with a σ family or continuous v_prediction.
    * rescale_betas_zero_snr sets ᾱ_{T−1} = 2⁻²⁴ so σ_max stays finite (4096).
    * Before ``set_timesteps``, ``timesteps``/``sigmas`` are the whole training schedule.

    Deliberate differences:

    * 'trailing' spacing: diffusers' list has an extra, invalid timestep −1 for some (T, n) (T=1000,
      n=61): dropped, as ``schedule.euler_timesteps`` does, so the loop has n steps (with a σ family
      σ_min then comes from the last valid timestep, where diffusers' comes from t = −1 ≡ σ_0).
    * ``step`` before ``set_timesteps``, a timestep not in ``timesteps`` (diffusers: IndexError) and
      an integer timestep (as diffusers) are ValueErrors; custom timesteps must be strictly
      descending in [0, T − 1], custom σ's strictly descending and ≥ 0; num_inference_steps in [1, T].
    * Coefficients are computed in float64 from the float32 σ's and rounded once (diffusers rounds
      every operation to float32); ``scale_model_input`` multiplies by c_in rounded to float32
      (diffusers divides by √(σ² + 1); ≤ 1 ulp apart), the factor the sync-free loop uses too.
    * beta_schedule 'sigmoid' and 'laplace' work (diffusers' Euler rejects them); diffusers' legacy
      prediction_type 'original_sample' is refused (use 'sample'), and so is None for a σ-family
      flag (diffusers types them ``bool | None``, then fails on None); no warning when
      ``scale_model_input`` was not called.
    * ``step`` also takes ``uncond_model_output`` and ``guidance_scale`` (fused classifier-free
      guidance) and ``variance_noise`` (the churn noise), keyword-only.
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
        interpolation_type: str = "linear",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        self.sigma_family = sigma_family(self.config)
        validation.one_of("interpolation_type", interpolation_type, INTERPOLATION_TYPES)
        validation.one_of("timestep_type", timestep_type, TIMESTEP_TYPES)
        validation.one_of("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
        self._setup_sigmas()
        self._churn_steps = len(self.sigmas) - 1  # N of γ = S_churn/N: diffusers' len(sigmas) − 1

    def _model_timesteps(self, timesteps: np.ndarray, sigmas: torch.Tensor) -> torch.Tensor:
        """The timesteps, or ¼·ln σ with timestep_type='continuous' (diffusers: for v_prediction only)."""
        if self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction":
            return continuous_timesteps(sigmas[:-1])
        return super()._model_timesteps(timesteps, sigmas)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[float] | None = None, sigmas: list[float] | None = None) -> None:
        """The schedule of ``num_inference_steps`` steps, or of the descending ``timesteps`` (σ
        interpolated), or of the descending ``sigmas`` (the final σ included; timesteps from σ)."""
        given = [name for name, value in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                          ("sigmas", sigmas)) if value is not None]
        if len(given) != 1:
            raise ValueError(f"pass exactly one of num_inference_steps, timesteps or sigmas, got {given or 'none'}")
        train = train_sigmas(self.alphas_cumprod)
        if sigmas is not None:
            sigmas = _descending("sigmas", sigmas, 0.0, size=2).astype(np.float32)
            timesteps, steps = sigma_to_t(sigmas[:-1], np.log(train)), len(sigmas) - 1
        else:
            if timesteps is not None:
                self._check_custom_timesteps()
                timesteps = _descending("timesteps", timesteps, 0, self.config.num_train_timesteps - 1)
                timesteps = timesteps.astype(np.float32)
                steps, sigmas = len(timesteps), linear_sigmas(train, timesteps)
            else:
                timesteps, sigmas = self._spaced_schedule(num_inference_steps)
                steps = int(num_inference_steps)
            timesteps, sigmas = self._respaced(train, timesteps, sigmas)
        self.num_inference_steps = steps
        self._churn_steps = len(sigmas) - 1
        self._use_tables(timesteps, torch.from_numpy(sigmas), device)

    def _respaced(self, train: np.ndarray, timesteps: np.ndarray, sigmas: np.ndarray):
        """(timesteps, σ float32 with the final σ) from the interpolated σ's: log-linear σ's, a σ
        family (its timesteps found from σ), then the final σ (0, or σ_0 with 'sigma_min')."""
        config, n = self.config, len(timesteps)
        if config.interpolation_type == "log_linear":
            sigmas = log_linear_sigmas(train, n)
        if self.sigma_family is not None:
            sigmas = respaced_sigmas(self.sigma_family, sigmas, n, config.sigma_min, config.sigma_max)
            timesteps = sigma_to_t(sigmas, np.log(train))
        final = train[0] if config.final_sigmas_type == "sigma_min" else 0.0
        return timesteps, np.concatenate([sigmas, [final]]).astype(np.float32)

    def _check_custom_timesteps(self) -> None:
        """diffusers' refusals of custom timesteps: they fix neither a σ family nor ¼·ln σ timesteps."""
        if self.sigma_family is not None:
            flag = next(flag for flag, family in SIGMA_FAMILY_FLAGS.items() if family == self.sigma_family)
            raise ValueError(f"set_timesteps(timesteps=...) cannot be used with {flag}=True: the σ family sets "
                             "the timesteps; pass sigmas=... instead")
        if self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction":
            raise ValueError("set_timesteps(timesteps=...) cannot be used with timestep_type='continuous' and "
                             "prediction_type='v_prediction' (the timesteps are ¼·ln σ); pass sigmas=... instead")

    def _plan(self, start: int, **options):
        """The steps from ``start`` on with the churn ``options`` (checked here, before any step)."""
        options = churn_options(**options)
        sigmas, prediction_type = self.sigmas.tolist(), self.config.prediction_type
        return (euler_step(sigmas[i], sigmas[i + 1], prediction_type, churn_gamma(
                    sigmas[i], options["s_churn"], options["s_tmin"], options["s_tmax"], self._churn_steps),
                    options["s_noise"])
                for i in range(start, len(self.timesteps)))

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        *,
        variance_noise: torch.Tensor | None = None,
        uncond_model_output: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
    ) -> SchedulerOutput | tuple:
        """x at σ_i -> x at σ_{i+1}: churn when S_churn > 0 (within [S_tmin, S_tmax]), x̂0 = D(x̂; σ̂),
        one Euler step (``euler_step``), in one fused launch.

        model_output, sample: (B, C, H, W); ``timestep`` one of ``self.timesteps``. The churn noise
        is ``variance_noise`` if given, else drawn from ``generator`` as diffusers draws it.
        """
        options = churn_options(s_churn, s_tmin, s_tmax, s_noise)
        return self._euler_step(model_output, timestep, sample, generator, return_dict, variance_noise,
                                uncond_model_output, guidance_scale, **options)


def sigma_family(config) -> str | None:
    """The σ family a config asks for ('karras', 'exponential', 'beta') or None (at most one), with
    its σ_min/σ_max checked."""
    chosen = [flag for flag in SIGMA_FAMILY_FLAGS if validation.boolean(flag, config[flag])]
    if len(chosen) > 1:
        raise ValueError(f"only one of {', '.join(SIGMA_FAMILY_FLAGS)} can be True, got {', '.join(chosen)}")
    for name in ("sigma_min", "sigma_max"):
        if config[name] is not None:
            validation.real(name, config[name], 0, min_open=True)
    if config.sigma_min is not None and config.sigma_max is not None and config.sigma_min >= config.sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={config.sigma_min}, "
                         f"sigma_max={config.sigma_max}")
    if "use_beta_sigmas" in chosen and importlib.util.find_spec("scipy") is None:
        raise ImportError("use_beta_sigmas needs scipy (pip install scipy), as in diffusers")
    return SIGMA_FAMILY_FLAGS[chosen[0]] if chosen else None
