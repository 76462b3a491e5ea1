"""What the scheduler test files share: the toy model, the tolerance checks, the β tables, and the
ways of running diffusers' schedulers in float64 (tests/test_scheduler_*.py, tests/test_compat_*.py,
tests/test_schedulers.py). Their fixtures (``one_thread``, ``fused_calls``, ``op_calls``) are in
conftest.py. A plain module: pytest puts tests/ on sys.path (no __init__.py), so the tests
``from scheduler_helpers import ...``. diffusers is not imported here: each test file skips itself
when it is missing (``pytest.importorskip``) and passes its classes in.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import unittest.mock

import numpy as np
import pytest
import torch

RTOL = 1e-5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the kernel runs (the CPU: the interpreter)
BETA_RANGES = {  # beta_schedule -> (beta_start, beta_end); the cosine and Laplace ones ignore both
    "linear": (0.0001, 0.02),
    "scaled_linear": (0.00085, 0.012),  # Stable Diffusion's
    "squaredcos_cap_v2": (0.0001, 0.02),
    "sigmoid": (0.0002, 0.03),
    "laplace": (0.0001, 0.02),
}


def device_for(backend: str) -> str:
    return DEVICE if backend == "triton" else "cpu"


def toy_model(sample: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for the U-Net: ε̂(x, t) = 0.7·tanh(x) + 0.1·sin(t/100)."""
    return 0.7 * torch.tanh(sample) + 0.1 * math.sin(float(t) / 100)


# ----------------------------------------------------------------------------- tolerances
def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str = "", *, cast: bool = False,
                   equal_nan: bool = False) -> None:
    """Equal to RTOL relative to the scale (max |expected|) of the tensor. ``cast``: ``expected`` is
    first cast to ``actual``'s dtype (and its scale taken there); ``equal_nan``: NaN where expected's
    are passes, and the scale is that of the rest (NaN as 0, ±inf as the dtype's largest value)."""
    if cast:
        expected = expected.to(actual.dtype)
    scale = (expected.abs().nan_to_num(0.0) if equal_nan else expected.abs()).max().item()
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * scale, equal_nan=equal_nan,
                               msg=lambda m: f"{what}: {m}")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


# ----------------------------------------------------------------------------- configs
def schedule_config(name: str) -> dict:
    beta_start, beta_end = BETA_RANGES[name]
    return dict(beta_schedule=name, beta_start=beta_start, beta_end=beta_end)


def trained_betas(num_train_timesteps: int) -> list[float]:
    """An irregular but valid β table, as a model trained with its own schedule would carry."""
    rng = np.random.default_rng(num_train_timesteps)
    betas = np.linspace(1e-4, 0.03, num_train_timesteps) * rng.uniform(0.5, 1.5, num_train_timesteps)
    return np.minimum(betas, 0.5).astype(np.float32).tolist()


def sigmoid_as_trained_betas(config: dict, ddpm_class) -> dict:
    """For a diffusers scheduler that rejects beta_schedule="sigmoid": diffusers DDPM's
    (``ddpm_class``) sigmoid betas as trained_betas."""
    config = dict(config)
    if config.get("beta_schedule") == "sigmoid" and config.get("trained_betas") is None:
        ddpm = ddpm_class(beta_schedule="sigmoid", beta_start=config["beta_start"], beta_end=config["beta_end"],
                          num_train_timesteps=config.get("num_train_timesteps", 1000))
        config["trained_betas"] = ddpm.betas.tolist()
    return config


def own_betas_as_trained(config: dict, ours_class) -> dict:
    """Betas diffusers has no schedule for (sigmoid, Laplace) as trained_betas, from fastdiff's
    ``ours_class`` itself."""
    config = dict(config)
    if config.get("beta_schedule") in ("sigmoid", "laplace") and config.get("trained_betas") is None:
        config["trained_betas"] = ours_class(**config).betas.tolist()
        config["beta_schedule"] = "linear"
    return config


def scheduler_pair(ours_class, theirs_class, config: dict, theirs_config: dict, steps: int | None = None):
    """fastdiff's scheduler for ``config`` and diffusers' for ``theirs_config``, both set to ``steps``."""
    ours, theirs = ours_class(**config), theirs_class(**theirs_config)
    if steps is not None:
        ours.set_timesteps(steps)
        theirs.set_timesteps(steps)
    return ours, theirs


