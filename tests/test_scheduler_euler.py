"""fastdiff's EulerDiscreteScheduler against diffusers 0.42, the numerical oracle.

The requirement: for every config option and step keyword, in float32, the same timesteps, σ's and
init_noise_sigma as diffusers, and the same samples after a full sampling loop (≤ 1e-5 relative to
the largest value), with churn noise drawn from a torch.Generator in diffusers' order, on both
backends ('torch', and 'triton': the fused multistep kernel, through Triton's interpreter without
a GPU). The default run holds every option value; ``pytest -m full_grid`` runs the whole product.

Tolerance, everywhere: rtol = 1e-5 and atol = 1e-5 · max|expected|. Every loop is checked against
diffusers' float32 run and against diffusers' own step equations run in float64 (float64 σ's and
model outputs, the same noise). One regime defeats the float32 comparison: a step from a large σ
to a small one with an O(1) x̂0 (v_prediction, sample), where diffusers' float32
x + (x − x̂0)/σ̂·(σ_next − σ̂) cancels ~eps·|x| and misses its own float64 value by up to 1e-3
(``test_few_step_from_a_large_sigma_...``); fastdiff computes r·x + (1 − r)·x̂0, which does not
cancel. So: fastdiff ≤ 1e-5 from the float64 run always; ≤ 1e-5 from the float32 run wherever that
run is within RTOL/2 of its float64 self; elsewhere closer to the float64 run than diffusers is.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.schedulers import schedule
from fastdiff.schedulers.euler import EulerDiscreteScheduler, euler_step
from fastdiff.schedulers.linear import INPUT_SCALE, slot_buffers
from fastdiff.sampling_loop import SamplingLoop
from scheduler_helpers import (RTOL, assert_matches, noise_drawn_in, own_betas_as_trained, relative_error,
                               schedule_config, toy_model, trained_betas)

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 3, 4, 4)  # (B, C, H, W)
BACKENDS = ["torch", "triton"]
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("linspace", "leading", "trailing")
FAMILIES = {"none": {}, "karras": dict(use_karras_sigmas=True), "exponential": dict(use_exponential_sigmas=True),
            "beta": dict(use_beta_sigmas=True)}
pytestmark = pytest.mark.usefixtures("one_thread")
SCHEDULES = {  # beta_schedule -> (beta_start, beta_end)
    "linear": (0.0001, 0.02),
    "scaled_linear": (0.00085, 0.012),  # Stable Diffusion's: σ_max ≈ 14.6
    "squaredcos_cap_v2": (0.0001, 0.02),
    "sigmoid": (0.0002, 0.03),  # fastdiff only: diffusers' Euler gets the same betas as trained_betas
}
CHURNS = {  # step keywords
    "none": {},
    "churn": dict(s_churn=1.0),
    "window": dict(s_churn=3.0, s_tmin=0.3, s_tmax=6.0, s_noise=1.007),
}


def diffusers_twin(config: dict):
    """diffusers' scheduler for ``config``; betas it has no schedule for arrive as trained_betas."""
    return diffusers.EulerDiscreteScheduler(**own_betas_as_trained(config, EulerDiscreteScheduler))


# ----------------------------------------------------------------------------- the parity grid
@dataclasses.dataclass(frozen=True)
class Case:
    config: dict
    steps: int = 8
    churn: str = "none"
    seed: int = 0

    @property
    def id(self) -> str:
        cfg = self.config
        family = next((name for name, flags in FAMILIES.items() if flags and all(cfg.get(k) for k in flags)), "none")
        parts = [cfg.get("beta_schedule", "linear"), cfg.get("prediction_type", "epsilon"),
                 cfg.get("timestep_spacing", "linspace"), family, f"n{self.steps}", self.churn]
        named = {"interpolation_type": "", "timestep_type": "", "final_sigmas_type": "final=", "steps_offset": "off",
                 "rescale_betas_zero_snr": "zsnr=", "sigma_min": "smin", "sigma_max": "smax",
                 "num_train_timesteps": "T"}
        parts += [f"{tag}{cfg[key]}" for key, tag in named.items() if key in cfg]
        if cfg.get("trained_betas") is not None:
            parts.append("trained")
        return "-".join(map(str, parts))


def build_cases(full: bool) -> list[Case]:
    """The default run: every option value at least once, rotating the rest. The full grid: the
    product of σ family × prediction × spacing × interpolation × final σ × churn, then the rest."""
    cases = []
    schedules = ["scaled_linear", "linear", "squaredcos_cap_v2", "sigmoid"]
    product = itertools.product(FAMILIES, PREDICTIONS, SPACINGS, ("linear", "log_linear"), ("zero", "sigma_min"),
                                CHURNS)
    for i, (family, pred, spacing, interpolation, final, churn) in enumerate(product):
        if not full and i % 29:
            continue
        config = dict(**schedule_config(schedules[i % 4]), **FAMILIES[family], prediction_type=pred,
                      timestep_spacing=spacing, interpolation_type=interpolation, final_sigmas_type=final)
        cases.append(Case(config, steps=(5, 8, 10)[i % 3], churn=churn, seed=i % 5))
    extra = [  # the other options, each value at least once
        dict(use_karras_sigmas=True, sigma_min=0.05, sigma_max=10.0, prediction_type="v_prediction"),
        dict(use_exponential_sigmas=True, sigma_max=8.0, timestep_spacing="leading"),
        dict(use_beta_sigmas=True, sigma_min=0.1, timestep_spacing="trailing", prediction_type="sample"),
        dict(timestep_type="continuous", prediction_type="v_prediction"),
        dict(timestep_type="continuous", prediction_type="epsilon", use_karras_sigmas=True),
        dict(timestep_type="continuous", prediction_type="v_prediction", interpolation_type="log_linear"),
        dict(timestep_spacing="leading", steps_offset=1),
        dict(timestep_spacing="leading", steps_offset=3, use_karras_sigmas=True),
        dict(timestep_spacing="trailing", steps_offset=1),
        dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"),
        dict(rescale_betas_zero_snr=True, timestep_spacing="linspace", use_karras_sigmas=True),
        dict(rescale_betas_zero_snr=True, timestep_spacing="leading"),
        dict(trained_betas=trained_betas(1000), prediction_type="v_prediction"),
        dict(num_train_timesteps=100, trained_betas=trained_betas(100), timestep_spacing="trailing"),
        dict(num_train_timesteps=100, use_exponential_sigmas=True),
        dict(beta_schedule="laplace", timestep_spacing="leading"),
    ]
    for i, config in enumerate(extra):
        base = schedule_config(schedules[i % 4]) if "beta_schedule" not in config else {}
        churns = list(CHURNS) if full else [list(CHURNS)[i % 3]]
        for churn in churns:
            cases.append(Case({**base, **config}, steps=(10 if config.get("rescale_betas_zero_snr") else (6, 9)[i % 2]),
                              churn=churn, seed=i))
    return cases


