"""fastdiff.compat's FastDPMSolverMultistepScheduler against the stock diffusers DPMSolverMultistepScheduler.

Requirement: with the same model outputs (and, for the SDE variants, the same generator or
``variance_noise``) the drop-in gives the stock class's sample after every step of a full loop and
leaves the stock class's state (``model_outputs``, ``lower_order_nums``, ``step_index``), on both
backends ('triton' through Triton's interpreter on the CPU, its launches counted); state set between
steps, a step of diffusers' own code in between and a copied or pickled scheduler continue as the
stock class does. Where the fused op would not give diffusers' result diffusers' step runs: there
the outputs are the stock ones exactly and the op is not called (``fused_calls``).

Tolerance: rtol = 1e-5 and atol = 1e-5·max|expected| (float32), except noise prediction
("dpmsolver", "sde-dpmsolver") whose ε̂ is computed from the sample (sample/v models, thresholding):
float32 is ill-conditioned there near σ_max (tests/test_scheduler_dpmsolver.py), so the drop-in's
float32 error against the stock class run in float64 must be at most ILL_CONDITIONED_RATIO times
the stock float32 error (or 1e-5). fp16/bf16 on the kernel: error against the stock class in float32
at most LOW_PRECISION_RATIO times the stock class's own error in that dtype (the flash-attention
criterion). The default run holds a grid in which every option value appears; ``-m full_grid`` more.
"""

from __future__ import annotations

import copy
import itertools
import math
import pickle

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastdiff  # noqa: E402
from fastdiff.compat import _dpmsolver  # noqa: E402
from fastdiff.compat._dpmsolver import FastDPMSolverMultistepScheduler  # noqa: E402
import scheduler_helpers  # noqa: E402
from scheduler_helpers import (DEVICE, RTOL, device_for, diffusers_in_float64, kernel_option_subset,  # noqa: E402
                               lambda32, parameters, public_config, relative_error, toy_model)

Stock = diffusers.DPMSolverMultistepScheduler
ILL_CONDITIONED_RATIO = 8.0
LOW_PRECISION_RATIO = 2.0
SHAPE = (2, 3, 4, 4)
ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("linspace", "leading", "trailing")
FAMILIES = ({}, dict(use_karras_sigmas=True), dict(use_lu_lambdas=True), dict(use_exponential_sigmas=True),
            dict(use_beta_sigmas=True))
SCHEDULES = (dict(beta_schedule="linear"), dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))

