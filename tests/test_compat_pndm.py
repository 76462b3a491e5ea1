"""fastdiff.compat._pndm.FastPNDMScheduler against diffusers' own PNDMScheduler (0.42).

The requirement: a drop-in. For the same model outputs, every step's sample and diffusers' state
after it (``counter``, ``ets``, ``cur_sample``, ``cur_model_output``) equal stock diffusers' in
float32, with the fused op running each step (counted: a fallback to diffusers' code would pass
any parity test), on both backends ('torch', 'triton' with ``launches``); state injected or changed
between steps, a stock step in between, copies and pickles mid-run continue as diffusers would;
what the op cannot reproduce runs diffusers' code, bit for bit.

Tolerance: rtol = 1e-5 and atol = 1e-5 · max|expected|. As in test_scheduler_pndm.py, diffusers'
float32 step is ill-conditioned where κ = √(ᾱ_prev/ᾱ_t) is large (the cosine schedule near
t = 999): every loop is checked against diffusers run in float64 (its float32 ᾱ table promoted) and
against its float32 run where κ ≤ KAPPA_MAX. fp16/bf16: each step within 3 ulps of diffusers'
float32 step on the same inputs, in ulps at the tensor's scale: ≤ 1.5 (the op rounds once, ≤ 0.5;
PRK's running sum is stored in the dtype, ≤ 0.5 more; Triton's CPU interpreter stores bf16 by
truncation, twice RNE's error). diffusers' own fp16/bf16 steps are ~1 ulp off at that scale too.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import pickle

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastdiff  # noqa: E402
from fastdiff.compat._pndm import FAST, FastPNDMScheduler  # noqa: E402
import scheduler_helpers  # noqa: E402
from scheduler_helpers import (RTOL, conditioning, parameters, pndm_in_float64, public_config,  # noqa: E402
                               toy_model, trained_betas)

KAPPA_MAX = 10.0
SHAPE = (2, 3, 4, 4)
SL = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # Stable Diffusion's betas
pytestmark = pytest.mark.usefixtures("one_thread")
SD15 = dict(**SL, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Equal to 1e-5 relative to the scale (max |expected|, once cast to ``actual``'s dtype)."""
    scheduler_helpers.assert_matches(actual, expected, what, cast=True)


def float64_twin(config: dict):
    """diffusers' scheduler computing in float64 from its float32 ᾱ table (the exact result of its algorithm)."""
    return pndm_in_float64(diffusers.PNDMScheduler(**config))


def state(scheduler) -> dict:
    """A snapshot of diffusers' PNDM state (cloned: the drop-in's tensors are views of slots that
    later steps overwrite)."""
    def snapshot(x):
        return x.clone() if torch.is_tensor(x) else x

    return dict(counter=scheduler.counter, ets=[snapshot(e) for e in scheduler.ets],
                cur_sample=snapshot(scheduler.cur_sample), cur_model_output=snapshot(scheduler.cur_model_output))


def assert_state_matches(ours: dict, theirs: dict, what: str) -> None:
    """Counter equal; cur_sample / cur_model_output equal (None / 0 where diffusers' are); ets: the
    outputs a later step can read (the last three), and the older ones diffusers keeps unless they
    are the one a PLMS step's push overwrote (module docstring of fastdiff.compat._pndm)."""
    assert ours["counter"] == theirs["counter"], what
    ets, stock_ets = ours["ets"], theirs["ets"]
    assert len(ets) in (len(stock_ets), min(len(stock_ets), 3)), f"{what}: ets {len(ets)} vs {len(stock_ets)}"
    for k, (mine, stock) in enumerate(zip(ets[::-1], stock_ets[::-1])):
        assert_matches(mine, stock, f"{what}: ets[-{k + 1}]")
    for name, empty in (("cur_sample", None), ("cur_model_output", 0)):
        if isinstance(theirs[name], torch.Tensor):
            assert_matches(ours[name], theirs[name], f"{what}: {name}")
        else:
            assert ours[name] is empty if empty is None else (ours[name] == 0 and not torch.is_tensor(ours[name]))


