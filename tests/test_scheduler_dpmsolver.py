"""fastdiff's DPMSolverMultistepScheduler against diffusers 0.42's, the numerical oracle.

Requirement: for every option, in float32, the same timesteps and σ table as diffusers, and the same
samples after every step of a full sampling loop (≤ 1e-5 relative to the tensor's scale), on both
backends ('torch', the reference, and 'triton', the fused kernel; on the CPU through Triton's
interpreter, ~0.1 s a step, hence tiny tensors and few steps). The default run holds a grid in which
every option value appears; ``pytest -m full_grid`` runs the whole product.

Tolerance: rtol = 1e-5 and atol = 1e-5 · max|expected| (as tests/test_schedulers.py), except for
one class of configurations that float32 cannot resolve to 1e-5: noise prediction
(algorithm_type "dpmsolver", "sde-dpmsolver") whose ε̂ is computed from the sample (a sample- or
v-predicting model, or ε̂ = (x − α·x̂0)/σ back from a thresholded x̂0). Its update weights near
σ_max (α_t/α_s on x, nearly as much on ε̂) are large and cancel, most on the cosine and zero-SNR
schedules (and a thresholding clamp flips with the rounding): diffusers' own float32 samples are up to ~1e-2 away from the same
computation in float64, and a 1-ulp change of the initial noise moves them by up to ~5e-3. There
fastdiff's float32 error against diffusers run in float64 (``diffusers_in_float64``) must be at most
ILL_CONDITIONED_RATIO times diffusers' own float32 error, or 1e-5 (the flash-attention criterion).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import warnings

import pytest
import torch

import fastdiff
from fastdiff.schedulers import linear
from fastdiff.schedulers.dpmsolver import DPMSolverMultistepScheduler, dpm_order, dpm_solver_step, model_differences
from fastdiff.schedulers.schedule import randn_tensor
from scheduler_helpers import (RTOL, assert_matches, covering_subset, diffusers_in_float64, relative_error,
                               schedule_config, scheduler_pair, sigmoid_as_trained_betas, toy_model, trained_betas)

diffusers = pytest.importorskip("diffusers")

ILL_CONDITIONED_RATIO = 8.0
SHAPE = (2, 3, 4, 4)  # (B, C, H, W)
BACKENDS = ["torch", "triton"]
ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("linspace", "leading", "trailing")
FAMILIES = {None: {}, "karras": dict(use_karras_sigmas=True), "exponential": dict(use_exponential_sigmas=True),
            "beta": dict(use_beta_sigmas=True), "lu": dict(use_lu_lambdas=True)}
SCHEDULES = {"linear": (0.0001, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (0.0001, 0.02),
             "sigmoid": (0.0002, 0.03)}
THRESHOLDS = (dict(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=2.5),
              dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=1.5))


# "dpmsolver" and "sde-dpmsolver" warn (FutureWarning) as diffusers' deprecated types do
# (and diffusers 0.42's np.array(tensor) warns under numpy 2)
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:algorithm_type=:FutureWarning"),
              pytest.mark.filterwarnings("ignore:`algorithm_types dpmsolver:FutureWarning"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]


def model_with_variance(sample: torch.Tensor, t, variance_type: str | None = None) -> torch.Tensor:
    """A deterministic stand-in for the U-Net: ε̂(x, t) = 0.7·tanh(x) + 0.1·sin(t/100); a learned
    variance type gets a second half of channels (not used by the solver)."""
    mean = toy_model(sample, t)
    if variance_type in ("learned", "learned_range"):
        return torch.cat([mean, torch.tanh(0.5 * sample)], dim=1)
    return mean


# ----------------------------------------------------------------------------- the parity grid
@dataclasses.dataclass(frozen=True)
class Case:
    config: dict
    steps: int = 10
    seed: int = 0

    @property
    def id(self) -> str:
        cfg = self.config
        parts = [cfg.get("algorithm_type", "dpmsolver++"), f"o{cfg.get('solver_order', 2)}",
                 cfg.get("solver_type", "midpoint"), cfg.get("prediction_type", "epsilon")[:3],
                 cfg.get("timestep_spacing", "linspace")[:4], f"n{self.steps}"]
        for flag, family in (("use_karras_sigmas", "karras"), ("use_exponential_sigmas", "exp"),
                             ("use_beta_sigmas", "beta"), ("use_lu_lambdas", "lu")):
            if cfg.get(flag):
                parts.append(family)
        named = {"final_sigmas_type": "", "lower_order_final": "lof=", "euler_at_final": "euler=",
                 "thresholding": "thr=", "rescale_betas_zero_snr": "zsnr=", "variance_type": "",
                 "lambda_min_clipped": "clip", "steps_offset": "off", "num_train_timesteps": "T", "beta_schedule": ""}
        parts += [f"{tag}{cfg[key]}" for key, tag in named.items() if key in cfg]
        if cfg.get("trained_betas") is not None:
            parts.append("trained")
        return "-".join(str(p) for p in parts)


def valid(config: dict) -> bool:
    algorithm = config.get("algorithm_type", "dpmsolver++")
    if not algorithm.endswith("++") and config.get("final_sigmas_type", "zero") == "zero":
        return False
    return not (algorithm == "sde-dpmsolver" and config.get("solver_order", 2) == 3)


def avoid_diffusers_failures(config: dict, steps: int) -> dict:
    """Two corners where diffusers itself fails, each tested on its own below: a σ family on a cosine or
    zero-SNR schedule can repeat the first timestep (diffusers' index rule then starts at index 1 and
    a loop over the timesteps runs out of σ's); a higher-order last step of length 0 is NaN (and an
    SDE one of length ≈ 0 adds noise σ_t·√(2h) that diffusers' float32 λ's round to anything in
    [0, ~1e-3·σ_t]: tested on its own, test_sde_last_step_up_in_sigma_adds_no_noise)."""
    scheduler = DPMSolverMultistepScheduler(**config)
    scheduler.set_timesteps(steps)
    if len(scheduler.timesteps) > 1 and scheduler.timesteps[0] == scheduler.timesteps[1]:
        config = {k: v for k, v in config.items() if not k.startswith("use_")}
        scheduler = DPMSolverMultistepScheduler(**config)
        scheduler.set_timesteps(steps)
    n = len(scheduler.timesteps)
    c = scheduler.config
    last_order = dpm_order(n - 1, n, min(n - 1, c.solver_order), c.solver_order, lower_order_final=c.lower_order_final,
                           euler_at_final=c.euler_at_final, final_sigmas_type=c.final_sigmas_type)
    if torch.isclose(scheduler.sigmas[-1], scheduler.sigmas[-2], rtol=1e-6, atol=0):  # a last step of length ≈ 0
        if c.algorithm_type.startswith("sde"):  # its noise weight σ_t·√(e^(2h) − 1) has infinite slope at h = 0
            config = {k: v for k, v in config.items() if not k.startswith("use_")}
        elif last_order >= 2:
            config = {**config, "euler_at_final": True}
    return config


def build_cases(full: bool) -> list[Case]:
    cases = []
    families, schedules = list(FAMILIES), list(SCHEDULES)
    # 1. algorithm × order × solver type, every other option rotating (full: × prediction × spacing too)
    extra = itertools.product(PREDICTIONS, SPACINGS) if full else [(None, None)]
    for i, (algorithm, order, solver_type, (pred, spacing)) in enumerate(
            itertools.product(ALGORITHMS, (1, 2, 3), ("midpoint", "heun"), list(extra))):
        config = dict(algorithm_type=algorithm, solver_order=order, solver_type=solver_type,
                      prediction_type=pred or PREDICTIONS[i % 3], timestep_spacing=spacing or SPACINGS[(i // 3) % 3],
                      final_sigmas_type=("sigma_min", "zero")[i % 2] if algorithm.endswith("++") else "sigma_min",
                      lower_order_final=i % 4 != 1, euler_at_final=i % 5 == 3, **FAMILIES[families[(i // 2) % 5]],
                      **schedule_config(schedules[i % 4]))
        if i % 6 == 4:
            config.update(THRESHOLDS[(i // 6) % 2])
        if i % 7 == 2 and config["beta_schedule"] != "squaredcos_cap_v2":
            # (cosine + zero SNR + a σ family repeats the first timestep: diffusers' index rule then skips σ_0)
            config["rescale_betas_zero_snr"] = True
        if config["timestep_spacing"] == "leading" and i % 2:
            config["steps_offset"] = 1
        if valid(config):
            cases.append(Case(avoid_diffusers_failures(config, (7, 10, 16)[i % 3]), steps=(7, 10, 16)[i % 3], seed=i))
    # 2. learned variance (diffusers slices the mean only for ε), λ clipping, trained betas, short T
    for i, variance_type in enumerate(("learned", "learned_range")):
        cases.append(Case(dict(variance_type=variance_type, solver_order=i + 2, timestep_spacing=SPACINGS[i]), steps=9))
    for i, spacing in enumerate(SPACINGS if full else SPACINGS[:2]):
        cases.append(Case(dict(**schedule_config("squaredcos_cap_v2"), lambda_min_clipped=-5.1, timestep_spacing=spacing,
                               solver_order=3, prediction_type=PREDICTIONS[i]), steps=10 + i))
    for i, (T, spacing) in enumerate(itertools.product((1000, 64), SPACINGS if full else SPACINGS[1:])):
        cases.append(Case(dict(num_train_timesteps=T, trained_betas=trained_betas(T), beta_schedule="scaled_linear",
                               timestep_spacing=spacing, prediction_type=PREDICTIONS[i % 3],
                               algorithm_type=("sde-dpmsolver++", "dpmsolver++")[i % 2]), steps=11, seed=i))
    for i, spacing in enumerate(SPACINGS):
        cases.append(Case(dict(num_train_timesteps=100, timestep_spacing=spacing, solver_order=3, steps_offset=i % 2,
                               **FAMILIES[families[i + 1]]), steps=(5, 9, 15)[i]))
    # 3. zero terminal SNR with v-prediction (what it is for), every spacing
    for i, spacing in enumerate(SPACINGS):
        cases.append(Case(dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing=spacing,
                               **schedule_config("scaled_linear"), algorithm_type=ALGORITHMS[i % 2]), steps=10))
    return cases


def option_values(case: Case) -> dict:
    """The case's full config (defaults filled in), flags for the values that are lists or tables."""
    config = {**DPMSolverMultistepScheduler(**case.config).config}
    config["trained_betas"] = config["trained_betas"] is not None
    config["lambda_min_clipped"] = config["lambda_min_clipped"] != -math.inf
    return config


