"""fastdiff's UniPCMultistepScheduler against diffusers 0.42's, the numerical oracle.

Requirement: for every option, in float32, the same timesteps and σ table as diffusers and the same
samples after every step of a full sampling loop (≤ 1e-5 relative to the tensor's scale), on both
backends ('torch', the reference; 'triton', the fused kernel, on the CPU through Triton's
interpreter). The default run holds a grid in which every option value appears; ``pytest -m
full_grid`` runs the whole product. Two kinds of case are checked otherwise, each in its own test:

* where diffusers' last step is NaN (into σ = 0 with bh1, with predict_x0=False or with a higher
  order; a step of length 0), fastdiff's last sample is the step's exact value (x̂0, resp. the
  corrected sample), computed from diffusers' own state;
* noise prediction (predict_x0=False) of a sample- or v-predicting model is ill-conditioned in
  float32: near σ_max the update's weights (α_t/α_s on x, ≈ the same on ε̂ = (x − α·x̂0)/σ) are large
  and cancel, and diffusers' corrector converts with the uncorrected sample, so rounding errors grow
  step by step. diffusers' own float32 result is up to 5e-2 (cosine schedule) away from its float64
  one, and a 1-ulp change of the initial noise moves it by ~1e-4 in 7 steps: no float32 implementation
  that does not repeat diffusers' exact operation order can match it to 1e-5. There, against
  diffusers run in float64, fastdiff's float32 error must be at most ILL_CONDITIONED_RATIO times
  diffusers' float32 error (or 1e-5): the flash-attention criterion, with the factor measured over
  the full grid (worst 5.0: fastdiff's fused corrector + predictor sums big cancelling terms once).

Tolerance everywhere else: rtol = 1e-5 and atol = 1e-5 · max|expected| (as tests/test_schedulers.py).
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
from fastdiff.schedulers import linear
from fastdiff.schedulers.dpmsolver import DPMSolverMultistepScheduler
from fastdiff.schedulers.unipc import UniPCMultistepScheduler, uni_rhos, unipc_order
from scheduler_helpers import (RTOL, assert_matches, covering_subset, relative_error, schedule_config,
                               scheduler_pair, sigmoid_as_trained_betas, toy_model, trained_betas)

diffusers = pytest.importorskip("diffusers")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]  # diffusers, numpy 2

ILL_CONDITIONED_RATIO = 8.0
SHAPE = (2, 3, 4, 4)  # (B, C, H, W)
BACKENDS = ["torch", "triton"]
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("linspace", "leading", "trailing")
FAMILIES = {None: {}, "karras": dict(use_karras_sigmas=True), "exponential": dict(use_exponential_sigmas=True),
            "beta": dict(use_beta_sigmas=True)}
SCHEDULES = {"linear": (0.0001, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (0.0001, 0.02),
             "sigmoid": (0.0002, 0.03)}
THRESHOLDS = (dict(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=2.5),
              dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=1.5))


# ----------------------------------------------------------------------------- the parity grid
@dataclasses.dataclass(frozen=True)
class Case:
    config: dict
    steps: int = 10
    seed: int = 0

    @property
    def id(self) -> str:
        cfg = self.config
        parts = [cfg.get("solver_type", "bh2"), "x0" if cfg.get("predict_x0", True) else "eps",
                 f"o{cfg.get('solver_order', 2)}", cfg.get("prediction_type", "epsilon")[:3],
                 cfg.get("timestep_spacing", "linspace")[:4], f"n{self.steps}"]
        for flag, family in (("use_karras_sigmas", "karras"), ("use_exponential_sigmas", "exp"),
                             ("use_beta_sigmas", "beta")):
            if cfg.get(flag):
                parts.append(family)
        named = {"final_sigmas_type": "", "lower_order_final": "lof=", "disable_corrector": "off",
                 "thresholding": "thr=", "rescale_betas_zero_snr": "zsnr=", "steps_offset": "offset",
                 "num_train_timesteps": "T", "beta_schedule": "", "sigma_min": "smin", "sigma_max": "smax"}
        parts += [f"{tag}{cfg[key]}" for key, tag in named.items() if key in cfg]
        if cfg.get("trained_betas") is not None:
            parts.append("trained")
        return "-".join(str(p).replace(" ", "") for p in parts)


def ill_conditioned(config: dict) -> bool:
    """Noise prediction of an x0- or v-predicting model (see the module docstring)."""
    return not config.get("predict_x0", True) and config.get("prediction_type", "epsilon") != "epsilon"


def first_timestep_repeats(config: dict, steps: int) -> bool:
    """A σ family on a cosine or zero-SNR schedule can repeat the first timestep: diffusers' index rule
    then starts at index 1 and a loop over the timesteps runs out of σ's (as for DPM-Solver)."""
    scheduler = UniPCMultistepScheduler(**config)
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps) > 1 and bool(scheduler.timesteps[0] == scheduler.timesteps[1])