def sample_loop(scheduler, steps: int, dtype=torch.float32, seed: int = 0):
    """diffusers' PNDM loop with the toy model: [(x after each step, state after it)]."""
    scheduler.set_timesteps(steps)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)
    trajectory = []
    for t in scheduler.timesteps:
        sample = scheduler.step(toy_model(sample, t), t, sample).prev_sample
        trajectory.append((sample, state(scheduler)))
    return trajectory


# ----------------------------------------------------------------------------- diffusers' own, for config and files
def test_fast_scheduler_is_the_stock_one_for_config_and_files(tmp_path):
    stock = diffusers.PNDMScheduler(**SD15, prediction_type="v_prediction", timestep_spacing="trailing")
    fast = FastPNDMScheduler.from_config(stock.config)
    assert isinstance(fast, diffusers.PNDMScheduler) and diffusers.PNDMScheduler in fast.compatibles
    assert set(fast.compatibles) == set(stock.compatibles) and FAST == {diffusers.PNDMScheduler: FastPNDMScheduler}

    assert public_config(fast.config) == public_config(stock.config)
    fast.save_pretrained(tmp_path / "fast")
    assert public_config(diffusers.PNDMScheduler.from_pretrained(tmp_path / "fast").config) == public_config(stock.config)
    stock.save_pretrained(tmp_path / "stock")
    reloaded = FastPNDMScheduler.from_pretrained(tmp_path / "stock")
    assert type(reloaded) is FastPNDMScheduler and public_config(reloaded.config) == public_config(stock.config)


def test_signatures_are_diffusers():
    for name in ("step", "step_prk", "step_plms", "set_timesteps", "scale_model_input", "add_noise"):
        assert parameters(getattr(FastPNDMScheduler, name)) == parameters(getattr(diffusers.PNDMScheduler, name)), name
    assert FastPNDMScheduler.step is diffusers.PNDMScheduler.step  # diffusers' dispatch by counter, unchanged


# ----------------------------------------------------------------------------- parity: full loops
@dataclasses.dataclass(frozen=True)
class Case:
    config: dict
    steps: int

    @property
    def id(self) -> str:
        cfg = self.config
        parts = ["plms" if cfg.get("skip_prk_steps") else "prk", cfg.get("beta_schedule", "linear"),
                 cfg.get("prediction_type", "epsilon"), cfg.get("timestep_spacing", "leading"), f"n{self.steps}"]
        parts += [f"{k}={cfg[k]}" for k in ("set_alpha_to_one", "steps_offset", "num_train_timesteps") if k in cfg]
        return "-".join(map(str, parts + (["trained"] if "trained_betas" in cfg else [])))