with warnings.catch_warnings():  # collection builds schedulers of the deprecated types too
    warnings.simplefilter("ignore", FutureWarning)
    CASES = build_cases(full=False)
    TRITON_CASES = covering_subset(CASES, option_values)
    FULL_CASES = [case for case in build_cases(full=True) if case.id not in {c.id for c in CASES}]
RUNS = [(case, "torch") for case in CASES] + [(case, "triton") for case in TRITON_CASES]


def diffusers_config(config: dict) -> dict:
    """diffusers' DPM-Solver rejects beta_schedule="sigmoid": give it diffusers DDPM's sigmoid betas."""
    return sigmoid_as_trained_betas(config, diffusers.DDPMScheduler)


def pair(config: dict, steps: int | None = None):
    return scheduler_pair(DPMSolverMultistepScheduler, diffusers.DPMSolverMultistepScheduler, config,
                          diffusers_config(config), steps)


def sample_loop(scheduler, steps: int, seed: int, variance_type=None, backend: str = "torch",
                dtype=torch.float32) -> list[torch.Tensor]:
    """A full loop from seed ``seed`` (the SDE noise from the same generator); every step's sample."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(SHAPE, generator=generator).to(dtype)
    scheduler.set_timesteps(steps)
    if dtype == torch.float64:
        scheduler.sigmas = scheduler.sigmas.double()
    samples = []
    with fastdiff.use_backend(backend):
        for t in scheduler.timesteps:
            sample = scheduler.step(model_with_variance(sample, t, variance_type), t, sample, generator=generator).prev_sample
            samples.append(sample)
    return samples


def ill_conditioned(config: dict) -> bool:
    """Noise prediction whose ε̂ is computed from the sample: an x0- or v-predicting model, or ε̂ taken
    back from a thresholded x̂0 (see the module docstring)."""
    return not config.get("algorithm_type", "dpmsolver++").endswith("++") and (
        config.get("prediction_type", "epsilon") != "epsilon" or config.get("thresholding", False))


def check_loop(case: Case, backend: str) -> float:
    ours, theirs = pair(case.config)
    variance_type = case.config.get("variance_type")
    samples = sample_loop(ours, case.steps, case.seed, variance_type, backend)
    expected = sample_loop(theirs, case.steps, case.seed, variance_type)
    n = len(ours.timesteps)
    assert torch.equal(ours.timesteps, theirs.timesteps[:n])
    assert len(theirs.timesteps) == n or theirs.timesteps[n:].tolist() == [-1]  # diffusers' invalid trailing −1
    if ill_conditioned(case.config):
        with diffusers_in_float64(diffusers.DPMSolverMultistepScheduler):
            exact = sample_loop(pair(case.config)[1], case.steps, case.seed, variance_type, dtype=torch.float64)
        assert exact[-1].dtype == torch.float64
        ours_error = max(relative_error(x, e) for x, e in zip(samples, exact))
        their_error = max(relative_error(y, e) for y, e in zip(expected, exact))
        assert ours_error <= max(ILL_CONDITIONED_RATIO * their_error, RTOL), (ours_error, their_error)
        return ours_error
    worst = 0.0
    for i, (x, y) in enumerate(zip(samples, expected)):
        assert torch.isfinite(y).all(), "the grid should only hold cases diffusers computes"
        assert_matches(x, y, f"sample after step {i} (t={int(theirs.timesteps[i])})")
        worst = max(worst, relative_error(x, y))
    return worst


@pytest.mark.parametrize("case, backend", RUNS, ids=[f"{c.id}-{b}" for c, b in RUNS])
def test_full_loop_matches_diffusers(case, backend):
    check_loop(case, backend)


@pytest.mark.full_grid
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FULL_CASES, ids=[c.id for c in FULL_CASES])
def test_full_grid_loop_matches_diffusers(case, backend):
    check_loop(case, backend)


@pytest.mark.parametrize("cases", [CASES, TRITON_CASES], ids=["torch", "triton"])
def test_grid_covers_every_option_value(cases):
    seen = {}
    for case in cases:
        for key, value in option_values(case).items():
            seen.setdefault(key, set()).add(value)
    assert seen["algorithm_type"] == set(ALGORITHMS)
    assert seen["solver_order"] == {1, 2, 3}
    assert seen["solver_type"] == {"midpoint", "heun"}
    assert seen["prediction_type"] == set(PREDICTIONS)
    assert seen["timestep_spacing"] == set(SPACINGS)
    assert seen["final_sigmas_type"] == {"zero", "sigma_min"}
    assert seen["variance_type"] == {None, "learned", "learned_range"}
    assert seen["beta_schedule"] >= set(SCHEDULES)
    for flag in ("lower_order_final", "euler_at_final", "thresholding", "rescale_betas_zero_snr", "trained_betas",
                 "lambda_min_clipped", *(k for family in FAMILIES.values() for k in family)):
        assert seen[flag] == {True, False}, flag
    assert seen["steps_offset"] == {0, 1} and seen["num_train_timesteps"] >= {1000, 100, 64}
    assert len(seen["dynamic_thresholding_ratio"]) >= 2 and len(seen["sample_max_value"]) >= 3
    assert {case.steps >= 15 for case in cases} == {True, False}  # around lower_order_final's 15


def test_same_seed_gives_the_same_samples():
    case = Case(dict(algorithm_type="sde-dpmsolver++", solver_order=3), steps=6, seed=3)
    runs = [sample_loop(DPMSolverMultistepScheduler(**case.config), case.steps, case.seed, backend=backend)[-1]
            for backend in ("triton", "triton", "torch")]
    assert torch.equal(runs[0], runs[1])
    assert_matches(runs[0], runs[2])
    other = sample_loop(DPMSolverMultistepScheduler(**case.config), case.steps, case.seed + 1)[-1]
    assert not torch.allclose(other, runs[2])


# ----------------------------------------------------------------------------- set_timesteps
TABLE_FAMILIES = list(FAMILIES)


def check_tables(config: dict, steps: int) -> None:
    ours, theirs = pair(config)
    theirs.set_timesteps(steps)
    if len(set(theirs.sigmas[:-1].tolist())) < len(theirs.timesteps):  # diffusers repeats a noise level
        with pytest.raises(ValueError, match="repeats a noise level"):
            ours.set_timesteps(steps)
        return
    ours.set_timesteps(steps)
    n = len(ours.timesteps)
    assert ours.timesteps.dtype == torch.int64 and ours.sigmas.dtype == torch.float32
    assert torch.equal(ours.timesteps, theirs.timesteps[:n]), (ours.timesteps, theirs.timesteps)
    assert ours.num_inference_steps == n and len(ours.sigmas) == n + 1
    if len(theirs.timesteps) == n:
        assert torch.equal(ours.sigmas, theirs.sigmas)
    else:  # diffusers' trailing −1, dropped here: its σ are ours plus one before the final σ
        assert theirs.timesteps[n:].tolist() == [-1]
        assert torch.equal(ours.sigmas[:-1], theirs.sigmas[:n]) and ours.sigmas[-1] == theirs.sigmas[-1]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("family", TABLE_FAMILIES)
def test_timesteps_and_sigmas_match_diffusers(family, spacing):
    for T, steps, final, schedule in itertools.product((1000, 37), (1, 2, 7, 10, 25), ("zero", "sigma_min"),
                                                       ("scaled_linear", "squaredcos_cap_v2")):
        config = dict(num_train_timesteps=T, timestep_spacing=spacing, final_sigmas_type=final,
                      steps_offset=1 if spacing == "leading" else 0, **FAMILIES[family], **schedule_config(schedule))
        if steps <= T:
            check_tables(config, steps)


@pytest.mark.full_grid
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("family", TABLE_FAMILIES)
def test_full_grid_timesteps_and_sigmas_match_diffusers(family, spacing):
    for T, steps, final, schedule, zsnr in itertools.product((1000, 100, 37), (1, 2, 3, 7, 10, 25, 36, 61, 100),
                                                             ("zero", "sigma_min"), list(SCHEDULES)[:3], (False, True)):
        config = dict(num_train_timesteps=T, timestep_spacing=spacing, final_sigmas_type=final, steps_offset=1,
                      rescale_betas_zero_snr=zsnr, **FAMILIES[family], **schedule_config(schedule))
        if steps <= T:
            check_tables(config, steps)


@pytest.mark.parametrize("clip", [-5.1, -3.0, 0.0, 2.5])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_lambda_min_clipped_timesteps_match_diffusers(clip, spacing):
    for steps, schedule in itertools.product((1, 7, 20), ("squaredcos_cap_v2", "linear")):
        check_tables(dict(lambda_min_clipped=clip, timestep_spacing=spacing, **schedule_config(schedule)), steps)


@pytest.mark.parametrize("T, n", [(1000, 61), (1000, 103), (100, 29)])
def test_trailing_spacing_drops_diffusers_invalid_last_timestep(T, n):
    """diffusers' trailing list is n + 1 long for these (T, n), ending in −1 (float rounding in
    np.arange); fastdiff visits the n valid timesteps, with diffusers' σ at each."""
    ours, theirs = pair(dict(num_train_timesteps=T, timestep_spacing="trailing"), n)
    assert theirs.timesteps[-1] == -1 and len(theirs.timesteps) == n + 1
    assert len(ours.timesteps) == n and ours.timesteps[-1] >= 0
    check_tables(dict(num_train_timesteps=T, timestep_spacing="trailing"), n)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps:
        sample = ours.step(toy_model(sample, t), t, sample).prev_sample
    assert torch.isfinite(sample).all()


