"""fastdiff's EulerAncestralDiscreteScheduler against diffusers 0.42, the numerical oracle.

The requirement: for every config option, in float32, the same timesteps, σ's and init_noise_sigma
as diffusers, and the same samples after a full sampling loop (≤ 1e-5 relative to the largest
value), with the noise of every step drawn from a torch.Generator in diffusers' order, on both
backends ('torch', and 'triton': the fused multistep kernel, through Triton's interpreter without
a GPU). The default run holds every option value; ``pytest -m full_grid`` runs the whole product.

Tolerance, everywhere: rtol = 1e-5 and atol = 1e-5 · max|expected|, against diffusers' float32
run and against diffusers' equations evaluated in float64; where diffusers' float32 run is itself
further than RTOL/2 from its float64 one (a big σ drop with an O(1) x̂0: its x + (x − x̂0)/σ·dt
cancels ~eps·|x|), fastdiff must be the closer of the two (see test_scheduler_euler.py).
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
from fastdiff.schedulers.euler_ancestral import (EulerAncestralDiscreteScheduler,
                                                 EulerAncestralDiscreteSchedulerOutput, ancestral_sigmas,
                                                 euler_ancestral_step)
from fastdiff.schedulers.linear import INPUT_SCALE, slot_buffers
from fastdiff.sampling_loop import SamplingLoop
from scheduler_helpers import (RTOL, assert_matches, noise_drawn_in, own_betas_as_trained, relative_error,
                               schedule_config, toy_model, trained_betas)

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 3, 4, 4)  # (B, C, H, W)
BACKENDS = ["torch", "triton"]
PREDICTIONS = ("epsilon", "v_prediction")  # diffusers' Euler-a has no 'sample' (fastdiff's: see below)
SPACINGS = ("linspace", "leading", "trailing")
pytestmark = pytest.mark.usefixtures("one_thread")
SCHEDULES = {  # beta_schedule -> (beta_start, beta_end)
    "linear": (0.0001, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "squaredcos_cap_v2": (0.0001, 0.02),
    "sigmoid": (0.0002, 0.03),  # fastdiff only: diffusers gets the same betas as trained_betas
}


def diffusers_twin(config: dict):
    return diffusers.EulerAncestralDiscreteScheduler(**own_betas_as_trained(config, EulerAncestralDiscreteScheduler))


# ----------------------------------------------------------------------------- the parity grid
@dataclasses.dataclass(frozen=True)
class Case:
    config: dict
    steps: int = 8
    seed: int = 0
    per_sample_generators: bool = False

    @property
    def id(self) -> str:
        cfg = self.config
        parts = [cfg.get("beta_schedule", "linear"), cfg.get("prediction_type", "epsilon"),
                 cfg.get("timestep_spacing", "linspace"), f"n{self.steps}"]
        named = {"steps_offset": "off", "rescale_betas_zero_snr": "zsnr=", "num_train_timesteps": "T"}
        parts += [f"{tag}{cfg[key]}" for key, tag in named.items() if key in cfg]
        if cfg.get("trained_betas") is not None:
            parts.append("trained")
        if self.per_sample_generators:
            parts.append("gen_list")
        return "-".join(map(str, parts))


def build_cases(full: bool) -> list[Case]:
    cases = []
    product = itertools.product(SCHEDULES, PREDICTIONS, SPACINGS, (False, True))
    for i, (sched, pred, spacing, zsnr) in enumerate(product):
        if not full and i % 5:
            continue
        config = dict(**schedule_config(sched), prediction_type=pred, timestep_spacing=spacing,
                      rescale_betas_zero_snr=zsnr)
        cases.append(Case(config, steps=(10 if zsnr else (5, 8, 10)[i % 3]), seed=i % 4))
    schedules = list(SCHEDULES)
    extra = [
        dict(timestep_spacing="leading", steps_offset=1),
        dict(timestep_spacing="leading", steps_offset=3, prediction_type="v_prediction"),
        dict(timestep_spacing="trailing", steps_offset=1, rescale_betas_zero_snr=True),
        dict(trained_betas=trained_betas(1000), prediction_type="v_prediction"),
        dict(num_train_timesteps=100, trained_betas=trained_betas(100), timestep_spacing="trailing"),
        dict(num_train_timesteps=100, timestep_spacing="linspace"),
        dict(beta_schedule="laplace", timestep_spacing="leading"),
    ]
    for i, config in enumerate(extra):
        base = schedule_config(schedules[i % 4]) if "beta_schedule" not in config else {}
        cases.append(Case({**base, **config}, steps=(6, 9)[i % 2], seed=i, per_sample_generators=i % 3 == 1))
    return cases


DEFAULT_CASES = build_cases(full=False)
FULL_CASES = [case for case in build_cases(full=True) if case not in DEFAULT_CASES]
# the interpreter runs the kernel bit for bit like the reference: every other default case on 'triton'
DEFAULT_RUNS = [(case, backend) for i, case in enumerate(DEFAULT_CASES) for backend in BACKENDS
                if backend == "torch" or i % 2 == 0]
FULL_RUNS = [(case, backend) for case in FULL_CASES for backend in BACKENDS] + [
    (case, "triton") for i, case in enumerate(DEFAULT_CASES) if i % 2]


def generators(case: Case):
    if case.per_sample_generators:
        return [torch.Generator().manual_seed(case.seed + i) for i in range(SHAPE[0])]
    return torch.Generator().manual_seed(case.seed)


def sample_loop(scheduler, case: Case, float64: bool = False, model=None):
    """A full loop from seed ``case.seed``: (final sample, [x̂0 per step]). ``float64`` runs
    diffusers' step on float64 σ's and model outputs (the model sees float32)."""
    scheduler.set_timesteps(case.steps)
    generator = generators(case)
    sample = schedule.randn_tensor(SHAPE, generator=generator) * scheduler.init_noise_sigma
    if float64:
        scheduler.sigmas, sample = scheduler.sigmas.double(), sample.double()
    pred_x0 = []
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(sample, t)
        model_output = toy_model(model_input.float(), t) if model is None else model(sample, model_input, t, i)
        out = scheduler.step(model_output.double() if float64 else model_output, t, sample, generator=generator)
        sample = out.prev_sample
        pred_x0.append(out.pred_original_sample)
    return sample, pred_x0


def check_loop(case: Case, backend: str) -> tuple[float, float, float]:
    """fastdiff (``backend``) against diffusers' float32 run and its equations in float64 (the rule
    of the module docstring). Returns (error vs diffusers fp32, vs its float64 run, diffusers' own
    fp32 error)."""
    ours, theirs = EulerAncestralDiscreteScheduler(**case.config), diffusers_twin(case.config)
    with fastdiff.use_backend(backend):
        ours_run = sample_loop(ours, case)
    theirs_run = sample_loop(theirs, case)
    with noise_drawn_in(diffusers.EulerAncestralDiscreteScheduler):
        exact_run = sample_loop(diffusers_twin(case.config), case, float64=True)
    assert torch.equal(ours.timesteps, theirs.timesteps.float())
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
        config = {**EulerAncestralDiscreteScheduler(**case.config).config}
        config["trained_betas"] = config["trained_betas"] is not None
        config["per_sample_generators"] = case.per_sample_generators
        for key, value in config.items():
            seen.setdefault(key, set()).add(value)
    assert seen["beta_schedule"] >= set(SCHEDULES) | {"laplace"}
    assert seen["prediction_type"] == set(PREDICTIONS)
    assert seen["timestep_spacing"] == set(SPACINGS)
    assert len(seen["steps_offset"]) >= 3 and seen["num_train_timesteps"] == {1000, 100}
    for flag in ("rescale_betas_zero_snr", "trained_betas", "per_sample_generators"):
        assert seen[flag] == {True, False}, flag
    kernel_runs = [case for case, backend in DEFAULT_RUNS if backend == "triton"]
    assert {c.config.get("prediction_type", "epsilon") for c in kernel_runs} == set(PREDICTIONS)
    assert {c.config.get("timestep_spacing", "linspace") for c in kernel_runs} == set(SPACINGS)


def test_same_seed_same_result_and_every_step_draws_noise():
    """diffusers draws z on every step, the last too (σ_up = 0 there): the generator ends where diffusers' does."""
    case = Case(schedule_config("scaled_linear"), steps=6, seed=3)
    first, _ = sample_loop(EulerAncestralDiscreteScheduler(**case.config), case)
    again, _ = sample_loop(EulerAncestralDiscreteScheduler(**case.config), case)
    other, _ = sample_loop(EulerAncestralDiscreteScheduler(**case.config), dataclasses.replace(case, seed=4))
    assert torch.equal(first, again) and not torch.allclose(first, other)
    ours, theirs = EulerAncestralDiscreteScheduler(), diffusers.EulerAncestralDiscreteScheduler()
    after = []
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(4)
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(SHAPE, generator=generator)
        for t in scheduler.timesteps:
            sample = scheduler.step(toy_model(sample, t), t, sample, generator=generator).prev_sample
        after.append(torch.randn(3, generator=generator))
    assert torch.equal(*after)
    scheduler = EulerAncestralDiscreteScheduler()
    scheduler.set_timesteps(4)
    assert all(step.noise for step in scheduler._plan(0)) and list(scheduler._plan(3))[0].out["z"] == 0


