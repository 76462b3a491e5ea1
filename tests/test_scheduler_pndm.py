"""fastdiff's PNDMScheduler against diffusers 0.42's, the numerical oracle.

The requirement: for every option value, in float32, the same timesteps (PRK's, PLMS's) and the
same samples after every step of a full sampling loop as diffusers (≤ 1e-5 relative to the largest
value), on both backends: 'torch' (the reference op) and 'triton' (the fused kernel, on CUDA or,
without a GPU, on the CPU through Triton's interpreter).

Tolerance, everywhere: rtol = 1e-5 and atol = 1e-5 · max|expected|.

Where diffusers' own float32 arithmetic is ill-conditioned its result is not the reference: its
step computes √(ᾱ_{t−δ}/ᾱ_t)·x_t and the ε term separately and subtracts them, and where that ratio
κ is large (x_t at ᾱ_t ≈ 2e-9, the cosine schedule's t = 999; or a 1-2 step run from t = 999)
each product's rounding, κ·2^-24 relative to x_t, survives the cancellation: up to 8e-3 for
v_prediction. fastdiff folds the coefficients in float64 (eq. 9 is linear) and lands within 1e-6 of
the exact result. So every loop is also checked against diffusers' own PNDMScheduler run in float64
(its float32 ᾱ table promoted: the same numbers, without the rounding), and against diffusers in
float32 wherever κ ≤ KAPPA_MAX, where its rounding stays well inside the tolerance.
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
from fastdiff import ops
from fastdiff.reference import ROW_SIZE
from fastdiff.schedulers.linear import LinearPlan, slot_buffers
from fastdiff.schedulers.pndm import (PLMS_WEIGHTS, PRK_WEIGHTS, PNDMScheduler, PNDMSchedulerOutput, plms_second_stage,
                                      plms_step, pndm_step, pndm_transfer, prk_stage)
import scheduler_helpers
from scheduler_helpers import conditioning, pndm_in_float64, relative_error, schedule_config, toy_model, trained_betas

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers.scheduling_pndm import betas_for_alpha_bar  # noqa: E402

KAPPA_MAX = 10.0  # diffusers' float32 rounding ≈ κ·2^-24·(a few): ≤ 3e-6 observed below this
SHAPE = (2, 3, 4, 4)  # (B, C, H, W)
BACKENDS = ("torch", "triton")
SPACINGS = ("leading", "linspace", "trailing")
PREDICTIONS = ("epsilon", "v_prediction")
SCHEDULES = {  # beta_schedule -> (beta_start, beta_end); the cosine and Laplace ones ignore both
    "linear": (0.0001, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "squaredcos_cap_v2": (0.0001, 0.02),
    "sigmoid": (0.0002, 0.03),
    "laplace": (0.0001, 0.02),
}
SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "skip_prk_steps": True,
        "set_alpha_to_one": False, "steps_offset": 1, "num_train_timesteps": 1000, "trained_betas": None,
        "clip_sample": False}
full_grid = pytest.mark.full_grid
pytestmark = pytest.mark.usefixtures("one_thread")


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Equal to 1e-5 relative to the scale (max |expected|, once cast to ``actual``'s dtype)."""
    scheduler_helpers.assert_matches(actual, expected, what, cast=True)


def diffusers_twin(config: dict):
    """diffusers' PNDMScheduler for ``config``; it has no sigmoid or Laplace schedule: given as
    trained_betas from diffusers' own DDPM sigmoid and Laplace ᾱ(t)."""
    config = dict(config)
    T = config.get("num_train_timesteps", 1000)
    if config.get("trained_betas") is None and config.get("beta_schedule") == "sigmoid":
        ddpm = diffusers.DDPMScheduler(num_train_timesteps=T, **schedule_config("sigmoid"))
        config["trained_betas"] = ddpm.betas.tolist()
    elif config.get("trained_betas") is None and config.get("beta_schedule") == "laplace":
        config["trained_betas"] = betas_for_alpha_bar(T, alpha_transform_type="laplace").tolist()
    if config.get("trained_betas") is not None:
        config["beta_schedule"] = "linear"
    return diffusers.PNDMScheduler(**config)


def float64_twin(config: dict):
    """diffusers' scheduler computing in float64 from its float32 ᾱ table: the exact result of its algorithm."""
    return pndm_in_float64(diffusers_twin(config))


def sample_loop(scheduler, steps: int, dtype=torch.float32, seed: int = 0, start: int = 0) -> list[torch.Tensor]:
    """A full sampling loop with the toy model from timestep index ``start``; x after every step."""
    scheduler.set_timesteps(steps)
    if start and isinstance(scheduler, PNDMScheduler):
        scheduler.set_begin_index(start)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype) * scheduler.init_noise_sigma
    trajectory = []
    for t in scheduler.timesteps[start:]:
        sample = scheduler.step(toy_model(scheduler.scale_model_input(sample, t), t), t, sample).prev_sample
        trajectory.append(sample)
    return trajectory


