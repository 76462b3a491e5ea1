"""What DPMSolverMultistepScheduler and UniPCMultistepScheduler share: the σ schedule of diffusers'
VP multistep solvers, the (α_t, σ_t, λ_t) of a step, and the model-output conversion.

Both solvers integrate the diffusion ODE of x_t = α_t·x0 + σ_t·ε in λ_t = log(α_t/σ_t), the half
log-SNR (Lu et al. 2022, arXiv:2206.00927, eq. 3.4). The scheduler tables the noise-to-signal ratio
σ = √((1 − ᾱ)/ᾱ) of each step (``self.sigmas``: float32 as diffusers holds it, one more than the
timesteps, the last the σ after the last step), and α_t = 1/√(σ² + 1), σ_t = σ·α_t. diffusers 0.42
computes the two schedulers' tables the same way up to a few details (the class attributes of
``VPMultistepScheduler``); ``vp_solver_schedule`` is that computation, written once.

The step functions of the two solvers (dpmsolver.py, unipc.py) take the table and a step index, so
that fastdiff's schedulers and the diffusers drop-ins (diffusers' own state) call the same code.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np
import torch

from .. import validation
from ..reference import PREDICTION_TYPES, VARIANCE_TYPES
from .linear import LinearStep
from .schedule import (alpha_sigma, lu_lambdas, respaced_sigmas, sigma_to_t, solver_timesteps, train_sigmas)
from .solver import LinearScheduler

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
FLOW_UNSUPPORTED = "not supported by fastdiff: no flow-matching models"
# keys of DDPM/DDIM configs that the solvers do not take; from_config drops them, as diffusers does
# (configuration.FOREIGN_SCHEDULER_KEYS lists the solvers' keys for DDPM/DDIM, not these)
DDPM_ONLY_KEYS = frozenset({"clip_sample", "clip_sample_range", "set_alpha_to_one"})
# the zero-terminal-SNR schedule's ᾱ_{T−1}: diffusers' "close to 0 without being 0", so σ_max is finite
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


# ----------------------------------------------------------------------------- one noise level
class NoiseLevel(NamedTuple):
    """(α_t, σ_t, λ_t) of one entry of the σ table, as Python floats (float64)."""

    alpha: float
    sigma: float
    lam: float  # λ_t = log α_t − log σ_t; +inf at σ = 0 (the clean end of a final_sigmas_type="zero" run)


def noise_level(sigmas: torch.Tensor, index: int) -> NoiseLevel:
    """The level of ``sigmas[index]``: α_t and σ_t computed in float32 exactly as diffusers does
    (``schedule.alpha_sigma`` on the float32 entry), λ_t in float64 from them. The coefficients built
    on it are float64, rounded once when the step is packed."""
    alpha_t, sigma_t = (float(v) for v in alpha_sigma(sigmas[index].to(torch.float32)))
    lam = math.inf if sigma_t == 0 else math.log(alpha_t) - math.log(sigma_t)
    return NoiseLevel(alpha_t, sigma_t, lam)


def conversion(prediction_type: str, predicts: str, level: NoiseLevel, thresholding: bool = False):
    """(convert, reconvert) of ``LinearStep``: the model output m at level (α, σ) as what the solver
    integrates, ``predicts`` "x0" (data prediction: DPM-Solver++, UniPC with predict_x0) or
    "epsilon" (noise prediction). The (a, b, e, d) form keeps diffusers' operations:

        x0 from ε: (x − σ·m)/α      x0 from v: α·x − σ·m      ε from x0: (x − α·m)/σ      ε from v: σ·x + α·m

    With dynamic thresholding c is x̂0 first (thresholded by the op); an ε-space solver then takes
    ε = (x − α·x̂0)/σ = x/σ − (α/σ)·x̂0 back from it (reconvert)."""
    alpha, sigma = level.alpha, level.sigma
    to_x0 = {"epsilon": (1.0, -sigma, 0.0, alpha), "sample": (0.0, 1.0, 0.0, 1.0),
             "v_prediction": (alpha, -sigma, 0.0, 1.0)}
    to_epsilon = {"epsilon": (0.0, 1.0, 0.0, 1.0), "sample": (1.0, -alpha, 0.0, sigma),
                  "v_prediction": (sigma, alpha, 0.0, 1.0)}
    if predicts == "x0":
        return to_x0[prediction_type], (0.0, 1.0)
    if thresholding:
        return to_x0[prediction_type], (1.0 / sigma, -alpha / sigma)
    return to_epsilon[prediction_type], (0.0, 1.0)


def weighted(*terms: tuple[float, dict[str, float]]) -> dict[str, float]:
    """Σ w·v over (w, v) pairs of coefficient dicts: a linear combination of the step's inputs."""
    total: dict[str, float] = {}
    for weight, coefficients in terms:
        for name, value in coefficients.items():
            total[name] = total.get(name, 0.0) + weight * value
    return total