def public_config(config) -> dict:
    """A scheduler config without its private ("_"-prefixed) entries."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def parameters(function) -> list:
    """A signature as (name, kind, default) triples."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


# ----------------------------------------------------------------------------- choosing the interpreter's cases
def covering_subset(cases: list, option_values) -> list:
    """Few cases in which every (option, value) of ``cases`` (``option_values(case)``) still appears,
    and short and long (≥ 15 steps) runs (greedy set cover): the 'triton' runs, ~0.1 s a step
    through the interpreter."""
    wanted = [{(k, repr(v)) for k, v in option_values(case).items()} | {("long", case.steps >= 15)}
              for case in cases]
    missing, chosen = set().union(*wanted), []
    while missing:
        best = max(range(len(cases)), key=lambda i: (len(wanted[i] & missing), -cases[i].steps))
        chosen.append(cases[best])
        missing -= wanted[best]
    return sorted(chosen, key=cases.index)


def kernel_option_subset(cases: list, options: tuple, stock_class) -> list:
    """Few short (config, steps) cases in which every value of each of ``options`` (defaults:
    ``stock_class``'s) still appears: the interpreter runs."""
    def values(case):
        config, steps = case
        return {(k, repr(config.get(k, defaults[k].default))) for k in options}

    defaults = inspect.signature(stock_class.__init__).parameters

    missing, chosen = set().union(*map(values, cases)), []
    while missing:
        best = max(cases, key=lambda case: (len(values(case) & missing), -case[1]))  # fewest steps on ties
        chosen.append(best)
        missing -= values(best)
    return chosen


# ----------------------------------------------------------------------------- diffusers in float64
@contextlib.contextmanager
def noise_drawn_in(stock_class, noise_dtype: torch.dtype = torch.float32):
    """diffusers draws its noise in the model output's dtype; this makes ``stock_class``'s module draw
    ``noise_dtype``'s numbers (cast to the run's dtype): its float64 run draws the float32 run's."""
    module = sys.modules[stock_class.__module__]
    draw = module.randn_tensor

    def drawn(shape, generator=None, device=None, dtype=None, **kwargs):
        return draw(shape, generator=generator, device=device, dtype=noise_dtype, **kwargs).to(dtype)

    with unittest.mock.patch.object(module, "randn_tensor", drawn):
        yield


@contextlib.contextmanager
def diffusers_in_float64(stock_class):
    """``stock_class`` computing in float64: its step casts the sample to float32, so its module sees
    a ``torch`` whose float32 is float64; the noise is still drawn in float32 (the same numbers)."""
    module = sys.modules[stock_class.__module__]

    class Float64Torch:
        float32 = torch.float64

        def __getattr__(self, name):
            return getattr(torch, name)

    with noise_drawn_in(stock_class, torch.float32), pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "torch", Float64Torch())
        yield


def lambda32(scheduler, index) -> float:
    """diffusers' float32 λ of σ table entry ``index``."""
    alpha, sigma = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[index])
    return float(torch.log(alpha) - torch.log(sigma))


def pndm_in_float64(twin):
    """diffusers' PNDMScheduler ``twin`` computing in float64 from its float32 ᾱ table (the exact
    result of its algorithm)."""
    twin.alphas_cumprod = twin.alphas_cumprod.double()
    twin.final_alpha_cumprod = twin.final_alpha_cumprod.double()
    return twin


def conditioning(scheduler) -> float:
    """κ = max √(ᾱ_prev/ᾱ_t) over diffusers' PNDM steps (prev at most T//n below t): how far the
    rounding of diffusers' √(ᾱ_prev/ᾱ_t)·x_t term is amplified by the cancellation after it."""
    alphas = scheduler.alphas_cumprod.double()
    ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    final = float(scheduler.final_alpha_cumprod)
    return max(math.sqrt((float(alphas[t - ratio]) if t >= ratio else final) / float(alphas[t]))
               for t in scheduler.timesteps.tolist())