def test_custom_timesteps_match_diffusers():
    custom = [999, 800, 601, 420, 250, 99, 30, 1]
    ours, theirs = pair(dict(final_sigmas_type="sigma_min"))
    ours.set_timesteps(timesteps=custom)
    theirs.set_timesteps(timesteps=custom)
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
    sample = expected = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    for t in custom:
        sample = ours.step(toy_model(sample, t), t, sample).prev_sample
        expected = theirs.step(toy_model(expected, t), t, expected).prev_sample
    assert_matches(sample, expected)


def test_set_timesteps_device_and_reset():
    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(5, device="cpu")
    assert scheduler.timesteps.device.type == "cpu" and scheduler.sigmas.device.type == "cpu"
    scheduler.set_begin_index(2)
    sample = torch.randn(SHAPE)
    scheduler.step(sample, scheduler.timesteps[2], sample)
    assert scheduler.step_index == 3
    scheduler.set_timesteps(5)  # as diffusers: forgets the step and the begin index
    assert scheduler.step_index is None and scheduler.begin_index is None


# ----------------------------------------------------------------------------- step() against step()
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm, order, thresholding", [
    ("dpmsolver++", 3, False), ("sde-dpmsolver++", 2, True), ("dpmsolver", 3, True), ("sde-dpmsolver", 2, False)])