DEFAULT_CASES = build_cases(full=False)
FULL_CASES = [case for case in build_cases(full=True) if case not in DEFAULT_CASES]
# The interpreter runs the kernel bit for bit like the reference (test_kernel_multistep), at ~50 ms
# a launch: the default run takes every case on 'torch' and every other one on 'triton' (a
# rotation that still meets each prediction type, σ family and churn); the full grid takes the rest.
DEFAULT_RUNS = [(case, backend) for i, case in enumerate(DEFAULT_CASES) for backend in BACKENDS
                if backend == "torch" or i % 2 == 0]
FULL_RUNS = [(case, backend) for case in FULL_CASES for backend in BACKENDS] + [
    (case, "triton") for i, case in enumerate(DEFAULT_CASES) if i % 2]


def sample_loop(scheduler, case: Case, float64: bool = False):
    """A full sampling loop from seed ``case.seed``: (final sample, [x̂0 per step]). ``float64``
    runs diffusers' step on float64 σ's and model outputs (the model itself sees float32)."""
    scheduler.set_timesteps(case.steps)
    generator = torch.Generator().manual_seed(case.seed)
    sample = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
    if float64:
        scheduler.sigmas, sample = scheduler.sigmas.double(), sample.double()
    pred_x0 = []
    for t in scheduler.timesteps:
        model_output = toy_model(scheduler.scale_model_input(sample, t).float(), t)
        model_output = model_output.double() if float64 else model_output
        out = scheduler.step(model_output, t, sample, generator=generator, **CHURNS[case.churn])
        sample = out.prev_sample
        pred_x0.append(out.pred_original_sample)
    return sample, pred_x0


def diffusers_float64_loop(config: dict, case: Case):
    """diffusers' own step equations evaluated in float64, on the float32 run's noise."""
    with noise_drawn_in(diffusers.EulerDiscreteScheduler):
        return sample_loop(diffusers_twin(config), case, float64=True)


def check_loop(case: Case, backend: str) -> tuple[float, float, float]:
    """Run ``case`` on fastdiff (``backend``) and on diffusers, in float32 and in float64.

    The rule of the module docstring: fastdiff within 1e-5 of diffusers' equations (their float64
    run) always, and of diffusers' float32 run wherever that run is within RTOL/2 of its float64
    one; elsewhere (diffusers' float32 cancellation) the closer of the two. Returns (error vs diffusers fp32, vs its float64 run,
    diffusers' own fp32 error).
    """
    ours, theirs = EulerDiscreteScheduler(**case.config), diffusers_twin(case.config)
    with fastdiff.use_backend(backend):
        ours_run = sample_loop(ours, case)
    theirs_run = sample_loop(theirs, case)
    exact_run = diffusers_float64_loop(case.config, case)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert len(ours_run[1]) == len(theirs_run[1]) == len(ours.timesteps)
    ours_all, theirs_all, exact_all = ([run[0], *run[1]] for run in (ours_run, theirs_run, exact_run))
    assert all(torch.isfinite(x).all() for x in theirs_all)
    names = ["final sample", *(f"pred_original_sample of step {i}" for i in range(len(ours.timesteps)))]
    their_error = max(relative_error(a, b) for a, b in zip(theirs_all, exact_all))
    for x, exact, what in zip(ours_all, exact_all, names):
        assert_matches(x.double(), exact, what + " vs diffusers in float64")
    if their_error <= RTOL / 2:
        for x, expected, what in zip(ours_all, theirs_all, names):
            assert_matches(x, expected, what)
    our_error = max(relative_error(a, b) for a, b in zip(ours_all, exact_all))
    assert their_error <= RTOL / 2 or our_error < their_error
    return max(relative_error(a, b) for a, b in zip(ours_all, theirs_all)), our_error, their_error


@pytest.mark.parametrize("case, backend", DEFAULT_RUNS, ids=[f"{c.id}-{b}" for c, b in DEFAULT_RUNS])
def test_full_loop_matches_diffusers(case, backend):
    check_loop(case, backend)


@pytest.mark.full_grid
@pytest.mark.parametrize("case, backend", FULL_RUNS, ids=[f"{c.id}-{b}" for c, b in FULL_RUNS])
def test_full_loop_matches_diffusers_full_grid(case, backend):
    check_loop(case, backend)