@pytest.mark.parametrize("config, steps", [
    (dict(prediction_type="v_prediction", timestep_spacing="trailing"), 2),  # σ_max ≈ 157
    (dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True), 2),  # 4096
])
def test_few_step_v_prediction_matches_diffusers_equations_in_float64(config, steps):
    """KNOWN LIMIT of diffusers' float32 step (test_scheduler_euler.py has the Euler twin): two
    steps down from a large σ_max with v_prediction; fastdiff matches diffusers' equations in
    float64 to 1e-5, diffusers' float32 run does not."""
    case = Case(config, steps=steps, seed=1)
    sample, _ = sample_loop(EulerAncestralDiscreteScheduler(**config), case)
    float32_sample, _ = sample_loop(diffusers.EulerAncestralDiscreteScheduler(**config), case)
    with noise_drawn_in(diffusers.EulerAncestralDiscreteScheduler):
        exact, _ = sample_loop(diffusers.EulerAncestralDiscreteScheduler(**config), case, float64=True)
    assert_matches(sample.double(), exact, "fastdiff vs diffusers' equations in float64")
    assert relative_error(sample, exact) < RTOL / 10 and relative_error(float32_sample, exact) > RTOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_sample_prediction_equals_epsilon_prediction_with_its_x0(spacing, backend):
    """DELIBERATE: prediction_type='sample' works (diffusers: NotImplementedError). A model that
    predicts x̂0 = x − σ·ε̂ gives diffusers' ε-prediction samples, step for step."""
    config = dict(**schedule_config("scaled_linear"), timestep_spacing=spacing)
    ours = EulerAncestralDiscreteScheduler(**config, prediction_type="sample")

    def x0_model(sample, model_input, t, i):
        sigma = ours.sigmas[i].item()
        return sample - sigma * toy_model(model_input, t)

    case = Case(config, steps=6, seed=2)
    with fastdiff.use_backend(backend):
        sample, pred_x0 = sample_loop(ours, case, model=x0_model)
    expected, expected_x0 = sample_loop(diffusers.EulerAncestralDiscreteScheduler(**config), case)
    assert_matches(sample, expected)
    for x0, wanted in zip(pred_x0, expected_x0):
        assert_matches(x0, wanted)
    with pytest.raises(NotImplementedError):  # diffusers still lacks it: drop the note when it has it
        sample_loop(diffusers.EulerAncestralDiscreteScheduler(**config, prediction_type="sample"), case)