def identity_step(convert, reconvert, *, push: bool, noise: bool = False, last=None) -> LinearStep:
    """A step of length h = 0 (σ_next = σ: a final_sigmas_type="sigma_min" run whose last visited σ
    is σ_min already): the exact solution is x_next = x, whatever the order (diffusers' third-order
    formulas give 0/0 = NaN there). The output is still converted and pushed, noise still drawn."""
    return LinearStep(convert=convert, out={"x": 1.0}, reconvert=reconvert, push=push, noise=noise, last=last)


# ----------------------------------------------------------------------------- the σ schedule
def lambda_clipped_last_timestep(alphas_cumprod: torch.Tensor, lambda_min_clipped: float) -> int:
    """The number of training timesteps whose λ_t is at least ``lambda_min_clipped`` (diffusers'
    ``last_timestep``): λ_t in float32 as diffusers computes it, searched in ascending order."""
    lambda_t = torch.log(torch.sqrt(alphas_cumprod)) - torch.log(torch.sqrt(1 - alphas_cumprod))
    clipped = torch.searchsorted(torch.flip(lambda_t, [0]), lambda_min_clipped)
    return len(alphas_cumprod) - int(clipped)


def vp_solver_schedule(alphas_cumprod: torch.Tensor, num_inference_steps: int, spacing: str, steps_offset: int = 0, *,
                       family: str | None = None, last_timestep: int | None = None, rounds_timesteps: bool = True,
                       final_sigmas_type: str = "zero", final_from_family: bool = False,
                       sigma_min: float | None = None, sigma_max: float | None = None,
                       timesteps=None) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64, sigmas float32 with the final σ appended) of diffusers' DPM-Solver / UniPC.

    family None: the spaced timesteps (``schedule.solver_timesteps``, or ``timesteps`` given) and σ
    interpolated at them. "karras", "exponential", "beta": n σ of the family between the training
    σ's ends (or ``sigma_min``/``sigma_max``); "lu": n log σ uniform in λ (Lu et al. 2022). A
    family's timesteps are its σ mapped back to (fractional) training timesteps, rounded where
    ``rounds_timesteps`` (else truncated by the int64 cast, as in diffusers). The final σ: 0, or
    σ_min: the training σ at t = 0, or with ``final_from_family`` the family's last σ (UniPC's rule).
    """
    sigmas = train_sigmas(alphas_cumprod)  # (T,) float32, ascending in t
    log_sigmas = np.log(sigmas)
    if family is None:
        if timesteps is None:
            timesteps = solver_timesteps(len(sigmas), num_inference_steps, spacing, steps_offset, last_timestep)
        timesteps = np.asarray(timesteps, dtype=np.int64)
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
    else:
        if family == "lu":
            descending = np.flip(log_sigmas).copy()
            sigmas = np.exp(lu_lambdas(descending[-1].item(), descending[0].item(), num_inference_steps))
        else:
            sigmas = respaced_sigmas(family, np.flip(sigmas).copy(), num_inference_steps, sigma_min, sigma_max)
        timesteps = sigma_to_t(sigmas, log_sigmas)
        if rounds_timesteps:
            timesteps = timesteps.round()
        timesteps = timesteps.astype(np.int64)
    if final_sigmas_type == "zero":
        sigma_last = 0.0
    elif final_from_family and family is not None:
        sigma_last = sigmas[-1]
    else:
        sigma_last = float(((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5)
    return timesteps, np.concatenate([sigmas, [sigma_last]]).astype(np.float32)


# ----------------------------------------------------------------------------- the shared scheduler
class VPMultistepScheduler(LinearScheduler):
    """The config checks, tables and ``set_timesteps`` of DPM-Solver and UniPC. Subclasses set:"""

    # σ family per config flag, in the order diffusers tries them
    sigma_families: dict[str, str] = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential",
                                      "use_beta_sigmas": "beta"}
    clips_lambda = False  # lambda_min_clipped cuts the spaced timesteps (DPM-Solver)
    final_from_family = False  # final_sigmas_type="sigma_min" after a σ family: the family's last σ (UniPC)

    def _setup_vp(self) -> None:
        """Check the options both solvers have, then build ᾱ and the training-time σ table."""
        config = self.config
        check_flow_options(config)
        if config.prediction_type == "flow_prediction":
            raise ValueError(f"prediction_type='flow_prediction' is {FLOW_UNSUPPORTED}; use one of "
                             f"{', '.join(map(repr, PREDICTION_TYPES))}")
        validation.integer("solver_order", config.solver_order, 1, 3)
        validation.one_of("final_sigmas_type", config.final_sigmas_type, FINAL_SIGMAS_TYPES)
        for flag in ("lower_order_final", *self.sigma_families):
            validation.boolean(flag, config[flag])
        chosen = [flag for flag in self.sigma_families if config[flag]]
        if len(chosen) > 1:
            raise ValueError(f"use at most one σ family; got {', '.join(f'{flag}=True' for flag in chosen)}")
        if "use_beta_sigmas" in chosen:
            try:
                import scipy.stats  # noqa: F401
            except ImportError as err:
                raise ImportError("use_beta_sigmas needs scipy (pip install scipy), as in diffusers") from err
        self._setup(config)
        if config.get("rescale_betas_zero_snr", False):
            self.alphas_cumprod[-1] = ZERO_SNR_ALPHA_CUMPROD  # diffusers: so that σ_max is finite
        # before set_timesteps: the training σ in the order of self.timesteps (T−1 … 0), so that
        # add_noise at timestep t uses σ_t (see the class docstrings: diffusers' ascending table does not)
        self.sigmas = torch.from_numpy(np.flip(train_sigmas(self.alphas_cumprod)).copy())
        self._reset()

    @classmethod
    def from_config(cls, config: dict | None = None, **kwargs):
        """``ConfigMixin.from_config``, also taking fastdiff DDPM/DDIM configs (their clipping keys are dropped)."""
        if isinstance(config, dict):
            config = {k: v for k, v in config.items() if k not in DDPM_ONLY_KEYS or k in cls.init_keys()}
        return super().from_config(config, **kwargs)

    def _family(self) -> str | None:
        return next((family for flag, family in self.sigma_families.items() if self.config[flag]), None)

    def _rounds_family_timesteps(self, family: str) -> bool:
        """Whether the timesteps of σ ``family`` are rounded (else truncated) to integers."""
        raise NotImplementedError

    def _set_schedule(self, num_inference_steps: int | None, device, timesteps=None, mu=None) -> None:
        """``set_timesteps``: the timesteps to visit and their σ (``self.timesteps`` on ``device``,
        ``self.sigmas`` float32 on the CPU, one longer), as diffusers computes them; ``timesteps``: a
        custom descending list (no σ family), as in diffusers' DPM-Solver."""
        config, T = self.config, self.config.num_train_timesteps
        if mu is not None:
            raise ValueError(f"mu (dynamic shifting) is {FLOW_UNSUPPORTED}")
        family = self._family()
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        last_timestep = None
        if timesteps is not None:
            if family is not None:
                raise ValueError(f"custom timesteps cannot be used with the {family} σ family")
            timesteps = self._custom_timesteps(timesteps)
            n = len(timesteps)
        else:
            n = validation.integer("num_inference_steps", num_inference_steps, 1, T)
            if self.clips_lambda and family is None and config.lambda_min_clipped != -math.inf:
                last_timestep = lambda_clipped_last_timestep(self.alphas_cumprod, config.lambda_min_clipped)
                if last_timestep < 1:
                    raise ValueError(f"lambda_min_clipped={config.lambda_min_clipped} is above λ_t of every "
                                     "training timestep; no timestep is left to sample")
        timesteps, sigmas = vp_solver_schedule(
            self.alphas_cumprod, n, config.timestep_spacing, config.steps_offset, family=family,
            last_timestep=last_timestep, rounds_timesteps=family is not None and self._rounds_family_timesteps(family),
            final_sigmas_type=config.final_sigmas_type, final_from_family=self.final_from_family,
            sigma_min=config.get("sigma_min"), sigma_max=config.get("sigma_max"), timesteps=timesteps)
        visited = sigmas[:len(timesteps)]
        if len(visited) > 1 and not bool((visited[1:] < visited[:-1]).all()):
            raise ValueError(f"num_inference_steps={n} repeats a noise level with timestep_spacing="
                             f"{config.timestep_spacing!r} (a step of length 0 in λ, NaN in diffusers' multistep "
                             f"updates); use fewer steps")
        self.sigmas = torch.from_numpy(sigmas)
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self._begin_index = None  # diffusers forgets the begin index here too
        self._reset()

    def _custom_timesteps(self, timesteps) -> np.ndarray:
        values = np.asarray(timesteps)
        if values.ndim != 1 or len(values) == 0 or not all(isinstance(v, numbers.Integral) for v in values.tolist()):
            raise TypeError("timesteps must be a non-empty list of integers")
        for t in values.tolist():
            validation.timesteps("timesteps", t, self.config.num_train_timesteps)
        if not bool((values[1:] < values[:-1]).all()):
            raise ValueError(f"timesteps must be strictly decreasing, got {values.tolist()}")
        return values.astype(np.int64)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The multistep solvers feed the sample to the model unscaled."""
        return sample


def check_flow_options(config) -> None:
    """The flow-matching options are accepted at their defaults only (there is no flow model to run)."""
    for flag in ("use_flow_sigmas", "use_dynamic_shifting"):
        if validation.boolean(flag, config[flag]):
            raise ValueError(f"{flag}=True is {FLOW_UNSUPPORTED}; leave it False")
    if validation.real("flow_shift", config.flow_shift) != 1.0:
        raise ValueError(f"flow_shift={config.flow_shift} is {FLOW_UNSUPPORTED}; leave it at 1.0")
    if config.time_shift_type != "exponential":
        raise ValueError(f"time_shift_type={config.time_shift_type!r} is {FLOW_UNSUPPORTED}; leave it 'exponential'")
    if config.get("shift_terminal") is not None:
        raise ValueError(f"shift_terminal={config.shift_terminal!r} is {FLOW_UNSUPPORTED}; leave it None")


def check_lambda_min_clipped(value) -> float:
    """−inf (no clipping, the default) or a finite real number."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and value == -math.inf:
        return -math.inf
    return validation.real("lambda_min_clipped", value)


def check_variance_type(value) -> None:
    """None, or one of DDPM's variance types (configs cross-load): only the learned ones change anything."""
    if value is not None:
        validation.one_of("variance_type", value, (None, *VARIANCE_TYPES))
