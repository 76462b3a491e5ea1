"""fastdiff.compat._euler's drop-ins against diffusers' own EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler (0.42).

The requirement: a drop-in. For the same model outputs and the same generator (churn and ancestral
noise drawn by diffusers' randn_tensor, same steps, same order), every step's prev_sample and
pred_original_sample, and diffusers' state (step_index, begin_index, the scale_model_input warning)
equal stock diffusers' in float32, with the fused op running each step (counted), on both backends;
a stock step in between, copies and pickles mid-run continue as diffusers would; what the op
cannot reproduce runs diffusers' code, bit for bit.

Tolerance: rtol = 1e-5 and atol = 1e-5 · max|expected|. As in test_scheduler_euler.py, every loop is
checked against diffusers' equations run in float64 (float64 σ's and model outputs, the float32
run's noise), and against diffusers' float32 run wherever that run is within RTOL/2 of its float64
self; elsewhere (a big σ drop with an O(1) x̂0: diffusers' x + (x − x̂0)/σ̂·dt cancels ~eps·|x|)
the drop-in must be the closer of the two. fp16/bf16: each step within 1.5 ulps (at the tensor's
scale) of diffusers' float32 step on the same inputs and noise (one rounding, ≤ 0.5; Triton's CPU
interpreter stores bf16 by truncation).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import logging
import pickle

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastdiff  # noqa: E402
from fastdiff.compat._euler import FAST, FastEulerAncestralDiscreteScheduler, FastEulerDiscreteScheduler  # noqa: E402
from scheduler_helpers import (RTOL, noise_drawn_in, parameters, public_config, relative_error, toy_model,  # noqa: E402
                               trained_betas)

SHAPE = (2, 3, 4, 4)
SL = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # Stable Diffusion's betas
PAIRS = {"euler": (diffusers.EulerDiscreteScheduler, FastEulerDiscreteScheduler),
         "ancestral": (diffusers.EulerAncestralDiscreteScheduler, FastEulerAncestralDiscreteScheduler)}
pytestmark = pytest.mark.usefixtures("one_thread")
CHURNS = {"none": {}, "churn": dict(s_churn=1.0), "window": dict(s_churn=3.0, s_tmin=0.3, s_tmax=6.0, s_noise=1.007)}


def assert_matches(actual, expected, what: str = "") -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=RTOL, atol=RTOL * scale,
                               msg=lambda m: f"{what}: {m}")


@contextlib.contextmanager
def diffusers_warnings():
    """The messages diffusers' loggers emit (its library logger does not propagate to pytest's caplog)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


# ----------------------------------------------------------------------------- diffusers' own, for config and files
@pytest.mark.parametrize("kind", PAIRS)
def test_fast_scheduler_is_the_stock_one_for_config_and_files(kind, tmp_path):
    stock_class, fast_class = PAIRS[kind]
    options = dict(use_karras_sigmas=True, final_sigmas_type="sigma_min") if kind == "euler" else {}
    stock = stock_class(**SL, prediction_type="v_prediction", timestep_spacing="trailing", **options)
    fast = fast_class.from_config(stock.config)
    assert isinstance(fast, stock_class) and stock_class in fast.compatibles
    assert set(fast.compatibles) == set(stock.compatibles) and FAST[stock_class] is fast_class

    assert public_config(fast.config) == public_config(stock.config)
    fast.save_pretrained(tmp_path / "fast")
    assert public_config(stock_class.from_pretrained(tmp_path / "fast").config) == public_config(stock.config)
    stock.save_pretrained(tmp_path / "stock")
    reloaded = fast_class.from_pretrained(tmp_path / "stock")
    assert type(reloaded) is fast_class and public_config(reloaded.config) == public_config(stock.config)


@pytest.mark.parametrize("kind", PAIRS)
def test_signatures_are_diffusers(kind):
    stock_class, fast_class = PAIRS[kind]

    for name in ("step", "set_timesteps", "scale_model_input", "add_noise", "index_for_timestep"):
        assert parameters(getattr(fast_class, name)) == parameters(getattr(stock_class, name)), name
    assert fast_class.set_timesteps is stock_class.set_timesteps  # the schedule is diffusers' own