# ----------------------------------------------------------------------------- the equations
def test_ancestral_split_keeps_the_variance_of_sigma_next():
    for sigma, sigma_next in [(14.6, 7.0), (3.0, 0.03), (0.5, 0.0), (80.0, 79.9)]:
        up, down = ancestral_sigmas(sigma, sigma_next)
        assert math.isclose(up**2 + down**2, sigma_next**2, rel_tol=1e-12)
        assert math.isclose(down, math.sqrt(sigma_next**2 - up**2), rel_tol=1e-9)  # diffusers' form
        step = euler_ancestral_step(sigma, sigma_next, "epsilon")
        assert step.noise and step.out["z"] == up and step.input_scale == 1 / math.sqrt(sigma**2 + 1)
        assert step.convert == (1.0, -sigma, 0.0, 1.0)


# ----------------------------------------------------------------------------- set_timesteps
def assert_tables_match(ours, theirs) -> None:
    assert ours.timesteps.dtype == torch.float32
    assert torch.equal(ours.timesteps, theirs.timesteps.float())  # diffusers' start as float64
    assert ours.sigmas.dtype == torch.float32 and len(ours.sigmas) == len(ours.timesteps) + 1
    assert torch.equal(ours.sigmas, theirs.sigmas)
    assert torch.equal(torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(theirs.init_noise_sigma))
    assert ours.num_inference_steps == theirs.num_inference_steps