def test_each_step_matches_diffusers_step(algorithm, order, thresholding, backend):
    """Random model outputs, the same for both libraries, fed step by step (not a function of the sample)."""
    config = dict(algorithm_type=algorithm, solver_order=order, final_sigmas_type="sigma_min",
                  solver_type="heun", prediction_type="v_prediction", lower_order_final=False,
                  **(THRESHOLDS[1] if thresholding else {}))
    ours, theirs = pair(config, 7)
    g = torch.Generator().manual_seed(11)
    sample = torch.randn(SHAPE, generator=g)
    seeds = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)]
    with fastdiff.use_backend(backend):
        for i, t in enumerate(ours.timesteps):
            model_output = torch.randn(SHAPE, generator=g)
            mine = ours.step(model_output, t, sample, generator=seeds[0])
            expected = theirs.step(model_output, t, sample, generator=seeds[1])
            assert ours.step_index == theirs.step_index == i + 1
            assert_matches(mine.prev_sample, expected.prev_sample, f"step {i}")
            sample = expected.prev_sample


def test_variance_noise_is_the_noise_the_generator_draws():
    ours, theirs = pair(dict(algorithm_type="sde-dpmsolver++"), 5)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    t = ours.timesteps[0]
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    given = ours.step(toy_model(sample, t), t, sample, None, noise).prev_sample  # diffusers' positional order
    expected = theirs.step(toy_model(sample, t), t, sample, variance_noise=noise).prev_sample
    assert_matches(given, expected)
    ours.set_timesteps(5)
    drawn = ours.step(toy_model(sample, t), t, sample, generator=torch.Generator().manual_seed(5)).prev_sample
    assert torch.equal(drawn, given)


def test_step_returns_diffusers_outputs():
    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(4)
    sample = torch.randn(SHAPE)
    t = scheduler.timesteps[0]
    out = scheduler.step(toy_model(sample, t), t, sample)
    assert isinstance(out, fastdiff.schedulers.dpmsolver.DPMSolverMultistepSchedulerOutput)
    assert out.prev_sample.shape == SHAPE and out.prev_sample.dtype == torch.float32
    scheduler.set_timesteps(4)
    (prev,) = scheduler.step(toy_model(sample, t), int(t), sample, return_dict=False)
    assert torch.equal(prev, out.prev_sample)


def test_step_index_follows_diffusers_rule():
    """The first step's timestep picks the index (the last one when absent); later steps count on."""
    for timestep in (None, 12345):
        ours, theirs = pair({}, 6)
        sample = torch.randn(SHAPE)
        t = ours.timesteps[3] if timestep is None else timestep
        ours.step(sample, t, sample)
        theirs.step(sample, t, sample)
        assert ours.step_index == theirs.step_index


