"""The fused DDPM and DDIM step kernels (fastdiff.kernels.scheduler_step) against their plain-PyTorch
twins, fastdiff.reference.ddpm_step / ddim_step, on the CPU through Triton's interpreter or on CUDA.

Tolerances, relative to the scale (max |expected|) of each output:
* fp32: 1e-6. The kernel computes the step's scalars where the reference does (PyTorch ops for ᾱ on
  the CPU, in-kernel IEEE math for ᾱ on the device) and every elementwise op in the reference's
  order without FMA contraction, so with ᾱ on the CPU it is bit for bit the reference on the
  interpreter (test_fp32_is_bitwise_the_reference), short of the learned variance types' per-element
  sqrt/exp (numpy's vs PyTorch's CPU ones, ~1e-7).
* fp16 / bf16: 1e-3 / 1e-2 against the fp32 reference on the same (rounded) inputs: the kernel
  computes in fp32 and rounds once; the reference in low precision rounds after every op.
"""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastdiff
from fastdiff import ops, reference
from fastdiff.kernels import Unsupported
from fastdiff.kernels import scheduler_step as steps

FP32_TOL = 1e-6
TOLERANCES = {torch.float32: FP32_TOL, torch.float16: 1e-3, torch.bfloat16: 1e-2}
LOW_PRECISION = [torch.float16, torch.bfloat16]
PREDICTIONS = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
X0_LIMITS = {  # how x̂0 is clipped or thresholded
    "raw": {},
    "clip": dict(clip_sample_range=1.5),
    "thresh": dict(dynamic_thresholding_ratio=0.9, sample_max_value=2.0),
    "both": dict(clip_sample_range=1.0, dynamic_thresholding_ratio=0.7, sample_max_value=1.5),  # ratio wins
}
# (ᾱ_t, ᾱ_{t-1}): early in sampling (√ᾱ_t ≈ 0.11: x̂0 from ε cancels), and the last step (ᾱ_{t-1} = 1)
SCHEDULE_POINTS = [(0.0123, 0.0234), (0.9, 1.0)]
SHAPE = (3, 3, 7, 5)
ODD_SHAPES = [(3, 3, 7, 5), (1, 1, 1, 1), (2, 4, 33, 17), (5, 1030), (2, 3)]


def make_inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    """Step inputs; each sample's model output has its own scale, so thresholds differ per sample."""
    g = torch.Generator().manual_seed(seed)
    per_sample = torch.arange(1, shape[0] + 1, dtype=torch.float32).reshape(-1, *[1] * (len(shape) - 1))
    tensors = dict(
        model_output=torch.randn(shape, generator=g) * per_sample,
        sample=2 * torch.randn(shape, generator=g),
        noise=torch.randn(shape, generator=g),
        uncond=torch.randn(shape, generator=g),
        learned=1e-3 + 0.02 * torch.rand(shape, generator=g),  # σ² for 'learned'
        learned_range=2 * torch.rand(shape, generator=g) - 1,  # v ∈ [-1, 1] for 'learned_range'
    )
    return {name: x.to(dtype=dtype, device=device) for name, x in tensors.items()}


def schedule(alpha_t, alpha_prev, device="cpu"):
    return torch.tensor(alpha_t, device=device), torch.tensor(alpha_prev, device=device)


def upcast(value):
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() and \
        value.dtype != torch.float32 else value


def assert_matches(actual, expected, tol, what=""):
    finite = expected.float()[torch.isfinite(expected)]
    scale = max(finite.abs().max().item(), 1e-30) if finite.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def check(kind, *args, **kwargs):
    """Run the launcher ``kind`` ('ddpm_step' / 'ddim_step') and the reference; compare both outputs.

    fp32 is compared with the reference on the same tensors, fp16/bf16 with the fp32 reference on
    the upcast tensors (the same values)."""
    out = getattr(steps, kind)(*args, **kwargs)
    dtype = args[1].dtype
    expected = getattr(reference, kind)(*map(upcast, args), **{k: upcast(v) for k, v in kwargs.items()})
    for name, actual, want in zip(("prev_sample", "pred_original_sample"), out, expected):
        assert actual.dtype == dtype and actual.shape == args[1].shape
        assert_matches(actual, want, TOLERANCES[dtype], name)
    return out