@pytest.mark.parametrize("spacing, offset", [("linspace", 0), ("leading", 0), ("leading", 1), ("trailing", 0),
                                             ("trailing", 2)])
@pytest.mark.parametrize("T, beta_schedule, zsnr", [(1000, "scaled_linear", False), (1000, "linear", True),
                                                    (100, "squaredcos_cap_v2", False), (37, "linear", True)])
def test_set_timesteps_matches_diffusers(spacing, offset, T, beta_schedule, zsnr):
    config = dict(num_train_timesteps=T, beta_schedule=beta_schedule, timestep_spacing=spacing, steps_offset=offset,
                  rescale_betas_zero_snr=zsnr)
    ours, theirs = EulerAncestralDiscreteScheduler(**config), diffusers.EulerAncestralDiscreteScheduler(**config)
    assert_matches(ours.alphas_cumprod, theirs.alphas_cumprod, "alphas_cumprod")
    assert_tables_match(ours, theirs)  # before set_timesteps: the training schedule
    for n in (1, 2, 3, 7, 10, 25, T // 2, T):
        if n > T:
            continue
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
        assert_tables_match(ours, theirs)


@pytest.mark.parametrize("T, n", [(1000, 61), (100, 29), (17, 7)])
def test_trailing_spacing_drops_diffusers_invalid_last_timestep(T, n):
    """DELIBERATE (as EulerDiscreteScheduler): diffusers' trailing list ends at t = −1 for these
    (T, n), n + 1 steps; fastdiff takes the n valid ones, whose σ's are diffusers', then 0."""
    ours = EulerAncestralDiscreteScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    theirs = diffusers.EulerAncestralDiscreteScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    assert len(theirs.timesteps) == n + 1 and theirs.timesteps[-1] == -1
    assert len(ours.timesteps) == n and torch.equal(ours.timesteps, theirs.timesteps[:n].float())
    assert torch.equal(ours.sigmas[:n], theirs.sigmas[:n]) and ours.sigmas[-1] == 0


# ----------------------------------------------------------------------------- step by step
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_step_matches_diffusers_step_by_step(prediction_type, backend):
    config = dict(**schedule_config("scaled_linear"), prediction_type=prediction_type)
    ours, theirs = EulerAncestralDiscreteScheduler(**config), diffusers.EulerAncestralDiscreteScheduler(**config)
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    g = torch.Generator().manual_seed(7)
    sample = torch.randn(SHAPE, generator=g) * theirs.init_noise_sigma
    for i, t in enumerate(theirs.timesteps):
        model_output = torch.randn(SHAPE, generator=g)
        assert_matches(ours.scale_model_input(sample, t), theirs.scale_model_input(sample, t), f"model input {i}")
        with fastdiff.use_backend(backend):
            out = ours.step(model_output, t, sample, generator=torch.Generator().manual_seed(i))
        expected = theirs.step(model_output, t, sample, generator=torch.Generator().manual_seed(i))
        assert ours.step_index == theirs.step_index == i + 1
        assert_matches(out.pred_original_sample, expected.pred_original_sample, f"pred_original_sample {i}")
        assert_matches(out.prev_sample, expected.prev_sample, f"prev_sample {i}")
        sample = expected.prev_sample


def test_step_outputs_dtypes_and_variance_noise():
    scheduler = EulerAncestralDiscreteScheduler()
    scheduler.set_timesteps(5)
    t, sample = scheduler.timesteps[0], torch.randn(SHAPE)
    out = scheduler.step(sample, t, sample, generator=torch.Generator().manual_seed(5))
    scheduler.set_timesteps(5)
    prev, x0 = scheduler.step(sample, t, sample, generator=torch.Generator().manual_seed(5), return_dict=False)
    assert isinstance(out, EulerAncestralDiscreteSchedulerOutput)
    assert torch.equal(out.prev_sample, prev) and torch.equal(out.pred_original_sample, x0)
    scheduler.set_timesteps(5)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    assert torch.equal(scheduler.step(sample, t, sample, variance_noise=noise).prev_sample, prev)
    scheduler.set_timesteps(5)
    half = scheduler.step(sample.half(), t, sample.half(), generator=torch.Generator().manual_seed(5))
    assert half.prev_sample.dtype == torch.float16 and half.pred_original_sample.dtype == torch.float32
    assert scheduler.order == 1 and len(scheduler) == 1000


# ----------------------------------------------------------------------------- the sync-free loop
def step_path(scheduler, timesteps, sample, seed):
    generator = torch.Generator().manual_seed(seed)
    outs = []
    for t in timesteps:
        out = scheduler.step(toy_model(scheduler.scale_model_input(sample, t), t), t, sample, generator=generator)
        sample = out.prev_sample
        outs.append(out)
    return outs


def table_path(scheduler, tables, sample, seed):
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


@pytest.mark.parametrize("config, backend", [(dict(prediction_type="v_prediction"), "triton"), ({}, "torch"),
                                             (dict(timestep_spacing="leading", steps_offset=1), "torch")])
def test_step_tables_reproduce_step_exactly(config, backend):
    scheduler = EulerAncestralDiscreteScheduler(**config)
    scheduler.set_timesteps(5)
    tables = scheduler.step_tables(scheduler.timesteps)
    assert not tables.slots and tables.scales_input and tables.noisy == (True,) * 5
    for i, sigma in enumerate(scheduler.sigmas[:-1].tolist()):
        assert tables.rows[i, INPUT_SCALE] == np.float32(1 / math.sqrt(sigma**2 + 1))
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) * scheduler.init_noise_sigma
    with fastdiff.use_backend(backend):
        loop = table_path(scheduler, tables, sample, seed=4)
        steps = step_path(scheduler, scheduler.timesteps, sample, seed=4)
    for (prev, x0), out in zip(loop, steps):
        assert torch.equal(prev, out.prev_sample) and torch.equal(x0, out.pred_original_sample)