# ----------------------------------------------------------------------------- the sync-free loop's tables
def run_tables(scheduler, timesteps, sample, generator, backend, variance_type=None):
    """The sync-free loop's step sequence on the host: rows of step_tables through _update."""
    tables = scheduler.step_tables(timesteps)
    slots = linear.slot_buffers(sample)
    samples = []
    with fastdiff.use_backend(backend):
        for i, t in enumerate(tables.host_timesteps):
            noise = randn_tensor(SHAPE, generator=generator, dtype=torch.float32) if tables.noisy[i] else None
            sample, _ = scheduler._update(model_with_variance(sample, t, variance_type), sample, tables.rows[i], noise, slots)
            samples.append(sample)
    return tables, samples


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", [dict(algorithm_type="sde-dpmsolver++", solver_order=3, **THRESHOLDS[0]),
                                    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min",
                                         variance_type="learned_range", use_karras_sigmas=True)],
                         ids=["sde3-thresholding", "dpmsolver-learned-karras"])
def test_step_tables_reproduce_step_exactly(config, backend):
    variance_type = config.get("variance_type")
    scheduler = DPMSolverMultistepScheduler(**config)
    scheduler.set_timesteps(7)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    tables, from_tables = run_tables(scheduler, scheduler.timesteps, start, torch.Generator().manual_seed(2), backend,
                                     variance_type)
    assert tables.slots and not tables.scales_input and len(tables) == 7
    assert tables.rows.shape == (7, linear.TABLE_WIDTH) and tables.rows.dtype == torch.float32
    assert tables.noisy == (config["algorithm_type"].startswith("sde"),) * 7
    generator, sample = torch.Generator().manual_seed(2), start
    with fastdiff.use_backend(backend):
        for t, expected in zip(scheduler.timesteps, from_tables):
            sample = scheduler.step(model_with_variance(sample, t, variance_type), t, sample, generator=generator).prev_sample
            assert torch.equal(sample, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm, begin", [("dpmsolver++", 4), ("sde-dpmsolver++", 2)])
def test_sdedit_tail_matches_diffusers_img2img(algorithm, begin, backend):
    """img2img: set_begin_index(k), noise x0 to the k-th timestep, run the tail. diffusers steps from
    the tail's first timestep at first order (its warm-up counts steps taken, not the index)."""
    ours, theirs = pair(dict(algorithm_type=algorithm, solver_order=3), 8)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)).clamp(-1, 1)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    tail = ours.timesteps[begin:]
    for scheduler in (ours, theirs):
        scheduler.set_begin_index(begin)
    start = ours.add_noise(x0, noise, tail[:1])
    assert_matches(start, theirs.add_noise(x0, noise, tail[:1]))
    _, mine = run_tables(ours, tail, start, torch.Generator().manual_seed(6), backend)
    generator, sample = torch.Generator().manual_seed(6), start
    for t, x in zip(tail, mine):
        sample = theirs.step(toy_model(sample, t), t, sample, generator=generator).prev_sample
        assert_matches(x, sample, f"t={int(t)}")
    generator, sample = torch.Generator().manual_seed(6), start  # and step() after set_begin_index
    ours.set_begin_index(begin)
    with fastdiff.use_backend(backend):
        for t, x in zip(tail, mine):
            sample = ours.step(toy_model(sample, t), t, sample, generator=generator).prev_sample
            assert torch.equal(sample, x)


def test_step_tables_refuses_what_is_not_a_tail():
    scheduler = DPMSolverMultistepScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step_tables(torch.tensor([999]))
    scheduler.set_timesteps(5)
    with pytest.raises(ValueError, match="tail"):
        scheduler.step_tables(scheduler.timesteps[:2])


# ----------------------------------------------------------------------------- the equations
def test_order_rule_is_diffusers():
    """Warm-up, lower_order_final (< 15 steps), euler_at_final, a final σ of 0."""
    common = dict(lower_order_final=True, euler_at_final=False, final_sigmas_type="sigma_min")
    assert [dpm_order(i, 6, min(i, 3), 3, **common) for i in range(6)] == [1, 2, 3, 3, 2, 1]
    assert [dpm_order(i, 20, min(i, 3), 3, **common) for i in (18, 19)] == [3, 3]
    assert dpm_order(19, 20, 3, 3, **{**common, "final_sigmas_type": "zero"}) == 1
    assert dpm_order(19, 20, 3, 3, **{**common, "euler_at_final": True}) == 1
    assert dpm_order(3, 6, 0, 3, **common) == 1  # a run started at index 3: warm-up again


def test_model_differences_are_backward_differences_in_lambda():
    """Applied to a quadratic in λ, D1/h and 2·D2/h² are its first and second derivatives at λ_s0."""
    h, h0, h1 = 0.3, 0.5, 0.4
    lam = {"c": 0.0, "m1": -h0, "m2": -h0 - h1}
    f = {name: 1.0 + 2.0 * v + 3.0 * v**2 for name, v in lam.items()}
    d0, d1, d2 = (sum(w * f[name] for name, w in d.items()) for d in model_differences(3, h, h0, h1))
    assert (d0, d1 / h, 2 * d2 / h**2) == pytest.approx((1.0, 2.0, 6.0))  # f(0), f'(0), f''(0): exact
    assert model_differences(2, 0.0, h0) == [{"c": 1.0}, {"c": 0.0, "m1": -0.0}]  # finite at h = 0


def test_first_order_dpmsolver_pp_is_ddim():
    """DPM-Solver++(1) is DDIM with η = 0: x_t = α_t·x̂0 + σ_t·ε̂ (Lu et al. 2022b)."""
    scheduler = DPMSolverMultistepScheduler(solver_order=1)
    scheduler.set_timesteps(5)
    step = dpm_solver_step(scheduler.sigmas, 1, 1, algorithm_type="dpmsolver++", solver_type="midpoint",
                           prediction_type="epsilon")
    (a_s, s_s), (a_t, s_t) = ((1 / math.sqrt(v**2 + 1), v / math.sqrt(v**2 + 1)) for v in scheduler.sigmas[1:3].tolist())
    # c = x̂0 = (x − σ_s·ε)/α_s; x_t = (σ_t/σ_s)·x + (α_t − α_s·σ_t/σ_s)·x̂0
    assert step.convert == pytest.approx((1.0, -s_s, 0.0, a_s), rel=1e-6)
    assert step.out["x"] == pytest.approx(s_t / s_s, rel=1e-6)
    assert step.out["c"] == pytest.approx(a_t - a_s * s_t / s_s, rel=1e-5)