def build_cases(full: bool) -> list[Case]:
    cases = []
    families, schedules = list(FAMILIES), list(SCHEDULES)
    # 1. solver type × predict_x0 × order, every other option rotating (full: × prediction × spacing too)
    extra = itertools.product(PREDICTIONS, SPACINGS) if full else [(None, None)] * 2
    for i, (solver_type, predict_x0, order, (pred, spacing)) in enumerate(
            itertools.product(("bh1", "bh2"), (True, False), (1, 2, 3), list(extra))):
        config = dict(solver_type=solver_type, predict_x0=predict_x0, solver_order=order,
                      prediction_type=pred or PREDICTIONS[i % 3], timestep_spacing=spacing or SPACINGS[(i // 3) % 3],
                      final_sigmas_type=("zero", "sigma_min")[(i // 2) % 2], lower_order_final=i % 4 != 3,
                      **FAMILIES[families[i % 4]], **schedule_config(schedules[(i // 4) % 4]))
        if i % 3 == 1:
            config["disable_corrector"] = [1, 3] if i % 2 else [0]
        if predict_x0 and i % 5 == 2:
            config.update(THRESHOLDS[(i // 5) % 2])
        if i % 7 == 3:
            config["rescale_betas_zero_snr"] = True
        if config["timestep_spacing"] == "leading" and i % 2:
            config["steps_offset"] = 1
        steps = (6, 8, 11)[i % 3]
        if first_timestep_repeats(config, steps):
            config = {k: v for k, v in config.items() if not k.startswith("use_")}
        cases.append(Case(config, steps=steps, seed=i))
    # 2. σ families bounded by sigma_min / sigma_max, trained betas, a short training schedule
    for i, family in enumerate(list(FAMILIES)[1:]):
        bounds = [dict(sigma_min=0.05), dict(sigma_max=20.0), dict(sigma_min=0.02, sigma_max=50.0)][i]
        cases.append(Case(dict(**FAMILIES[family], **bounds, solver_order=3, prediction_type=PREDICTIONS[i]), steps=9))
    for i, (T, spacing) in enumerate(itertools.product((1000, 64), SPACINGS if full else SPACINGS[1:])):
        cases.append(Case(dict(num_train_timesteps=T, trained_betas=trained_betas(T), beta_schedule="scaled_linear",
                               timestep_spacing=spacing, prediction_type=PREDICTIONS[i % 3], solver_order=3), steps=11,
                          seed=i))
    for i, spacing in enumerate(SPACINGS):
        cases.append(Case(dict(num_train_timesteps=100, timestep_spacing=spacing, solver_order=3, steps_offset=i % 2,
                               **FAMILIES[families[i + 1]]), steps=(5, 9, 15)[i]))
    # 3. zero terminal SNR with v-prediction, every spacing
    for i, spacing in enumerate(SPACINGS):
        cases.append(Case(dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing=spacing,
                               **schedule_config("scaled_linear"), solver_order=i + 1), steps=10))
    return cases


def option_values(case: Case) -> dict:
    """The case's full config (defaults filled in), flags for the values that are lists or tables."""
    config = {**UniPCMultistepScheduler(**case.config).config}
    config["trained_betas"] = config["trained_betas"] is not None
    config["disable_corrector"] = bool(config["disable_corrector"])
    for key in ("sigma_min", "sigma_max"):
        config[key] = config[key] is not None
    config["last_step"] = (config["solver_type"], config["predict_x0"], config["final_sigmas_type"])  # NaN in diffusers?
    return config


CASES = build_cases(full=False)
TRITON_CASES = covering_subset(CASES, option_values)
RUNS = [(case, "torch") for case in CASES] + [(case, "triton") for case in TRITON_CASES]
FULL_CASES = [case for case in build_cases(full=True) if case.id not in {c.id for c in CASES}]


def diffusers_config(config: dict) -> dict:
    """diffusers' UniPC rejects beta_schedule="sigmoid": give it diffusers DDPM's sigmoid betas."""
    return sigmoid_as_trained_betas(config, diffusers.DDPMScheduler)


def pair(config: dict, steps: int | None = None):
    return scheduler_pair(UniPCMultistepScheduler, diffusers.UniPCMultistepScheduler, config, diffusers_config(config),
                          steps)


def sample_loop(scheduler, steps: int, seed: int, backend: str = "torch", dtype=torch.float32) -> list[torch.Tensor]:
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)
    scheduler.set_timesteps(steps)
    if dtype == torch.float64:  # diffusers in float64: its σ table too
        scheduler.sigmas = scheduler.sigmas.double()
    samples = []
    with fastdiff.use_backend(backend):
        for t in scheduler.timesteps:
            sample = scheduler.step(toy_model(sample, t), t, sample).prev_sample
            samples.append(sample)
    return samples


def exact_last_step(theirs) -> torch.Tensor:
    """The value of the last step where diffusers' is NaN, from diffusers' state after it: into σ = 0,
    x̂0 (x0-space: the converted output; ε-space: (x^c − σ_s·ε̂)/α_s from the corrected sample);
    a step of length 0, the corrected sample itself."""
    if theirs.sigmas[-1] == theirs.sigmas[-2]:
        return theirs.last_sample
    assert theirs.sigmas[-1] == 0
    converted = theirs.model_outputs[-1]
    if theirs.config.predict_x0:
        return converted
    alpha_s, sigma_s = theirs._sigma_to_alpha_sigma_t(theirs.sigmas[-2])
    return (theirs.last_sample - sigma_s * converted) / alpha_s


def diffusers_loop(config: dict, steps: int, seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    """diffusers' samples, its NaN last step (if any) replaced by the step's exact value."""
    theirs = diffusers.UniPCMultistepScheduler(**diffusers_config(config))
    expected = sample_loop(theirs, steps, seed, dtype=dtype)
    if not torch.isfinite(expected[-1]).all() and theirs.timesteps[-1] >= 0:
        expected[-1] = exact_last_step(theirs)
    return expected


def check_loop(case: Case, backend: str) -> float:
    ours = UniPCMultistepScheduler(**case.config)
    samples = sample_loop(ours, case.steps, case.seed, backend)
    expected = diffusers_loop(case.config, case.steps, case.seed)
    theirs = pair(case.config, case.steps)[1]
    n = len(ours.timesteps)
    assert torch.equal(ours.timesteps, theirs.timesteps[:n])
    assert len(theirs.timesteps) == n or theirs.timesteps[n:].tolist() == [-1]  # diffusers' invalid trailing −1
    if ill_conditioned(case.config):
        exact = diffusers_loop(case.config, case.steps, case.seed, torch.float64)[:n]
        ours_error = max(relative_error(x, e) for x, e in zip(samples, exact))
        their_error = max(relative_error(y, e) for y, e in zip(expected, exact))
        assert ours_error <= max(ILL_CONDITIONED_RATIO * their_error, RTOL), (ours_error, their_error)
        return ours_error
    worst = 0.0
    for i, (x, y) in enumerate(zip(samples, expected)):
        assert torch.isfinite(y).all(), f"diffusers is NaN before the last step (step {i})"
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
    assert seen["solver_type"] == {"bh1", "bh2"} and seen["predict_x0"] == {True, False}
    assert seen["solver_order"] == {1, 2, 3}
    assert seen["prediction_type"] == set(PREDICTIONS) and seen["timestep_spacing"] == set(SPACINGS)
    assert seen["final_sigmas_type"] == {"zero", "sigma_min"}
    assert seen["beta_schedule"] >= set(SCHEDULES)
    for flag in ("lower_order_final", "disable_corrector", "thresholding", "rescale_betas_zero_snr", "trained_betas",
                 "sigma_min", "sigma_max", *(k for family in FAMILIES.values() for k in family)):
        assert seen[flag] == {True, False}, flag
    assert seen["steps_offset"] == {0, 1} and seen["num_train_timesteps"] >= {1000, 100, 64}
    assert len(seen["dynamic_thresholding_ratio"]) >= 2 and len(seen["sample_max_value"]) >= 3
    assert {("bh1", True, "zero"), ("bh2", False, "zero")} <= seen["last_step"]  # diffusers' NaN last steps


def test_ill_conditioned_noise_prediction_cannot_be_matched_closer():
    """predict_x0=False with an x0-predicting model, 7 steps: a 1-ulp change of the initial noise
    moves diffusers' own result by more than 1e-5 (so parity is judged against float64 there), while
    with an ε-predicting model, or in x0 space, it moves it by less than 1e-6."""
    def nudged_change(**config):
        results = []
        for nudge in (False, True):
            scheduler = diffusers.UniPCMultistepScheduler(solver_order=3, final_sigmas_type="sigma_min", **config)
            scheduler.set_timesteps(7)
            sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
            if nudge:
                sample = torch.nextafter(sample, torch.full_like(sample, 10.0))
            for t in scheduler.timesteps:
                sample = scheduler.step(toy_model(sample, t), t, sample).prev_sample
            results.append(sample)
        return relative_error(results[1], results[0])

    assert nudged_change(predict_x0=False, prediction_type="sample") > 1e-5
    assert nudged_change(predict_x0=False, prediction_type="epsilon") < 1e-6
    assert nudged_change(predict_x0=True, prediction_type="sample") < 1e-6
    config = dict(predict_x0=False, prediction_type="sample", solver_order=3, final_sigmas_type="sigma_min")
    assert ill_conditioned(config)
    check_loop(Case(config, steps=7), "torch")


def test_same_seed_gives_the_same_samples():
    case = Case(dict(solver_order=3, solver_type="bh1"), steps=6, seed=3)
    runs = [sample_loop(UniPCMultistepScheduler(**case.config), case.steps, case.seed, backend)[-1]
            for backend in ("triton", "triton", "torch")]
    assert torch.equal(runs[0], runs[1])
    assert_matches(runs[0], runs[2])


# ----------------------------------------------------------------------------- set_timesteps
def check_tables(config: dict, steps: int) -> None:
    ours, theirs = pair(config, steps)
    n = len(ours.timesteps)
    assert ours.timesteps.dtype == torch.int64 and ours.sigmas.dtype == torch.float32
    assert torch.equal(ours.timesteps, theirs.timesteps[:n]), (ours.timesteps, theirs.timesteps)
    assert ours.num_inference_steps == n and len(ours.sigmas) == n + 1
    if len(theirs.timesteps) == n:
        assert torch.equal(ours.sigmas, theirs.sigmas)
    else:  # diffusers' trailing −1, dropped here
        assert theirs.timesteps[n:].tolist() == [-1]
        assert torch.equal(ours.sigmas[:-1], theirs.sigmas[:n]) and ours.sigmas[-1] == theirs.sigmas[-1]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_timesteps_and_sigmas_match_diffusers(family, spacing):
    for T, steps, final, schedule in itertools.product((1000, 37), (1, 2, 7, 10, 25), ("zero", "sigma_min"),
                                                       ("scaled_linear", "squaredcos_cap_v2")):
        config = dict(num_train_timesteps=T, timestep_spacing=spacing, final_sigmas_type=final,
                      steps_offset=1 if spacing == "leading" else 0, **FAMILIES[family], **schedule_config(schedule))
        if steps <= T:
            check_tables(config, steps)
    if family is not None:
        check_tables(dict(FAMILIES[family], sigma_min=0.1, sigma_max=30.0, final_sigmas_type="sigma_min"), 9)


@pytest.mark.full_grid
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_full_grid_timesteps_and_sigmas_match_diffusers(family, spacing):
    for T, steps, final, schedule, zsnr in itertools.product((1000, 100, 37), (1, 2, 3, 7, 10, 25, 36, 61, 100),
                                                             ("zero", "sigma_min"), list(SCHEDULES)[:3], (False, True)):
        config = dict(num_train_timesteps=T, timestep_spacing=spacing, final_sigmas_type=final, steps_offset=1,
                      rescale_betas_zero_snr=zsnr, **FAMILIES[family], **schedule_config(schedule))
        if steps <= T:
            check_tables(config, steps)


def test_trailing_spacing_drops_diffusers_invalid_last_timestep():
    ours, theirs = pair(dict(timestep_spacing="trailing"), 61)
    assert theirs.timesteps[-1] == -1 and len(ours.timesteps) == 61 and ours.timesteps[-1] >= 0
    check_tables(dict(timestep_spacing="trailing"), 61)


# ----------------------------------------------------------------------------- step() against step()
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", [dict(solver_order=3, **THRESHOLDS[1]),
                                    dict(solver_order=3, solver_type="bh1", predict_x0=False, lower_order_final=False,
                                         final_sigmas_type="sigma_min", disable_corrector=[2])],
                         ids=["x0-thresholding", "eps-bh1-disable2"])
def test_each_step_matches_diffusers_step(config, backend):
    """Random model outputs, the same for both libraries, fed step by step."""
    ours, theirs = pair(config, 7)
    g = torch.Generator().manual_seed(11)
    sample = torch.randn(SHAPE, generator=g)
    with fastdiff.use_backend(backend):
        for i, t in enumerate(ours.timesteps):
            model_output = torch.randn(SHAPE, generator=g)
            mine = ours.step(model_output, t, sample).prev_sample
            expected = theirs.step(model_output, t, sample).prev_sample
            assert ours.step_index == theirs.step_index == i + 1
            assert_matches(mine, expected, f"step {i}")
            sample = expected


def test_step_returns_diffusers_outputs():
    scheduler = UniPCMultistepScheduler()
    scheduler.set_timesteps(4)
    sample = torch.randn(SHAPE)
    t = scheduler.timesteps[0]
    out = scheduler.step(toy_model(sample, t), t, sample)
    assert isinstance(out, fastdiff.schedulers.unipc.UniPCMultistepSchedulerOutput)
    scheduler.set_timesteps(4)
    (prev,) = scheduler.step(toy_model(sample, t), int(t), sample, False)  # diffusers' positional return_dict
    assert torch.equal(prev, out.prev_sample)


@pytest.mark.parametrize("disabled", [[0], [1, 2, 3], list(range(8))])
def test_disable_corrector_skips_the_corrections_diffusers_skips(disabled):
    """disable_corrector=[i]: the prediction made at step i is not corrected (at step i + 1)."""
    ours, theirs = pair(dict(disable_corrector=disabled, solver_order=3))
    assert_matches(sample_loop(ours, 8, 1)[-1], sample_loop(theirs, 8, 1)[-1])
    tables = ours.step_tables(ours.timesteps)
    for i in range(1, 7):  # a corrected step reads "last" (not the last step: into σ = 0, x^c has weight 0)
        reads_last = tables.rows[i, linear.ROW_OUT + linear.NAMES.index("last")] != 0
        assert bool(reads_last) == (i - 1 not in disabled), i


# ----------------------------------------------------------------------------- the sync-free loop's tables
def run_tables(scheduler, timesteps, sample, backend):
    tables = scheduler.step_tables(timesteps)
    slots = linear.slot_buffers(sample)
    samples = []
    with fastdiff.use_backend(backend):
        for i, t in enumerate(tables.host_timesteps):
            assert not tables.noisy[i]
            sample, _ = scheduler._update(toy_model(sample, t), sample, tables.rows[i], None, slots)
            samples.append(sample)
    return samples


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_tables_reproduce_step_exactly(backend):
    scheduler = UniPCMultistepScheduler(solver_order=3, solver_type="bh1", disable_corrector=[2], **THRESHOLDS[0])
    scheduler.set_timesteps(7)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    from_tables = run_tables(scheduler, scheduler.timesteps, start, backend)
    sample = start
    with fastdiff.use_backend(backend):
        for t, expected in zip(scheduler.timesteps, from_tables):
            sample = scheduler.step(toy_model(sample, t), t, sample).prev_sample
            assert torch.equal(sample, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdedit_tail_matches_diffusers_img2img(backend):
    """set_begin_index(k), noise x0 to the k-th timestep, run the tail: the first step of the tail is not
    corrected (there is no earlier sample) and starts the warm-up, as in diffusers."""
    begin = 3
    ours, theirs = pair(dict(solver_order=3), 8)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)).clamp(-1, 1)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    tail = ours.timesteps[begin:]
    for scheduler in (ours, theirs):
        scheduler.set_begin_index(begin)
    start = ours.add_noise(x0, noise, tail[:1])
    assert_matches(start, theirs.add_noise(x0, noise, tail[:1]))
    mine = run_tables(ours, tail, start, backend)
    sample = start
    for t, x in zip(tail, mine):
        sample = theirs.step(toy_model(sample, t), t, sample).prev_sample
        assert_matches(x, sample, f"t={int(t)}")
    sample = start
    with fastdiff.use_backend(backend):
        for t, x in zip(tail, mine):
            sample = ours.step(toy_model(sample, t), t, sample).prev_sample
            assert torch.equal(sample, x)


# ----------------------------------------------------------------------------- the equations, diffusers' NaN
def test_order_rule_is_diffusers():
    assert [unipc_order(i, 6, min(i, 3), 3, lower_order_final=True) for i in range(6)] == [1, 2, 3, 3, 2, 1]
    assert [unipc_order(i, 6, min(i, 3), 3, lower_order_final=False) for i in range(6)] == [1, 2, 3, 3, 3, 3]
    assert unipc_order(5, 6, 3, 3, lower_order_final=False, to_zero=True) == 1


def test_rhos_solve_the_order_conditions():
    """UniC-p's ρ solve Σ_j ρ_j·r_j^(i−1) = b_i exactly; one unknown is diffusers' fixed ½."""
    rks = [-1.3, -2.1, 1.0]
    rhos = uni_rhos(rks, -0.7, "bh2")
    R = np.array([[r ** i for r in rks] for i in range(3)])
    hh, b_h = -0.7, math.expm1(-0.7)
    phi = math.expm1(hh) / hh - 1  # b_1 = (φ_1(hh) − 1)/B(h)·1!
    assert (R @ rhos)[0] == pytest.approx(phi / b_h)
    assert uni_rhos([1.0], -0.7, "bh1").tolist() == [0.5] and uni_rhos([-1.5], -0.7, "bh2").tolist() == [0.5]


@pytest.mark.parametrize("config", [dict(solver_type="bh1", solver_order=3), dict(predict_x0=False, solver_order=3),
                                    dict(lower_order_final=False, solver_order=2),
                                    dict(lower_order_final=False, solver_order=3),
                                    dict(solver_type="bh1", predict_x0=False, solver_order=1)])
def test_last_step_into_sigma_zero_is_finite(config):
    """diffusers computes ∞·0 = NaN at the step into σ = 0 here (UniP-3: a singular system, an error);
    fastdiff's is x̂0 (first order, in its finite form), computed from diffusers' state after the same
    step. The steps before match diffusers."""
    ours, theirs = pair(config)
    samples = sample_loop(ours, 8, 0)
    if config.get("lower_order_final") is False and config["solver_order"] == 3:
        with pytest.raises(torch.linalg.LinAlgError):
            sample_loop(theirs, 8, 0)
        theirs, expected = pair(config)[1], None
        theirs.set_timesteps(8)
        sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        expected = []
        for t in theirs.timesteps[:-1]:
            sample = theirs.step(toy_model(sample, t), t, sample).prev_sample
            expected.append(sample)
        with pytest.raises(torch.linalg.LinAlgError):
            theirs.step(toy_model(sample, theirs.timesteps[-1]), theirs.timesteps[-1], sample)
    else:
        expected = sample_loop(theirs, 8, 0)
        assert not torch.isfinite(expected[-1]).any(), "diffusers fixed its last step: drop the special case"
        expected = expected[:-1]
    for x, y in zip(samples[:-1], expected):
        assert_matches(x, y)
    assert_matches(samples[-1], exact_last_step(theirs))


def test_step_of_length_zero_is_the_corrected_sample():
    """karras σ end at σ_min, final σ_min again: h = 0 (diffusers' order ≥ 2 there: 0/0 = NaN)."""
    config = dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False, solver_order=3)
    ours, theirs = pair(config)
    samples, expected = sample_loop(ours, 8, 0), sample_loop(theirs, 8, 0)
    assert torch.isnan(expected[-1]).all()
    for x, y in zip(samples[:-1], expected[:-1]):
        assert_matches(x, y)
    assert_matches(samples[-1], theirs.last_sample)


# ----------------------------------------------------------------------------- guidance, constants, noising
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_guidance_keywords_equal_stepping_the_combined_output(guidance_scale, backend):
    ours, theirs = pair(dict(solver_order=3, thresholding=True), 5)
    g = torch.Generator().manual_seed(9)
    sample = torch.randn(SHAPE, generator=g)
    with fastdiff.use_backend(backend):
        for t in ours.timesteps:
            cond, uncond = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
            fused = ours.step(cond, t, sample, uncond_model_output=uncond, guidance_scale=guidance_scale).prev_sample
            plain = theirs.step(uncond + guidance_scale * (cond - uncond), t, sample).prev_sample
            assert_matches(fused, plain, f"t={int(t)}")
            sample = plain


def test_scheduler_constants():
    ours, theirs = pair(dict(num_train_timesteps=250))
    assert ours.init_noise_sigma == theirs.init_noise_sigma == 1.0
    assert ours.order == theirs.order == 1 and len(ours) == len(theirs) == 250
    assert ours.predict_x0 is theirs.predict_x0 is True
    sample = torch.randn(SHAPE)
    assert torch.equal(ours.scale_model_input(sample, 10), sample)
    assert ours.step_index is None and ours.begin_index is None


def test_add_noise_matches_diffusers():
    ours, theirs = pair(dict(use_exponential_sigmas=True), 10)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn((5, 3, 4, 4), generator=g), torch.randn((5, 3, 4, 4), generator=g)
    timesteps = ours.timesteps[[0, 3, 9, 3, 5]]
    assert_matches(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps))
    for scheduler in (ours, theirs):
        scheduler.set_begin_index(4)
    assert_matches(ours.add_noise(x0, noise, timesteps[:1]), theirs.add_noise(x0, noise, timesteps[:1]))
    untimed = UniPCMultistepScheduler()  # before set_timesteps: σ of the timestep itself (see the docstring)
    assert_matches(untimed.add_noise(x0, noise, torch.tensor([7])), fastdiff.DDPMScheduler().add_noise(
        x0, noise, torch.tensor([7])))


# ----------------------------------------------------------------------------- config
def test_config_matches_diffusers():
    config = dict(solver_type="bh1", predict_x0=False, disable_corrector=[1, 4], use_karras_sigmas=True,
                  sigma_min=0.1, solver_order=3)
    ours, theirs = pair(config)
    assert dict(ours.config) == {k: v for k, v in theirs.config.items() if not k.startswith("_")}
    assert dict(UniPCMultistepScheduler().config) == {
        k: v for k, v in diffusers.UniPCMultistepScheduler().config.items() if not k.startswith("_")}
    for dpm_type in ("midpoint", "heun", "logrho"):  # configs cross-load: read as bh2, as diffusers
        assert UniPCMultistepScheduler(solver_type=dpm_type).config.solver_type == "bh2"


def test_save_config_round_trips_and_loads_in_diffusers(tmp_path):
    config = dict(solver_type="bh1", disable_corrector=[2], use_beta_sigmas=True, sigma_max=40.0, solver_order=1)
    ours = UniPCMultistepScheduler(**config)
    ours.save_config(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["_class_name"] == "UniPCMultistepScheduler"
    assert UniPCMultistepScheduler.from_pretrained(tmp_path).config == ours.config
    theirs = diffusers.UniPCMultistepScheduler.from_pretrained(tmp_path)
    assert {k: theirs.config[k] for k in config} == config


def test_cross_loading_with_dpmsolver_and_ddim_configs():
    dpm = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_type="heun", use_karras_sigmas=True,
                                      beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = UniPCMultistepScheduler.from_config(dpm.config)
    theirs = diffusers.UniPCMultistepScheduler.from_config(diffusers.DPMSolverMultistepScheduler(**dpm.config).config)
    assert dict(ours.config) == {k: theirs.config[k] for k in ours.config} and ours.config.solver_type == "bh2"
    assert_matches(sample_loop(ours, 8, 0)[-1], sample_loop(theirs, 8, 0)[-1])
    back = DPMSolverMultistepScheduler.from_config(ours.config)
    assert back.config.solver_type == "midpoint" and back.config.use_karras_sigmas
    ddim = fastdiff.DDIMScheduler(clip_sample=True, steps_offset=1, timestep_spacing="leading")
    from_ddim = UniPCMultistepScheduler.from_config(ddim.config)
    assert from_ddim.config.steps_offset == 1 and from_ddim.config.timestep_spacing == "leading"
    assert fastdiff.DDIMScheduler.from_config(from_ddim.config).config.steps_offset == 1


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("option, value, message", [
    ("solver_type", "bh3", "solver_type"), ("solver_order", 4, "solver_order"), ("solver_order", 0, "solver_order"),
    ("final_sigmas_type", "one", "final_sigmas_type"), ("predict_x0", 1, "predict_x0"),
    ("disable_corrector", [1.5], "disable_corrector"), ("disable_corrector", [-1], "disable_corrector"),
    ("disable_corrector", 3, "disable_corrector"), ("lower_order_final", "no", "lower_order_final"),
    ("sigma_min", -1.0, "sigma_min"), ("sigma_max", "big", "sigma_max"), ("prediction_type", "eps", "prediction_type"),
    ("timestep_spacing", "uniform", "timestep_spacing"), ("use_beta_sigmas", 1, "use_beta_sigmas"),
])
def test_unknown_option_value_is_an_error(option, value, message):
    with pytest.raises((ValueError, TypeError), match=message):
        UniPCMultistepScheduler(**{option: value})


@pytest.mark.parametrize("config, message", [
    (dict(solver_p=diffusers.DPMSolverMultistepScheduler()), "solver_p=DPMSolverMultistepScheduler is not supported"),
    (dict(thresholding=True, predict_x0=False), "thresholding=True needs predict_x0=True"),
    (dict(use_karras_sigmas=True, use_exponential_sigmas=True), "at most one σ family"),
    (dict(sigma_min=5.0, sigma_max=1.0), "sigma_min must be below sigma_max"),
    (dict(use_flow_sigmas=True), "not supported by fastdiff: no flow-matching models"),
    (dict(shift_terminal=0.1), "shift_terminal=0.1 is not supported by fastdiff"),
    (dict(flow_shift=2.0), "flow_shift=2.0 is not supported"),
    (dict(prediction_type="flow_prediction"), "flow_prediction' is not supported by fastdiff"),
])
def test_unsupported_combinations_are_errors(config, message):
    with pytest.raises(ValueError) as info:
        UniPCMultistepScheduler(**config)
    assert message in str(info.value)


def test_set_timesteps_errors():
    scheduler = UniPCMultistepScheduler()
    for steps in (0, 1001, 2.5, None):
        with pytest.raises((ValueError, TypeError), match="num_inference_steps"):
            scheduler.set_timesteps(steps)
    with pytest.raises(ValueError, match="sigmas"):
        scheduler.set_timesteps(5, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="mu"):
        scheduler.set_timesteps(5, mu=0.3)
    with pytest.raises(ValueError, match="repeats a noise level"):
        UniPCMultistepScheduler(timestep_spacing="leading").set_timesteps(1000)


def test_step_errors():
    scheduler = UniPCMultistepScheduler()
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
    with pytest.raises(ValueError, match="shape"):
        scheduler.step(torch.randn(1, 3, 4, 4), scheduler.timesteps[1], torch.randn(1, 3, 4, 4))
    with pytest.raises(TypeError, match="model_output"):
        scheduler.step(sample.numpy(), scheduler.timesteps[1], sample)
    with pytest.raises(ValueError, match="guidance_scale"):
        scheduler.step(sample, scheduler.timesteps[1], sample, guidance_scale=3.0)