def test_default_grid_covers_every_option_value():
    seen: dict[str, set] = {}
    for case in DEFAULT_CASES:
        config = {**EulerDiscreteScheduler(**case.config).config, **CHURNS[case.churn]}
        config["trained_betas"] = config["trained_betas"] is not None
        config["steps"] = case.steps
        for key, value in config.items():
            if not key.startswith("_"):  # _use_default_values: diffusers' in-memory record, a list
                seen.setdefault(key, set()).add(value)
    assert seen["beta_schedule"] >= set(SCHEDULES) | {"laplace"}
    assert seen["prediction_type"] == set(PREDICTIONS)
    assert seen["timestep_spacing"] == set(SPACINGS)
    assert seen["interpolation_type"] == {"linear", "log_linear"}
    assert seen["timestep_type"] == {"discrete", "continuous"}
    assert seen["final_sigmas_type"] == {"zero", "sigma_min"}
    for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "rescale_betas_zero_snr",
                 "trained_betas"):
        assert seen[flag] == {True, False}, flag
    assert len(seen["sigma_min"]) >= 3 and len(seen["sigma_max"]) >= 3  # None and values
    assert len(seen["steps_offset"]) >= 3 and seen["num_train_timesteps"] == {1000, 100}
    assert len(seen["s_churn"]) == 2 and len(seen["s_tmin"]) == len(seen["s_tmax"]) == len(seen["s_noise"]) == 1
    # every prediction type meets churn, log_linear and each σ family somewhere
    pairs = {(c.config.get("prediction_type", "epsilon"), c.churn) for c in DEFAULT_CASES}
    assert {p for p, churn in pairs if churn != "none"} == set(PREDICTIONS)
    kernel_runs = [case for case, backend in DEFAULT_RUNS if backend == "triton"]
    assert {c.config.get("prediction_type", "epsilon") for c in kernel_runs} == set(PREDICTIONS)
    assert {c.churn for c in kernel_runs} == set(CHURNS)
    assert {next((f for f, flags in FAMILIES.items() if flags and all(c.config.get(k) for k in flags)), "none")
            for c in kernel_runs} == set(FAMILIES)


def test_same_seed_same_result_and_churn_draws_noise():
    case = Case(dict(**schedule_config("scaled_linear"), use_karras_sigmas=True), steps=6, churn="churn", seed=3)
    first, _ = sample_loop(EulerDiscreteScheduler(**case.config), case)
    again, _ = sample_loop(EulerDiscreteScheduler(**case.config), case)
    assert torch.equal(first, again)
    other, _ = sample_loop(EulerDiscreteScheduler(**case.config), dataclasses.replace(case, seed=4))
    deterministic, _ = sample_loop(EulerDiscreteScheduler(**case.config), dataclasses.replace(case, churn="none"))
    assert not torch.allclose(first, other)  # the seed sets x_T and the churn noise ...
    assert not torch.allclose(first, deterministic)  # ... and churn adds noise