@pytest.mark.parametrize("config", [{}, dict(timestep_spacing="leading", steps_offset=1)])
def test_sdedit_tail_after_set_begin_index(config):
    n, start = 10, 3
    ours = EulerAncestralDiscreteScheduler(**config)
    theirs = diffusers.EulerAncestralDiscreteScheduler(**config)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    results = []
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(n)
        scheduler.set_begin_index(start)
        tail = scheduler.timesteps[start:]
        sample = scheduler.add_noise(x0, noise, tail[:1].repeat(SHAPE[0]))
        results.append((sample, step_path(scheduler, tail, sample, seed=1)))
    (ours_start, ours_steps), (their_start, their_steps) = results
    assert_matches(ours_start, their_start, "add_noise")
    for i, (a, b) in enumerate(zip(ours_steps, their_steps)):
        assert_matches(a.prev_sample, b.prev_sample, f"tail step {i}")
    loop = table_path(ours, ours.step_tables(ours.timesteps[start:]), ours_start, seed=1)
    for (prev, _), out in zip(loop, ours_steps):
        assert torch.equal(prev, out.prev_sample)


class ToyUNet(torch.nn.Module):
    """What SamplingLoop needs of a U-Net: device, dtype, memory_format and (x, t, labels) -> ε̂."""

    device, dtype, memory_format = torch.device("cpu"), torch.float32, torch.contiguous_format

    def forward(self, x, t, labels=None):
        return toy_model(x, t.item())


def test_sampling_loop_runs_euler_ancestral_like_step():
    scheduler = EulerAncestralDiscreteScheduler(prediction_type="v_prediction")
    scheduler.set_timesteps(6)
    tables = scheduler.step_tables(scheduler.timesteps)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) * scheduler.init_noise_sigma
    loop = SamplingLoop(ToyUNet(), scheduler, tables, SHAPE, None, None, {})
    loop.reset(sample, None)
    result = loop.run(torch.Generator().manual_seed(4), progress=False)
    assert torch.equal(result, step_path(scheduler, scheduler.timesteps, sample, seed=4)[-1].prev_sample)