# ----------------------------------------------------------------------------- parity: full loops
@dataclasses.dataclass(frozen=True)
class Case:
    kind: str
    config: dict
    steps: int = 8
    churn: str = "none"
    seed: int = 0
    generator_list: bool = False

    @property
    def id(self) -> str:
        named = ",".join(f"{k}={v}" for k, v in self.config.items()
                         if k not in ("beta_start", "beta_end", "trained_betas"))
        extras = ["trained"] * ("trained_betas" in self.config) + ["gen_list"] * self.generator_list
        return "-".join([self.kind, named or "default", f"n{self.steps}", self.churn, *extras])


FAMILIES = {"none": {}, "karras": dict(use_karras_sigmas=True), "exponential": dict(use_exponential_sigmas=True),
            "beta": dict(use_beta_sigmas=True)}
SCHEDULES = [dict(), SL, dict(beta_schedule="squaredcos_cap_v2")]


def build_cases(full: bool) -> list[Case]:
    """Default: each option value at least once (a rotation through the product); full: the product
    of σ family × prediction × spacing × interpolation × final σ × churn, and Euler-a's grid."""
    cases = []
    product = itertools.product(FAMILIES, ("epsilon", "v_prediction", "sample"), ("linspace", "leading", "trailing"),
                                ("linear", "log_linear"), ("zero", "sigma_min"), CHURNS)
    for i, (family, pred, spacing, interpolation, final, churn) in enumerate(product):
        if not full and i % 23:
            continue
        config = dict(**SCHEDULES[i % 3], **FAMILIES[family], prediction_type=pred, timestep_spacing=spacing,
                      interpolation_type=interpolation, final_sigmas_type=final)
        cases.append(Case("euler", config, steps=(5, 8, 10)[i % 3], churn=churn, seed=i % 5))
    cases += [
        Case("euler", dict(timestep_type="continuous", prediction_type="v_prediction", **SL), 6, "churn"),
        Case("euler", dict(use_karras_sigmas=True, sigma_min=0.05, sigma_max=10.0, timestep_spacing="leading",
                           steps_offset=1), 7, "window"),
        Case("euler", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing",
                           **SL), 10),
        Case("euler", dict(num_train_timesteps=100, trained_betas=trained_betas(100)), 6, "churn", generator_list=True),
    ]
    product = itertools.product(SCHEDULES, ("epsilon", "v_prediction"), ("linspace", "leading", "trailing"),
                                (False, True))
    for i, (schedule, pred, spacing, zsnr) in enumerate(product):
        if not full and i % 5:
            continue
        config = dict(**schedule, prediction_type=pred, timestep_spacing=spacing, rescale_betas_zero_snr=zsnr)
        cases.append(Case("ancestral", config, steps=10 if zsnr else (5, 8, 10)[i % 3], seed=i % 4))
    cases += [Case("ancestral", dict(timestep_spacing="leading", steps_offset=3, **SL), 6, generator_list=True),
              Case("ancestral", dict(num_train_timesteps=100, trained_betas=trained_betas(100),
                                     prediction_type="v_prediction"), 9)]
    return cases


DEFAULT_CASES = build_cases(full=False)
FULL_CASES = [case for case in build_cases(full=True) if case not in DEFAULT_CASES]
KERNEL_CASES = [Case("euler", dict(**SL, use_karras_sigmas=True), 4, "churn"),
                Case("euler", dict(prediction_type="v_prediction", timestep_spacing="trailing"), 4, "window"),
                Case("euler", dict(prediction_type="sample", interpolation_type="log_linear"), 3),
                Case("ancestral", dict(**SL), 4, generator_list=True),
                Case("ancestral", dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       timestep_spacing="trailing"), 3)]


def generators(case: Case):
    if case.generator_list:
        return [torch.Generator().manual_seed(case.seed + i) for i in range(SHAPE[0])]
    return torch.Generator().manual_seed(case.seed)