FEW_STEP_CASES = [  # (config, steps) where diffusers' float32 loop misses its float64 self by more than 1e-5
    (dict(prediction_type="v_prediction", timestep_spacing="trailing"), 1),  # linear betas: σ_max ≈ 157
    (dict(prediction_type="v_prediction", use_karras_sigmas=True), 2),
    (dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"), 1),  # 4096
    (dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"), 2),
    (dict(prediction_type="v_prediction", timestep_type="continuous", interpolation_type="log_linear"), 1),
    (dict(prediction_type="sample", beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"), 2),  # 20291
]


def few_step_id(config: dict, steps: int) -> str:
    return "-".join([*(str(v) for v in config.values()), f"n{steps}"])


@pytest.mark.parametrize("churn", ["none", "churn"])
@pytest.mark.parametrize("config, steps", FEW_STEP_CASES, ids=[few_step_id(c, n) for c, n in FEW_STEP_CASES])
def test_few_step_from_a_large_sigma_matches_diffusers_equations_in_float64(config, steps, churn):
    """KNOWN LIMIT of diffusers' float32 step: one or two steps down from a large σ_max with an
    O(1) x̂0 (v_prediction, sample): diffusers' x + (x − x̂0)/σ·(σ_next − σ) keeps ~eps·|x| of
    cancellation error, more than 1e-5 of the result. fastdiff's r·x + (1 − r)·x̂0 has none: it
    matches diffusers' equations run in float64 to 1e-5, where diffusers' float32 run does not."""
    case = Case(config, steps=steps, churn=churn, seed=1)
    sample, _ = sample_loop(EulerDiscreteScheduler(**config), case)
    float32_sample, _ = sample_loop(diffusers.EulerDiscreteScheduler(**config), case)
    exact, _ = diffusers_float64_loop(config, case)
    assert exact.dtype == torch.float64
    assert_matches(sample.double(), exact, "fastdiff vs diffusers' equations in float64")
    assert relative_error(sample, exact) < RTOL / 10 and relative_error(float32_sample, exact) > RTOL


# ----------------------------------------------------------------------------- set_timesteps
TABLE_CONFIGS = [
    dict(**FAMILIES[family], timestep_spacing=spacing, interpolation_type=interpolation, final_sigmas_type=final,
         **({"timestep_type": "continuous", "prediction_type": "v_prediction"} if continuous else {}))
    for family, spacing, interpolation, final, continuous in itertools.product(
        FAMILIES, SPACINGS, ("linear", "log_linear"), ("zero", "sigma_min"), (False, True))
]


def table_id(config: dict) -> str:
    return "-".join(str(v) for k, v in config.items() if k != "prediction_type")


def assert_tables_match(ours, theirs) -> None:
    """Timesteps, σ's (diffusers' log_linear list has one unread σ more) and init_noise_sigma equal."""
    assert ours.timesteps.dtype == theirs.timesteps.dtype == torch.float32
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.sigmas.dtype == torch.float32 and len(ours.sigmas) == len(ours.timesteps) + 1
    assert torch.equal(ours.sigmas, theirs.sigmas[:len(ours.sigmas)])
    unread = len(theirs.sigmas) - len(ours.sigmas)  # the σ after the last step's, never read
    assert unread == 0 or (unread == 1 and ours.config.interpolation_type == "log_linear")
    assert torch.equal(torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(theirs.init_noise_sigma))
    assert ours.num_inference_steps == theirs.num_inference_steps


@pytest.mark.parametrize("config", TABLE_CONFIGS, ids=[table_id(c) for c in TABLE_CONFIGS])
def test_set_timesteps_matches_diffusers(config):
    config = dict(**schedule_config("scaled_linear"), **config)
    ours, theirs = EulerDiscreteScheduler(**config), diffusers.EulerDiscreteScheduler(**config)
    assert_tables_match(ours, theirs)  # before set_timesteps: the training schedule
    for n in (1, 2, 7, 10, 25):
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
        assert_tables_match(ours, theirs)


@pytest.mark.parametrize("spacing, offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 2)])
@pytest.mark.parametrize("T, beta_schedule, zsnr", [(1000, "linear", False), (100, "squaredcos_cap_v2", True),
                                                    (37, "scaled_linear", False)])
def test_set_timesteps_matches_diffusers_across_training_schedules(spacing, offset, T, beta_schedule, zsnr):
    config = dict(num_train_timesteps=T, beta_schedule=beta_schedule, timestep_spacing=spacing, steps_offset=offset,
                  rescale_betas_zero_snr=zsnr)
    ours, theirs = EulerDiscreteScheduler(**config), diffusers.EulerDiscreteScheduler(**config)
    assert_matches(ours.alphas_cumprod, theirs.alphas_cumprod, "alphas_cumprod")
    for n in (1, 2, 3, 9, T // 2, T):
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
        assert_tables_match(ours, theirs)
    if zsnr:
        assert ours.alphas_cumprod[-1] == 2**-24 and ours.init_noise_sigma == theirs.init_noise_sigma


def test_tables_reuse_the_shared_schedule_math():
    """schedule.euler_timesteps / respaced_sigmas / sigma_to_t are what set_timesteps is made of."""
    config = dict(use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1)
    theirs = diffusers.EulerDiscreteScheduler(**config)
    theirs.set_timesteps(9)
    train = schedule.train_sigmas(theirs.alphas_cumprod)
    timesteps = schedule.euler_timesteps(1000, 9, "leading", 1)
    sigmas = np.interp(timesteps, np.arange(1000), train)
    karras = schedule.respaced_sigmas("karras", sigmas, 9)
    assert np.array_equal(karras.astype(np.float32), theirs.sigmas[:-1].numpy())
    assert np.array_equal(schedule.sigma_to_t(karras, np.log(train)).astype(np.float32), theirs.timesteps.numpy())


@pytest.mark.parametrize("config", [{}, dict(interpolation_type="log_linear"), dict(final_sigmas_type="sigma_min"),
                                    dict(prediction_type="v_prediction", timestep_type="continuous")])
def test_custom_sigmas_match_diffusers(config):
    ours, theirs = EulerDiscreteScheduler(**config), diffusers.EulerDiscreteScheduler(**config)
    for sigmas in ([14.0, 7.5, 3.0, 1.2, 0.4, 0.0], [80.0, 0.5], [2.0, 1.0, 0.03]):
        ours.set_timesteps(sigmas=sigmas)
        theirs.set_timesteps(sigmas=sigmas)
        assert_tables_match(ours, theirs)
    case = Case(config, churn="churn")
    ours.set_timesteps(sigmas=[14.0, 7.5, 3.0, 1.2, 0.4, 0.0])
    theirs.set_timesteps(sigmas=[14.0, 7.5, 3.0, 1.2, 0.4, 0.0])
    assert_matches(custom_loop(ours, case), custom_loop(theirs, case))


@pytest.mark.parametrize("config", [{}, dict(interpolation_type="log_linear"), dict(timestep_spacing="leading"),
                                    dict(prediction_type="v_prediction", final_sigmas_type="sigma_min")])
def test_custom_timesteps_match_diffusers(config):
    ours, theirs = EulerDiscreteScheduler(**config), diffusers.EulerDiscreteScheduler(**config)
    for timesteps in ([999, 800, 600, 420, 250, 100, 30, 1, 0], [999.0, 500.5, 0.25], [500]):
        ours.set_timesteps(timesteps=timesteps)
        theirs.set_timesteps(timesteps=timesteps)
        assert_tables_match(ours, theirs)
    case = Case(config, churn="window")
    assert_matches(custom_loop(ours, case), custom_loop(theirs, case))


def custom_loop(scheduler, case: Case) -> torch.Tensor:
    """``sample_loop`` on the schedule set already (custom timesteps or σ's)."""
    generator = torch.Generator().manual_seed(case.seed)
    sample = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_output = toy_model(scheduler.scale_model_input(sample, t), t)
        sample = scheduler.step(model_output, t, sample, generator=generator, **CHURNS[case.churn]).prev_sample
    return sample


@pytest.mark.parametrize("T, n", [(1000, 61), (1000, 103), (100, 29), (17, 7)])
@pytest.mark.parametrize("family", ["none", "karras"])
def test_trailing_spacing_drops_diffusers_invalid_last_timestep(T, n, family):
    """DELIBERATE: diffusers' 'trailing' list is n + 1 long for these (T, n), ending at t = −1 (float
    rounding in np.arange); fastdiff takes the n valid timesteps (schedule.euler_timesteps). The
    σ's of those timesteps are diffusers'; with a σ family, diffusers' σ_min comes from t = −1
    (σ_0), fastdiff's from the last valid timestep."""
    config = dict(num_train_timesteps=T, timestep_spacing="trailing", **FAMILIES[family])
    ours, theirs = EulerDiscreteScheduler(**config), diffusers.EulerDiscreteScheduler(**config)
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    assert len(ours.timesteps) == n and ours.timesteps[0] == T - 1 and ours.timesteps.min() >= 0
    if family == "none":
        assert theirs.timesteps[-1] == -1 and len(theirs.timesteps) == n + 1
        assert torch.equal(ours.timesteps, theirs.timesteps[:n])
        assert torch.equal(ours.sigmas[:n], theirs.sigmas[:n]) and ours.sigmas[-1] == 0
    else:
        valid = schedule.euler_timesteps(T, n, "trailing")
        train = schedule.train_sigmas(ours.alphas_cumprod)
        assert ours.sigmas[n - 1] == np.float32(np.interp(valid[-1], np.arange(T), train))
    assert torch.isfinite(custom_loop(ours, Case(config))).all()


def test_timesteps_go_to_the_model_as_floats():
    scheduler = EulerDiscreteScheduler(use_karras_sigmas=True)
    scheduler.set_timesteps(10, device="cpu")
    assert scheduler.timesteps.dtype == torch.float32 and scheduler.timesteps.device.type == "cpu"
    assert (scheduler.timesteps != scheduler.timesteps.round()).any()  # fractional
    assert scheduler.sigmas.device.type == "cpu"


# ----------------------------------------------------------------------------- step by step
STEP_CASES = [
    (dict(prediction_type=pred, **FAMILIES[family]), churn)
    for pred, family, churn in [("epsilon", "none", "none"), ("v_prediction", "karras", "churn"),
                                ("sample", "exponential", "window"), ("epsilon", "beta", "churn")]
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config, churn", STEP_CASES, ids=[f"{c['prediction_type']}-{ch}" for c, ch in STEP_CASES])
def test_step_matches_diffusers_step_by_step(config, churn, backend):
    """Random model outputs, the same input sample for both at every step (no drift), the same generator seeds."""
    config = dict(**schedule_config("scaled_linear"), **config)
    ours, theirs = EulerDiscreteScheduler(**config), diffusers.EulerDiscreteScheduler(**config)
    ours.set_timesteps(6)
    theirs.set_timesteps(6)
    g = torch.Generator().manual_seed(7)
    sample = torch.randn(SHAPE, generator=g) * theirs.init_noise_sigma
    for i, t in enumerate(theirs.timesteps):
        model_output = torch.randn(SHAPE, generator=g)
        assert_matches(ours.scale_model_input(sample, t), theirs.scale_model_input(sample, t), f"model input {i}")
        with fastdiff.use_backend(backend):
            out = ours.step(model_output, t, sample, generator=torch.Generator().manual_seed(i), **CHURNS[churn])
        expected = theirs.step(model_output, t, sample, generator=torch.Generator().manual_seed(i), **CHURNS[churn])
        assert ours.step_index == theirs.step_index == i + 1
        assert_matches(out.pred_original_sample, expected.pred_original_sample, f"pred_original_sample {i}")
        assert_matches(out.prev_sample, expected.prev_sample, f"prev_sample {i}")
        sample = expected.prev_sample


def test_step_outputs_and_dtypes():
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(5)
    t = scheduler.timesteps[0]
    sample = torch.randn(SHAPE)
    out = scheduler.step(sample, t, sample)
    scheduler.set_timesteps(5)
    prev, x0 = scheduler.step(sample, t, sample, return_dict=False)
    assert isinstance(out, fastdiff.schedulers.euler.EulerDiscreteSchedulerOutput)
    assert torch.equal(out.prev_sample, prev) and torch.equal(out.pred_original_sample, x0)
    assert torch.equal(out[0], prev)
    # diffusers' dtypes: computed on the float32 sample, prev_sample in the model output's dtype
    scheduler.set_timesteps(5)
    half = scheduler.step(sample.half(), t, sample.half())
    assert half.prev_sample.dtype == torch.float16 and half.pred_original_sample.dtype == torch.float32
    assert scheduler.order == 1 and len(scheduler) == 1000


def test_variance_noise_is_the_noise_the_generator_would_draw():
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(5)
    t, sample = scheduler.timesteps[0], torch.randn(SHAPE)
    drawn = scheduler.step(sample, t, sample, s_churn=2.0, generator=torch.Generator().manual_seed(5))
    scheduler.set_timesteps(5)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    given = scheduler.step(sample, t, sample, s_churn=2.0, variance_noise=noise)
    assert torch.equal(given.prev_sample, drawn.prev_sample)


def test_churn_options_may_change_between_steps():
    """diffusers takes s_churn & co. per call; so does fastdiff (the plan restarts at the step index)."""
    ours, theirs = EulerDiscreteScheduler(), diffusers.EulerDiscreteScheduler()
    ours.set_timesteps(6)
    theirs.set_timesteps(6)
    sample = expected = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * ours.init_noise_sigma
    for i, t in enumerate(ours.timesteps):
        options = [{}, dict(s_churn=2.0), dict(s_churn=2.0, s_noise=0.9), {}, dict(s_churn=6.0, s_tmax=2.0), {}][i]
        sample = ours.step(toy_model(sample, t), t, sample, generator=torch.Generator().manual_seed(i),
                           **options).prev_sample
        expected = theirs.step(toy_model(expected, t), t, expected, generator=torch.Generator().manual_seed(i),
                               **options).prev_sample
    assert_matches(sample, expected)


def test_churn_gamma_is_capped_and_windowed():
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    sigmas = scheduler.sigmas.tolist()
    steps = list(scheduler._plan(0, s_churn=100.0, s_tmin=0.5, s_tmax=20.0))
    assert [step.noise for step in steps] == [0.5 <= s <= 20.0 for s in sigmas[:-1]]
    capped = euler_step(sigmas[1], sigmas[2], "epsilon", gamma=2**0.5 - 1)
    assert steps[1].convert[1] == capped.convert[1]  # σ̂ = √2·σ: γ = min(100/4, √2 − 1)


# ----------------------------------------------------------------------------- the sync-free loop
def step_path(scheduler, timesteps, sample, seed, options):
    """diffusers' API: scale_model_input, the model, step."""
    generator = torch.Generator().manual_seed(seed)
    outs = []
    for t in timesteps:
        out = scheduler.step(toy_model(scheduler.scale_model_input(sample, t), t), t, sample, generator=generator,
                             **options)
        sample = out.prev_sample
        outs.append(out)
    return outs


def table_path(scheduler, tables, sample, seed):
    """The sync-free loop's path: rows, their input scale, ``_update`` on fixed slots."""
    generator = torch.Generator().manual_seed(seed)
    slots = slot_buffers(sample) if tables.slots else None  # the loop's rule
    outs = []
    for i in range(len(tables)):
        row, t = tables.rows[i], tables.timesteps[i]
        noisy = tables.noisy[i]
        noise = schedule.randn_tensor(sample.shape, generator=generator, dtype=sample.dtype) if noisy else None
        sample, x0 = scheduler._update(toy_model(sample * row[INPUT_SCALE], t), sample, row, noise, slots)
        outs.append((sample, x0))
    return outs


@pytest.mark.parametrize("config, churn, backend", [
    (dict(use_karras_sigmas=True), "window", "triton"), (dict(use_karras_sigmas=True), "window", "torch"),
    (dict(prediction_type="v_prediction"), "none", "torch"),
    (dict(prediction_type="sample", timestep_spacing="leading"), "churn", "torch")])
def test_step_tables_reproduce_step_exactly(config, churn, backend):
    options = CHURNS[churn]
    scheduler = EulerDiscreteScheduler(**config)
    scheduler.set_timesteps(5)
    tables = scheduler.step_tables(scheduler.timesteps, **options)
    assert not tables.slots and tables.scales_input and len(tables) == 5
    assert tables.noisy == tuple(step.noise for step in scheduler._plan(0, **options))
    assert any(tables.noisy) == (churn != "none")
    for i, sigma in enumerate(scheduler.sigmas[:-1].tolist()):
        assert tables.rows[i, INPUT_SCALE] == np.float32(1 / math.sqrt(sigma**2 + 1))
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) * scheduler.init_noise_sigma
    with fastdiff.use_backend(backend):
        loop = table_path(scheduler, tables, sample, seed=4)
        steps = step_path(scheduler, scheduler.timesteps, sample, seed=4, options=options)
    for (prev, x0), out in zip(loop, steps):
        assert torch.equal(prev, out.prev_sample) and torch.equal(x0, out.pred_original_sample)


@pytest.mark.parametrize("config, churn", [(dict(use_karras_sigmas=True), "churn"), ({}, "none"),
                                           (dict(timestep_spacing="leading", steps_offset=1), "window")])
def test_sdedit_tail_after_set_begin_index(config, churn):
    """Image-to-image: noise x0 to the σ where the tail starts (add_noise), then run the tail —
    fastdiff's step, its sync-free tables and diffusers' step agree."""
    options, n, start = CHURNS[churn], 10, 4
    ours, theirs = EulerDiscreteScheduler(**config), diffusers.EulerDiscreteScheduler(**config)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    results = []
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(n)
        scheduler.set_begin_index(start)
        tail = scheduler.timesteps[start:]
        sample = scheduler.add_noise(x0, noise, tail[:1].repeat(SHAPE[0]))
        results.append((sample, step_path(scheduler, tail, sample, seed=1, options=options)))
    (ours_start, ours_steps), (their_start, their_steps) = results
    assert_matches(ours_start, their_start, "add_noise")
    assert ours.begin_index == start and ours.step_index == n
    for i, (a, b) in enumerate(zip(ours_steps, their_steps)):
        assert_matches(a.prev_sample, b.prev_sample, f"tail step {i}")
    tables = ours.step_tables(ours.timesteps[start:], **options)
    loop = table_path(ours, tables, ours_start, seed=1)
    for (prev, _), out in zip(loop, ours_steps):
        assert torch.equal(prev, out.prev_sample)


class ToyUNet(torch.nn.Module):
    """What SamplingLoop needs of a U-Net: device, dtype, memory_format and (x, t, labels) -> ε̂."""

    device, dtype, memory_format = torch.device("cpu"), torch.float32, torch.contiguous_format

    def forward(self, x, t, labels=None):
        return toy_model(x, t.item())


def test_sampling_loop_runs_euler_like_step():
    scheduler = EulerDiscreteScheduler(use_karras_sigmas=True)
    scheduler.set_timesteps(6)
    options = CHURNS["churn"]
    tables = scheduler.step_tables(scheduler.timesteps, **options)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) * scheduler.init_noise_sigma
    loop = SamplingLoop(ToyUNet(), scheduler, tables, SHAPE, None, None, options)
    loop.reset(sample, None)
    result = loop.run(torch.Generator().manual_seed(4), progress=False)
    expected = step_path(scheduler, scheduler.timesteps, sample, seed=4, options=options)[-1].prev_sample
    assert torch.equal(result, expected)


# ----------------------------------------------------------------------------- guidance, noising
@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
@pytest.mark.parametrize("prediction_type, churn", [("epsilon", "churn"), ("v_prediction", "none")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_guidance_equals_diffusers_on_the_combined_output(guidance_scale, prediction_type, churn, backend):
    ours = EulerDiscreteScheduler(prediction_type=prediction_type, **schedule_config("scaled_linear"))
    theirs = diffusers.EulerDiscreteScheduler(prediction_type=prediction_type, **schedule_config("scaled_linear"))
    ours.set_timesteps(4)
    theirs.set_timesteps(4)
    g = torch.Generator().manual_seed(9)
    sample = torch.randn(SHAPE, generator=g) * ours.init_noise_sigma
    for i, t in enumerate(ours.timesteps):
        cond, uncond = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        combined = uncond + guidance_scale * (cond - uncond)
        with fastdiff.use_backend(backend):
            fused = ours.step(cond, t, sample, generator=torch.Generator().manual_seed(i), uncond_model_output=uncond,
                              guidance_scale=guidance_scale, **CHURNS[churn])
        plain = theirs.step(combined, t, sample, generator=torch.Generator().manual_seed(i), **CHURNS[churn])
        assert_matches(fused.prev_sample, plain.prev_sample, f"prev_sample {i}")
        assert_matches(fused.pred_original_sample, plain.pred_original_sample, f"x0 {i}")
        sample = plain.prev_sample


@pytest.mark.parametrize("config", [{}, dict(use_karras_sigmas=True, rescale_betas_zero_snr=True),
                                    dict(timestep_spacing="leading", steps_offset=1)])
def test_add_noise_matches_diffusers(config):
    ours, theirs = EulerDiscreteScheduler(**config), diffusers.EulerDiscreteScheduler(**config)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn((5, 3, 4, 4), generator=g), torch.randn((5, 3, 4, 4), generator=g)
    # before set_timesteps (training): any training timestep, integer or float
    for timesteps in (torch.tensor([0, 999, 500, 1, 250]), torch.tensor([3.0, 998.0, 10.0, 400.0, 7.0])):
        assert_matches(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps), "training")
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(10)
    picked = ours.timesteps[[0, 3, 3, 9, 5]]
    assert_matches(ours.add_noise(x0, noise, picked), theirs.add_noise(x0, noise, picked), "scheduled")
    for scheduler in (ours, theirs):  # with a begin index every sample takes its σ
        scheduler.set_begin_index(2)
    assert_matches(ours.add_noise(x0, noise, picked), theirs.add_noise(x0, noise, picked), "begin index")


# ----------------------------------------------------------------------------- config
def test_config_matches_diffusers_defaults():
    ours, theirs = EulerDiscreteScheduler(), diffusers.EulerDiscreteScheduler()
    assert dict(ours.config) == {k: v for k, v in theirs.config.items() if not k.startswith("_")}
    config = dict(use_karras_sigmas=True, sigma_min=0.1, timestep_spacing="trailing", final_sigmas_type="sigma_min")
    assert dict(EulerDiscreteScheduler(**config).config) == {
        k: v for k, v in diffusers.EulerDiscreteScheduler(**config).config.items() if not k.startswith("_")}


def test_save_config_round_trips_and_loads_in_diffusers(tmp_path):
    config = dict(**schedule_config("scaled_linear"), use_exponential_sigmas=True, sigma_max=10.0,
                  prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1,
                  rescale_betas_zero_snr=True, final_sigmas_type="sigma_min", interpolation_type="log_linear")
    ours = EulerDiscreteScheduler(**config)
    ours.save_config(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["_class_name"] == "EulerDiscreteScheduler"
    back = EulerDiscreteScheduler.from_pretrained(tmp_path)
    theirs = diffusers.EulerDiscreteScheduler.from_pretrained(tmp_path)
    assert back.config == ours.config
    assert {k: theirs.config[k] for k in config} == config
    case = Case(config, steps=12, churn="churn")
    assert_matches(sample_loop(back, case)[0], sample_loop(theirs, case)[0])
    again = EulerDiscreteScheduler.from_config(ours.config)
    assert again.config == ours.config


def test_from_pretrained_of_a_diffusers_saved_folder(tmp_path):
    theirs = diffusers.EulerDiscreteScheduler(**schedule_config("scaled_linear"), use_karras_sigmas=True,
                                              timestep_spacing="trailing")
    theirs.save_config(tmp_path / "scheduler")
    for ours in (EulerDiscreteScheduler.from_pretrained(tmp_path / "scheduler"),
                 EulerDiscreteScheduler.from_pretrained(tmp_path, subfolder="scheduler")):
        assert dict(ours.config) == {k: v for k, v in theirs.config.items() if not k.startswith("_")}
        case = Case({}, steps=7, churn="window")
        assert_matches(sample_loop(ours, case)[0], sample_loop(theirs, case)[0])


def test_cross_loading_with_ddim():
    """Pipelines swap schedulers with from_config(other.config): Euler from a DDIM config (Stable
    Diffusion's, every key explicit as in a saved file) and back; keys the other does not take are
    ignored, as in diffusers."""
    ddim = diffusers.DDIMScheduler(**schedule_config("scaled_linear"), steps_offset=1, clip_sample=False,
                                   set_alpha_to_one=False, timestep_spacing="leading")
    ours = EulerDiscreteScheduler.from_config(ddim.config)
    theirs = diffusers.EulerDiscreteScheduler.from_config(ddim.config)
    assert dict(ours.config) == {k: theirs.config[k] for k in ours.config}
    assert ours.config.timestep_spacing == "leading" and ours.config.steps_offset == 1
    case = Case({}, steps=9)
    assert_matches(sample_loop(ours, case)[0], sample_loop(theirs, case)[0])
    euler = EulerDiscreteScheduler(use_karras_sigmas=True, **schedule_config("scaled_linear"))
    back = fastdiff.DDIMScheduler.from_config(euler.config)
    assert back.config.beta_schedule == "scaled_linear" and "use_karras_sigmas" not in back.config
    also = EulerDiscreteScheduler.from_config(fastdiff.DDIMScheduler(**schedule_config("scaled_linear")).config)
    assert also.config.beta_end == 0.012


def test_cross_loading_drops_the_other_schedulers_defaults_as_diffusers_does():
    """diffusers records which keys a scheduler took by default (``_use_default_values``, in memory
    only) and lets the target's own defaults apply to them: a default DDIM config gives Euler its
    'linspace' spacing, not DDIM's 'leading'."""
    ddim = diffusers.DDIMScheduler(**schedule_config("scaled_linear"))
    theirs = diffusers.EulerDiscreteScheduler.from_config(ddim.config)
    assert theirs.config.timestep_spacing == "linspace"
    assert EulerDiscreteScheduler.from_config(ddim.config).config.timestep_spacing == "linspace"


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("option, value", [
    ("interpolation_type", "cubic"), ("timestep_type", "discrete2"), ("final_sigmas_type", "one"),
    ("prediction_type", "eps"), ("prediction_type", "original_sample"), ("timestep_spacing", "uniform"),
    ("beta_schedule", "cosine"), ("sigma_min", 0.0), ("sigma_max", -1.0), ("sigma_min", float("nan")),
    ("num_train_timesteps", 0), ("steps_offset", -1),
])
def test_unknown_option_value_is_an_error(option, value):
    with pytest.raises(ValueError, match=option):
        EulerDiscreteScheduler(**{option: value})


@pytest.mark.parametrize("option, value", [("use_karras_sigmas", "yes"), ("use_beta_sigmas", 1),
                                           ("use_exponential_sigmas", None),
                                           ("rescale_betas_zero_snr", None), ("sigma_max", "10")])
def test_option_of_the_wrong_type_is_an_error(option, value):
    with pytest.raises(TypeError, match=option):
        EulerDiscreteScheduler(**{option: value})


@pytest.mark.parametrize("flags", [("use_karras_sigmas", "use_exponential_sigmas"),
                                   ("use_karras_sigmas", "use_beta_sigmas"),
                                   ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")])
def test_several_sigma_families_is_an_error(flags):
    with pytest.raises(ValueError, match="only one of use_karras_sigmas"):
        EulerDiscreteScheduler(**{flag: True for flag in flags})


def test_sigma_min_above_sigma_max_is_an_error():
    with pytest.raises(ValueError, match="sigma_min must be < sigma_max"):
        EulerDiscreteScheduler(use_karras_sigmas=True, sigma_min=5.0, sigma_max=1.0)


def test_unknown_config_key_and_bad_trained_betas_are_errors():
    with pytest.raises(ValueError, match="use_karas_sigmas"):
        EulerDiscreteScheduler.from_config({"use_karas_sigmas": True})
    with pytest.raises(ValueError, match="trained_betas"):
        EulerDiscreteScheduler(num_train_timesteps=10, trained_betas=[0.01] * 9)


@pytest.mark.parametrize("steps", [0, -3, 101, 10.0, 2.5, "10", True])
def test_num_inference_steps_out_of_range_is_an_error(steps):
    scheduler = EulerDiscreteScheduler(num_train_timesteps=100)
    with pytest.raises((ValueError, TypeError), match="num_inference_steps"):
        scheduler.set_timesteps(steps)


@pytest.mark.parametrize("kwargs", [{}, dict(num_inference_steps=5, sigmas=[1.0, 0.0]),
                                    dict(timesteps=[999, 0], sigmas=[1.0, 0.0]),
                                    dict(num_inference_steps=5, timesteps=[999, 0])])
def test_set_timesteps_needs_exactly_one_schedule(kwargs):
    with pytest.raises(ValueError, match="exactly one of num_inference_steps, timesteps or sigmas"):
        EulerDiscreteScheduler().set_timesteps(**kwargs)


@pytest.mark.parametrize("config, match", [(dict(use_karras_sigmas=True), "use_karras_sigmas"),
                                           (dict(use_beta_sigmas=True), "use_beta_sigmas"),
                                           (dict(timestep_type="continuous", prediction_type="v_prediction"),
                                            "continuous")])
def test_custom_timesteps_with_a_sigma_schedule_is_an_error(config, match):
    with pytest.raises(ValueError, match=match):
        EulerDiscreteScheduler(**config).set_timesteps(timesteps=[999, 500, 0])


@pytest.mark.parametrize("name, values", [
    ("timesteps", [0, 500, 999]), ("timesteps", [999, 999, 0]), ("timesteps", [1000, 0]), ("timesteps", [5, -1]),
    ("timesteps", [float("nan"), 0]), ("timesteps", []), ("timesteps", [[999, 0]]), ("timesteps", ["999"]),
    ("sigmas", [0.0, 1.0]), ("sigmas", [1.0]), ("sigmas", [2.0, -1.0]), ("sigmas", [float("inf"), 0.0]),
    ("sigmas", [3.0, 1.0, 1.0, 0.0]),
])
def test_bad_custom_schedule_is_an_error(name, values):
    with pytest.raises((ValueError, TypeError), match=name):
        EulerDiscreteScheduler().set_timesteps(**{name: values})


def test_step_before_set_timesteps_is_an_error():
    scheduler = EulerDiscreteScheduler()
    sample = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(sample, scheduler.timesteps[0], sample)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step_tables(scheduler.timesteps)


def test_more_steps_than_timesteps_is_an_error():
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(3)
    sample = torch.randn(SHAPE)
    for t in scheduler.timesteps:
        sample = scheduler.step(sample, t, sample).prev_sample
    with pytest.raises(ValueError, match="4 times for 3 timesteps"):
        scheduler.step(sample, scheduler.timesteps[-1], sample)


@pytest.mark.parametrize("kwargs, error", [
    (dict(s_churn=-0.1), ValueError), (dict(s_churn=float("nan")), ValueError),
    (dict(s_churn=float("inf")), ValueError), (dict(s_noise=float("inf")), ValueError),
    (dict(s_noise=float("nan")), ValueError), (dict(s_noise=-1.0), ValueError),
    (dict(s_tmin=float("nan")), ValueError), (dict(s_tmax=float("nan")), ValueError), (dict(s_churn="1"), TypeError),
    (dict(s_tmax=None), TypeError),
])
def test_bad_churn_options_are_errors(kwargs, error):
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(5)
    sample = torch.randn(SHAPE)
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        scheduler.step(sample, scheduler.timesteps[0], sample, **kwargs)
    with pytest.raises(error, match=name):
        scheduler.step_tables(scheduler.timesteps, **kwargs)
    assert scheduler.step_index is None  # refused before anything ran


def test_step_tables_with_an_unknown_option_is_an_error():
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(5)
    with pytest.raises(TypeError, match="eta"):
        scheduler.step_tables(scheduler.timesteps, eta=0.5)


@pytest.mark.parametrize("timestep", [999, torch.tensor(999), torch.tensor([999.0, 0.0]), 998.5, "999",
                                      float("nan")])
def test_bad_timestep_is_an_error(timestep):
    scheduler = EulerDiscreteScheduler(timestep_spacing="leading")
    scheduler.set_timesteps(10)
    sample = torch.randn(SHAPE)
    with pytest.raises((ValueError, TypeError), match="timestep"):
        scheduler.step(sample, timestep, sample)
    with pytest.raises((ValueError, TypeError), match="timestep"):
        scheduler.scale_model_input(sample, timestep)


def test_bad_step_tensors_are_errors():
    scheduler = EulerDiscreteScheduler()
    scheduler.set_timesteps(5)
    t, sample = scheduler.timesteps[0], torch.randn(SHAPE)
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(torch.randn(2, 3, 4, 5), t, sample)
    with pytest.raises(TypeError, match="sample"):
        scheduler.step(sample, t, torch.ones(SHAPE, dtype=torch.int64))
    with pytest.raises(ValueError, match="uncond_model_output"):
        scheduler.step(sample, t, sample, uncond_model_output=torch.randn(2, 3, 2, 2), guidance_scale=2.0)
    with pytest.raises(ValueError, match="noise"):
        scheduler.add_noise(sample, torch.randn(2, 3, 4, 5), t.reshape(1).repeat(2))
    with pytest.raises(ValueError, match="timestep"):
        scheduler.add_noise(sample, sample, torch.tensor([1.5, 2.5]))