pytestmark = [pytest.mark.filterwarnings("ignore:`algorithm_types dpmsolver:FutureWarning"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]


def assert_matches(actual, expected, what="") -> None:
    """NaN where the stock class's sample is NaN passes (the steps left to diffusers' code)."""
    scheduler_helpers.assert_matches(actual, expected, what, equal_nan=True)


# ----------------------------------------------------------------------------- loops
def snapshot(scheduler) -> tuple:
    """The diffusers state a step leaves (tensors cloned: the drop-in's entries are views of its slots)."""
    outputs = [None if m is None else m.clone() for m in scheduler.model_outputs]
    return outputs, scheduler.lower_order_nums, scheduler.step_index


def sample_loop(scheduler, steps, seed, *, backend="torch", dtype=torch.float32, between=None, noise=False,
                feed=None, record=None, device=None):
    """A full loop from seed ``seed`` (SDE noise from the same generator, or explicit ``variance_noise``);
    each step's sample and state. ``between(scheduler, i)`` runs before step i (state changes);
    ``feed``: the samples to step from (another run's ``record``) instead of the loop's own."""
    generator = torch.Generator().manual_seed(seed)
    device = device or device_for(backend)
    sample = torch.randn(SHAPE, generator=generator).to(device=device, dtype=dtype)
    scheduler.set_timesteps(steps)
    if dtype == torch.float64:
        scheduler.sigmas = scheduler.sigmas.double()
    samples, states = [], []
    with fastdiff.use_backend(backend):
        for i, t in enumerate(scheduler.timesteps):
            if between is not None:
                between(scheduler, i)
            drawn = torch.randn(SHAPE, generator=generator).to(device) if noise else None
            kwargs = {"variance_noise": drawn} if noise else {"generator": generator}
            sample = sample if feed is None else feed[i]
            if record is not None:
                record.append(sample)
            sample = scheduler.step(toy_model(sample, t), t, sample, **kwargs).prev_sample
            samples.append(sample)
            states.append(snapshot(scheduler))
    return samples, states


def check_same_run(fast, stock, what="") -> float:
    """Sample and state after every step agree; returns the worst relative sample error."""
    worst = 0.0
    for i, ((x, fast_state), (y, stock_state)) in enumerate(zip(zip(*fast), zip(*stock))):
        assert_matches(x, y, f"{what} sample after step {i}")
        worst = max(worst, relative_error(x, y)) if torch.isfinite(y).all() else worst
        (fast_outputs, *fast_counters), (stock_outputs, *stock_counters) = fast_state, stock_state
        assert fast_counters == stock_counters, f"{what} lower_order_nums, step_index after step {i}"
        assert len(fast_outputs) == len(stock_outputs)
        for k, (m, e) in enumerate(zip(fast_outputs, stock_outputs)):
            assert (m is None) == (e is None), f"{what} model_outputs[{k}] after step {i}"
            if e is not None:
                assert m.dtype == e.dtype
                assert_matches(m, e, f"{what} model_outputs[{k}] after step {i}")
    assert len(fast[0]) == len(stock[0])
    return worst


# ----------------------------------------------------------------------------- the parity grid
def ill_conditioned(config: dict) -> bool:
    return not config.get("algorithm_type", "dpmsolver++").endswith("++") and (
        config.get("prediction_type", "epsilon") != "epsilon" or config.get("thresholding", False))


def case_id(config: dict, steps: int) -> str:
    short = {"algorithm_type": "", "solver_order": "o", "solver_type": "", "prediction_type": "",
             "timestep_spacing": "", "final_sigmas_type": "", "lower_order_final": "lof", "euler_at_final": "euler",
             "thresholding": "thr", "beta_schedule": "", "rescale_betas_zero_snr": "zsnr",
             "lambda_min_clipped": "clip", "steps_offset": "off"}
    parts = [f"{tag}{config[key]}" for key, tag in short.items() if key in config]
    parts += [key[4:-7] for key in config if key.startswith("use_") and config[key]]
    return "-".join(parts + [f"n{steps}"])


def build_cases(full: bool) -> list[tuple[dict, int]]:
    """algorithm × order × solver type (full: × prediction × spacing), every other option rotating; then
    zero-SNR v-prediction and λ clipping on the cosine schedule."""
    cases = []
    extra = list(itertools.product(PREDICTIONS, SPACINGS)) if full else [(None, None)]
    for i, (algorithm, order, solver_type, (prediction, spacing)) in enumerate(
            itertools.product(ALGORITHMS, (1, 2, 3), ("midpoint", "heun"), extra)):
        if algorithm == "sde-dpmsolver" and order == 3:  # diffusers has no such update (test below)
            continue
        steps = (6, 9, 16)[i % 3]
        config = dict(algorithm_type=algorithm, solver_order=order, solver_type=solver_type,
                      prediction_type=prediction or PREDICTIONS[i % 3],
                      timestep_spacing=spacing or SPACINGS[(i // 3) % 3],
                      final_sigmas_type="zero" if algorithm.endswith("++") and i % 2 else "sigma_min",
                      lower_order_final=i % 4 != 1, euler_at_final=i % 5 == 3, **FAMILIES[(i // 2) % 5],
                      **SCHEDULES[i % 2])
        if i % 6 == 4:
            config.update(thresholding=True, dynamic_thresholding_ratio=(0.995, 0.8)[i % 2], sample_max_value=2.5)
        if config["timestep_spacing"] == "leading" and i % 2:
            config["steps_offset"] = 1
        if algorithm.startswith("sde") and config["final_sigmas_type"] == "sigma_min":
            # a last SDE step of length ≈ 0 (a σ family ending a rounding away from σ_min) has noise weight
            # σ_t·√(e^(2h) − 1) of infinite slope at h = 0: diffusers' float32 h makes it anything in [0, ~1e-3]
            config = {k: v for k, v in config.items() if not k.startswith("use_")}
        cases.append((config, steps))
    for i, spacing in enumerate(SPACINGS):
        cases.append((dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing=spacing,
                           algorithm_type=ALGORITHMS[i % 2], solver_order=3, **SCHEDULES[1]), 10))
    cases.append((dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, solver_order=3,
                       prediction_type="sample"), 12))
    return cases


# the options that change what the kernel computes (which inputs, slots and conversions a row uses);
# the others change the host's σ table and coefficients only, the same numbers on both backends
KERNEL_OPTIONS = ("algorithm_type", "solver_order", "solver_type", "prediction_type", "thresholding")


CASES = build_cases(full=False)
TRITON_CASES = kernel_option_subset([case for case in CASES if not ill_conditioned(case[0])], KERNEL_OPTIONS, Stock)
FULL_CASES = [case for case in build_cases(full=True) if case not in CASES]


def check_loop(config: dict, steps: int, backend: str, fused_calls: list) -> float:
    """Step by step on ``backend``, each step from the stock run's sample (the same model outputs and
    noise: state compared tightly); then the free-running loop's samples (against float64 where
    ill-conditioned)."""
    seed = len(case_id(config, steps))
    stock_scheduler, fed = Stock(**config), []
    stock = sample_loop(stock_scheduler, steps, seed, record=fed, device=device_for(backend))
    forced = sample_loop(FastDPMSolverMultistepScheduler(**config), steps, seed, backend=backend, feed=fed)
    n = len(stock_scheduler.timesteps)
    # diffusers' own step runs only for a last step of length 0 in λ (σ_min reached already)
    assert len(fused_calls) == n - int(lambda32(stock_scheduler, n) == lambda32(stock_scheduler, n - 1))
    if ill_conditioned(config):  # even from the same inputs a step rounds differently: the counters only here
        assert [s[1:] for s in forced[1]] == [s[1:] for s in stock[1]]
        worst = 0.0
    else:
        worst = check_same_run(forced, stock, case_id(config, steps))
    if backend != "torch" and not ill_conditioned(config):
        return worst  # the kernel is the reference's twin; the free loop is checked on the reference
    fast = sample_loop(FastDPMSolverMultistepScheduler(**config), steps, seed, backend=backend)
    if not ill_conditioned(config):
        for i, (x, y) in enumerate(zip(fast[0], stock[0])):
            assert_matches(x, y, f"{case_id(config, steps)} free-running loop, sample after step {i}")
            worst = max(worst, relative_error(x, y)) if torch.isfinite(y).all() else worst
        return worst
    with diffusers_in_float64(Stock):
        exact = sample_loop(Stock(**config), steps, seed, dtype=torch.float64, device=device_for(backend))
    ours = max(relative_error(x, e) for x, e in zip(fast[0], exact[0]))
    theirs = max(relative_error(y, e) for y, e in zip(stock[0], exact[0]))
    assert ours <= max(ILL_CONDITIONED_RATIO * theirs, RTOL), (ours, theirs)
    return ours


@pytest.mark.parametrize("config, steps", CASES, ids=[case_id(*c) for c in CASES])
def test_full_loop_matches_stock(config, steps, fused_calls):
    check_loop(config, steps, "torch", fused_calls)


@pytest.mark.parametrize("config, steps", TRITON_CASES, ids=[case_id(*c) for c in TRITON_CASES])
def test_full_loop_matches_stock_on_the_kernel(config, steps, fused_calls, launches):
    check_loop(config, steps, "triton", fused_calls)
    assert launches["multistep_update"] == len(fused_calls) > 0


@pytest.mark.full_grid
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("config, steps", FULL_CASES, ids=[case_id(*c) for c in FULL_CASES])
def test_full_grid_loop_matches_stock(config, steps, backend, fused_calls):
    check_loop(config, steps, backend, fused_calls)


def test_grid_covers_every_option_value():
    seen = {}
    for config, _ in CASES:
        for key, value in Stock(**config).config.items():  # defaults filled in
            if isinstance(value, (bool, int, float, str)):
                seen.setdefault(key, set()).add(value)
    assert seen["algorithm_type"] == set(ALGORITHMS) and seen["solver_order"] == {1, 2, 3}
    assert seen["solver_type"] == {"midpoint", "heun"} and seen["prediction_type"] == set(PREDICTIONS)
    assert seen["timestep_spacing"] == set(SPACINGS) and seen["final_sigmas_type"] == {"zero", "sigma_min"}
    for flag in ("lower_order_final", "euler_at_final", "use_karras_sigmas", "use_lu_lambdas",
                 "use_exponential_sigmas", "use_beta_sigmas"):
        assert seen[flag] == {True, False}, flag
    for flag in ("thresholding", "rescale_betas_zero_snr"):
        assert seen[flag] == {True, False}, flag
    assert seen["lambda_min_clipped"] == {-math.inf, -5.1} and seen["steps_offset"] == {0, 1}
    assert {steps >= 15 for _, steps in CASES} == {True, False}  # around lower_order_final's 15 steps
    # some cases run their last step in diffusers' code (length 0 in λ), most do not
    stocks = [Stock(**config) for config, _ in CASES]
    for scheduler, (_, steps) in zip(stocks, CASES):
        scheduler.set_timesteps(steps)
    assert {lambda32(s, -1) == lambda32(s, -2) for s in stocks} == {True, False}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sde_noise_from_variance_noise_matches_stock(backend, fused_calls):
    config = dict(algorithm_type="sde-dpmsolver++", solver_order=3, use_karras_sigmas=True)
    fast = sample_loop(FastDPMSolverMultistepScheduler(**config), 6, 3, backend=backend, noise=True)
    check_same_run(fast, sample_loop(Stock(**config), 6, 3, noise=True, device=device_for(backend)))
    assert len(fused_calls) == 6
    # the same numbers as the generator draws: variance_noise is what the generator would have given
    assert not torch.equal(fast[0][-1], sample_loop(Stock(**config), 6, 3, device=device_for(backend))[0][-1])


HALF_CONFIGS = [dict(), dict(algorithm_type="sde-dpmsolver++", solver_order=3, thresholding=True, sample_max_value=2.0)]
INTERPRETED = not torch.cuda.is_available()


HALF_RUNS = [(config, dtype, "torch") for config in HALF_CONFIGS for dtype in (torch.float16, torch.bfloat16)] + [
    (HALF_CONFIGS[1], torch.float16, "triton"), (HALF_CONFIGS[1], torch.bfloat16, "triton")]


@pytest.mark.parametrize("config, dtype, backend", HALF_RUNS,
                         ids=[f"{('2M', 'sde3-thr')[HALF_CONFIGS.index(c)]}-{str(d)[6:]}-{b}" for c, d, b in HALF_RUNS])
def test_half_precision_matches_stock_float32(config, dtype, backend, fused_calls, launches):
    """Low-precision inputs: the op combines in float32 and rounds once; its error against the stock
    class in float32 is at most LOW_PRECISION_RATIO times the stock class's own error in ``dtype``.
    (Triton's CPU interpreter casts fp32 -> bf16 by truncation, where a GPU rounds to nearest: a bias
    the loop compounds. There the kernel is held to the reference step by step instead, below.)"""
    if backend == "triton" and dtype == torch.bfloat16 and INTERPRETED:
        pytest.skip("the interpreter truncates fp32 -> bf16: test_bf16_kernel_step_matches_the_reference")

    def loop(cls, run_dtype, run_backend="torch"):
        samples, _ = sample_loop(cls(**config), 8, 5, backend=run_backend, dtype=run_dtype, device=device_for(backend))
        return samples

    fast = loop(FastDPMSolverMultistepScheduler, dtype, backend)
    assert len(fused_calls) == 8 and fast[-1].dtype == dtype
    assert launches["multistep_update"] == (8 if backend == "triton" else 0)
    reference = loop(Stock, torch.float32)  # from the same initial noise, not rounded to dtype
    ours = max(relative_error(x, e) for x, e in zip(fast, reference))
    theirs = max(relative_error(x, e) for x, e in zip(loop(Stock, dtype), reference))
    assert ours <= LOW_PRECISION_RATIO * theirs, (ours, theirs)


def test_bf16_kernel_step_matches_the_reference(launches):
    """Each step on the kernel from the reference run's state (a deep copy) and inputs: within one bf16
    ulp of the reference's step (truncation against round-to-nearest, on the interpreter)."""
    scheduler = FastDPMSolverMultistepScheduler(**HALF_CONFIGS[1])
    scheduler.set_timesteps(6)
    generator = torch.Generator().manual_seed(5)
    sample = torch.randn(SHAPE, generator=generator).to(device=DEVICE, dtype=torch.bfloat16)
    for t in scheduler.timesteps:
        noise = torch.randn(SHAPE, generator=generator).to(DEVICE)
        kernel_side = copy.deepcopy(scheduler)
        model_output = toy_model(sample, t)
        with fastdiff.use_backend("triton"):
            on_kernel = kernel_side.step(model_output, t, sample, variance_noise=noise).prev_sample
        sample = scheduler.step(model_output, t, sample, variance_noise=noise).prev_sample
        ulp = 2.0**-7
        torch.testing.assert_close(on_kernel, sample, rtol=ulp, atol=ulp * sample.abs().max().item())
        torch.testing.assert_close(kernel_side.model_outputs[-1], scheduler.model_outputs[-1], rtol=ulp,
                                   atol=ulp * scheduler.model_outputs[-1].abs().max().item())
    assert launches["multistep_update"] == 6


# ----------------------------------------------------------------------------- state
CONFIG = dict(solver_order=3, algorithm_type="sde-dpmsolver++", solver_type="heun", lower_order_final=False,
              use_karras_sigmas=True)


def test_state_holds_views_of_the_slots():
    scheduler = FastDPMSolverMultistepScheduler(**CONFIG)
    scheduler.set_timesteps(5)
    sample = torch.randn(SHAPE)
    pointers = []
    for t in scheduler.timesteps[:4]:
        sample = scheduler.step(toy_model(sample, t), t, sample, generator=torch.Generator()).prev_sample
        slots = _dpmsolver.slot_mirror(scheduler).slots
        held = [m for m in scheduler.model_outputs if m is not None]
        assert all(m.untyped_storage().data_ptr() == slots.untyped_storage().data_ptr() for m in held)
        pointers.append([m.data_ptr() for m in held])
    # the history is renamed, not moved: the newest entry of one step is the second newest of the next
    assert [p[-1] for p in pointers[:-1]] == [p[-2] for p in pointers[1:]]


def set_history(scheduler, i, generator_seed=11):
    """Before step 3, as diffusers' own tests do: a user's history and warm-up count."""
    if i == 3:
        gen = torch.Generator().manual_seed(generator_seed)
        scheduler.model_outputs = [torch.randn(SHAPE, generator=gen) for _ in range(scheduler.config.solver_order)]
        scheduler.lower_order_nums = scheduler.config.solver_order


def write_in_place(scheduler, i):
    if i in (2, 4):
        scheduler.model_outputs[-1].mul_(0.5)
        scheduler.model_outputs[-2].add_(0.25)


def stock_step_between(scheduler, i):
    """Step 2 of the run in diffusers' own code, on the same object (the loop's next call then continues)."""
    if i == 2 and type(scheduler) is FastDPMSolverMultistepScheduler:
        scheduler.__class__ = Stock
    elif i == 3 and type(scheduler) is Stock and scheduler.__dict__.get("_fastdiff_slots") is not None:
        scheduler.__class__ = FastDPMSolverMultistepScheduler


STATE_CHANGES = [(set_history, 7, "torch"), (write_in_place, 7, "torch"), (write_in_place, 7, "triton"),
                 (stock_step_between, 6, "torch")]


@pytest.mark.parametrize("between, fused, backend", STATE_CHANGES,
                         ids=["history-set", "written-in-place", "written-in-place-triton", "stock-step-between"])
def test_state_changed_between_steps_continues_as_stock(between, fused, backend, fused_calls):
    """(On the kernel the slots' version counter does not move; an in-place write by the user still does.)"""
    fast = sample_loop(FastDPMSolverMultistepScheduler(**CONFIG), 7, 2, backend=backend, between=between)
    check_same_run(fast, sample_loop(Stock(**CONFIG), 7, 2, between=between, device=device_for(backend)))
    assert len(fused_calls) == fused


@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda s: pickle.loads(pickle.dumps(s))],
                         ids=["deepcopy", "pickle"])
def test_copied_mid_run_continues_as_stock(duplicate, fused_calls):
    fast, stock = FastDPMSolverMultistepScheduler(**CONFIG), Stock(**CONFIG)
    gen = torch.Generator().manual_seed(4)
    sample = torch.randn(SHAPE, generator=gen)
    copies = {}

    def stepped(scheduler, x, t, seed):
        return scheduler.step(toy_model(x, t), t, x, generator=torch.Generator().manual_seed(seed)).prev_sample

    for scheduler in (fast, stock):
        scheduler.set_timesteps(6)
    x = sample
    for i, t in enumerate(fast.timesteps):
        if i == 3:
            copies = {"fast": duplicate(fast), "stock": copy.deepcopy(stock)}
            copies["x"] = x
        expected = stepped(stock, x, t, i)
        assert_matches(stepped(fast, x, t, i), expected)
        x = expected
    # the copy continues from step 3 on its own slots: the original's later steps did not touch it
    y = copies["x"]
    for i, t in enumerate(fast.timesteps[3:], start=3):
        expected = stepped(copies["stock"], y, t, i)
        assert_matches(stepped(copies["fast"], y, t, i), expected)
        check_same_run(([expected], [snapshot(copies["fast"])]), ([expected], [snapshot(copies["stock"])]))
        y = expected
    assert len(fused_calls) == 9


def test_pickled_state_holds_no_slot_buffer():
    scheduler = FastDPMSolverMultistepScheduler(solver_order=3)
    scheduler.set_timesteps(6)
    sample = torch.randn(64, 4, 16, 16)
    for t in scheduler.timesteps[:3]:
        sample = scheduler.step(toy_model(sample, t), t, sample).prev_sample
    stored = len(pickle.dumps(scheduler))
    assert 3 * sample.nbytes < stored < 4 * sample.nbytes  # three outputs, not 5-slot buffers per view


def test_inputs_that_are_views_of_the_state_continue_as_stock(fused_calls):
    """A caller passing tensors of diffusers' state back as a step's inputs, after an in-place write (so
    the slots are reloaded before the step, over the slot an input lives in): as the stock class."""
    results = []
    for cls in (FastDPMSolverMultistepScheduler, Stock):
        scheduler = cls(solver_order=3)
        scheduler.set_timesteps(8)
        sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        out = []
        for i, t in enumerate(scheduler.timesteps):
            model_output = toy_model(sample, t)
            if i >= 4:
                scheduler.model_outputs[-1].mul_(0.9)
                sample, model_output = scheduler.model_outputs[-2], scheduler.model_outputs[-3]
            sample = scheduler.step(model_output, t, sample).prev_sample
            out.append(sample)
        results.append(out)
    for i, (x, y) in enumerate(zip(*results)):
        assert_matches(x, y, f"sample after step {i}")
    assert len(fused_calls) == 8


# ----------------------------------------------------------------------------- diffusers' own code
def stock_and_fast_agree_exactly(config, steps=5, *, model=toy_model, dtype=torch.float32, sample_dtype=None,
                                 noise_shape=None):
    """Run both; the outputs must be identical (diffusers' code ran) and NaN in the same places."""
    results = []
    for cls in (FastDPMSolverMultistepScheduler, Stock):
        scheduler = cls(**config)
        scheduler.set_timesteps(steps)
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(SHAPE, generator=generator).to(sample_dtype or dtype)
        out = []
        for t in scheduler.timesteps:
            noise = None if noise_shape is None else torch.randn(noise_shape, generator=generator)
            sample = scheduler.step(model(sample, t).to(dtype), t, sample, generator=generator,
                                    variance_noise=noise).prev_sample
            out.append(sample)
        results.append(out)
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    return results[0]


def learned_model(sample, t):
    return torch.cat([toy_model(sample, t), torch.tanh(sample)], dim=1)


@pytest.mark.parametrize("config, kwargs", [
    (dict(), dict(dtype=torch.float64)),
    (dict(), dict(dtype=torch.float16, sample_dtype=torch.float32)),
    (dict(variance_type="learned_range"), dict(model=learned_model)),
    (dict(use_flow_sigmas=True, prediction_type="flow_prediction"), dict()),
    (dict(algorithm_type="sde-dpmsolver++"), dict(noise_shape=(1, *SHAPE[1:]))),
], ids=["float64", "mixed-dtypes", "learned-variance", "flow-sigmas", "broadcast-noise"])
def test_what_the_op_cannot_reproduce_runs_diffusers_code(config, kwargs, fused_calls):
    stock_and_fast_agree_exactly(config, **kwargs)
    assert fused_calls == []


@pytest.mark.parametrize("config, backend", [(dict(solver_type="heun"), "torch"), (dict(solver_order=3), "torch"),
                                             (dict(solver_order=3), "triton")],
                         ids=["heun", "third-order", "third-order-triton"])
def test_last_step_of_length_zero_is_diffusers_nan(config, backend, fused_calls):
    """karras σ end at σ_min: a final_sigmas_type="sigma_min" run's last step has h = 0 and, at a
    higher order (lower_order_final off), diffusers' result is NaN. The drop-in runs that step in
    diffusers' code (the earlier ones fused)."""
    config = dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False, **config)
    fast = sample_loop(FastDPMSolverMultistepScheduler(**config), 6, 1, backend=backend)
    check_same_run(fast, sample_loop(Stock(**config), 6, 1, device=device_for(backend)))
    assert torch.isnan(fast[0][-1]).all() and torch.isfinite(fast[0][-2]).all()
    assert len(fused_calls) == 5


