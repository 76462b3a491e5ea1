"""fastdiff.compat's FastUniPCMultistepScheduler against the stock diffusers UniPCMultistepScheduler.

Requirement: with the same model outputs the drop-in gives the stock class's sample after every step
of a full loop and leaves the stock class's state (``model_outputs``, ``timestep_list``,
``last_sample``, ``this_order``, ``lower_order_nums``, ``step_index``), on both backends ('triton'
through Triton's interpreter on the CPU, its launches counted); state set between steps, a step of
diffusers' own code in between and a copied or pickled scheduler continue as the stock class does.
Where the fused op would not give diffusers' result diffusers' step runs: there the outputs are the
stock ones exactly (NaN where diffusers' are) and the op is not called (``fused_calls``).

Tolerance: rtol = 1e-5 and atol = 1e-5·max|expected| (float32), except noise prediction
(predict_x0=False) of sample/v models, ill-conditioned in float32 (tests/test_scheduler_unipc.py):
there the drop-in's float32 error against the stock class run in float64 must be at most
ILL_CONDITIONED_RATIO times the stock float32 error (or 1e-5). fp16/bf16: error against the stock
class in float32 at most LOW_PRECISION_RATIO times the stock class's own error in that dtype.
"""

from __future__ import annotations

import copy
import itertools
import pickle

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastdiff  # noqa: E402
from fastdiff.compat import _unipc  # noqa: E402
from fastdiff.compat._dpmsolver import slot_mirror  # noqa: E402
from fastdiff.compat._unipc import FastUniPCMultistepScheduler  # noqa: E402
import scheduler_helpers  # noqa: E402
from scheduler_helpers import (RTOL, device_for, kernel_option_subset,  # noqa: E402
                               lambda32, parameters, public_config, relative_error, toy_model)

Stock = diffusers.UniPCMultistepScheduler
ILL_CONDITIONED_RATIO = 8.0
LOW_PRECISION_RATIO = 2.0
SHAPE = (2, 3, 4, 4)
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("linspace", "leading", "trailing")
FAMILIES = ({}, dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True))
SCHEDULES = (dict(beta_schedule="linear"), dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
DISABLED = ([], [0], [1, 3])
INTERPRETED = not torch.cuda.is_available()

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]


def assert_matches(actual, expected, what="") -> None:
    """NaN where the stock class's sample is NaN passes (the steps left to diffusers' code)."""
    scheduler_helpers.assert_matches(actual, expected, what, equal_nan=True)


# ----------------------------------------------------------------------------- loops
def snapshot(scheduler) -> tuple:
    """The diffusers state a step leaves (tensors cloned: the drop-in's are views of its slots)."""
    def cloned(x):
        return None if x is None else x.clone()

    tensors = [cloned(m) for m in scheduler.model_outputs] + [cloned(scheduler.last_sample)]
    counters = ([None if t is None else int(t) for t in scheduler.timestep_list], scheduler.this_order,
                scheduler.lower_order_nums, scheduler.step_index)
    return tensors, counters


def sample_loop(scheduler, steps, seed, *, backend="torch", dtype=torch.float32, between=None, feed=None, record=None,
                device=None):
    """A full loop from seed ``seed``: each step's sample and state; ``between(scheduler, i)`` runs before
    step i. ``feed``: the samples to step from (another run's ``record``) instead of the loop's own."""
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    sample = sample.to(device=device or device_for(backend), dtype=dtype)
    scheduler.set_timesteps(steps)
    if dtype == torch.float64:  # the stock class in float64: its σ table too (its step keeps the sample's dtype)
        scheduler.sigmas = scheduler.sigmas.double()
    samples, states = [], []
    with fastdiff.use_backend(backend):
        for i, t in enumerate(scheduler.timesteps):
            if between is not None:
                between(scheduler, i)
            sample = sample if feed is None else feed[i]
            if record is not None:
                record.append(sample)
            sample = scheduler.step(toy_model(sample, t), t, sample).prev_sample
            samples.append(sample)
            states.append(snapshot(scheduler))
    return samples, states