def sample_loop(scheduler, case: Case, float64: bool = False):
    """A full loop: [(prev_sample, pred_original_sample, step_index) per step]. ``float64`` runs
    diffusers' step on float64 σ's and model outputs (the model sees float32)."""
    scheduler.set_timesteps(case.steps)
    generator = generators(case)
    sample = diffusers.utils.torch_utils.randn_tensor(SHAPE, generator=generator) * scheduler.init_noise_sigma
    if float64:
        scheduler.sigmas, sample = scheduler.sigmas.double(), sample.double()
    kwargs = CHURNS[case.churn] if case.kind == "euler" else {}
    steps = []
    for t in scheduler.timesteps:
        model_output = toy_model(scheduler.scale_model_input(sample, t).float(), t)
        out = scheduler.step(model_output.double() if float64 else model_output, t, sample, generator=generator,
                             **kwargs)
        sample = out.prev_sample
        steps.append((out.prev_sample, out.pred_original_sample, scheduler.step_index))
    return steps


def check_loop(case: Case, backend: str, op_calls: dict) -> None:
    stock_class, fast_class = PAIRS[case.kind]
    stock, fast = stock_class(**case.config), fast_class(**case.config)
    with fastdiff.use_backend(backend):
        ours = sample_loop(fast, case)
    theirs = sample_loop(stock, case)
    with noise_drawn_in(PAIRS[case.kind][0], torch.float32):
        exact = sample_loop(stock_class(**case.config), case, float64=True)
    assert op_calls["multistep_update"] == len(stock.timesteps)  # every step fused: no fallback
    assert [s[2] for s in ours] == [s[2] for s in theirs] == list(range(1, len(stock.timesteps) + 1))
    ours_all, theirs_all, exact_all = ([x for step in run for x in step[:2]] for run in (ours, theirs, exact))
    assert all(torch.isfinite(x).all() for x in theirs_all)
    assert all(a.dtype == b.dtype for a, b in zip(ours_all, theirs_all))
    names = [f"{what} of step {i}" for i in range(len(ours)) for what in ("prev_sample", "pred_original_sample")]
    their_error = max(relative_error(a, b) for a, b in zip(theirs_all, exact_all))
    for x, wanted, what in zip(ours_all, exact_all, names):
        assert_matches(x.double(), wanted, what + " vs diffusers in float64")
    if their_error <= RTOL / 2:
        for x, wanted, what in zip(ours_all, theirs_all, names):
            assert_matches(x, wanted, what)
    else:  # diffusers' float32 cancellation: the drop-in is the closer one
        assert max(relative_error(a, b) for a, b in zip(ours_all, exact_all)) < their_error


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=lambda c: c.id)
def test_full_loop_matches_diffusers(case, op_calls):
    check_loop(case, "torch", op_calls)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c.id)
def test_full_loop_matches_diffusers_on_the_kernel(case, op_calls, launches):
    check_loop(case, "triton", op_calls)
    assert launches["multistep_update"] == op_calls["multistep_update"] > 0


@pytest.mark.full_grid
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", FULL_CASES, ids=lambda c: c.id)
def test_full_loop_matches_diffusers_full_grid(case, backend, op_calls):
    check_loop(case, backend, op_calls)


def test_default_grid_covers_every_option_value():
    seen: dict[str, set] = {}
    for case in DEFAULT_CASES:
        config = {**PAIRS[case.kind][0](**case.config).config, **CHURNS[case.churn], "kind": case.kind,
                  "generator_list": case.generator_list}
        for key, value in config.items():
            if not key.startswith("_"):
                seen.setdefault(key, set()).add(value if key != "trained_betas" else value is not None)
    assert seen["prediction_type"] == {"epsilon", "v_prediction", "sample"}
    assert seen["timestep_spacing"] == {"linspace", "leading", "trailing"}
    assert seen["beta_schedule"] == {"linear", "scaled_linear", "squaredcos_cap_v2"}
    assert seen["interpolation_type"] == {"linear", "log_linear"}
    assert seen["timestep_type"] == {"discrete", "continuous"}
    assert seen["final_sigmas_type"] == {"zero", "sigma_min"}
    for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "rescale_betas_zero_snr",
                 "trained_betas", "generator_list"):
        assert seen[flag] == {True, False}, flag
    assert seen["steps_offset"] == {0, 1, 3} and len(seen["s_churn"]) == 2 and seen["kind"] == set(PAIRS)
    assert {c.config.get("prediction_type", "epsilon") for c in DEFAULT_CASES if c.kind == "ancestral"} == {
        "epsilon", "v_prediction"}


