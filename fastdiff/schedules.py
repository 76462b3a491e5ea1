"""Noise-schedule math shared by every scheduler: betas, ᾱ, timestep spacings, noise drawing.

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