def build_cases(full: bool) -> list[Case]:
    """Default: skip_prk_steps × prediction × spacing, the other options rotating (each value seen);
    full: × beta schedule × set_alpha_to_one × steps_offset."""
    schedules = [dict(), SL, dict(beta_schedule="squaredcos_cap_v2")]
    rest = (range(3), (True, False), (0, 1, 3)) if full else ((None,),) * 3  # schedule, set_alpha_to_one, offset
    product = itertools.product((True, False), ("epsilon", "v_prediction"), ("leading", "linspace", "trailing"), *rest)
    cases = []
    for i, (skip, pred, spacing, schedule, alpha_one, offset) in enumerate(product):
        config = dict(**schedules[i % 3 if schedule is None else schedule], skip_prk_steps=skip, prediction_type=pred,
                      timestep_spacing=spacing, set_alpha_to_one=i % 4 < 2 if alpha_one is None else alpha_one,
                      steps_offset=(0, 1, 3)[i // 2 % 3] if offset is None else offset)
        cases.append(Case(config, ((5, 8, 3), (4, 8, 5))[not skip][i % 3]))
    cases += [Case(dict(num_train_timesteps=64, trained_betas=trained_betas(64), prediction_type="v_prediction",
                        timestep_spacing="trailing"), 4),
              Case(dict(num_train_timesteps=100, skip_prk_steps=True, steps_offset=1), 7),
              Case(dict(timestep_spacing="trailing", skip_prk_steps=True), 61)]  # diffusers' t = −1 at the end, kept
    return cases


DEFAULT_CASES = build_cases(full=False)
FULL_CASES = [case for case in build_cases(full=True) if case not in DEFAULT_CASES]
KERNEL_CASES = [Case(dict(**SD15), 4), Case(dict(prediction_type="v_prediction", set_alpha_to_one=True), 4)]


def check_loop(case: Case, backend: str, op_calls: dict) -> None:
    stock, fast = diffusers.PNDMScheduler(**case.config), FastPNDMScheduler(**case.config)
    with fastdiff.use_backend(backend):
        ours = sample_loop(fast, case.steps)
    theirs = sample_loop(stock, case.steps)
    exact = sample_loop(float64_twin(case.config), case.steps, torch.float64)
    assert op_calls["multistep_update"] == len(stock.timesteps)  # every step fused: no fallback
    well_conditioned = conditioning(stock) <= KAPPA_MAX
    for t, (x, mine), (wanted, stock_state), (exact_x, _) in zip(stock.timesteps.tolist(), ours, theirs, exact):
        assert torch.isfinite(wanted).all()
        assert_matches(x, exact_x, f"x after t={t} vs diffusers in float64")
        if well_conditioned:
            assert_matches(x, wanted, f"x after t={t}")
            assert_state_matches(mine, stock_state, f"state after t={t}")


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
        for key, value in {**diffusers.PNDMScheduler(**case.config).config}.items():
            if not key.startswith("_"):
                seen.setdefault(key, set()).add(value if key != "trained_betas" else value is not None)
    assert seen["skip_prk_steps"] == seen["set_alpha_to_one"] == seen["trained_betas"] == {True, False}
    assert seen["prediction_type"] == {"epsilon", "v_prediction"}
    assert seen["timestep_spacing"] == {"leading", "linspace", "trailing"}
    assert seen["beta_schedule"] >= {"linear", "scaled_linear", "squaredcos_cap_v2"}
    assert seen["steps_offset"] == {0, 1, 3} and seen["num_train_timesteps"] == {1000, 100, 64}


def test_diffusers_float32_is_the_outlier_where_ill_conditioned(op_calls):
    """The cosine schedule from t = 999 (κ ≈ 2·10⁴): diffusers' float32 keeps ~1e-4 of rounding; the
    drop-in stays within 1e-6 of diffusers' own algorithm in float64."""
    config = dict(beta_schedule="squaredcos_cap_v2", skip_prk_steps=True, prediction_type="v_prediction",
                  timestep_spacing="trailing")
    mine = sample_loop(FastPNDMScheduler(**config), 2)[-1][0]
    stock = diffusers.PNDMScheduler(**config)
    rounded = sample_loop(stock, 2)[-1][0]
    exact = sample_loop(float64_twin(config), 2, torch.float64)[-1][0]
    error = lambda x: ((x.double() - exact).abs().max() / exact.abs().max()).item()  # noqa: E731
    assert conditioning(stock) > 1e4 and error(mine) < 1e-6 < 1e-4 < error(rounded)
    assert op_calls["multistep_update"] == 3


# ----------------------------------------------------------------------------- diffusers' state
# (config, the calls): diffusers' test_scheduler_pndm check_over_configs / test_step_shape pattern
INJECTED = [(dict(), [("step_prk", 10), ("step_plms", 10), ("step_prk", 5), ("step_plms", 5)]),
            (dict(prediction_type="v_prediction", skip_prk_steps=True),
             [("step_plms", 10), ("step_plms", 10), ("step_plms", 5), ("step_plms", 1)])]


@pytest.mark.parametrize("config, calls", INJECTED, ids=["prk", "plms-v"])
def test_diffusers_test_pattern_injected_ets_then_step_prk_and_step_plms(config, calls, op_calls):
    """diffusers' own tests: ``scheduler.ets = dummy_past_residuals[:]``, then step_prk / step_plms
    called directly from counter 0. The second call, PLMS at counter 1 with more than one stored
    output, is diffusers' sum of stored outputs alone: diffusers' code runs it on the drop-in's list."""
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    residual = 0.1 * sample
    stock, fast = diffusers.PNDMScheduler(**config), FastPNDMScheduler(**config)
    for s in (stock, fast):
        s.set_timesteps(50)
        s.ets = [residual + 0.2, residual + 0.15, residual + 0.1, residual + 0.05]
    for i, (method, t) in enumerate(calls):
        expected = getattr(stock, method)(residual, t, sample).prev_sample
        actual = getattr(fast, method)(residual, t, sample).prev_sample
        assert_matches(actual, expected, f"call {i}: {method}")
        if i == 0:
            assert len(fast.ets) == len(stock.ets)  # injected outputs older than the ring are kept
        assert_state_matches(state(fast), state(stock), f"after call {i}: {method}")
    assert op_calls["multistep_update"] == len(calls) - 1


@pytest.mark.parametrize("skip", [True, False], ids=["plms", "prk"])
def test_state_injected_between_steps_is_copied_in(skip, op_calls):
    """Assigned ets, cur_sample and cur_model_output mid-run (even mid Runge-Kutta step) are what the
    next fused step reads, as diffusers' step reads them."""
    stock, fast = diffusers.PNDMScheduler(skip_prk_steps=skip), FastPNDMScheduler(skip_prk_steps=skip)
    for s in (stock, fast):
        s.set_timesteps(6)
    generator = torch.Generator().manual_seed(2)
    sample = torch.randn(SHAPE, generator=generator)
    for i, t in enumerate(stock.timesteps):
        if i in (1, 6, 10):  # warm-up / mid-PRK stage, later steps
            shift = torch.randn(SHAPE, generator=generator)
            for s in (stock, fast):
                s.ets = [e + 0.1 * shift for e in s.ets]
                if isinstance(s.cur_sample, torch.Tensor):
                    s.cur_sample = s.cur_sample + shift
                if isinstance(s.cur_model_output, torch.Tensor):
                    s.cur_model_output = s.cur_model_output * 0.5
        model_output = toy_model(sample, t)
        actual = fast.step(model_output, t, sample).prev_sample
        expected = stock.step(model_output, t, sample).prev_sample
        assert_matches(actual, expected, f"step {i}")
        assert_state_matches(state(fast), state(stock), f"after step {i}")
        sample = expected
    assert op_calls["multistep_update"] == len(stock.timesteps)


@pytest.mark.parametrize("skip", [True, False], ids=["plms", "prk"])
def test_a_stock_step_in_between_then_fused_steps_again(skip, op_calls):
    """diffusers' own step code run on the drop-in's state (it appends to ets, adds to the running sum
    in place) is taken up by the next fused step: the whole run equals stock diffusers'."""
    stock, fast = diffusers.PNDMScheduler(skip_prk_steps=skip), FastPNDMScheduler(skip_prk_steps=skip)
    for s in (stock, fast):
        s.set_timesteps(6)
    stock_steps = {1, 5, 9} if not skip else {1, 3}  # mid-PRK stages / the warm-up's second step, a PLMS step
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    for i, t in enumerate(stock.timesteps):
        model_output = toy_model(sample, t)
        if i in stock_steps:  # diffusers' step_prk / step_plms themselves (its step would dispatch to ours)
            method = "step_prk" if i < len(stock.prk_timesteps) else "step_plms"
            actual = getattr(diffusers.PNDMScheduler, method)(fast, model_output, t, sample).prev_sample
        else:
            actual = fast.step(model_output, t, sample).prev_sample
        expected = stock.step(model_output, t, sample).prev_sample
        assert_matches(actual, expected, f"step {i}")
        assert_state_matches(state(fast), state(stock), f"after step {i}")
        sample = expected
    assert op_calls["multistep_update"] == len(stock.timesteps) - len(stock_steps)


def test_state_lives_in_the_slots_and_is_not_copied_between_fused_steps():
    """ets, cur_sample and cur_model_output are views of the drop-in's slots; fused step after fused
    step the mirror never copies (its plan object would be replaced by a copy-in)."""
    fast = FastPNDMScheduler()
    fast.set_timesteps(5)
    sample, plans = torch.randn(SHAPE), set()
    for t in fast.timesteps:
        sample = fast.step(toy_model(sample, t), t, sample).prev_sample
        slots = fast._slot_mirror.slots
        held = [*fast.ets, *[x for x in (fast.cur_sample, fast.cur_model_output) if torch.is_tensor(x)]]
        assert held and all(x.untyped_storage().data_ptr() == slots.untyped_storage().data_ptr() for x in held)
        plans.add(id(fast._slot_mirror.plan))
    assert len(plans) == 1  # the first step's copy-in only


def test_copies_and_pickles_mid_run_continue_like_diffusers(op_calls):
    stock, fast = diffusers.PNDMScheduler(), FastPNDMScheduler()
    for s in (stock, fast):
        s.set_timesteps(5)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    timesteps = stock.timesteps.tolist()
    for t in timesteps[:6]:  # mid Runge-Kutta step 2
        model_output = toy_model(sample, t)
        fast.step(model_output, t, sample)
        sample = stock.step(model_output, t, sample).prev_sample
    twins = [copy.deepcopy(fast), pickle.loads(pickle.dumps(fast)), fast]
    expected = sample
    for t in timesteps[6:]:
        expected = stock.step(toy_model(expected, t), t, expected).prev_sample
    for twin in twins:  # the original last: continuing a copy must not move the original's state
        x = sample
        for t in timesteps[6:]:
            x = twin.step(toy_model(x, t), t, x).prev_sample
        assert_matches(x, expected, f"{type(twin).__name__} continued")
        assert_state_matches(state(twin), state(stock), "state at the end")
    assert op_calls["multistep_update"] == 6 + 3 * (len(timesteps) - 6)


# ----------------------------------------------------------------------------- fallbacks: diffusers' own code
def _run_both(case: str):
    """(stock result or error, fast result or error) of one call that the drop-in leaves to diffusers."""
    config = dict(prediction_type="sample") if case == "prediction_type sample" else dict()
    if case == "zero alpha_cumprod":  # a trained β of 1 at t = 999: diffusers divides by ᾱ_999 = 0
        config = dict(trained_betas=[*np.linspace(1e-4, 0.02, 999), 1.0], timestep_spacing="trailing",
                      skip_prk_steps=True)
    stock, fast = diffusers.PNDMScheduler(**config), FastPNDMScheduler(**config)
    dtype = torch.float64 if case == "float64" else torch.float32
    model_output = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).to(dtype)
    if case == "mixed dtypes":
        model_output = model_output.half()
    if case == "autograd":
        model_output.requires_grad_(True)
    timestep, method = (999 if case == "zero alpha_cumprod" else 901), "step"
    if case == "1-d timestep":
        timestep = torch.tensor([901])
    elif case == "float timestep":
        timestep = 901.0
    results = []
    for s in (stock, fast):
        if case != "before set_timesteps":
            s.set_timesteps(10)
        if case == "plms before prk":
            method = "step_plms"
        if case == "step_prk past prk":
            s.counter, method = 12, "step_prk"
        if case == "a running sum at stage 0":  # diffusers adds ε/6 to it (in place)
            s.cur_model_output = torch.full(SHAPE, 0.5)
        if case == "stage 1 without cur_sample":  # diffusers starts from the sample passed, sums from 0
            s.counter = 1
        try:
            results.append(getattr(s, method)(model_output, timestep, sample).prev_sample)
        except Exception as error:  # noqa: BLE001 - the stock error is the expected result
            results.append(error)
        results.append(state(s))
    return results


FALLBACKS = ["float64", "mixed dtypes", "autograd", "1-d timestep", "float timestep", "prediction_type sample",
             "plms before prk", "step_prk past prk", "before set_timesteps", "a running sum at stage 0",
             "stage 1 without cur_sample", "zero alpha_cumprod"]


@pytest.mark.parametrize("case", FALLBACKS)
def test_what_the_op_cannot_match_runs_diffusers_code(case, op_calls, launches):
    with fastdiff.use_backend("triton"):
        expected, expected_state, actual, actual_state = _run_both(case)
    assert op_calls["multistep_update"] == launches["multistep_update"] == 0
    if isinstance(expected, Exception):  # diffusers' message names the class
        message = str(expected).replace(str(diffusers.PNDMScheduler), str(FastPNDMScheduler))
        assert type(actual) is type(expected) and str(actual) == message
    else:
        assert actual.dtype == expected.dtype
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
        assert case != "zero alpha_cumprod" or not expected.isfinite().all()  # diffusers' inf / NaN, kept
    assert actual_state["counter"] == expected_state["counter"]
    assert len(actual_state["ets"]) == len(expected_state["ets"])
    assert all(torch.equal(a, b) for a, b in zip(actual_state["ets"], expected_state["ets"]))
    for name in ("cur_sample", "cur_model_output"):
        wanted, got = expected_state[name], actual_state[name]
        assert torch.equal(got, wanted) if torch.is_tensor(wanted) else got is wanted or got == wanted == 0


# ----------------------------------------------------------------------------- low precision, pipelines
@pytest.mark.parametrize("config", [dict(**SL), dict(**SD15, prediction_type="v_prediction")], ids=["prk", "plms-v"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_on_the_kernel(dtype, config, op_calls, launches):
    """Step by step from diffusers' float32 trajectory rounded to ``dtype``: the kernel's step within
    1.5 ulps (at the tensor's scale) of diffusers' float32 step on the same inputs."""
    reference, fast = diffusers.PNDMScheduler(**config), FastPNDMScheduler(**config)
    for s in (reference, fast):
        s.set_timesteps(4)
    generator = torch.Generator().manual_seed(7)
    sample = torch.randn(SHAPE, generator=generator).to(dtype)
    worst = 0.0
    for t in reference.timesteps:
        model_output = torch.randn(SHAPE, generator=generator).to(dtype)
        expected = reference.step(model_output.float(), t, sample.float()).prev_sample
        with fastdiff.use_backend("triton"):
            actual = fast.step(model_output, t, sample).prev_sample
        assert actual.dtype == dtype
        ulp = torch.finfo(dtype).eps * expected.abs().max()
        worst = max(worst, ((actual.float() - expected).abs().max() / ulp).item())
        sample = expected.to(dtype)
    assert worst <= 1.5
    assert launches["multistep_update"] == op_calls["multistep_update"] == len(reference.timesteps)


def test_pndm_pipeline_gives_the_stock_images(op_calls, launches):
    """diffusers' PNDMPipeline with the drop-in swapped in (PRK's 12 stages + PLMS, on the kernel)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    pipe = diffusers.PNDMPipeline(unet=unet, scheduler=diffusers.PNDMScheduler(num_train_timesteps=100))
    pipe.set_progress_bar_config(disable=True)

    def images():
        return pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(5),
                    output_type="np").images

    expected = images()
    pipe.scheduler = FastPNDMScheduler.from_config(pipe.scheduler.config)
    with fastdiff.use_backend("triton"):
        actual = images()
    assert launches["multistep_update"] == op_calls["multistep_update"] == 13
    np.testing.assert_allclose(actual, expected, rtol=0, atol=RTOL)
    assert actual.std() > 0.05


@pytest.mark.parametrize("layout", ["channels_last", "mixed"])
def test_channels_last_samples_on_the_kernel(layout, op_calls, launches):
    """The slots follow the sample's layout (SlotMirror); a channels_last model output with a
    contiguous sample (a channels_last U-Net) works too."""
    stock, fast = diffusers.PNDMScheduler(**SD15), FastPNDMScheduler(**SD15)
    for s in (stock, fast):
        s.set_timesteps(4)
    expected = actual = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    for t in stock.timesteps:
        model_output = toy_model(expected, t)
        expected = stock.step(model_output, t, expected).prev_sample
        sample = actual.to(memory_format=torch.channels_last) if layout == "channels_last" else actual
        with fastdiff.use_backend("triton"):
            actual = fast.step(model_output.to(memory_format=torch.channels_last), t, sample).prev_sample
        assert_matches(actual, expected, f"t={int(t)}")
    slots = fast._slot_mirror.slots
    assert slots[0].is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    assert launches["multistep_update"] == op_calls["multistep_update"] == len(stock.timesteps)