def test_few_steps_from_a_large_sigma_the_drop_in_is_closer_to_diffusers_float64(op_calls):
    """diffusers' float32 x + (x − x̂0)/σ̂·dt from σ_max = 4096 (zero terminal SNR) with v_prediction
    keeps ~1e-4 of cancellation error; the drop-in's r·x + (1 − r)·x̂0 does not."""
    case = Case("euler", dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                              timestep_spacing="trailing"), 2)
    mine = sample_loop(FastEulerDiscreteScheduler(**case.config), case)[-1][0]
    rounded = sample_loop(diffusers.EulerDiscreteScheduler(**case.config), case)[-1][0]
    with noise_drawn_in(PAIRS["euler"][0], torch.float32):
        exact = sample_loop(diffusers.EulerDiscreteScheduler(**case.config), case, float64=True)[-1][0]
    assert relative_error(mine, exact) < RTOL / 10 and relative_error(rounded, exact) > RTOL
    assert op_calls["multistep_update"] == 2


# ----------------------------------------------------------------------------- diffusers' state and behaviour
def test_warning_step_index_and_begin_index_are_diffusers(op_calls):
    """Without scale_model_input both warn on every step; set_begin_index (image-to-image) starts the
    step index there; after each step the index is diffusers'."""
    for kind in PAIRS:
        stock_class, fast_class = PAIRS[kind]
        runs = {}
        for scheduler in (stock_class(**SL), fast_class(**SL)):
            scheduler.set_timesteps(6)
            scheduler.set_begin_index(2)
            sample, generator = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)), torch.Generator()
            with diffusers_warnings() as messages:
                indices = []
                for t in scheduler.timesteps[2:]:
                    sample = scheduler.step(toy_model(sample, t), t, sample, generator=generator.manual_seed(int(t))
                                            ).prev_sample
                    indices.append((scheduler.step_index, scheduler.begin_index))
            warnings = [m for m in messages if "scale_model_input" in m]
            runs[type(scheduler)] = (sample, indices, warnings, scheduler.is_scale_input_called)
        (stock_x, *stock_rest), (fast_x, *fast_rest) = runs.values()
        assert_matches(fast_x, stock_x, kind)
        assert fast_rest == stock_rest and len(stock_rest[1]) == 4 and stock_rest[0][0] == (3, 2)
    assert op_calls["multistep_update"] == 8


@pytest.mark.parametrize("kind", PAIRS)
def test_a_stock_step_in_between_then_fused_steps_again(kind, op_calls):
    stock_class, fast_class = PAIRS[kind]
    stock, fast = stock_class(**SL), fast_class(**SL)
    kwargs = CHURNS["churn"] if kind == "euler" else {}
    runs = []
    for scheduler in (stock, fast):
        scheduler.set_timesteps(6)
        generator = torch.Generator().manual_seed(3)
        sample = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            model_output = toy_model(scheduler.scale_model_input(sample, t), t)
            step = stock_class.step if i in (0, 3) else type(scheduler).step  # diffusers' own code on the drop-in
            out = step(scheduler, model_output, t, sample, generator=generator, **kwargs)
            sample = out.prev_sample
            runs.append((sample, out.pred_original_sample, scheduler.step_index))
    half = len(runs) // 2
    for (x, x0, index), (wanted, wanted_x0, wanted_index) in zip(runs[half:], runs[:half]):
        assert_matches(x, wanted, f"step {index}")
        assert_matches(x0, wanted_x0, f"x0 of step {index}")
        assert index == wanted_index
    assert op_calls["multistep_update"] == 4