@pytest.mark.parametrize("family, order, solver_type, algorithm", [
    ("karras", 3, "midpoint", "dpmsolver++"), ("beta", 2, "heun", "dpmsolver"), ("karras", 2, "midpoint", "dpmsolver++")])
def test_last_step_of_length_zero_is_the_identity(family, order, solver_type, algorithm):
    """karras / beta σ end at σ_min, then the final σ_min again: a step of length 0 in λ. Its exact
    solution is x_next = x; diffusers' third order and heun weights are 0/0 = NaN there (its second
    order midpoint gives x). The steps before match diffusers."""
    config = dict(FAMILIES[family], final_sigmas_type="sigma_min", solver_order=order, solver_type=solver_type,
                  algorithm_type=algorithm)
    ours, theirs = pair(config)
    samples = sample_loop(ours, 16, 0)
    expected = sample_loop(theirs, 16, 0)
    assert ours.sigmas[-1] == ours.sigmas[-2]
    if order == 3 or solver_type == "heun":
        assert torch.isnan(expected[-1]).all(), "diffusers fixed its h = 0 step: drop the special case"
        expected[-1] = expected[-2]
    for x, y in zip(samples, expected):
        assert_matches(x, y)
    assert torch.equal(samples[-1], samples[-2])


# ----------------------------------------------------------------------------- guidance, learned variance
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_guidance_keywords_equal_stepping_the_combined_output(guidance_scale, backend):
    ours, theirs = pair(dict(algorithm_type="sde-dpmsolver++", solver_order=2, thresholding=True), 5)
    g = torch.Generator().manual_seed(9)
    sample = torch.randn(SHAPE, generator=g)
    with fastdiff.use_backend(backend):
        for t in ours.timesteps:
            cond, uncond = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
            fused = ours.step(cond, t, sample, generator=torch.Generator().manual_seed(int(t)),
                              uncond_model_output=uncond, guidance_scale=guidance_scale).prev_sample
            plain = theirs.step(uncond + guidance_scale * (cond - uncond), t, sample,
                                generator=torch.Generator().manual_seed(int(t))).prev_sample
            assert_matches(fused, plain, f"t={int(t)}")
            sample = plain


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_learned_variance_uses_the_first_half_of_channels(prediction_type):
    """For every prediction type (diffusers only slices for ε, and only 3 channels): the same samples as
    the mean half alone, and the guided 2C outputs guide the mean halves."""
    config = dict(prediction_type=prediction_type, solver_order=3)
    learned = DPMSolverMultistepScheduler(**config, variance_type="learned_range")
    plain = DPMSolverMultistepScheduler(**config)
    for scheduler in (learned, plain):
        scheduler.set_timesteps(6)
    sample = expected = torch.randn((2, 4, 3, 3), generator=torch.Generator().manual_seed(0))
    for t in plain.timesteps:
        both = torch.cat([toy_model(sample, t), torch.randn((2, 4, 3, 3))], dim=1)
        uncond = torch.cat([0.5 * toy_model(sample, t), torch.randn((2, 4, 3, 3))], dim=1)
        sample = learned.step(both, t, sample, uncond_model_output=uncond, guidance_scale=2.0).prev_sample
        mean = 0.5 * toy_model(expected, t) + 2.0 * (toy_model(expected, t) - 0.5 * toy_model(expected, t))
        expected = plain.step(mean, t, expected).prev_sample
        assert_matches(sample, expected)
    with pytest.raises(ValueError, match="variance_type"):
        learned.set_timesteps(6)
        learned.step(sample, learned.timesteps[0], sample)


# ----------------------------------------------------------------------------- constants, noising, config
def test_scheduler_constants():
    ours, theirs = pair(dict(num_train_timesteps=250))
    assert ours.init_noise_sigma == theirs.init_noise_sigma == 1.0
    assert ours.order == theirs.order == 1
    assert len(ours) == len(theirs) == 250
    sample = torch.randn(SHAPE)
    assert torch.equal(ours.scale_model_input(sample, 10), sample) and torch.equal(ours.scale_model_input(sample), sample)
    assert ours.step_index is None and ours.begin_index is None
    ours.set_begin_index(3)
    assert ours.begin_index == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_noise_matches_diffusers(dtype):
    for config in (dict(), dict(use_karras_sigmas=True, rescale_betas_zero_snr=True, beta_schedule="scaled_linear")):
        ours, theirs = pair(config, 10)
        g = torch.Generator().manual_seed(0)
        x0, noise = (torch.randn((5, 3, 4, 4), generator=g).to(dtype) for _ in range(2))
        timesteps = ours.timesteps[[0, 3, 9, 3, 5]]
        assert_matches(ours.add_noise(x0, noise, timesteps).float(), theirs.add_noise(x0, noise, timesteps).float())
        assert_matches(ours.add_noise(x0, noise, torch.tensor([4])).float(),  # absent: the last σ
                       theirs.add_noise(x0, noise, torch.tensor([4])).float())
        for scheduler in (ours, theirs):
            scheduler.set_begin_index(2)
        assert_matches(ours.add_noise(x0, noise, timesteps[:1]).float(), theirs.add_noise(x0, noise, timesteps[:1]).float())