# ----------------------------------------------------------------------------- the parity grid
@dataclasses.dataclass
class Case:
    config: dict
    steps: int

    @property
    def id(self) -> str:
        cfg = self.config
        parts = ["prk" if not cfg.get("skip_prk_steps", False) else "plms", cfg.get("beta_schedule", "linear"),
                 cfg.get("prediction_type", "epsilon"), cfg.get("timestep_spacing", "leading"), f"n{self.steps}"]
        named = {"set_alpha_to_one": "a1=", "steps_offset": "off", "num_train_timesteps": "T"}
        parts += [f"{tag}{cfg[key]}" for key, tag in named.items() if key in cfg]
        return "-".join(parts + (["trained"] if cfg.get("trained_betas") is not None else []))


def default_cases() -> list[Case]:
    """Every option value at least once, few steps (the Triton interpreter takes ~0.1 s a step)."""
    names = list(SCHEDULES)
    cases = []
    for i, (skip, pred, spacing) in enumerate(itertools.product((True, False), PREDICTIONS, SPACINGS)):
        steps = ((5, 8, 3), (4, 8, 5))[not skip][(i // 3 + i) % 3]  # n = 8: T//n = 125 is odd
        config = dict(**schedule_config(names[i % 5]), skip_prk_steps=skip, prediction_type=pred,
                      timestep_spacing=spacing, set_alpha_to_one=i % 4 < 2, steps_offset=(0, 1, 3)[i // 3 % 3])
        cases.append(Case(config, steps))
    cases.append(Case(dict(num_train_timesteps=64, trained_betas=trained_betas(64), skip_prk_steps=False,
                           prediction_type="v_prediction", timestep_spacing="trailing"), 4))
    cases.append(Case(dict(num_train_timesteps=100, skip_prk_steps=True, steps_offset=1), 7))
    return cases


def full_cases() -> list[Case]:
    cases = []
    # 1. schedule × skip_prk_steps × prediction × spacing × set_alpha_to_one
    for i, (sched, skip, pred, spacing, alpha_one) in enumerate(
            itertools.product(SCHEDULES, (True, False), PREDICTIONS, SPACINGS, (True, False))):
        steps = (1, 2, 3, 6, 10, 25)[i % 6] if skip else (4, 5, 8, 10, 25)[i % 5]
        cases.append(Case(dict(**schedule_config(sched), skip_prk_steps=skip, prediction_type=pred,
                               timestep_spacing=spacing, set_alpha_to_one=alpha_one), steps))
    # 2. steps_offset (only 'leading' uses it; the others ignore it, as diffusers does)
    for offset, spacing, skip in itertools.product((1, 3), SPACINGS, (True, False)):
        cases.append(Case(dict(steps_offset=offset, timestep_spacing=spacing, skip_prk_steps=skip), 10))
    # 3. short training schedules, n = T included (h = (T//n)//2 = 0: PRK's half steps are whole ones)
    for (T, steps), spacing, skip in itertools.product(((100, 7), (100, 25), (37, 37)), SPACINGS, (True, False)):
        cases.append(Case(dict(num_train_timesteps=T, timestep_spacing=spacing, skip_prk_steps=skip,
                               prediction_type=PREDICTIONS[steps % 2]), steps))
    # 4. trained_betas (beta_schedule is then ignored)
    for T, spacing, skip in itertools.product((1000, 64), SPACINGS, (True, False)):
        cases.append(Case(dict(num_train_timesteps=T, trained_betas=trained_betas(T), beta_schedule="scaled_linear",
                               timestep_spacing=spacing, skip_prk_steps=skip), 8))
    return cases


DEFAULT_CASES, FULL_CASES = default_cases(), full_cases()
CASES = [pytest.param(c, id=c.id) for c in DEFAULT_CASES] + [pytest.param(c, id=c.id, marks=full_grid)
                                                             for c in FULL_CASES]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_full_loop_matches_diffusers(case, backend):
    ours, theirs = PNDMScheduler(**case.config), diffusers_twin(case.config)
    assert_matches(ours.alphas_cumprod, theirs.alphas_cumprod, "alphas_cumprod")
    with fastdiff.use_backend(backend):
        trajectory = sample_loop(ours, case.steps)
    expected = sample_loop(theirs, case.steps)
    exact = sample_loop(float64_twin(case.config), case.steps, torch.float64)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert len(trajectory) == len(expected) == len(theirs.timesteps)
    well_conditioned = conditioning(theirs) <= KAPPA_MAX
    for t, x, wanted, exact_x in zip(theirs.timesteps.tolist(), trajectory, expected, exact):
        assert torch.isfinite(wanted).all()
        assert_matches(x, exact_x, f"x after t={t} vs diffusers in float64")
        if well_conditioned:
            assert_matches(x, wanted, f"x after t={t}")


def test_default_grid_covers_every_option_value():
    seen = {}
    for case in DEFAULT_CASES:
        config = {**PNDMScheduler(**case.config).config}
        config["trained_betas"] = config["trained_betas"] is not None
        config["offset_with"] = (config["steps_offset"], config["timestep_spacing"])
        for key, value in config.items():
            seen.setdefault(key, set()).add(value)
    assert seen["skip_prk_steps"] == seen["set_alpha_to_one"] == seen["trained_betas"] == {True, False}
    assert seen["beta_schedule"] >= set(SCHEDULES)
    assert seen["prediction_type"] == set(PREDICTIONS)
    assert seen["timestep_spacing"] == set(SPACINGS)
    assert seen["num_train_timesteps"] >= {1000, 100, 64}
    assert {(1, "leading"), (3, "leading"), (0, "leading")} <= seen["offset_with"]
    assert any(offset and spacing != "leading" for offset, spacing in seen["offset_with"])  # ignored there
    assert any(PNDMScheduler(**c.config).config.num_train_timesteps // c.steps % 2 for c in DEFAULT_CASES
               if not c.config["skip_prk_steps"])  # PRK with an odd T//n


def test_diffusers_float32_is_the_outlier_where_ill_conditioned():
    """The cosine schedule's ᾱ_999 = 2.4e-9: from there diffusers' float32 v_prediction step keeps
    ~1e-3 of rounding (κ ≈ 2·10⁴); fastdiff stays within 1e-6 of the exact (float64) result."""
    config = dict(beta_schedule="squaredcos_cap_v2", skip_prk_steps=True, prediction_type="v_prediction",
                  timestep_spacing="trailing")
    ours, theirs = PNDMScheduler(**config), diffusers_twin(config)
    mine, rounded = sample_loop(ours, 2)[-1], sample_loop(theirs, 2)[-1]
    exact = sample_loop(float64_twin(config), 2, torch.float64)[-1]
    assert conditioning(theirs) > 1e4
    assert relative_error(mine, exact) < 1e-6
    assert relative_error(rounded, exact) > 1e-4


# ----------------------------------------------------------------------------- timesteps
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_match_diffusers(spacing, skip):
    """timesteps, prk_timesteps, plms_timesteps: diffusers' layout (its trailing −1, see below, dropped)."""
    for T, n, offset in itertools.product((1000, 100, 37), (1, 2, 3, 4, 5, 7, 8, 10, 20, 36, 37, 61), (0, 1)):
        if n > T or (not skip and n < 4):
            continue
        config = dict(num_train_timesteps=T, timestep_spacing=spacing, skip_prk_steps=skip, steps_offset=offset)
        ours, theirs = PNDMScheduler(**config), diffusers.PNDMScheduler(**config)
        theirs.set_timesteps(n)
        if theirs.timesteps.max() >= T:  # steps_offset pushed the last one past the table: refused up front
            with pytest.raises(ValueError, match="steps_offset"):
                ours.set_timesteps(n)
            continue
        ours.set_timesteps(n)
        what = f"T={T} n={n} offset={offset}"
        assert ours.timesteps.dtype == torch.int64
        assert torch.equal(ours.timesteps, theirs.timesteps[theirs.timesteps >= 0]), what
        np.testing.assert_array_equal(ours.prk_timesteps, theirs.prk_timesteps, err_msg=what)
        np.testing.assert_array_equal(ours.plms_timesteps, theirs.plms_timesteps[theirs.plms_timesteps >= 0],
                                      err_msg=what)
        assert len(ours.timesteps) == (n + 9 if not skip else n + 1 if n > 1 else 1) and ours.num_inference_steps == n


@pytest.mark.parametrize("skip", [True, False])
def test_trailing_spacing_visits_valid_timesteps(skip):
    """KNOWN BUG in diffusers 0.42: 'trailing' builds np.arange(T, 0, -T/n), one element too long for
    some (T, n); its PNDM loop then ends with a step at t = −1 (ᾱ of the last training step)."""
    config = dict(timestep_spacing="trailing", skip_prk_steps=skip)
    ours, theirs = PNDMScheduler(**config), diffusers.PNDMScheduler(**config)
    ours.set_timesteps(61)
    theirs.set_timesteps(61)
    assert theirs.timesteps[-1] == -1, "diffusers fixed its trailing spacing: drop the filter in the tests"
    assert torch.equal(ours.timesteps, theirs.timesteps[:-1]) and ours.timesteps.min() >= 0
    assert torch.isfinite(sample_loop(ours, 61)[-1]).all()


def test_timesteps_before_and_after_set_timesteps():
    ours = PNDMScheduler(num_train_timesteps=50)
    assert torch.equal(ours.timesteps, torch.arange(49, -1, -1)) and ours.prk_timesteps is None
    ours.set_timesteps(10, device="cpu")
    assert ours.timesteps.device == torch.device("cpu")
    assert ours.prk_timesteps.dtype == ours.plms_timesteps.dtype == np.int64


# ----------------------------------------------------------------------------- step by step
STEP_CONFIGS = [
    pytest.param(dict(skip_prk_steps=True), id="plms-eps"),
    pytest.param(dict(skip_prk_steps=False, prediction_type="v_prediction", set_alpha_to_one=True), id="prk-v"),
    pytest.param(dict(skip_prk_steps=True, prediction_type="v_prediction", timestep_spacing="linspace"),
                 id="plms-v-linspace", marks=full_grid),
    pytest.param(dict(skip_prk_steps=False, timestep_spacing="trailing", beta_schedule="scaled_linear"),
                 id="prk-eps-trailing", marks=full_grid),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", STEP_CONFIGS)
def test_step_by_step_matches_diffusers(config, backend):
    """Each step from the same sample and random model output; counter and ets as diffusers holds them."""
    ours, theirs = PNDMScheduler(**config), diffusers.PNDMScheduler(**config)
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(SHAPE, generator=generator)
    for t in theirs.timesteps:
        model_output = torch.randn(SHAPE, generator=generator)
        with fastdiff.use_backend(backend):
            out = ours.step(model_output, t, sample)
        expected = theirs.step(model_output, t, sample).prev_sample
        assert isinstance(out, PNDMSchedulerOutput) and out.pred_original_sample is None
        assert_matches(out.prev_sample, expected, f"t={int(t)} counter={theirs.counter - 1}")
        assert ours.counter == theirs.counter
        assert len(ours.ets) == min(len(theirs.ets), 3)  # diffusers' 4th-oldest is never read again
        assert all(torch.equal(a, b) for a, b in zip(ours.ets, theirs.ets[-3:]))
        sample = expected


@pytest.mark.parametrize("skip", [True, False])
def test_step_prk_and_step_plms_match_diffusers(skip):
    """Calling diffusers' step_prk / step_plms for each phase directly, as its tests do."""
    ours, theirs = PNDMScheduler(skip_prk_steps=skip), diffusers.PNDMScheduler(skip_prk_steps=skip)
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    sample = expected = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for i, t in enumerate(theirs.timesteps):
        method = "step_prk" if i < len(theirs.prk_timesteps) else "step_plms"
        (sample,) = getattr(ours, method)(toy_model(sample, t), t, sample, return_dict=False)
        expected = getattr(theirs, method)(toy_model(expected, t), t, expected).prev_sample
        assert_matches(sample, expected, f"{method} t={int(t)}")


def test_warm_up_steps_start_from_the_stored_sample():
    """diffusers' quirk, kept: PRK stages 1-3 and the skip-PRK second step ignore the sample passed."""
    def run(skip: bool, garbage_at: set[int]) -> list[torch.Tensor]:
        scheduler = PNDMScheduler(skip_prk_steps=skip)
        scheduler.set_timesteps(5)
        sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
        outs = []
        for i, t in enumerate(scheduler.timesteps[:8]):
            given = torch.full(SHAPE, 1e3) if i in garbage_at else sample
            sample = scheduler.step(toy_model(sample, t), t, given).prev_sample
            outs.append(sample)
        return outs

    for skip, ignored in ((True, {1}), (False, {1, 2, 3, 5, 6, 7})):
        clean = run(skip, set())
        assert all(torch.equal(a, b) for a, b in zip(clean, run(skip, ignored)))
        assert not torch.equal(clean[-1], run(skip, {4})[-1])  # a step that starts from the sample passed


@pytest.mark.parametrize("skip, start", [(True, 1), (True, 2), (True, 4), (False, 3), (False, 12)])
def test_a_run_started_part_way_matches_diffusers(skip, start):
    """Image-to-image: diffusers' counter starts at 0 on the tail (set_begin_index tells fastdiff where)."""
    ours, theirs = PNDMScheduler(skip_prk_steps=skip), diffusers.PNDMScheduler(skip_prk_steps=skip)
    trajectory = sample_loop(ours, 6, start=start)
    theirs.set_timesteps(6)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t, x in zip(theirs.timesteps[start:], trajectory):
        sample = theirs.step(toy_model(sample, t), t, sample).prev_sample
        assert_matches(x, sample, f"t={int(t)}")
    assert len(trajectory) == len(theirs.timesteps) - start


def test_a_run_started_from_a_timestep_takes_its_first_occurrence():
    scheduler = PNDMScheduler(skip_prk_steps=True)
    scheduler.set_timesteps(6)
    tail = scheduler.timesteps[1:]  # t_{n-1} twice: the tail holds both
    sample = torch.randn(SHAPE)
    for t in tail:
        sample = scheduler.step(toy_model(sample, t), t, sample).prev_sample
    assert scheduler.counter == len(tail)


# ----------------------------------------------------------------------------- the sync-free loop
SYNC_FREE = [(dict(skip_prk_steps=True), 6, 0), (dict(skip_prk_steps=False, prediction_type="v_prediction"), 4, 0),
             (dict(skip_prk_steps=False), 5, 6), (dict(skip_prk_steps=True, prediction_type="v_prediction"), 8, 3)]


# every case on the torch backend; the interpreter (slow) takes the v_prediction ones, PRK and PLMS both
SYNC_FREE_CASES = [(backend, *case) for backend in BACKENDS for case in SYNC_FREE
                   if backend == "torch" or case[0].get("prediction_type") == "v_prediction"]


@pytest.mark.parametrize("backend, config, steps, start", SYNC_FREE_CASES)
def test_step_tables_reproduce_step(config, steps, start, backend):
    """Rows of step_tables through _update with the loop's slots give step()'s samples bit for bit."""
    scheduler = PNDMScheduler(**config)
    with fastdiff.use_backend(backend):
        stepped = sample_loop(scheduler, steps, start=start)
    tables = scheduler.step_tables(scheduler.timesteps[start:])
    assert tables.slots and not any(tables.noisy) and not tables.scales_input
    assert torch.equal(tables.timesteps, scheduler.timesteps[start:]) and len(tables) == len(stepped)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    slots = slot_buffers(sample)
    with fastdiff.use_backend(backend):
        for i, t in enumerate(tables.host_timesteps):
            sample, converted = scheduler._update(toy_model(sample, t), sample, tables.rows[i], None, slots)
            assert converted is None
            assert torch.equal(sample, stepped[i]), f"step {i} (t={t})"


def test_pndm_step_runs_on_diffusers_own_state():
    """The drop-in contract: pndm_step(diffusers' scheduler, its counter, len(ets), t) is its step."""
    theirs = diffusers.PNDMScheduler(prediction_type="v_prediction")
    theirs.set_timesteps(5)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    plan, slots = LinearPlan(), slot_buffers(sample)
    for t in theirs.timesteps:
        model_output = toy_model(sample, t)
        row = plan.pack(pndm_step(theirs, theirs.counter, len(theirs.ets), int(t)))[:ROW_SIZE]
        fused, _ = ops.multistep_update(model_output, sample, row, slots)
        sample = theirs.step(model_output, t, sample).prev_sample
        assert_matches(fused, sample, f"t={int(t)}")


# ----------------------------------------------------------------------------- the equations
def test_transfer_is_ddim_with_eta_zero():
    """Eq. 9 is DDIM's deterministic step written without its cancellation; v folded in as ε."""
    rng = np.random.default_rng(0)
    for alpha_t, alpha_prev in rng.uniform(1e-4, 1, (50, 2)):
        x0_coef, eps_coef = 1 / math.sqrt(alpha_t), -math.sqrt((1 - alpha_t) / alpha_t)  # x̂0 = (x − √β ε)/√ᾱ
        ddim = (math.sqrt(alpha_prev) * x0_coef, math.sqrt(alpha_prev) * eps_coef + math.sqrt(1 - alpha_prev))
        np.testing.assert_allclose(pndm_transfer(alpha_t, alpha_prev, "epsilon"), ddim, rtol=1e-12)
        # v: x̂0 = √ᾱ x − √β v, ε̂ = √β x + √ᾱ v
        v_ddim = (math.sqrt(alpha_prev * alpha_t) + math.sqrt((1 - alpha_prev) * (1 - alpha_t)),
                  -math.sqrt(alpha_prev * (1 - alpha_t)) + math.sqrt((1 - alpha_prev) * alpha_t))
        np.testing.assert_allclose(pndm_transfer(alpha_t, alpha_prev, "v_prediction"), v_ddim, rtol=1e-9, atol=1e-12)


def test_steps_are_consistent_methods():
    """The multistep and Runge-Kutta weights sum to 1 (ε' of a constant ε is ε); who stores what."""
    for order, weights in PLMS_WEIGHTS.items():
        assert math.isclose(sum(weights), 1.0) and len(weights) == order
    assert math.isclose(sum(PRK_WEIGHTS), 1.0)
    stages = [prk_stage(s, 0.5, 0.6, "epsilon") for s in range(4)]
    assert [s.push for s in stages] == [True, False, False, False]
    assert stages[0].last == {"x": 1.0} and all(s.last is None for s in stages[1:])
    assert all(s.uses("last") and not s.uses("x") for s in stages[1:])  # stages 1-3 restart from x_t
    assert plms_step(1, 0.5, 0.6, "epsilon").last == {"x": 1.0} and plms_step(4, 0.5, 0.6, "epsilon").last is None
    second = plms_second_stage(0.5, 0.6, "epsilon")
    assert not second.push and second.uses("m1") and second.uses("last") and not second.uses("x")


# ----------------------------------------------------------------------------- guidance
GUIDED = [pytest.param(dict(skip_prk_steps=True), id="plms-eps"),
          pytest.param(dict(skip_prk_steps=False, prediction_type="v_prediction"), id="prk-v")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", GUIDED)
def test_fused_guidance_equals_diffusers_step_on_the_combined_output(config, backend):
    ours, theirs = PNDMScheduler(**config), diffusers.PNDMScheduler(**config)
    ours.set_timesteps(4 if backend == "triton" else 8)
    theirs.set_timesteps(4 if backend == "triton" else 8)
    generator = torch.Generator().manual_seed(5)
    sample = torch.randn(SHAPE, generator=generator)
    for i, t in enumerate(theirs.timesteps):
        scale = (1.0, 7.5, 3.0)[i % 3]
        cond, uncond = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
        with fastdiff.use_backend(backend):
            fused = ours.step(cond, t, sample, uncond_model_output=uncond, guidance_scale=scale).prev_sample
        expected = theirs.step(uncond + scale * (cond - uncond), t, sample).prev_sample
        assert_matches(fused, expected, f"t={int(t)} w={scale}")
        sample = expected


# ----------------------------------------------------------------------------- training side
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_add_noise_matches_diffusers(schedule, dtype):
    """PNDM noises as DDPM does: per-sample timesteps, before, during or after a run alike."""
    ours, theirs = PNDMScheduler(**schedule_config(schedule)), diffusers.PNDMScheduler(**schedule_config(schedule))
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn((5, 3, 7, 6), generator=generator).to(dtype)
    noise = torch.randn((5, 3, 7, 6), generator=generator).to(dtype)
    for timesteps in (torch.tensor([0, 999, 500, 1, 250]), torch.tensor([3, 998, 10, 400, 7], dtype=torch.int32),
                      torch.tensor(640)):
        expected = theirs.add_noise(x0, noise, timesteps)
        for when in ("before", "during"):
            if when == "during":
                ours.set_timesteps(10)
                ours.step(torch.randn(SHAPE), ours.timesteps[0], torch.randn(SHAPE))
            noisy = ours.add_noise(x0, noise, timesteps)
            assert noisy.dtype == dtype
            if dtype == torch.float32:
                assert_matches(noisy, expected, f"add_noise {when} a run")
            else:  # same ops in the same low precision
                torch.testing.assert_close(noisy, expected)


def test_add_noise_refuses_timesteps_outside_the_table():
    scheduler = PNDMScheduler()
    x = torch.randn(SHAPE)
    for timesteps in (torch.tensor([1000, 3]), torch.tensor([-1, 3])):
        with pytest.raises(ValueError, match="timesteps"):
            scheduler.add_noise(x, x, timesteps)


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("config", [{}, dict(skip_prk_steps=True, set_alpha_to_one=True, steps_offset=1,
                                             beta_schedule="scaled_linear", timestep_spacing="trailing",
                                             prediction_type="v_prediction")])
def test_config_and_constants_match_diffusers(config):
    ours, theirs = PNDMScheduler(**config), diffusers.PNDMScheduler(**config)
    assert dict(ours.config) == {k: v for k, v in theirs.config.items() if not k.startswith("_")}
    assert ours.order == theirs.order == 1 and ours.init_noise_sigma == theirs.init_noise_sigma == 1.0
    assert ours.pndm_order == theirs.pndm_order == 4 and len(ours) == len(theirs) == 1000
    assert_matches(ours.final_alpha_cumprod, theirs.final_alpha_cumprod, "final_alpha_cumprod")
    sample = torch.randn(SHAPE)
    assert torch.equal(ours.scale_model_input(sample, 10), sample)
    assert torch.equal(ours.scale_model_input(sample), sample)
    with pytest.raises(TypeError, match="read-only"):
        ours.config["skip_prk_steps"] = True


def test_save_config_round_trips_and_loads_in_diffusers(tmp_path):
    config = dict(skip_prk_steps=True, prediction_type="v_prediction", timestep_spacing="linspace",
                  num_train_timesteps=64, trained_betas=trained_betas(64))
    ours = PNDMScheduler(**config)
    ours.save_config(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["_class_name"] == "PNDMScheduler"
    back, theirs = PNDMScheduler.from_pretrained(tmp_path), diffusers.PNDMScheduler.from_pretrained(tmp_path)
    assert back.config == ours.config and torch.equal(back.betas, ours.betas)
    assert_matches(sample_loop(ours, 8)[-1], sample_loop(theirs, 8)[-1])


def test_from_pretrained_of_a_diffusers_saved_config(tmp_path):
    theirs = diffusers.PNDMScheduler(**{k: v for k, v in SD15.items() if k != "clip_sample"})
    theirs.save_config(tmp_path / "scheduler")  # a model repo's layout
    for ours in (PNDMScheduler.from_pretrained(tmp_path / "scheduler"),
                 PNDMScheduler.from_pretrained(tmp_path, subfolder="scheduler")):
        assert dict(ours.config) == {k: v for k, v in theirs.config.items() if not k.startswith("_")}
        assert_matches(sample_loop(ours, 10)[-1], sample_loop(theirs, 10)[-1])


def test_stable_diffusion_config_loads_and_matches(tmp_path):
    """SD 1.5's scheduler_config.json (PNDM, PLMS only) carries DDIM's clip_sample: ignored, as in diffusers."""
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "PNDMScheduler", **SD15}))
    ours, theirs = PNDMScheduler.from_pretrained(tmp_path), diffusers.PNDMScheduler.from_pretrained(tmp_path)
    assert ours.config.skip_prk_steps and ours.config.steps_offset == 1 and "clip_sample" not in ours.config
    assert torch.equal(PNDMScheduler.from_config(SD15).alphas_cumprod, ours.alphas_cumprod)
    ours.set_timesteps(50)
    theirs.set_timesteps(50)
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.timesteps[:3].tolist() == [981, 961, 961]
    assert_matches(sample_loop(ours, 12)[-1], sample_loop(theirs, 12)[-1])


@pytest.mark.parametrize("source", ["fastdiff", "diffusers"])
def test_cross_loading_with_ddim(source):
    """PNDM from a DDIM config (its clip_sample, thresholding, ... ignored) and DDIM from PNDM's."""
    library = fastdiff if source == "fastdiff" else diffusers
    ddim = library.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                 set_alpha_to_one=False, clip_sample=False, timestep_spacing="trailing")
    ours, theirs = PNDMScheduler.from_config(ddim.config), diffusers.PNDMScheduler.from_config(ddim.config)
    assert dict(ours.config) == {k: theirs.config[k] for k in ours.config}
    assert_matches(sample_loop(ours, 10)[-1], sample_loop(theirs, 10)[-1])
    back = fastdiff.DDIMScheduler.from_config(ours.config)
    assert {k: back.config[k] for k in ours.config if k in back.config} == \
           {k: v for k, v in ours.config.items() if k in back.config}
    assert back.config.set_alpha_to_one is False and back.config.clip_sample is True  # DDIM's default again


def test_unknown_config_key_is_still_an_error():
    with pytest.raises(ValueError, match="beta_strat"):
        PNDMScheduler.from_config({"num_train_timesteps": 100, "beta_strat": 0.001})
    with pytest.raises(TypeError, match="config"):
        PNDMScheduler.from_config([("num_train_timesteps", 100)])


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("option, value, error", [
    ("beta_schedule", "cosine", ValueError), ("timestep_spacing", "uniform", ValueError),
    ("prediction_type", "eps", ValueError), ("skip_prk_steps", "yes", TypeError), ("skip_prk_steps", 1, TypeError),
    ("set_alpha_to_one", None, TypeError), ("steps_offset", -1, ValueError), ("num_train_timesteps", 0, ValueError),
    ("trained_betas", [0.01] * 9, ValueError), ("beta_start", 0.5, ValueError),
])
def test_unknown_option_value_is_an_error(option, value, error):
    with pytest.raises(error, match=option):
        PNDMScheduler(**{option: value})


def test_prediction_type_sample_is_refused():
    """diffusers refuses it at the first step; fastdiff at construction, naming what it takes."""
    with pytest.raises(ValueError, match="prediction_type must be one of 'epsilon', 'v_prediction'; got 'sample'"):
        PNDMScheduler(prediction_type="sample")
    theirs = diffusers.PNDMScheduler(prediction_type="sample", skip_prk_steps=True)
    theirs.set_timesteps(10)
    with pytest.raises(ValueError, match="prediction_type"):
        theirs.step(torch.randn(SHAPE), theirs.timesteps[0], torch.randn(SHAPE))


@pytest.mark.parametrize("steps", [0, -3, 1001, 10.0, 2.5, "10", True, None])
def test_bad_num_inference_steps_is_an_error(steps):
    with pytest.raises((ValueError, TypeError), match="num_inference_steps"):
        PNDMScheduler().set_timesteps(steps)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_too_few_steps_for_runge_kutta_is_an_error(steps):
    with pytest.raises(ValueError, match="num_inference_steps must be >= 4 with skip_prk_steps=False"):
        PNDMScheduler().set_timesteps(steps)
    with pytest.raises(ValueError):  # diffusers: a numpy broadcast error
        diffusers.PNDMScheduler().set_timesteps(steps)
    PNDMScheduler(skip_prk_steps=True).set_timesteps(steps)


def test_steps_offset_past_the_table_is_an_error():
    with pytest.raises(ValueError, match="steps_offset=20 puts timestep 110 past the last training timestep 99"):
        PNDMScheduler(num_train_timesteps=100, steps_offset=20).set_timesteps(10)


def started(**config) -> PNDMScheduler:
    scheduler = PNDMScheduler(**config)
    scheduler.set_timesteps(4)
    return scheduler


def test_step_before_set_timesteps_is_an_error():
    sample = torch.randn(SHAPE)
    for method in ("step", "step_prk", "step_plms"):
        with pytest.raises(ValueError, match="set_timesteps"):
            getattr(PNDMScheduler(), method)(sample, 900, sample)


def test_more_steps_than_timesteps_is_an_error():
    scheduler = started(skip_prk_steps=True)
    sample = torch.randn(SHAPE)
    for t in scheduler.timesteps:
        sample = scheduler.step(toy_model(sample, t), t, sample).prev_sample
    with pytest.raises(ValueError, match="called 6 times for 5 timesteps; call set_timesteps again"):
        scheduler.step(sample, scheduler.timesteps[-1], sample)


def test_a_batch_that_changes_shape_mid_loop_is_an_error():
    scheduler = started()
    t0, t1 = scheduler.timesteps[:2]
    scheduler.step(torch.randn(SHAPE), t0, torch.randn(SHAPE))
    smaller = torch.randn(1, *SHAPE[1:])
    with pytest.raises(ValueError, match=r"sample is a torch.float32 tensor of shape \(1, 3, 4, 4\)"):
        scheduler.step(smaller, t1, smaller)


def test_bad_step_tensors_are_errors():
    scheduler = started()
    t = scheduler.timesteps[0]
    sample = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(torch.randn(2, 3, 4, 5), t, sample)
    with pytest.raises(TypeError, match="sample"):
        started().step(sample, t, torch.ones(SHAPE, dtype=torch.int64))
    with pytest.raises(ValueError, match="uncond_model_output"):
        started().step(sample, t, sample, guidance_scale=3.0)


@pytest.mark.parametrize("timestep, match", [
    (1000, r"timestep must lie in \[0, 1000\)"), (-1, "timestep must lie"), (2.5, "timestep must be an integer"),
    (torch.tensor(900.0), "timestep must be an integer tensor"), (torch.tensor([900, 800]), "single integer"),
    (5, "timestep 5 is not one of the scheduler's timesteps"),
])
def test_bad_first_timestep_is_an_error(timestep, match):
    sample = torch.randn(SHAPE)
    with pytest.raises((ValueError, TypeError), match=match):
        started().step(sample, timestep, sample)


def test_a_timestep_out_of_order_is_an_error():
    """The step computes with the schedule's next timestep: another one would silently differ from diffusers."""
    scheduler = started(skip_prk_steps=True)
    sample = torch.randn(SHAPE)
    scheduler.step(sample, scheduler.timesteps[0], sample)
    with pytest.raises(ValueError, match=r"timestep 250 is not the scheduler's next timestep 500 .*set_begin_index"):
        scheduler.step(sample, scheduler.timesteps[3], sample)
    scheduler = started(skip_prk_steps=True)  # a tail from the second of the repeated timesteps
    scheduler.step(sample, scheduler.timesteps[2], sample)
    with pytest.raises(ValueError, match="set_begin_index"):
        scheduler.step(sample, scheduler.timesteps[3], sample)


def test_step_prk_and_step_plms_out_of_their_phase_are_errors():
    sample = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="step_plms called at counter 0, where the next step is a Runge-Kutta stage"):
        started().step_plms(sample, 750, sample)
    with pytest.raises(ValueError, match="step_prk called at counter 0, where the next step is a linear multistep"):
        started(skip_prk_steps=True).step_prk(sample, 750, sample)