def test_sde_dpmsolver_third_order_fails_as_in_diffusers(fused_calls):
    errors = []
    for cls in (FastDPMSolverMultistepScheduler, Stock):
        scheduler = cls(algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min")
        scheduler.set_timesteps(6)
        sample = torch.randn(SHAPE)
        with pytest.raises(Exception) as error:
            for t in scheduler.timesteps:
                sample = scheduler.step(toy_model(sample, t), t, sample).prev_sample
        errors.append((type(error.value), scheduler.step_index))
    assert errors[0] == errors[1] and len(fused_calls) == 2


def test_missing_history_fails_as_in_diffusers(fused_calls):
    errors = []
    for cls in (FastDPMSolverMultistepScheduler, Stock):
        scheduler = cls()
        scheduler.set_timesteps(5)
        sample = torch.randn(SHAPE)
        t = scheduler.timesteps[0]
        sample = scheduler.step(toy_model(sample, t), t, sample).prev_sample
        scheduler.model_outputs = [None, None]  # the warm-up count says second order: m1 is read
        with pytest.raises(Exception) as error:
            scheduler.step(toy_model(sample, t), scheduler.timesteps[1], sample)
        errors.append(type(error.value))
    assert errors[0] is errors[1] and len(fused_calls) == 1


# ----------------------------------------------------------------------------- diffusers' API
def test_step_signature_and_outputs_are_diffusers():
    assert parameters(FastDPMSolverMultistepScheduler.step) == parameters(Stock.step)
    scheduler = FastDPMSolverMultistepScheduler()
    scheduler.set_timesteps(4)
    sample = torch.randn(SHAPE)
    out = scheduler.step(toy_model(sample, 999), scheduler.timesteps[0], sample, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == SHAPE
    assert type(scheduler.step(toy_model(sample, 9), scheduler.timesteps[1], sample)).__name__ == "SchedulerOutput"
    with pytest.raises(ValueError, match="set_timesteps"):
        FastDPMSolverMultistepScheduler().step(sample, 1, sample)
    assert _dpmsolver.FAST == {Stock: FastDPMSolverMultistepScheduler}


def test_config_and_files_are_diffusers(tmp_path):
    stock = Stock(num_train_timesteps=50, beta_schedule="scaled_linear", prediction_type="v_prediction",
                  timestep_spacing="trailing", thresholding=True, solver_order=3, algorithm_type="deis",
                  final_sigmas_type="sigma_min")
    fast = FastDPMSolverMultistepScheduler.from_config(stock.config)
    assert isinstance(fast, Stock) and Stock in fast.compatibles and fast.config.algorithm_type == "dpmsolver++"

    assert public_config(fast.config) == public_config(stock.config)
    fast.save_pretrained(tmp_path / "fast")
    assert public_config(Stock.from_pretrained(tmp_path / "fast").config) == public_config(stock.config)
    stock.save_pretrained(tmp_path / "stock")
    reloaded = FastDPMSolverMultistepScheduler.from_pretrained(tmp_path / "stock")
    assert type(reloaded) is FastDPMSolverMultistepScheduler and public_config(reloaded.config) == public_config(stock.config)
    euler = diffusers.EulerDiscreteScheduler.from_config(fast.config)  # the other way round too
    assert type(FastDPMSolverMultistepScheduler.from_config(euler.config)) is FastDPMSolverMultistepScheduler


def test_inside_a_diffusers_pipeline(fused_calls):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    images = []
    for cls in (Stock, FastDPMSolverMultistepScheduler):
        pipe = diffusers.DDPMPipeline(unet=unet, scheduler=cls(algorithm_type="sde-dpmsolver++"))
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(1),
                           output_type="np").images)
    assert len(fused_calls) == 5
    torch.testing.assert_close(torch.from_numpy(images[1]), torch.from_numpy(images[0]), rtol=0, atol=1e-5)