def check_same_run(fast, stock, what="") -> float:
    """Sample and state after every step agree; returns the worst relative error of the finite samples."""
    worst = 0.0
    assert len(fast[0]) == len(stock[0])
    for i, ((x, fast_state), (y, stock_state)) in enumerate(zip(zip(*fast), zip(*stock))):
        assert_matches(x, y, f"{what} sample after step {i}")
        worst = max(worst, relative_error(x, y)) if torch.isfinite(y).all() else worst
        (fast_tensors, fast_counters), (stock_tensors, stock_counters) = fast_state, stock_state
        assert fast_counters == stock_counters, f"{what} timestep_list, this_order, lower_order_nums, step_index"
        for k, (m, e) in enumerate(zip(fast_tensors, stock_tensors)):
            name = "last_sample" if k == len(stock_tensors) - 1 else f"model_outputs[{k}]"
            assert (m is None) == (e is None), f"{what} {name} after step {i}"
            if e is not None:
                assert m.dtype == e.dtype
                assert_matches(m, e, f"{what} {name} after step {i}")
    return worst


def stock_fallbacks(stock) -> int:
    """How many steps the drop-in leaves to diffusers' code in a full loop of ``stock`` (run already): only
    the last one, into σ = 0 where diffusers' ∞·0 is NaN, or of length 0 in λ."""
    n = len(stock.timesteps)
    into_zero_nan = float(stock.sigmas[n]) == 0 and (
        stock.config.solver_type == "bh1" or not stock.config.predict_x0 or stock.this_order > 1)
    return int(into_zero_nan or lambda32(stock, n) == lambda32(stock, n - 1))


# ----------------------------------------------------------------------------- the parity grid
def ill_conditioned(config: dict) -> bool:
    return not config.get("predict_x0", True) and config.get("prediction_type", "epsilon") != "epsilon"


def case_id(config: dict, steps: int) -> str:
    short = {"solver_type": "", "predict_x0": "x0", "solver_order": "o", "prediction_type": "",
             "timestep_spacing": "", "final_sigmas_type": "", "lower_order_final": "lof",
             "disable_corrector": "off", "thresholding": "thr", "beta_schedule": "", "rescale_betas_zero_snr": "zsnr",
             "steps_offset": "so", "sigma_min": "smin"}
    parts = [f"{tag}{config[key]}".replace(" ", "") for key, tag in short.items() if key in config]
    parts += [key[4:-7] for key in config if key.startswith("use_") and config[key]]
    return "-".join(parts + [f"n{steps}"])