def ddpm_args(x, variance_type, guided, with_noise, limit, alpha_t, alpha_prev):
    a_t, a_prev = schedule(alpha_t, alpha_prev)
    learned = x["learned"] if variance_type == "learned" else x["learned_range"]
    return (x["model_output"], x["sample"], a_t, a_prev, x["noise"] if with_noise else None), dict(
        predicted_variance=learned, variance_type=variance_type, uncond_model_output=x["uncond"] if guided else None,
        guidance_scale=3.5, **X0_LIMITS[limit])


def ddim_args(x, eta, use_clipped, guided, with_noise, limit, alpha_t, alpha_prev):
    a_t, a_prev = schedule(alpha_t, alpha_prev)
    return (x["model_output"], x["sample"], a_t, a_prev, x["noise"] if with_noise else None), dict(
        eta=eta, use_clipped_model_output=use_clipped, uncond_model_output=x["uncond"] if guided else None,
        guidance_scale=3.5, **X0_LIMITS[limit])


# ----------------------------------------------------------------------------- every option, fp32
@pytest.mark.parametrize("guided, with_noise", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("limit", X0_LIMITS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddpm_every_option(prediction_type, limit, variance_type, guided, with_noise, kernel_device):
    x = make_inputs(SHAPE, device=kernel_device)
    for point in SCHEDULE_POINTS:
        args, kwargs = ddpm_args(x, variance_type, guided, with_noise, limit, *point)
        check("ddpm_step", *args, prediction_type=prediction_type, **kwargs)


@pytest.mark.parametrize("guided, with_noise", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("limit", X0_LIMITS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddim_every_option(prediction_type, limit, eta, use_clipped, guided, with_noise, kernel_device):
    x = make_inputs(SHAPE, device=kernel_device)
    for point in SCHEDULE_POINTS:
        args, kwargs = ddim_args(x, eta, use_clipped, guided, with_noise, limit, *point)
        check("ddim_step", *args, prediction_type=prediction_type, **kwargs)


@pytest.mark.parametrize("kind", ["ddpm_step", "ddim_step"])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_fp32_is_bitwise_the_reference(kind, prediction_type, kernel_device):
    """ᾱ on the CPU (as the schedulers pass it): the same scalars, the same IEEE ops in the same
    order, so the same bits on the interpreter; on a GPU within 1e-6 (PyTorch's CUDA ops)."""
    x = make_inputs(SHAPE, device=kernel_device)
    a_t, a_prev = schedule(0.0123, 0.0234)
    kwargs = dict(prediction_type=prediction_type, uncond_model_output=x["uncond"], guidance_scale=7.5,
                  dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
    kwargs.update(eta=1.0, use_clipped_model_output=True) if kind == "ddim_step" else kwargs.update(
        variance_type="fixed_small_log")
    out = getattr(steps, kind)(x["model_output"], x["sample"], a_t, a_prev, x["noise"], **kwargs)
    expected = getattr(reference, kind)(x["model_output"], x["sample"], a_t, a_prev, x["noise"], **kwargs)
    for actual, want in zip(out, expected):
        if kernel_device == "cpu":
            assert torch.equal(actual, want)
        else:
            assert_matches(actual, want, FP32_TOL)


@pytest.mark.parametrize("kind", ["ddpm_step", "ddim_step"])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_coefficients_computed_in_the_kernel(kind, prediction_type, kernel_device, monkeypatch):
    """ᾱ on the sample's device: the kernel computes the scalars itself (IEEE roots and divisions;
    on the CPU the reference's PyTorch roots may be 1 ulp off): still 1e-6 of the reference."""
    monkeypatch.setattr(steps, "coefficients_on_host", lambda *alphas: False)
    x = make_inputs(SHAPE, device=kernel_device)
    for point, variance_type, limit in itertools.product(
            SCHEDULE_POINTS, ("fixed_small", "fixed_small_log", "fixed_large_log", "learned_range"), X0_LIMITS):
        a_t, a_prev = schedule(*point, device=kernel_device)
        kwargs = dict(prediction_type=prediction_type, uncond_model_output=x["uncond"], **X0_LIMITS[limit])
        if kind == "ddpm_step":
            kwargs.update(variance_type=variance_type, predicted_variance=x["learned_range"])
        else:
            kwargs.update(eta=0.7, use_clipped_model_output=variance_type == "fixed_small")
        check(kind, x["model_output"], x["sample"], a_t, a_prev, x["noise"], **kwargs)


# ----------------------------------------------------------------------------- fp16, bf16, shapes
@pytest.mark.parametrize("limit", X0_LIMITS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision(dtype, prediction_type, limit, kernel_device):
    x = make_inputs(SHAPE, dtype=dtype, device=kernel_device)
    for point, variance_type in zip(SCHEDULE_POINTS, ("learned_range", "fixed_small")):
        args, kwargs = ddpm_args(x, variance_type, True, True, limit, *point)
        check("ddpm_step", *args, prediction_type=prediction_type, **kwargs)
        args, kwargs = ddim_args(x, 0.5, limit == "clip", True, True, limit, *point)
        check("ddim_step", *args, prediction_type=prediction_type, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
def test_odd_shapes(shape, dtype, kernel_device):
    x = make_inputs(shape, dtype=dtype, device=kernel_device, seed=3)
    args, kwargs = ddpm_args(x, "learned", True, True, "thresh", 0.3, 0.5)
    check("ddpm_step", *args, **kwargs)
    args, kwargs = ddim_args(x, 1.0, True, True, True, "clip", 0.3, 0.5)
    check("ddim_step", *args, prediction_type="v_prediction", **kwargs)


def test_empty_batch(kernel_device):
    x = make_inputs((0, 3, 4), device=kernel_device)
    a_t, a_prev = schedule(0.3, 0.5)
    for kind in ("ddpm_step", "ddim_step"):
        prev, x0 = getattr(steps, kind)(x["model_output"], x["sample"], a_t, a_prev, x["noise"])
        assert prev.shape == x0.shape == (0, 3, 4)


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_learned_variance_is_read_from_the_model_output_halves(dtype, kernel_device):
    """A (B, 2C, H, W) model output split by channel: two views with batch stride 2·C·H·W, read in place."""
    output = make_inputs((2, 6, 9, 7), dtype=dtype, device=kernel_device)["model_output"]
    output[:, 3:] = output[:, 3:].tanh()  # the learned_range half: v ∈ [-1, 1]
    mean_view, var_view = output[:, :3], output[:, 3:]
    assert not var_view.is_contiguous() and var_view.stride(0) == 6 * 9 * 7
    x = make_inputs((2, 3, 9, 7), dtype=dtype, device=kernel_device, seed=1)
    a_t, a_prev = schedule(0.3, 0.5)
    check("ddpm_step", mean_view, x["sample"], a_t, a_prev, x["noise"], predicted_variance=var_view,
          variance_type="learned_range")
    uncond = make_inputs((2, 6, 9, 7), dtype=dtype, device=kernel_device, seed=2)["model_output"][:, :3]
    check("ddpm_step", mean_view, x["sample"], a_t, a_prev, x["noise"], predicted_variance=var_view,
          variance_type="learned_range", uncond_model_output=uncond, guidance_scale=4.0)


@pytest.mark.parametrize("kind", ["ddpm_step", "ddim_step"])
def test_guidance_halves_of_one_batch(kind, kernel_device):
    """CFG runs cond and uncond as one (2B, ...) batch: the halves are batch-sliced views."""
    both = make_inputs((4, 3, 8, 8), device=kernel_device)["model_output"]
    cond, uncond = both.chunk(2)
    x = make_inputs((2, 3, 8, 8), device=kernel_device, seed=1)
    a_t, a_prev = schedule(0.3, 0.5)
    check(kind, cond, x["sample"], a_t, a_prev, x["noise"], uncond_model_output=uncond, guidance_scale=7.5,
          dynamic_thresholding_ratio=0.8, sample_max_value=3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["ddpm_step", "ddim_step"])
def test_channels_last_stays_channels_last(kind, dtype, kernel_device):
    x = {name: t.contiguous(memory_format=torch.channels_last)
         for name, t in make_inputs((2, 5, 6, 7), dtype=dtype, device=kernel_device).items()}
    a_t, a_prev = schedule(0.3, 0.5)
    prev, x0 = check(kind, x["model_output"], x["sample"], a_t, a_prev, x["noise"], uncond_model_output=x["uncond"],
                     guidance_scale=2.0, clip_sample_range=1.0)
    assert prev.is_contiguous(memory_format=torch.channels_last)
    assert x0.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kind", ["ddpm_step", "ddim_step"])
def test_mixed_and_strided_layouts(kind, kernel_device):
    """Inputs laid out unlike the sample (contiguous vs channels_last, transposed, every other
    element, a batch-broadcast noise) are copied into the sample's layout or read with stride 0."""
    x = make_inputs((3, 4, 9, 6), device=kernel_device)
    sample = x["sample"].contiguous(memory_format=torch.channels_last)
    model_output = x["model_output"].transpose(2, 3).contiguous().transpose(2, 3)  # not channels_last
    uncond = make_inputs((3, 8, 9, 12), device=kernel_device, seed=1)["uncond"][:, ::2, :, ::2]
    noise = x["noise"][:1].expand(3, 4, 9, 6)
    a_t, a_prev = schedule(0.3, 0.5)
    prev, _ = check(kind, model_output, sample, a_t, a_prev, noise, uncond_model_output=uncond, guidance_scale=3.0)
    assert prev.is_contiguous(memory_format=torch.channels_last)


def test_sliced_sample_gives_contiguous_outputs(kernel_device):
    x = make_inputs((2, 6, 5, 5), device=kernel_device)
    sample = x["sample"][:, 1:4]
    a_t, a_prev = schedule(0.3, 0.5)
    prev, x0 = check("ddim_step", x["model_output"][:, :3], sample, a_t, a_prev)
    assert prev.is_contiguous() and x0.is_contiguous()


# ----------------------------------------------------------------------------- what is (not) read
def test_unused_inputs_are_not_used(kernel_device):
    """NaN-filled noise at η = 0 and a NaN predicted variance with a fixed variance type leave the
    results finite: the kernel never reads them (the reference ignores them too)."""
    x = make_inputs(SHAPE, device=kernel_device)
    nan = torch.full(SHAPE, float("nan"), device=kernel_device)
    a_t, a_prev = schedule(0.3, 0.5)
    prev, x0 = check("ddim_step", x["model_output"], x["sample"], a_t, a_prev, nan, eta=0.0)
    assert torch.isfinite(prev).all() and torch.isfinite(x0).all()
    prev, _ = check("ddpm_step", x["model_output"], x["sample"], a_t, a_prev, x["noise"], predicted_variance=nan,
                    variance_type="fixed_large")
    assert torch.isfinite(prev).all()
    prev, _ = check("ddpm_step", x["model_output"], x["sample"], a_t, a_prev, None, predicted_variance=nan,
                    variance_type="learned")  # last step: no noise, no variance
    assert torch.isfinite(prev).all()


def test_ddim_noise_is_ignored_at_eta_zero_and_used_above(kernel_device):
    x = make_inputs(SHAPE, device=kernel_device)
    a_t, a_prev = schedule(0.3, 0.5)
    without = steps.ddim_step(x["model_output"], x["sample"], a_t, a_prev, None, eta=0.0)[0]
    with_noise = steps.ddim_step(x["model_output"], x["sample"], a_t, a_prev, x["noise"], eta=0.0)[0]
    assert torch.equal(without, with_noise)
    assert not torch.equal(without, steps.ddim_step(x["model_output"], x["sample"], a_t, a_prev, x["noise"],
                                                    eta=0.5)[0])


# ----------------------------------------------------------------------------- property tests
unit = st.floats(2**-24, 1.0, width=32)  # ᾱ in (0, 1]; 2^-24 is diffusers' floor for zero terminal SNR


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    inner=st.lists(st.integers(1, 7), min_size=0, max_size=3),
    alphas=st.tuples(unit, unit),
    guidance_scale=st.one_of(st.none(), st.floats(0.0, 12.0, width=32)),
    prediction_type=st.sampled_from(PREDICTIONS),
    limit=st.sampled_from(list(X0_LIMITS)),
    variance_type=st.sampled_from(VARIANCE_TYPES),
    eta=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(batch, inner, alphas, guidance_scale, prediction_type, limit, variance_type,
                                    eta, seed):
    """Any shape, ᾱ_t ≤ ᾱ_{t-1} in (0, 1], any guidance scale and option: fp32 within 1e-6 (NaN
    where the reference has NaN, e.g. ᾱ_t = 1)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = make_inputs((batch, *inner), device=device, seed=seed)
    alpha_t, alpha_prev = sorted(alphas)
    uncond = dict(uncond_model_output=x["uncond"], guidance_scale=guidance_scale) if guidance_scale is not None else {}
    args, kwargs = ddpm_args(x, variance_type, False, True, limit, alpha_t, alpha_prev)
    kwargs.update(uncond)
    check("ddpm_step", *args, prediction_type=prediction_type, **kwargs)
    args, kwargs = ddim_args(x, eta, limit == "clip", False, True, limit, alpha_t, alpha_prev)
    kwargs.update(uncond)
    check("ddim_step", *args, prediction_type=prediction_type, **kwargs)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kind", ["ddpm_step", "ddim_step"])
@pytest.mark.parametrize("which", ["sample", "model_output", "noise", "uncond_model_output"])
def test_mixed_or_float64_dtypes_raise(kind, which, kernel_device):
    x = make_inputs(SHAPE, device=kernel_device)
    tensors = dict(model_output=x["model_output"], sample=x["sample"], noise=x["noise"],
                   uncond_model_output=x["uncond"])
    a_t, a_prev = schedule(0.3, 0.5)
    for dtype in (torch.float16, torch.float64):
        changed = {**tensors, which: tensors[which].to(dtype)}
        if which == "sample" and dtype == torch.float16:
            continue  # then the others are the odd ones: covered by the other cases
        with pytest.raises(Unsupported, match="dtype"):
            getattr(steps, kind)(changed["model_output"], changed["sample"], a_t, a_prev, changed["noise"],
                                 uncond_model_output=changed["uncond_model_output"],
                                 **({"eta": 1.0} if kind == "ddim_step" else {}))


def test_mixed_predicted_variance_dtype_raises(kernel_device):
    x = make_inputs(SHAPE, device=kernel_device)
    a_t, a_prev = schedule(0.3, 0.5)
    with pytest.raises(Unsupported, match="predicted_variance"):
        steps.ddpm_step(x["model_output"], x["sample"], a_t, a_prev, x["noise"],
                        predicted_variance=x["learned"].bfloat16(), variance_type="learned")


@pytest.mark.parametrize("alpha", [0.5, torch.tensor(0.5, dtype=torch.float64), torch.tensor([0.5, 0.6])],
                         ids=["float", "float64", "two_values"])
def test_schedule_values_must_be_float32_tensors(alpha, kernel_device):
    x = make_inputs(SHAPE, device=kernel_device)
    with pytest.raises(Unsupported, match="alpha_prod_t"):
        steps.ddim_step(x["model_output"], x["sample"], alpha, torch.tensor(0.7))


def test_tensor_guidance_scale_or_eta_raise(kernel_device):
    """A per-sample guidance scale (a tensor) works in the reference; the kernel hands it back."""
    x = make_inputs(SHAPE, device=kernel_device)
    a_t, a_prev = schedule(0.3, 0.5)
    with pytest.raises(Unsupported, match="guidance_scale"):
        steps.ddpm_step(x["model_output"], x["sample"], a_t, a_prev, uncond_model_output=x["uncond"],
                        guidance_scale=torch.full((3, 1, 1, 1), 2.0, device=kernel_device))
    with pytest.raises(Unsupported, match="eta"):
        steps.ddim_step(x["model_output"], x["sample"], a_t, a_prev, x["noise"], eta=torch.tensor(0.5))


def test_bad_options_raise_value_error(kernel_device):
    x = make_inputs(SHAPE, device=kernel_device)
    a_t, a_prev = schedule(0.3, 0.5)
    with pytest.raises(ValueError, match="prediction_type"):
        steps.ddim_step(x["model_output"], x["sample"], a_t, a_prev, prediction_type="x0")
    with pytest.raises(ValueError, match="variance_type"):
        steps.ddpm_step(x["model_output"], x["sample"], a_t, a_prev, variance_type="small")
    with pytest.raises(ValueError, match="predicted_variance"):
        steps.ddpm_step(x["model_output"], x["sample"], a_t, a_prev, x["noise"], variance_type="learned")


# ----------------------------------------------------------------------------- dispatch and configs
@pytest.mark.parametrize("kind", ["ddpm_step", "ddim_step"])
def test_ops_dispatches_to_the_kernel(kind, monkeypatch, kernel_device):
    module = importlib.import_module("fastdiff.kernels.scheduler_step")
    launcher, calls = getattr(module, kind), []

    def counted(*args, **kwargs):
        calls.append(1)
        return launcher(*args, **kwargs)

    monkeypatch.setattr(module, kind, counted)
    x = make_inputs(SHAPE, device=kernel_device)
    a_t, a_prev = schedule(0.3, 0.5)
    kwargs = dict(uncond_model_output=x["uncond"], guidance_scale=3.0, prediction_type="v_prediction")
    kwargs.update(eta=0.5) if kind == "ddim_step" else None
    for _ in range(2):
        with fastdiff.use_backend("triton"):
            out = getattr(ops, kind)(x["model_output"], x["sample"], a_t, a_prev, x["noise"], **kwargs)
    assert len(calls) == 2
    expected = getattr(reference, kind)(x["model_output"], x["sample"], a_t, a_prev, x["noise"], **kwargs)
    for actual, want in zip(out, expected):
        assert_matches(actual, want, FP32_TOL)


def test_launch_configs_cover_both_kernels_and_every_dtype():
    configs = steps.launch_configs()
    names = {(c.kernel.fn.__name__ if hasattr(c.kernel, "fn") else c.kernel.__name__, c.tags["dtype"])
             for c in configs}
    assert names == {(k, d) for k in ("_ddpm_step_kernel", "_ddim_step_kernel")
                     for d in ("float32", "float16", "bfloat16")}
    for config in configs:
        assert set(config.signature) == set(config.kernel.arg_names)
        assert all(config.signature[name] == "constexpr" for name in config.constexprs)


# ----------------------------------------------------------------------------- realistic sizes (GPU)
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["ddpm_step", "ddim_step"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
def test_gpu_cifar_batch(kind, dtype):
    """256 × 3 × 32 × 32 with guidance, thresholding and noise; ᾱ on the CPU and on the GPU."""
    x = make_inputs((256, 3, 32, 32), dtype=dtype, device="cuda")
    for device in ("cpu", "cuda"):
        a_t, a_prev = schedule(0.0123, 0.0234, device=device)
        kwargs = dict(uncond_model_output=x["uncond"], guidance_scale=7.5, dynamic_thresholding_ratio=0.995,
                      sample_max_value=2.5)
        if kind == "ddpm_step":
            kwargs.update(variance_type="learned_range", predicted_variance=x["learned_range"])
        else:
            kwargs.update(eta=1.0)
        check(kind, x["model_output"], x["sample"], a_t, a_prev, x["noise"], **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["ddpm_step", "ddim_step"])
def test_gpu_64m_elements(kind):
    """64M fp32 elements per tensor (4 × 4 × 2048 × 2048)."""
    shape = (4, 4, 2048, 2048)
    model_output, sample, noise = (torch.randn(shape, device="cuda") for _ in range(3))
    a_t, a_prev = schedule(0.3, 0.5)
    kwargs = dict(clip_sample_range=1.0) if kind == "ddpm_step" else dict(eta=0.5)
    check(kind, model_output, sample, a_t, a_prev, noise, **kwargs)