# ----------------------------------------------------------------------------- guidance, noising
@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_guidance_equals_diffusers_on_the_combined_output(guidance_scale, prediction_type, backend):
    config = dict(**schedule_config("scaled_linear"), prediction_type=prediction_type)
    ours, theirs = EulerAncestralDiscreteScheduler(**config), diffusers.EulerAncestralDiscreteScheduler(**config)
    ours.set_timesteps(3)
    theirs.set_timesteps(3)
    g = torch.Generator().manual_seed(9)
    sample = torch.randn(SHAPE, generator=g) * ours.init_noise_sigma
    for i, t in enumerate(ours.timesteps):
        cond, uncond = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        with fastdiff.use_backend(backend):
            fused = ours.step(cond, t, sample, generator=torch.Generator().manual_seed(i), uncond_model_output=uncond,
                              guidance_scale=guidance_scale)
        plain = theirs.step(uncond + guidance_scale * (cond - uncond), t, sample,
                            generator=torch.Generator().manual_seed(i))
        assert_matches(fused.prev_sample, plain.prev_sample, f"prev_sample {i}")
        assert_matches(fused.pred_original_sample, plain.pred_original_sample, f"x0 {i}")
        sample = plain.prev_sample


@pytest.mark.parametrize("config", [{}, dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"),
                                    dict(timestep_spacing="leading", steps_offset=1)])
def test_add_noise_matches_diffusers(config):
    ours, theirs = EulerAncestralDiscreteScheduler(**config), diffusers.EulerAncestralDiscreteScheduler(**config)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn((5, 3, 4, 4), generator=g), torch.randn((5, 3, 4, 4), generator=g)
    for timesteps in (torch.tensor([0, 999, 500, 1, 250]), torch.tensor([3.0, 998.0, 10.0, 400.0, 7.0])):
        assert_matches(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps), "training")
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(10)
    picked = ours.timesteps[[0, 3, 3, 9, 5]]
    assert_matches(ours.add_noise(x0, noise, picked), theirs.add_noise(x0, noise, picked.double()), "scheduled")
    for scheduler in (ours, theirs):
        scheduler.set_begin_index(2)
    assert_matches(ours.add_noise(x0, noise, picked), theirs.add_noise(x0, noise, picked.double()), "begin index")


# ----------------------------------------------------------------------------- config
def test_config_matches_diffusers():
    for config in ({}, dict(**schedule_config("scaled_linear"), timestep_spacing="trailing", steps_offset=1)):
        ours, theirs = EulerAncestralDiscreteScheduler(**config), diffusers.EulerAncestralDiscreteScheduler(**config)
        assert dict(ours.config) == {k: v for k, v in theirs.config.items() if not k.startswith("_")}


def test_save_config_round_trips_and_loads_in_diffusers(tmp_path):
    config = dict(**schedule_config("scaled_linear"), prediction_type="v_prediction", timestep_spacing="trailing",
                  rescale_betas_zero_snr=True)
    ours = EulerAncestralDiscreteScheduler(**config)
    ours.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "EulerAncestralDiscreteScheduler"
    back = EulerAncestralDiscreteScheduler.from_pretrained(tmp_path)
    theirs = diffusers.EulerAncestralDiscreteScheduler.from_pretrained(tmp_path)
    assert back.config == ours.config and {k: theirs.config[k] for k in config} == config
    case = Case(config, steps=10)
    assert_matches(sample_loop(back, case)[0], sample_loop(theirs, case)[0])


def test_from_pretrained_of_a_diffusers_saved_folder(tmp_path):
    theirs = diffusers.EulerAncestralDiscreteScheduler(**schedule_config("scaled_linear"), steps_offset=1,
                                                       timestep_spacing="leading")
    theirs.save_config(tmp_path / "scheduler")
    ours = EulerAncestralDiscreteScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert dict(ours.config) == {k: v for k, v in theirs.config.items() if not k.startswith("_")}
    case = Case({}, steps=7)
    assert_matches(sample_loop(ours, case)[0], sample_loop(theirs, case)[0])