@pytest.mark.parametrize("kind", PAIRS)
def test_copies_and_pickles_mid_run_continue_like_diffusers(kind, op_calls):
    stock_class, fast_class = PAIRS[kind]
    stock, fast = stock_class(**SL), fast_class(**SL)
    for s in (stock, fast):
        s.set_timesteps(6)
    kwargs = CHURNS["churn"] if kind == "euler" else {}
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)) * stock.init_noise_sigma
    for t in stock.timesteps[:3]:
        model_output = toy_model(stock.scale_model_input(sample, t), t)
        fast.scale_model_input(sample, t)
        fast.step(model_output, t, sample, generator=torch.Generator().manual_seed(int(t)), **kwargs)
        sample = stock.step(model_output, t, sample, generator=torch.Generator().manual_seed(int(t)),
                            **kwargs).prev_sample

    def finish(scheduler, x):
        for t in scheduler.timesteps[3:]:
            model_output = toy_model(scheduler.scale_model_input(x, t), t)
            x = scheduler.step(model_output, t, x, generator=torch.Generator().manual_seed(int(t)),
                               **kwargs).prev_sample
        return x

    twins = [copy.deepcopy(fast), pickle.loads(pickle.dumps(fast)), fast]  # the original last
    expected = finish(stock, sample)
    for twin in twins:
        assert twin.step_index == 3
        assert_matches(finish(twin, sample), expected, type(twin).__name__)
    assert op_calls["multistep_update"] == 3 + 3 * 3


def test_pred_original_sample_and_dtypes_are_diffusers(op_calls):
    """prev_sample in the model output's dtype; x̂0 float32, or for 'sample' the model output itself."""
    for dtype in (torch.float32, torch.float16):
        for prediction_type in ("sample", "epsilon"):
            stock = diffusers.EulerDiscreteScheduler(prediction_type=prediction_type)
            fast = FastEulerDiscreteScheduler(prediction_type=prediction_type)
            outs = []
            for s in (stock, fast):
                s.set_timesteps(4)
                model_output, sample = torch.randn(SHAPE).to(dtype), torch.randn(SHAPE).to(dtype)
                out = s.step(model_output, s.timesteps[0], sample)
                outs.append((out, model_output))
            (expected, _), (actual, model_output) = outs
            assert type(actual) is type(expected)
            assert actual.prev_sample.dtype == expected.prev_sample.dtype == dtype
            assert actual.pred_original_sample.dtype == expected.pred_original_sample.dtype
            assert (actual.pred_original_sample is model_output) == (prediction_type == "sample")
    assert op_calls["multistep_update"] == 4


# ----------------------------------------------------------------------------- fallbacks: diffusers' own code
def _call(case: str, kind: str):
    """[stock result or error, fast result or error, stock step_index, fast step_index] of a call left to diffusers."""
    stock_class, fast_class = PAIRS[kind]
    config = dict(prediction_type="sample") if case == "prediction_type sample" else {}
    if case == "sigma_next above sigma":
        config = dict(rescale_betas_zero_snr=True)
    results = []
    for scheduler in (stock_class(**config), fast_class(**config)):
        dtype = torch.float64 if case == "float64" else torch.float32
        generator = torch.Generator().manual_seed(0)
        model_output = torch.randn(SHAPE, generator=generator).to(dtype)
        sample = torch.randn(SHAPE, generator=generator).to(dtype)
        if case == "mixed dtypes":
            model_output = model_output.half()
        if case == "sigma 0 (custom sigmas)":
            scheduler.set_timesteps(sigmas=[3.0, 0.0, 0.0])
            scheduler.step(model_output, scheduler.timesteps[0], sample)  # fused: σ = 3 -> 0
        elif case == "sigma_next above sigma":  # zero terminal SNR: σ_998 > σ_999 = 4096 with 500 steps
            scheduler.set_timesteps(500)
        else:
            scheduler.set_timesteps(4)
        timestep = scheduler.timesteps[-1 if case == "sigma 0 (custom sigmas)" else 0]
        if case == "integer timestep":
            timestep = 999
        if case == "past the last step":
            scheduler.set_begin_index(len(scheduler.timesteps))
            timestep = scheduler.timesteps[-1]
        try:
            results.append(scheduler.step(model_output, timestep, sample, generator=generator))
        except Exception as error:  # noqa: BLE001 - the stock error is the expected result
            results.append(error)
        results.append(scheduler.step_index)
    return results


