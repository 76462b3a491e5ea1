"""fastdiff.schedulers.schedule — β tables, timestep spacings, σ schedules and noise drawing — against
diffusers 0.42.

These are the numbers a scheduler is built from, so they must be diffusers' to the bit where
diffusers computes them the same way (float32 throughout); the tolerance where one is stated is
1e-5 relative to the scale of the table.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from fastdiff.schedulers import schedule as schedules

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar, rescale_zero_terminal_snr  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

RTOL = 1e-5
SPACINGS = schedules.TIMESTEP_SPACINGS


def assert_matches(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * expected.abs().max().item())


# ----------------------------------------------------------------------------- β tables
@pytest.mark.parametrize("T", [1, 2, 10, 100, 1000, 4000])
@pytest.mark.parametrize("transform", ["cosine", "laplace"])
def test_betas_for_alpha_bar_matches_diffusers(transform, T):
    ours = schedules.betas_for_alpha_bar(T, alpha_transform_type=transform)
    theirs = betas_for_alpha_bar(T, alpha_transform_type=transform)
    assert ours.dtype == torch.float32 and ours.shape == (T,)
    assert_matches(ours, theirs)
    assert (ours <= 0.999).all() and (ours > 0).all()


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("T", [10, 100, 1000])
@pytest.mark.parametrize("schedule, beta_start, beta_end", [
    ("linear", 0.0001, 0.02), ("linear", 0.001, 0.05), ("scaled_linear", 0.00085, 0.012),
    ("squaredcos_cap_v2", 0.0001, 0.02), ("sigmoid", 0.0001, 0.02), ("sigmoid", 0.0002, 0.03),
    ("laplace", 0.0001, 0.02),
])
def test_make_betas_matches_diffusers(schedule, beta_start, beta_end, T, rescale):
    ours = schedules.make_betas(T, beta_start, beta_end, schedule, rescale_betas_zero_snr=rescale)
    theirs = diffusers.DDPMScheduler(num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end,
                                     beta_schedule=schedule, rescale_betas_zero_snr=rescale).betas
    assert ours.dtype == torch.float32 and ours.shape == (T,)
    assert_matches(ours, theirs)


@pytest.mark.parametrize("rescale", [False, True])
def test_make_betas_prefers_trained_betas(rescale):
    trained = np.linspace(0.001, 0.04, 50).astype(np.float32) ** 1.5
    ours = schedules.make_betas(50, 0.0001, 0.02, "linear", trained_betas=trained.tolist(),
                                rescale_betas_zero_snr=rescale)
    theirs = diffusers.DDPMScheduler(num_train_timesteps=50, trained_betas=trained,
                                     rescale_betas_zero_snr=rescale).betas
    assert_matches(ours, theirs)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_rescale_zero_terminal_snr_matches_diffusers(schedule):
    betas = schedules.make_betas(1000, 0.00085, 0.012, schedule)
    ours = schedules.rescale_zero_terminal_snr(betas.clone())
    assert_matches(ours, rescale_zero_terminal_snr(betas.clone()))
    # Lin et al. 2023, Algorithm 1: √ᾱ keeps its first value, and the last one becomes 0
    alphas_cumprod = torch.cumprod(1 - ours, dim=0)
    assert alphas_cumprod[-1] == 0
    torch.testing.assert_close(alphas_cumprod[0], torch.cumprod(1 - betas, 0)[0])


def test_rescale_zero_terminal_snr_leaves_its_input_alone():
    betas = schedules.make_betas(100, 0.0001, 0.02, "linear")
    before = betas.clone()
    schedules.rescale_zero_terminal_snr(betas)
    assert torch.equal(betas, before)


# ----------------------------------------------------------------------------- timestep spacings
def diffusers_timesteps(T, n, spacing, offset):
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    scheduler.set_timesteps(n)
    return scheduler.timesteps.numpy()


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("T, n", [(1000, 1), (1000, 10), (1000, 50), (1000, 999), (1000, 1000), (100, 3),
                                  (7, 7), (1, 1), (1024, 13)])
def test_spaced_timesteps_matches_diffusers(T, n, spacing, offset):
    ours = schedules.spaced_timesteps(T, n, spacing, offset)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, diffusers_timesteps(T, n, spacing, offset))


# (T, n) with 1 <= n <= T
train_and_inference_steps = st.integers(1, 2000).flatmap(lambda T: st.tuples(st.just(T), st.integers(1, T)))


@settings(max_examples=300, deadline=None)
@given(T_n=train_and_inference_steps, spacing=st.sampled_from(SPACINGS), offset=st.integers(0, 5))
def test_spaced_timesteps_matches_diffusers_property(T_n, spacing, offset):
    T, n = T_n
    theirs = diffusers_timesteps(T, n, spacing, offset)
    # diffusers' own 'trailing' overshoots for some (T, n): see test_spaced_timesteps_are_n_distinct_steps
    assume(len(theirs) == n and theirs.min() >= 0)
    np.testing.assert_array_equal(schedules.spaced_timesteps(T, n, spacing, offset), theirs)


@settings(max_examples=300, deadline=None)
@given(T_n=train_and_inference_steps, spacing=st.sampled_from(SPACINGS))
@example(T_n=(1000, 61), spacing="trailing")
@example(T_n=(17, 7), spacing="trailing")
def test_spaced_timesteps_are_n_distinct_steps(T_n, spacing):
    """n strictly descending timesteps in [0, T): what every sampling loop relies on.

    diffusers 0.42's 'trailing' computes np.arange(T, 0, -T/n), and float rounding makes that
    n + 1 long for some (T, n) — e.g. T=1000 with n=61, 103, 121 — the extra timestep being -1.
    fastdiff keeps diffusers' values but always n of them.
    """
    T, n = T_n
    timesteps = schedules.spaced_timesteps(T, n, spacing)
    assert len(timesteps) == n, f"T={T} n={n}: {len(timesteps)} timesteps, ending {timesteps[-3:].tolist()}"
    assert timesteps.min() >= 0 and timesteps.max() <= T - 1
    assert (np.diff(timesteps) < 0).all()
    # trailing and linspace start at the last training step (linspace with n = 1 is the single
    # point 0, as np.linspace(0, T-1, 1) and diffusers have it)
    if spacing == "trailing" or (spacing == "linspace" and n > 1):
        assert timesteps[0] == T - 1


@pytest.mark.parametrize("offset", [0, 1, 5])
def test_steps_offset_shifts_leading_only(offset):
    for spacing in SPACINGS:
        shifted = schedules.spaced_timesteps(1000, 20, spacing, offset)
        plain = schedules.spaced_timesteps(1000, 20, spacing, 0)
        np.testing.assert_array_equal(shifted, plain + (offset if spacing == "leading" else 0))


# ----------------------------------------------------------------------------- noise
@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("shape", [(1, 4), (2, 3, 8, 8), (3, 1, 5, 7)])
def test_randn_tensor_matches_diffusers(shape, dtype):
    ours = schedules.randn_tensor(shape, generator=torch.Generator().manual_seed(7), device="cpu", dtype=dtype)
    theirs = randn_tensor(shape, generator=torch.Generator().manual_seed(7), device=torch.device("cpu"), dtype=dtype)
    assert ours.dtype == theirs.dtype and ours.device == theirs.device
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_randn_tensor_with_a_generator_per_sample_matches_diffusers(batch):
    def generators():
        return [torch.Generator().manual_seed(100 + i) for i in range(batch)]

    shape = (batch, 3, 6, 5)
    ours = schedules.randn_tensor(shape, generator=generators(), device="cpu")
    theirs = randn_tensor(shape, generator=generators(), device=torch.device("cpu"))
    assert torch.equal(ours, theirs)
    # sample i depends on generator i alone: the same seed reproduces one image of a batch
    alone = schedules.randn_tensor((1, 3, 6, 5), generator=torch.Generator().manual_seed(100 + batch - 1))
    assert torch.equal(ours[-1:], alone)


def test_randn_tensor_draws_in_order_from_one_generator():
    generator = torch.Generator().manual_seed(3)
    first, second = (schedules.randn_tensor((2, 3), generator=generator) for _ in range(2))
    both = torch.randn((4, 3), generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat([first, second]), both)


def test_randn_tensor_generator_list_of_the_wrong_length_is_an_error():
    with pytest.raises(ValueError, match="generators"):
        schedules.randn_tensor((3, 2), generator=[torch.Generator(), torch.Generator()])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_randn_tensor_cpu_generator_gives_the_same_numbers_on_cuda():
    ours = schedules.randn_tensor((2, 3, 4, 4), generator=torch.Generator().manual_seed(0), device="cuda")
    theirs = randn_tensor((2, 3, 4, 4), generator=torch.Generator().manual_seed(0), device=torch.device("cuda"))
    assert ours.device.type == "cuda" and torch.equal(ours, theirs)
    assert torch.equal(ours.cpu(), torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(0)))


# ----------------------------------------------------------------------------- σ schedules and the solvers' spacings
def a_diffusers_scheduler(cls_name="EulerDiscreteScheduler", **config):
    return getattr(diffusers, cls_name)(**config)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_train_sigmas_match_diffusers(schedule):
    theirs = a_diffusers_scheduler(beta_schedule=schedule)
    sigmas = schedules.train_sigmas(theirs.alphas_cumprod)
    expected = (((1 - theirs.alphas_cumprod) / theirs.alphas_cumprod) ** 0.5).numpy()
    assert sigmas.dtype == np.float32
    np.testing.assert_array_equal(sigmas, expected)


@pytest.mark.parametrize("family, method", [("karras", "_convert_to_karras"), ("exponential", "_convert_to_exponential"),
                                            ("beta", "_convert_to_beta")])
@pytest.mark.parametrize("n", [1, 2, 7, 25])
def test_sigma_families_match_diffusers(family, method, n):
    pytest.importorskip("scipy")
    theirs = a_diffusers_scheduler("DPMSolverMultistepScheduler")
    sigmas = np.flip(schedules.train_sigmas(theirs.alphas_cumprod)).copy()  # descending, as DPM-Solver passes them
    expected = getattr(theirs, method)(in_sigmas=sigmas, num_inference_steps=n)
    np.testing.assert_array_equal(schedules.respaced_sigmas(family, sigmas, n), expected)


def test_sigma_families_take_eulers_sigma_min_and_max():
    theirs = a_diffusers_scheduler(sigma_min=0.05, sigma_max=20.0)
    sigmas = np.flip(schedules.train_sigmas(theirs.alphas_cumprod)).copy()
    expected = theirs._convert_to_karras(in_sigmas=sigmas, num_inference_steps=9)
    np.testing.assert_array_equal(schedules.respaced_sigmas("karras", sigmas, 9, 0.05, 20.0), expected)


def test_lu_lambdas_match_diffusers():
    theirs = a_diffusers_scheduler("DPMSolverMultistepScheduler")
    log_sigmas = np.log(schedules.train_sigmas(theirs.alphas_cumprod))
    lambdas = np.flip(log_sigmas.copy())
    expected = theirs._convert_to_lu(in_lambdas=lambdas, num_inference_steps=11)
    np.testing.assert_allclose(schedules.lu_lambdas(lambdas[-1].item(), lambdas[0].item(), 11), expected,
                               rtol=1e-12, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(sigma=st.floats(1e-4, 500.0), schedule=st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]))
def test_sigma_to_t_matches_diffusers(sigma, schedule):
    theirs = a_diffusers_scheduler(beta_schedule=schedule)
    log_sigmas = np.log(schedules.train_sigmas(theirs.alphas_cumprod))
    sigma = np.array(sigma)
    np.testing.assert_array_equal(schedules.sigma_to_t(sigma, log_sigmas), theirs._sigma_to_t(sigma, log_sigmas))


@pytest.mark.parametrize("sigma", [0.0, 0.3, 14.6])
def test_alpha_sigma_is_the_variance_preserving_pair(sigma):
    theirs = a_diffusers_scheduler("DPMSolverMultistepScheduler")
    expected = theirs._sigma_to_alpha_sigma_t(torch.tensor(sigma))
    actual = schedules.alpha_sigma(torch.tensor(sigma))
    assert all(torch.equal(a, e) for a, e in zip(actual, expected))


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("T, n", [(1000, 1), (1000, 10), (1000, 25), (1000, 999), (100, 7), (1024, 13)])
@pytest.mark.parametrize("offset", [0, 1])
def test_solver_timesteps_match_diffusers(T, n, spacing, offset):
    theirs = a_diffusers_scheduler("DPMSolverMultistepScheduler", num_train_timesteps=T, timestep_spacing=spacing,
                                   steps_offset=offset)
    theirs.set_timesteps(n)
    expected = theirs.timesteps.numpy()
    expected = expected[expected >= 0]  # diffusers' trailing can end in an invalid -1 (dropped here)
    np.testing.assert_array_equal(schedules.solver_timesteps(T, n, spacing, offset), expected)


def test_solver_timesteps_stop_at_the_clipped_lambda():
    theirs = a_diffusers_scheduler("DPMSolverMultistepScheduler", beta_schedule="squaredcos_cap_v2",
                                   lambda_min_clipped=-5.1)
    theirs.set_timesteps(12)
    clipped = int(torch.searchsorted(torch.flip(theirs.lambda_t, [0]), -5.1))
    ours = schedules.solver_timesteps(1000, 12, "linspace", last_timestep=1000 - clipped)
    np.testing.assert_array_equal(ours, theirs.timesteps.numpy())


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("T, n", [(1000, 1), (1000, 10), (1000, 61), (100, 7)])
def test_euler_timesteps_match_diffusers(T, n, spacing):
    theirs = a_diffusers_scheduler(num_train_timesteps=T, timestep_spacing=spacing)
    theirs.set_timesteps(n)
    expected = theirs.timesteps.numpy()
    expected = expected[expected >= 0]
    actual = schedules.euler_timesteps(T, n, spacing)
    assert actual.dtype == np.float32
    np.testing.assert_array_equal(actual, expected)