def test_cross_loading_with_ddim_and_euler():
    ddim = diffusers.DDIMScheduler(**schedule_config("scaled_linear"), steps_offset=1, clip_sample=False,
                                   set_alpha_to_one=False, timestep_spacing="leading")
    ours = EulerAncestralDiscreteScheduler.from_config(ddim.config)
    theirs = diffusers.EulerAncestralDiscreteScheduler.from_config(ddim.config)
    assert dict(ours.config) == {k: theirs.config[k] for k in ours.config}
    case = Case({}, steps=9)
    assert_matches(sample_loop(ours, case)[0], sample_loop(theirs, case)[0])
    euler = fastdiff.schedulers.euler.EulerDiscreteScheduler(use_karras_sigmas=True, prediction_type="v_prediction")
    from_euler = EulerAncestralDiscreteScheduler.from_config(euler.config)  # Euler's σ options are ignored
    assert from_euler.config.prediction_type == "v_prediction" and "use_karras_sigmas" not in from_euler.config
    back = fastdiff.DDIMScheduler.from_config(ours.config)
    assert back.config.steps_offset == 1 and back.config.beta_schedule == "scaled_linear"


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("option, value", [
    ("prediction_type", "eps"), ("prediction_type", "original_sample"), ("timestep_spacing", "uniform"),
    ("beta_schedule", "cosine"), ("num_train_timesteps", 0), ("steps_offset", -1),
])
def test_unknown_option_value_is_an_error(option, value):
    with pytest.raises(ValueError, match=option):
        EulerAncestralDiscreteScheduler(**{option: value})


def test_euler_only_options_are_not_taken():
    with pytest.raises(TypeError, match="use_karras_sigmas"):
        EulerAncestralDiscreteScheduler(use_karras_sigmas=True)
    with pytest.raises(ValueError, match="trained_betas"):
        EulerAncestralDiscreteScheduler(num_train_timesteps=10, trained_betas=[0.01] * 9)
    with pytest.raises(TypeError, match="rescale_betas_zero_snr"):
        EulerAncestralDiscreteScheduler(rescale_betas_zero_snr="yes")


@pytest.mark.parametrize("steps", [0, -3, 101, 10.0, "10", True, None])
def test_num_inference_steps_out_of_range_is_an_error(steps):
    scheduler = EulerAncestralDiscreteScheduler(num_train_timesteps=100)
    with pytest.raises((ValueError, TypeError), match="num_inference_steps"):
        scheduler.set_timesteps(steps)


def test_step_before_set_timesteps_and_past_the_last_step_are_errors():
    scheduler = EulerAncestralDiscreteScheduler()
    sample = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(sample, scheduler.timesteps[0], sample)
    scheduler.set_timesteps(2)
    for t in scheduler.timesteps:
        sample = scheduler.step(sample, t, sample).prev_sample
    with pytest.raises(ValueError, match="3 times for 2 timesteps"):
        scheduler.step(sample, scheduler.timesteps[-1], sample)


@pytest.mark.parametrize("timestep", [999, torch.tensor(999), 998.5, "999", torch.tensor([999.0, 0.0])])
def test_bad_timestep_is_an_error(timestep):
    scheduler = EulerAncestralDiscreteScheduler()
    scheduler.set_timesteps(10)
    sample = torch.randn(SHAPE)
    with pytest.raises((ValueError, TypeError), match="timestep"):
        scheduler.step(sample, timestep, sample)


def test_step_options_of_another_scheduler_are_errors():
    scheduler = EulerAncestralDiscreteScheduler()
    scheduler.set_timesteps(4)
    sample = torch.randn(SHAPE)
    with pytest.raises(TypeError, match="s_churn"):
        scheduler.step(sample, scheduler.timesteps[0], sample, s_churn=1.0)
    with pytest.raises(TypeError, match="s_churn"):
        scheduler.step_tables(scheduler.timesteps, s_churn=1.0)
    with pytest.raises(ValueError, match="tail"):
        scheduler.step_tables(scheduler.timesteps[:2])
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(torch.randn(2, 3, 4, 5), scheduler.timesteps[0], sample)