FALLBACKS = [("float64", "euler"), ("float64", "ancestral"), ("mixed dtypes", "euler"), ("mixed dtypes", "ancestral"),
             ("integer timestep", "euler"), ("integer timestep", "ancestral"), ("prediction_type sample", "ancestral"),
             ("past the last step", "euler"), ("sigma 0 (custom sigmas)", "euler"),
             ("sigma_next above sigma", "ancestral")]


@pytest.mark.parametrize("case, kind", FALLBACKS, ids=[f"{k}-{c}" for c, k in FALLBACKS])
def test_what_the_op_cannot_match_runs_diffusers_code(case, kind, op_calls, launches):
    with fastdiff.use_backend("triton"):
        expected, expected_index, actual, actual_index = _call(case, kind)
    fused_before = 1 if case == "sigma 0 (custom sigmas)" else 0  # the step before, σ = 3 -> 0
    assert op_calls["multistep_update"] == launches["multistep_update"] == fused_before
    assert actual_index == expected_index
    if isinstance(expected, Exception):
        assert type(actual) is type(expected) and str(actual) == str(expected)
        return
    for name in ("prev_sample", "pred_original_sample"):
        wanted, got = getattr(expected, name), getattr(actual, name)
        assert got.dtype == wanted.dtype
        torch.testing.assert_close(got, wanted, rtol=0, atol=0, equal_nan=True)
    if case.startswith("sigma"):  # diffusers' NaN, kept
        assert expected.prev_sample.isnan().any()


# ----------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("kind, config, churn", [("euler", dict(**SL), "churn"),
                                                 ("euler", dict(**SL, prediction_type="v_prediction"), "none"),
                                                 ("ancestral", dict(**SL), "none")],
                         ids=["euler-churn", "euler-v", "ancestral"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_on_the_kernel(dtype, kind, config, churn, op_calls, launches):
    """Step by step from diffusers' float32 trajectory rounded to ``dtype``, the same noise: the
    kernel's prev_sample and x̂0 within 1.5 ulps (at the scale) of diffusers' float32 step."""
    stock_class, fast_class = PAIRS[kind]
    reference, fast = stock_class(**config), fast_class(**config)
    kwargs = CHURNS[churn] if kind == "euler" else {}
    for s in (reference, fast):
        s.set_timesteps(4)
    generator = torch.Generator().manual_seed(7)
    sample = (torch.randn(SHAPE, generator=generator) * reference.init_noise_sigma).to(dtype)
    worst = 0.0
    for t in reference.timesteps:
        model_output = torch.randn(SHAPE, generator=generator).to(dtype)
        with noise_drawn_in(PAIRS[kind][0], dtype):  # the float32 reference gets the dtype's noise, as the drop-in draws it
            reference.scale_model_input(sample.float(), t)
            expected = reference.step(model_output.float(), t, sample.float(),
                                      generator=torch.Generator().manual_seed(int(t)), **kwargs)
        with fastdiff.use_backend("triton"):
            fast.scale_model_input(sample, t)
            actual = fast.step(model_output, t, sample, generator=torch.Generator().manual_seed(int(t)), **kwargs)
        assert actual.prev_sample.dtype == dtype and actual.pred_original_sample.dtype == torch.float32
        for name in ("prev_sample", "pred_original_sample"):
            wanted = getattr(expected, name)
            ulp = torch.finfo(dtype).eps * wanted.abs().max()
            worst = max(worst, ((getattr(actual, name).float() - wanted).abs().max() / ulp).item())
        sample = expected.prev_sample.to(dtype)
    assert worst <= 1.5
    assert launches["multistep_update"] == op_calls["multistep_update"] == len(reference.timesteps)
