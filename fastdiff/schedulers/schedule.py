"""Noise-schedule math shared by every scheduler: betas, ᾱ, timestep spacings, σ schedules
(Karras, exponential, beta, uniform logSNR), noise drawing.

Each function reproduces diffusers 0.42's numbers (float32 throughout, same operation order), so
that a fastdiff scheduler and a diffusers one built from the same config hold identical tables.
"""

from __future__ import annotations

import math

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_transform_type: str = "cosine",
                        max_beta: float = 0.999) -> torch.Tensor:
    """β_t = min(1 − ᾱ(t+1)/ᾱ(t), max_beta) for a continuous ᾱ on [0, 1].

    cosine: ᾱ(s) = cos²((s + 0.008)/1.008 · π/2) (Nichol & Dhariwal 2021, eq. 17).
    laplace: the Laplace noise schedule of Hang et al. 2024, as diffusers has it.
    """
    if alpha_transform_type == "cosine":
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    else:
        def alpha_bar(s):
            lmb = -0.5 * math.copysign(1, 0.5 - s) * math.log(1 - 2 * math.fabs(0.5 - s) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
    n = num_diffusion_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ so the last step has zero SNR (Lin et al. 2023, Algorithm 1)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
               trained_betas=None, rescale_betas_zero_snr: bool = False) -> torch.Tensor:
    """The (T,) float32 β table a config describes."""
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":  # linear in √β (latent diffusion)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(num_train_timesteps)
    elif beta_schedule == "laplace":
        betas = betas_for_alpha_bar(num_train_timesteps, alpha_transform_type="laplace")
    else:  # sigmoid (GeoDiff, Xu et al. 2022)
        betas = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (beta_end - beta_start) + beta_start
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def spaced_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str,
                     steps_offset: int = 0) -> np.ndarray:
    """The descending int64 timesteps a sampler visits (Lin et al. 2023, Table 2 for the spacings).

    leading: 0, k, 2k, ... (k = T // n) reversed, plus steps_offset; trailing: T−1 stepping down by
    T/n, rounded; linspace: n points from 0 to T−1, rounded. Equal to diffusers' timesteps except
    where diffusers' trailing list has an extra, invalid −1 at the end.
    """
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        timesteps = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64)
        return timesteps + steps_offset
    # diffusers writes np.arange(T, 0, -T/n), which float rounding makes n+1 long for some (T, n)
    # (T=1000, n=61 ends in -1). The same values (numpy's arange steps by (T - T/n) - T), n of them:
    step = (T - T / n) - T
    return np.round(T + np.arange(n) * step).astype(np.int64) - 1


def solver_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int = 0,
                     last_timestep: int | None = None) -> np.ndarray:
    """The int64 timesteps of diffusers' DPM-Solver and UniPC: linspace and leading space n + 1
    points over [0, last_timestep) and drop the last (t = 0); trailing steps down from
    last_timestep by T/n. ``last_timestep`` (default T) is where lambda_min_clipped cuts the
    schedule. diffusers' trailing list can end in an invalid −1 (float rounding in np.arange, see
    ``spaced_timesteps``): dropped here."""
    T, n = num_train_timesteps, num_inference_steps
    last = T if last_timestep is None else int(last_timestep)
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        step_ratio = last // (n + 1)
        return (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    timesteps = np.arange(last, 0, -T / n).round().copy().astype(np.int64) - 1
    return timesteps[timesteps >= 0]


def euler_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str,
                    steps_offset: int = 0) -> np.ndarray:
    """The float32 timesteps of diffusers' Euler schedulers before any σ family remaps them:
    linspace keeps fractions (n points over [0, T − 1]); leading and trailing are rounded as in
    ``spaced_timesteps`` (trailing's invalid −1 dropped likewise)."""
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.float32) + steps_offset
    timesteps = np.arange(T, 0, -T / n).round().copy().astype(np.float32) - 1
    return timesteps[timesteps >= 0]


# ----------------------------------------------------------------------------- σ schedules
# σ_t = √((1 − ᾱ_t)/ᾱ_t) is the noise-to-signal ratio of x_t = √ᾱ_t·(x0 + σ_t·ε) (Karras et al.
# 2022, the "variance exploding" view of a variance-preserving schedule). The families below
# respace n values of σ between σ_min and σ_max; each takes and returns float64 numpy arrays, as
# diffusers computes them, descending from σ_max.
SIGMA_FAMILIES = ("karras", "exponential", "beta")


def train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """σ_t of every training timestep, ascending in t (float32, computed as diffusers does)."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ (Karras et al. 2022, eq. 5; ρ = 7)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """σ evenly spaced in log σ from σ_max down to σ_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """σ_min + ppf(1 − i/(n−1))·(σ_max − σ_min), ppf the Beta(0.6, 0.6) quantile (Lee et al. 2024,
    "Beta Sampling is All You Need"). Needs scipy, as diffusers does."""
    try:
        import scipy.stats
    except ImportError as err:
        raise ImportError("use_beta_sigmas needs scipy (pip install scipy), as in diffusers") from err
    ppfs = [scipy.stats.beta.ppf(timestep, alpha, beta) for timestep in 1 - np.linspace(0, 1, n)]
    return np.array([sigma_min + ppf * (sigma_max - sigma_min) for ppf in ppfs])


def respaced_sigmas(family: str, sigmas: np.ndarray, n: int, sigma_min: float | None = None,
                    sigma_max: float | None = None) -> np.ndarray:
    """n σ of ``family`` between the ends of ``sigmas`` (descending), or ``sigma_min``/``sigma_max``
    where a config gives them (Euler's)."""
    sigma_min = float(sigmas[-1]) if sigma_min is None else sigma_min
    sigma_max = float(sigmas[0]) if sigma_max is None else sigma_max
    return {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}[family](
        sigma_min, sigma_max, n)


def lu_lambdas(lambda_min: float, lambda_max: float, n: int) -> np.ndarray:
    """log σ evenly spaced from λ_max to λ_min (uniform logSNR, Lu et al. 2022)."""
    return lambda_max + np.linspace(0, 1, n) * (lambda_min - lambda_max)


def sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) timestep whose σ is ``sigma``: linear interpolation in log σ between the
    two training timesteps around it, clipped to the table (diffusers' ``_sigma_to_t``)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def alpha_sigma(sigma):
    """(α_t, σ_t) of the variance-preserving x_t = α_t·x0 + σ_t·ε for a noise-to-signal ratio σ:
    α_t = 1/√(σ² + 1), σ_t = σ·α_t (diffusers' ``_sigma_to_alpha_sigma_t``)."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def randn_tensor(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise drawn exactly as diffusers' ``randn_tensor`` draws it.

    A CPU generator draws on the CPU and the result moves to ``device`` (same numbers on every
    device); a list of generators draws one batch element from each.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    rand_device = device
    generators = generator if isinstance(generator, list) else [generator]
    if generator is not None and (not generators or not all(isinstance(g, torch.Generator) for g in generators)):
        raise TypeError(f"generator must be a torch.Generator, a non-empty list of them (one per image) or None, "
                        f"got {type(generator).__name__}{'' if isinstance(generator, list) else f' {generator!r}'}")
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, list) else generator).device.type
        if gen_type != device.type and gen_type == "cpu":
            rand_device = torch.device("cpu")
        elif gen_type != device.type:
            raise ValueError(f"generator is on {gen_type}; cannot draw a {device.type} tensor from it")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        one = (1, *shape[1:])
        draws = [torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(draws, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)