def test_add_noise_before_set_timesteps_uses_the_timesteps_sigma():
    """Training-time noising: α_t·x0 + σ_t·ε at σ of t, i.e. DDPM's q_sample. diffusers' table is in
    ascending t while its timesteps descend, so it noises with σ_{T−1−t} (not kept)."""
    ours, theirs = DPMSolverMultistepScheduler(), diffusers.DPMSolverMultistepScheduler()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    timesteps = torch.tensor([10, 900])
    expected = fastdiff.DDPMScheduler().add_noise(x0, noise, timesteps)
    assert_matches(ours.add_noise(x0, noise, timesteps), expected)
    mirrored = fastdiff.DDPMScheduler().add_noise(x0, noise, 999 - timesteps)
    assert_matches(theirs.add_noise(x0, noise, timesteps), mirrored)


def test_config_matches_diffusers():
    config = dict(algorithm_type="sde-dpmsolver++", solver_order=3, use_karras_sigmas=True, timestep_spacing="trailing")
    ours, theirs = pair(config)
    assert dict(ours.config) == {k: v for k, v in theirs.config.items() if not k.startswith("_")}
    assert dict(DPMSolverMultistepScheduler().config) == {
        k: v for k, v in diffusers.DPMSolverMultistepScheduler().config.items() if not k.startswith("_")}


@pytest.mark.parametrize("given, recorded", [(dict(algorithm_type="deis", final_sigmas_type="sigma_min"),
                                              dict(algorithm_type="dpmsolver++")),
                                             (dict(solver_type="bh2"), dict(solver_type="midpoint")),
                                             (dict(solver_type="logrho"), dict(solver_type="midpoint"))])
def test_other_solvers_option_values_are_read_as_diffusers_reads_them(given, recorded):
    ours, theirs = pair(given)
    for key, value in recorded.items():
        assert ours.config[key] == theirs.config[key] == value
    with pytest.raises(ValueError, match="final_sigmas_type"):  # diffusers' check, before the replacement
        DPMSolverMultistepScheduler(algorithm_type="deis")


def test_save_config_round_trips_and_loads_in_diffusers(tmp_path):
    config = dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", use_lu_lambdas=True, solver_order=3,
                  lambda_min_clipped=-5.0, variance_type="learned_range", beta_schedule="squaredcos_cap_v2")
    ours = DPMSolverMultistepScheduler(**config)
    ours.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DPMSolverMultistepScheduler"
    back = DPMSolverMultistepScheduler.from_pretrained(tmp_path)
    assert back.config == ours.config
    theirs = diffusers.DPMSolverMultistepScheduler.from_pretrained(tmp_path)
    assert {k: theirs.config[k] for k in config} == config
    default = DPMSolverMultistepScheduler()
    default.save_config(tmp_path / "default")  # lambda_min_clipped = −inf survives JSON
    assert DPMSolverMultistepScheduler.from_pretrained(tmp_path / "default").config == default.config


def test_cross_loading_with_ddim_and_ddpm_configs(tmp_path):
    """A pipeline swaps schedulers with from_config(other.config): DPM from a DDIM / DDPM config and back."""
    ddim = fastdiff.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                  clip_sample=False, set_alpha_to_one=False)
    ours = DPMSolverMultistepScheduler.from_config(ddim.config)
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(diffusers.DDIMScheduler(**ddim.config).config)
    assert dict(ours.config) == {k: theirs.config[k] for k in ours.config}
    assert_matches(sample_loop(ours, 8, 0)[-1], sample_loop(theirs, 8, 0)[-1])
    back = fastdiff.DDIMScheduler.from_config(ours.config)
    assert {k: back.config[k] for k in ("beta_schedule", "beta_start", "beta_end", "steps_offset")} == \
        {k: ddim.config[k] for k in ("beta_schedule", "beta_start", "beta_end", "steps_offset")}
    ddpm = fastdiff.DDPMScheduler(variance_type="fixed_small", clip_sample=True)
    assert DPMSolverMultistepScheduler.from_config(ddpm.config).config.variance_type == "fixed_small"
    diffusers.DDIMScheduler(**ddim.config).save_config(tmp_path)
    assert DPMSolverMultistepScheduler.from_pretrained(tmp_path).config == ours.config


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("option, value, message", [
    ("algorithm_type", "dpm", "algorithm_type"), ("solver_type", "rk4", "solver_type"),
    ("final_sigmas_type", "one", "final_sigmas_type"), ("solver_order", 4, "solver_order"),
    ("solver_order", 0, "solver_order"), ("solver_order", 2.0, "solver_order"),
    ("prediction_type", "eps", "prediction_type"), ("timestep_spacing", "uniform", "timestep_spacing"),
    ("beta_schedule", "cosine", "beta_schedule"), ("variance_type", "fixed", "variance_type"),
    ("lambda_min_clipped", math.nan, "lambda_min_clipped"), ("lambda_min_clipped", "low", "lambda_min_clipped"),
    ("lower_order_final", 1, "lower_order_final"), ("euler_at_final", "yes", "euler_at_final"),
    ("use_karras_sigmas", None, "use_karras_sigmas"), ("dynamic_thresholding_ratio", 1.5, "dynamic_thresholding_ratio"),
    ("num_train_timesteps", 0, "num_train_timesteps"), ("steps_offset", -1, "steps_offset"),
])
def test_unknown_option_value_is_an_error(option, value, message):
    with pytest.raises((ValueError, TypeError), match=message):
        DPMSolverMultistepScheduler(**{option: value})