def build_cases(full: bool) -> list[tuple[dict, int]]:
    """solver type × predict_x0 × order (full: × prediction × spacing), every other option rotating;
    then zero-SNR v-prediction and bounded karras σ."""
    cases = []
    extra = list(itertools.product(PREDICTIONS, SPACINGS)) if full else [(None, None)] * 2
    for i, (solver_type, predict_x0, order, (prediction, spacing)) in enumerate(
            itertools.product(("bh1", "bh2"), (True, False), (1, 2, 3), extra)):
        config = dict(solver_type=solver_type, predict_x0=predict_x0, solver_order=order,
                      prediction_type=prediction or PREDICTIONS[i % 3],
                      timestep_spacing=spacing or SPACINGS[(i // 3) % 3],
                      final_sigmas_type=("zero", "sigma_min")[(i // 2) % 2], lower_order_final=i % 4 != 3,
                      disable_corrector=DISABLED[i % 3], **FAMILIES[(i // 3) % 4], **SCHEDULES[i % 2])
        if predict_x0 and i % 5 == 1:
            config.update(thresholding=True, dynamic_thresholding_ratio=(0.995, 0.8)[i % 2], sample_max_value=2.5)
        if config["timestep_spacing"] == "leading" and i % 2:
            config["steps_offset"] = 1
        cases.append((config, (6, 9, 16)[i % 3]))
    for i, spacing in enumerate(SPACINGS):
        cases.append((dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing=spacing,
                           solver_order=3, **SCHEDULES[1]), 10))
    cases.append((dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, solver_order=3), 8))
    return cases


# the options that change what the kernel computes (which inputs, slots and conversions a row uses);
# the others change the host's σ table and coefficients only, the same numbers on both backends
KERNEL_OPTIONS = ("solver_type", "predict_x0", "solver_order", "prediction_type", "thresholding",
                 "disable_corrector")


CASES = build_cases(full=False)
TRITON_CASES = kernel_option_subset([case for case in CASES if not ill_conditioned(case[0])], KERNEL_OPTIONS, Stock)
FULL_CASES = [case for case in build_cases(full=True) if case not in CASES]


def check_loop(config: dict, steps: int, backend: str, fused_calls: list) -> float:
    """Step by step on ``backend``, each step from the stock run's sample (the same model outputs: state
    compared tightly); then the free-running loop's samples (against float64 where ill-conditioned)."""
    seed = len(case_id(config, steps))
    stock_scheduler, fed = Stock(**config), []
    stock = sample_loop(stock_scheduler, steps, seed, record=fed, device=device_for(backend))
    forced = sample_loop(FastUniPCMultistepScheduler(**config), steps, seed, backend=backend, feed=fed)
    assert len(fused_calls) == len(stock_scheduler.timesteps) - stock_fallbacks(stock_scheduler)
    if ill_conditioned(config):  # even from the same inputs a step rounds differently: the counters only here
        assert [s[1] for s in forced[1]] == [s[1] for s in stock[1]]
        worst = 0.0
    else:
        worst = check_same_run(forced, stock, case_id(config, steps))
    if backend != "torch" and not ill_conditioned(config):
        return worst  # the kernel is the reference's twin; the free loop is checked on the reference
    fast = sample_loop(FastUniPCMultistepScheduler(**config), steps, seed, backend=backend)
    if not ill_conditioned(config):
        for i, (x, y) in enumerate(zip(fast[0], stock[0])):
            assert_matches(x, y, f"{case_id(config, steps)} free-running loop, sample after step {i}")
            worst = max(worst, relative_error(x, y)) if torch.isfinite(y).all() else worst
        return worst
    exact = sample_loop(Stock(**config), steps, seed, dtype=torch.float64, device=device_for(backend))
    finite = [i for i, e in enumerate(exact[0]) if torch.isfinite(e).all()]
    for i in set(range(len(exact[0]))) - set(finite):  # diffusers' NaN last step: the same NaNs
        torch.testing.assert_close(fast[0][i], stock[0][i], rtol=0, atol=0, equal_nan=True)
    ours = max(relative_error(fast[0][i], exact[0][i]) for i in finite)
    theirs = max(relative_error(stock[0][i], exact[0][i]) for i in finite)
    assert ours <= max(ILL_CONDITIONED_RATIO * theirs, RTOL), (ours, theirs)
    assert [s[1] for s in fast[1]] == [s[1] for s in stock[1]]
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
    stocks = []
    for config, steps in CASES:
        stocks.append(Stock(**config))
        for key, value in stocks[-1].config.items():  # defaults filled in
            seen.setdefault(key, set()).add(repr(value))
    assert seen["solver_type"] == {"'bh1'", "'bh2'"} and seen["solver_order"] == {"1", "2", "3"}
    assert seen["prediction_type"] == {repr(p) for p in PREDICTIONS}
    assert seen["timestep_spacing"] == {repr(s) for s in SPACINGS}
    assert seen["final_sigmas_type"] == {"'zero'", "'sigma_min'"}
    assert seen["disable_corrector"] == {repr(d) for d in DISABLED}
    for flag in ("predict_x0", "lower_order_final", "thresholding", "rescale_betas_zero_snr", "use_karras_sigmas",
                 "use_exponential_sigmas", "use_beta_sigmas"):
        assert seen[flag] == {"True", "False"}, flag
    assert {steps >= 15 for _, steps in CASES} == {True, False}
    # some loops leave their last step to diffusers (NaN into σ = 0, or length 0), most do not
    for scheduler, (_, steps) in zip(stocks, CASES):
        sample_loop(scheduler, steps, 0)
    assert {stock_fallbacks(s) for s in stocks} == {0, 1}
    assert any(torch.isnan(sample_loop(s, steps, 0)[0][-1]).any() for s, (_, steps) in zip(stocks, CASES))


HALF_CONFIGS = [dict(solver_order=3), dict(solver_order=2, thresholding=True, sample_max_value=2.0,
                                           disable_corrector=[2])]


HALF_RUNS = [(config, dtype, "torch") for config in HALF_CONFIGS for dtype in (torch.float16, torch.bfloat16)] + [
    (HALF_CONFIGS[1], torch.float16, "triton"), (HALF_CONFIGS[1], torch.bfloat16, "triton")]


@pytest.mark.parametrize("config, dtype, backend", HALF_RUNS,
                         ids=[f"{('3', '2-thr')[HALF_CONFIGS.index(c)]}-{str(d)[6:]}-{b}" for c, d, b in HALF_RUNS])
def test_half_precision_matches_stock_float32(config, dtype, backend, fused_calls, launches):
    """Low-precision inputs, combined in float32 and rounded once (diffusers computes in the dtype).
    (The interpreter truncates fp32 -> bf16 where a GPU rounds to nearest, a bias the loop compounds:
    tests/test_compat_dpmsolver.py holds the bf16 kernel to the reference step by step.)"""
    if backend == "triton" and dtype == torch.bfloat16 and INTERPRETED:
        pytest.skip("the interpreter truncates fp32 -> bf16")

    def loop(cls, run_dtype, run_backend="torch"):
        return sample_loop(cls(**config), 8, 5, backend=run_backend, dtype=run_dtype, device=device_for(backend))[0]

    fast = loop(FastUniPCMultistepScheduler, dtype, backend)
    assert len(fused_calls) == 8 and fast[-1].dtype == dtype
    assert launches["multistep_update"] == (8 if backend == "triton" else 0)
    reference = loop(Stock, torch.float32)
    ours = max(relative_error(x, e) for x, e in zip(fast, reference))
    theirs = max(relative_error(x, e) for x, e in zip(loop(Stock, dtype), reference))
    assert ours <= LOW_PRECISION_RATIO * theirs, (ours, theirs)


# ----------------------------------------------------------------------------- state
CONFIG = dict(solver_order=3, disable_corrector=[4], use_karras_sigmas=True)


def test_state_holds_views_of_the_slots():
    scheduler = FastUniPCMultistepScheduler(**CONFIG)
    scheduler.set_timesteps(5)
    sample = torch.randn(SHAPE)
    pointers = []
    for t in scheduler.timesteps[:4]:
        sample = scheduler.step(toy_model(sample, t), t, sample).prev_sample
        held = [m for m in scheduler.model_outputs if m is not None] + [scheduler.last_sample]
        slots = slot_mirror(scheduler).slots
        assert all(m.untyped_storage().data_ptr() == slots.untyped_storage().data_ptr() for m in held)
        pointers.append([m.data_ptr() for m in held[:-1]])
    assert [p[-1] for p in pointers[:-1]] == [p[-2] for p in pointers[1:]]  # renamed, not moved


def set_state(scheduler, i, seed=11):
    """Before step 3: a user's history, last sample, corrector order and warm-up count."""
    if i == 3:
        gen = torch.Generator().manual_seed(seed)
        scheduler.model_outputs = [torch.randn(SHAPE, generator=gen) for _ in range(scheduler.config.solver_order)]
        scheduler.last_sample = torch.randn(SHAPE, generator=gen)
        scheduler.this_order, scheduler.lower_order_nums = 3, 3


def write_in_place(scheduler, i):
    if i in (2, 4):
        scheduler.model_outputs[-1].mul_(0.5)
        scheduler.last_sample.add_(0.25)


def stock_step_between(scheduler, i):
    """Step 2 in diffusers' own code on the same object."""
    if i == 2 and type(scheduler) is FastUniPCMultistepScheduler:
        scheduler.__class__ = Stock
    elif i == 3 and type(scheduler) is Stock and scheduler.__dict__.get("_fastdiff_slots") is not None:
        scheduler.__class__ = FastUniPCMultistepScheduler


STATE_CHANGES = [(set_state, 7, "torch"), (write_in_place, 7, "torch"), (write_in_place, 7, "triton"),
                 (stock_step_between, 6, "torch")]


@pytest.mark.parametrize("between, fused, backend", STATE_CHANGES,
                         ids=["state-set", "written-in-place", "written-in-place-triton", "stock-step-between"])
def test_state_changed_between_steps_continues_as_stock(between, fused, backend, fused_calls):
    """(On the kernel the slots' version counter does not move; an in-place write by the user still does.)"""
    fast = sample_loop(FastUniPCMultistepScheduler(**CONFIG), 7, 2, backend=backend, between=between)
    check_same_run(fast, sample_loop(Stock(**CONFIG), 7, 2, between=between, device=device_for(backend)))
    assert len(fused_calls) == fused


@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda s: pickle.loads(pickle.dumps(s))],
                         ids=["deepcopy", "pickle"])
def test_copied_mid_run_continues_as_stock(duplicate, fused_calls):
    fast, stock = FastUniPCMultistepScheduler(**CONFIG), Stock(**CONFIG)
    for scheduler in (fast, stock):
        scheduler.set_timesteps(6)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    for i, t in enumerate(fast.timesteps):
        if i == 3:
            copies, y = (duplicate(fast), copy.deepcopy(stock)), x
        expected = stock.step(toy_model(x, t), t, x).prev_sample
        assert_matches(fast.step(toy_model(x, t), t, x).prev_sample, expected)
        x = expected
    # the copy continues from step 3 on its own slots: the original's later steps did not touch it
    for t in fast.timesteps[3:]:
        expected = copies[1].step(toy_model(y, t), t, y).prev_sample
        result = copies[0].step(toy_model(y, t), t, y).prev_sample
        check_same_run(([result], [snapshot(copies[0])]), ([expected], [snapshot(copies[1])]))
        y = expected
    assert len(fused_calls) == 9


def test_inputs_that_are_views_of_the_state_continue_as_stock(fused_calls):
    """A caller passing tensors of diffusers' state back as a step's inputs, after an in-place write (so
    the slots are reloaded before the step, over the slot an input lives in): as the stock class."""
    results = []
    for cls in (FastUniPCMultistepScheduler, Stock):
        scheduler = cls(solver_order=3)
        scheduler.set_timesteps(8)
        sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        out = []
        for i, t in enumerate(scheduler.timesteps):
            model_output = toy_model(sample, t)
            if i >= 4:
                scheduler.model_outputs[-1].mul_(0.9)
                sample, model_output = scheduler.last_sample, scheduler.model_outputs[-3]
            sample = scheduler.step(model_output, t, sample).prev_sample
            out.append(sample)
        results.append(out)
    for i, (x, y) in enumerate(zip(*results)):
        assert_matches(x, y, f"sample after step {i}")
    assert len(fused_calls) == 8


# ----------------------------------------------------------------------------- diffusers' own code
def stock_and_fast_agree_exactly(config, steps=5, *, dtype=torch.float32, sample_dtype=None):
    results = []
    for cls in (FastUniPCMultistepScheduler, Stock):
        scheduler = cls(**config)
        scheduler.set_timesteps(steps)
        sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(sample_dtype or dtype)
        out = []
        for t in scheduler.timesteps:
            sample = scheduler.step(toy_model(sample, t).to(dtype), t, sample).prev_sample
            out.append(sample)
        results.append(out)
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("config, kwargs", [
    (dict(), dict(dtype=torch.float64)),
    (dict(), dict(dtype=torch.float16, sample_dtype=torch.float32)),
    (dict(use_flow_sigmas=True, prediction_type="flow_prediction"), dict()),
    (dict(solver_p=diffusers.DPMSolverMultistepScheduler()), dict()),
], ids=["float64", "mixed-dtypes", "flow-sigmas", "solver_p"])
def test_what_the_op_cannot_reproduce_runs_diffusers_code(config, kwargs, fused_calls):
    stock_and_fast_agree_exactly(config, **kwargs)
    assert fused_calls == []


@pytest.mark.parametrize("config, backend", [(dict(solver_type="bh1"), "torch"), (dict(predict_x0=False), "torch"),
                                             (dict(lower_order_final=False), "torch"),
                                             (dict(solver_type="bh1"), "triton")],
                         ids=["bh1", "noise-prediction", "second-order", "bh1-triton"])
def test_last_step_into_zero_is_diffusers_nan(config, backend, fused_calls):
    """Into σ = 0 diffusers multiplies ∞ by 0 for these options: the drop-in runs that step in diffusers'
    code (NaN, or ±∞ at the second order) and the earlier ones fused."""
    fast = sample_loop(FastUniPCMultistepScheduler(**config), 6, 1, backend=backend)
    check_same_run(fast, sample_loop(Stock(**config), 6, 1, device=device_for(backend)))
    assert not torch.isfinite(fast[0][-1]).any() and torch.isfinite(fast[0][-2]).all()
    assert len(fused_calls) == 5


def test_last_step_into_zero_at_third_order_fails_as_in_diffusers(fused_calls):
    """(At the third order diffusers' ρ system is singular there: torch.linalg.solve raises.)"""
    for cls in (FastUniPCMultistepScheduler, Stock):
        with pytest.raises(torch.linalg.LinAlgError):
            sample_loop(cls(solver_order=3, lower_order_final=False), 6, 1)
    assert len(fused_calls) == 5


def test_into_zero_at_first_order_is_fused(fused_calls):
    """bh2 with predict_x0 (the defaults) into σ = 0 is finite in diffusers, x̂0: fused, the same numbers."""
    fast = sample_loop(FastUniPCMultistepScheduler(), 5, 1)
    check_same_run(fast, sample_loop(Stock(), 5, 1))
    assert len(fused_calls) == 5


def test_missing_history_fails_as_in_diffusers(fused_calls):
    errors = []
    for cls in (FastUniPCMultistepScheduler, Stock):
        scheduler = cls()
        scheduler.set_timesteps(5)
        sample = torch.randn(SHAPE)
        t = scheduler.timesteps[0]
        sample = scheduler.step(toy_model(sample, t), t, sample).prev_sample
        scheduler.model_outputs = [None, None]  # the corrector (this_order 1) reads model_outputs[-1]
        with pytest.raises(Exception) as error:
            scheduler.step(toy_model(sample, t), scheduler.timesteps[1], sample)
        errors.append(type(error.value))
    assert errors[0] is errors[1] and len(fused_calls) == 1


# ----------------------------------------------------------------------------- diffusers' API
def test_step_signature_and_outputs_are_diffusers():
    assert parameters(FastUniPCMultistepScheduler.step) == parameters(Stock.step)
    scheduler = FastUniPCMultistepScheduler()
    scheduler.set_timesteps(4)
    sample = torch.randn(SHAPE)
    out = scheduler.step(toy_model(sample, 999), scheduler.timesteps[0], sample, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == SHAPE
    assert type(scheduler.step(toy_model(sample, 9), scheduler.timesteps[1], sample)).__name__ == "SchedulerOutput"
    with pytest.raises(ValueError, match="set_timesteps"):
        FastUniPCMultistepScheduler().step(sample, 1, sample)
    assert _unipc.FAST == {Stock: FastUniPCMultistepScheduler}


def test_config_and_files_are_diffusers(tmp_path):
    stock = Stock(num_train_timesteps=50, beta_schedule="scaled_linear", prediction_type="v_prediction",
                  timestep_spacing="trailing", thresholding=True, solver_order=3, solver_type="midpoint",
                  disable_corrector=[0, 2])
    fast = FastUniPCMultistepScheduler.from_config(stock.config)
    assert isinstance(fast, Stock) and Stock in fast.compatibles and fast.config.solver_type == "bh2"

    assert public_config(fast.config) == public_config(stock.config)
    fast.save_pretrained(tmp_path / "fast")
    assert public_config(Stock.from_pretrained(tmp_path / "fast").config) == public_config(stock.config)
    stock.save_pretrained(tmp_path / "stock")
    reloaded = FastUniPCMultistepScheduler.from_pretrained(tmp_path / "stock")
    assert type(reloaded) is FastUniPCMultistepScheduler and public_config(reloaded.config) == public_config(stock.config)
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(fast.config)  # cross-loading, as pipelines do
    assert type(FastUniPCMultistepScheduler.from_config(dpm.config)) is FastUniPCMultistepScheduler