@pytest.mark.parametrize("config, message", [
    (dict(algorithm_type="dpmsolver"), "final_sigmas_type='zero' is not supported with algorithm_type='dpmsolver'"),
    (dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min", solver_order=3), "solver_order=3"),
    (dict(use_karras_sigmas=True, use_beta_sigmas=True), "at most one σ family"),
    (dict(use_karras_sigmas=True, use_lu_lambdas=True), "at most one σ family"),
    (dict(use_flow_sigmas=True), "not supported by fastdiff: no flow-matching models"),
    (dict(flow_shift=3.0), "flow_shift=3.0 is not supported by fastdiff"),
    (dict(use_dynamic_shifting=True), "use_dynamic_shifting=True is not supported"),
    (dict(time_shift_type="linear"), "time_shift_type='linear' is not supported"),
    (dict(prediction_type="flow_prediction"), "flow_prediction' is not supported by fastdiff"),
    (dict(num_train_timesteps=10, trained_betas=[0.01] * 9), "trained_betas"),
])
def test_unsupported_combinations_are_errors(config, message):
    with pytest.raises(ValueError) as info:
        DPMSolverMultistepScheduler(**config)
    assert message in str(info.value)


@pytest.mark.parametrize("steps", [0, -3, 1001, 10.0, "10", True, None])
def test_bad_num_inference_steps_is_an_error(steps):
    with pytest.raises((ValueError, TypeError), match="num_inference_steps"):
        DPMSolverMultistepScheduler().set_timesteps(steps)


@pytest.mark.parametrize("config, steps", [(dict(timestep_spacing="leading"), 1000),
                                           (dict(timestep_spacing="linspace", num_train_timesteps=100), 100),
                                           (dict(lambda_min_clipped=-5.1, beta_schedule="squaredcos_cap_v2"), 996)])
def test_step_counts_that_repeat_a_noise_level_are_errors(config, steps):
    """diffusers gives repeated timesteps (a step of length 0, then NaN from the next multistep update)."""
    with pytest.raises(ValueError, match="num_inference_steps=.* repeats a noise level"):
        DPMSolverMultistepScheduler(**config).set_timesteps(steps)


def test_other_set_timesteps_errors():
    scheduler = DPMSolverMultistepScheduler(use_karras_sigmas=True)
    with pytest.raises(ValueError, match="exactly one"):
        scheduler.set_timesteps(5, timesteps=[10, 5])
    with pytest.raises(ValueError, match="karras"):
        scheduler.set_timesteps(timesteps=[10, 5])
    with pytest.raises(ValueError, match="mu"):
        scheduler.set_timesteps(5, mu=0.5)
    with pytest.raises(ValueError, match="strictly decreasing"):
        DPMSolverMultistepScheduler().set_timesteps(timesteps=[5, 10])
    with pytest.raises(ValueError, match="timesteps"):
        DPMSolverMultistepScheduler().set_timesteps(timesteps=[1000, 5])
    with pytest.raises(ValueError, match="lambda_min_clipped"):
        DPMSolverMultistepScheduler(lambda_min_clipped=40.0).set_timesteps(5)


def test_step_errors():
    scheduler = DPMSolverMultistepScheduler()
    sample = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(sample, 999, sample)
    scheduler.set_timesteps(2)
    for t in scheduler.timesteps:
        scheduler.step(sample, t, sample)
    with pytest.raises(ValueError, match="called 3 times for 2 timesteps"):
        scheduler.step(sample, scheduler.timesteps[-1], sample)
    scheduler.set_timesteps(3)
    scheduler.step(sample, scheduler.timesteps[0], sample)
    with pytest.raises(ValueError, match="shape"):  # the history buffers are the first batch's
        scheduler.step(torch.randn(4, 3, 4, 4), scheduler.timesteps[1], torch.randn(4, 3, 4, 4))
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(torch.randn(2, 3, 4, 5), scheduler.timesteps[1], sample)
    with pytest.raises(TypeError, match="sample"):
        scheduler.step(sample, scheduler.timesteps[1], sample.long())
    with pytest.raises(ValueError, match="uncond_model_output"):
        scheduler.step(sample, scheduler.timesteps[1], sample, uncond_model_output=torch.randn(2, 3, 4, 5),
                       guidance_scale=2.0)
    with pytest.raises(ValueError, match="begin_index"):
        scheduler.set_begin_index(-1)


def test_sde_last_step_up_in_sigma_adds_no_noise():
    """Lu's last σ is exp(log σ_min), a rounding away from the final σ_min: in float64 h ≈ ±2e-7, and
    the SDE noise weight σ_t·√(e^(2h) − 1) would be √(negative) or ~σ_t·6e-4. fastdiff adds none
    (h < 0) or that little; diffusers' float32 λ's round h to 0 or to 1 ulp (~5e-7): a noise weight of
    0 or ~σ_t·1e-3. The steps before match diffusers; the last one differs by at most that noise."""
    for schedule, seed in (("squaredcos_cap_v2", 0), ("scaled_linear", 2)):
        config = dict(use_lu_lambdas=True, final_sigmas_type="sigma_min", algorithm_type="sde-dpmsolver",
                      beta_schedule=schedule, solver_order=1, timestep_spacing="leading")
        ours, theirs = pair(config, 10)
        assert torch.isclose(ours.sigmas[-1], ours.sigmas[-2], rtol=1e-6, atol=0)
        samples, expected = sample_loop(ours, 10, seed), sample_loop(theirs, 10, seed)
        for x, y in zip(samples[:-1], expected[:-1]):
            assert_matches(x, y)
        sigma_t = ours.sigmas[-1].item() / math.sqrt(ours.sigmas[-1].item() ** 2 + 1)
        noise_bound = sigma_t * 1.5e-3 * 5  # weight × |z| ≤ 5
        assert (samples[-1] - expected[-1]).abs().max() <= noise_bound + RTOL * expected[-1].abs().max()
        assert (samples[-1] - samples[-2]).abs().max() <= noise_bound


def test_repeated_first_timestep_follows_diffusers_index_rule():
    """A σ family on the cosine schedule can repeat the first timestep; diffusers' rule (the second
    occurrence) then starts at index 1, so a loop over all timesteps has one call too many: diffusers
    fails with an IndexError, fastdiff with a ValueError saying so."""
    ours, theirs = pair(dict(use_karras_sigmas=True, final_sigmas_type="sigma_min",
                             beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True), 16)
    assert ours.timesteps[0] == ours.timesteps[1] and torch.equal(ours.timesteps, theirs.timesteps)
    sample = torch.randn(SHAPE)
    for scheduler in (ours, theirs):
        scheduler.step(sample, scheduler.timesteps[0], sample)
    assert ours.step_index == theirs.step_index == 2
    with pytest.raises(IndexError):
        for t in theirs.timesteps[1:]:
            theirs.step(sample, t, sample)
    with pytest.raises(ValueError, match="called 17 times for 16 timesteps"):
        for t in ours.timesteps[1:]:
            ours.step(sample, t, sample)
