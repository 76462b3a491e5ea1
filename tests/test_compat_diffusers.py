"""fastdiff.compat.diffusers against diffusers itself: the Fast* schedulers, FastAttnProcessor and
accelerate() give the stock pipelines' and models' numbers while the kernels run (``launches``).

Tolerance: fp32 results within 1e-5 relative to the tensor's scale. The scheduler steps agree to
~1 ulp (the step kernel computes diffusers' expressions in its order); attention differs from SDPA
by summation order only (~1e-7 relative), which a U-Net and 3 sampling steps do not amplify.
"""

import inspect
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import fastdiff  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402
from fastdiff.compat.diffusers import (FastAttnProcessor, FastDDIMScheduler, FastDDPMScheduler,  # noqa: E402
                                       accelerate)

SHAPE = (2, 3, 8, 8)


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws the same inputs on every run."""
    torch.manual_seed(0)


def assert_close(actual, expected, rel=1e-5):
    """|actual − expected| ≤ rel·max(1, max|expected|) elementwise, NaN only where expected has NaN."""
    scale = max(1.0, expected.abs().nan_to_num(0.0).max().item())
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * scale, equal_nan=True)


# ----------------------------------------------------------------------------- packaging
IMPORT_CHECK = """
import sys, fastdiff, fastdiff.compat
print(sorted(m for m in ('diffusers', 'fastdiff.compat.diffusers') if m in sys.modules))
sys.modules['diffusers'] = None  # as if it were not installed
try:
    import fastdiff.compat.diffusers
except ImportError as error:
    print(error)
"""


def test_diffusers_is_imported_only_with_the_compat_module():
    result = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == ["[]", "fastdiff.compat.diffusers needs diffusers (tested with 0.42): "
                                                "pip install diffusers"]


def test_head_dim_limit_matches_the_kernel():
    from fastdiff.compat import diffusers as compat
    from fastdiff.kernels import attention as kernel

    assert compat.MAX_HEAD_DIM == kernel.MAX_HEAD_DIM


# ----------------------------------------------------------------------------- schedulers: config and files
@pytest.mark.parametrize("stock_class, fast_class", [(diffusers.DDPMScheduler, FastDDPMScheduler),
                                                     (diffusers.DDIMScheduler, FastDDIMScheduler)])
def test_fast_scheduler_is_the_stock_one_for_config_and_files(stock_class, fast_class, tmp_path):
    stock = stock_class(num_train_timesteps=50, beta_schedule="scaled_linear", prediction_type="v_prediction",
                        timestep_spacing="trailing", thresholding=True)
    fast = fast_class.from_config(stock.config)
    assert isinstance(fast, stock_class) and stock_class in fast.compatibles

    def settings(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert settings(fast.config) == settings(stock.config)
    fast.save_pretrained(tmp_path / "fast")
    assert settings(stock_class.from_pretrained(tmp_path / "fast").config) == settings(stock.config)
    stock.save_pretrained(tmp_path / "stock")
    reloaded = fast_class.from_pretrained(tmp_path / "stock")
    assert type(reloaded) is fast_class and settings(reloaded.config) == settings(stock.config)


# ----------------------------------------------------------------------------- schedulers: step parity
def model_outputs(steps, channels, seed=1):
    """Stand-in model outputs, one per step; learned variances get valid values (σ² > 0, v in (−1, 1))."""
    gen = torch.Generator().manual_seed(seed)
    outputs = [torch.randn(SHAPE[0], channels, *SHAPE[2:], generator=gen) for _ in range(steps)]
    for out in outputs:
        out[:, SHAPE[1]:] = out[:, SHAPE[1]:].tanh().abs() + 0.01
    return outputs


def sample_loop(scheduler, steps, channels, step_kwargs):
    """A sampling loop with fixed stand-in model outputs; returns every step's (prev_sample, x̂0)."""
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(SHAPE, generator=gen)
    results = []
    for t, out in zip(scheduler.timesteps, model_outputs(steps, channels)):
        prev, x0 = scheduler.step(out, t, x, generator=gen, return_dict=False, **step_kwargs)
        results.append((prev, x0))
        x = prev
    return results


DDPM_CONFIGS = [
    dict(),
    dict(prediction_type="v_prediction", variance_type="fixed_small_log", timestep_spacing="trailing"),
    dict(prediction_type="sample", variance_type="fixed_large", clip_sample=False, steps_offset=1),
    dict(variance_type="learned", beta_schedule="squaredcos_cap_v2", clip_sample_range=0.5),
    dict(variance_type="learned_range", thresholding=True, sample_max_value=1.5, timestep_spacing="linspace"),
    dict(beta_schedule="scaled_linear", prediction_type="v_prediction", rescale_betas_zero_snr=True),
    dict(variance_type="other"),  # any name diffusers does not know: its fixed_small σ, never a refusal
]


@pytest.mark.parametrize("config", DDPM_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_ddpm_step_matches_diffusers_on_the_kernel(config, launches):
    channels = 6 if config.get("variance_type", "").startswith("learned") else 3
    expected = sample_loop(diffusers.DDPMScheduler(num_train_timesteps=100, **config), 4, channels, {})
    with fastdiff.use_backend("triton"):
        actual = sample_loop(FastDDPMScheduler(num_train_timesteps=100, **config), 4, channels, {})
    assert launches["ddpm_step"] == 4
    for (prev, x0), (prev_ref, x0_ref) in zip(actual, expected):
        assert_close(prev, prev_ref)
        assert_close(x0, x0_ref)


DDIM_CONFIGS = [
    (dict(), dict(eta=0.0)),
    (dict(prediction_type="v_prediction", set_alpha_to_one=False), dict(eta=0.5)),
    (dict(prediction_type="sample", beta_schedule="squaredcos_cap_v2"), dict(eta=1.0, use_clipped_model_output=True)),
    (dict(thresholding=True, timestep_spacing="trailing", steps_offset=1), dict(eta=0.3)),
    (dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="linspace"), dict(eta=0.8)),
]


@pytest.mark.parametrize("config, step_kwargs", DDIM_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_ddim_step_matches_diffusers_on_the_kernel(config, step_kwargs, launches):
    expected = sample_loop(diffusers.DDIMScheduler(num_train_timesteps=100, **config), 4, 3, step_kwargs)
    with fastdiff.use_backend("triton"):
        actual = sample_loop(FastDDIMScheduler(num_train_timesteps=100, **config), 4, 3, step_kwargs)
    assert launches["ddim_step"] == 4
    for (prev, x0), (prev_ref, x0_ref) in zip(actual, expected):
        assert_close(prev, prev_ref)
        assert_close(x0, x0_ref)


def test_ddim_variance_noise_and_output_dataclass(launches):
    stock, fast = diffusers.DDIMScheduler(num_train_timesteps=100), FastDDIMScheduler(num_train_timesteps=100)
    stock.set_timesteps(5), fast.set_timesteps(5)
    out, x, noise = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    expected = stock.step(out, 60, x, eta=0.7, variance_noise=noise)
    with fastdiff.use_backend("triton"):
        actual = fast.step(out, 60, x, eta=0.7, variance_noise=noise)
    assert launches["ddim_step"] == 1
    assert type(actual) is type(expected)
    assert_close(actual.prev_sample, expected.prev_sample)
    assert_close(actual.pred_original_sample, expected.pred_original_sample)
    with pytest.raises(ValueError, match="generator"):
        fast.step(out, 60, x, eta=0.7, variance_noise=noise, generator=torch.Generator())


def test_ddpm_previous_timestep_is_diffusers(launches):
    # without set_timesteps diffusers' DDPM steps to t − 1 (fastdiff's own scheduler refuses): kept;
    # custom timesteps step to the next one given
    stock, fast = diffusers.DDPMScheduler(num_train_timesteps=100), FastDDPMScheduler(num_train_timesteps=100)
    out, x = torch.randn(SHAPE), torch.randn(SHAPE)
    for timesteps in (None, [90, 61, 7, 0]):
        if timesteps is not None:
            stock.set_timesteps(timesteps=timesteps), fast.set_timesteps(timesteps=timesteps)
        for t in timesteps or [50]:
            expected = stock.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
            with fastdiff.use_backend("triton"):
                actual = fast.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
            assert_close(actual, expected)
    assert launches["ddpm_step"] == 5
    with pytest.raises(ValueError, match="set_timesteps"):
        FastDDIMScheduler().step(out, 500, x)


@pytest.mark.parametrize("case", ["float64", "fixed_large_log", "broadcast noise"])
def test_what_the_kernels_cannot_match_runs_diffusers_code(case, launches):
    variance_type = "fixed_large_log" if case == "fixed_large_log" else "fixed_small"
    config = dict(num_train_timesteps=100, variance_type=variance_type)
    dtype = torch.float64 if case == "float64" else torch.float32
    stock, fast = diffusers.DDPMScheduler(**config), FastDDPMScheduler(**config)
    out, x = torch.randn(SHAPE, dtype=dtype), torch.randn(SHAPE, dtype=dtype)
    with fastdiff.use_backend("triton"):
        if case == "broadcast noise":
            noise, t = torch.randn(1, *SHAPE[1:]), torch.tensor([10, 90])
            actual, expected = fast.add_noise(x, noise, t), stock.add_noise(x, noise, t)
        else:
            stock.set_timesteps(4), fast.set_timesteps(4)
            expected = stock.step(out, 50, x, generator=torch.Generator().manual_seed(0)).prev_sample
            actual = fast.step(out, 50, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert sum(launches.values()) == 0
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)
    assert actual.dtype == dtype and (case != "fixed_large_log" or actual.isnan().all())


@pytest.mark.parametrize("timesteps", [torch.tensor([3, 40, 77, 99]), torch.tensor(55, dtype=torch.int32)])
def test_add_noise_and_get_velocity_on_the_kernel(timesteps, launches):
    stock = diffusers.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    fast = FastDDIMScheduler.from_config(stock.config)
    x0, noise = torch.randn(4, 3, 5, 7), torch.randn(4, 3, 5, 7)
    with fastdiff.use_backend("triton"):
        noisy, velocity = fast.add_noise(x0, noise, timesteps), fast.get_velocity(x0, noise, timesteps)
    assert launches["q_sample"] == 2
    assert_close(noisy, stock.add_noise(x0, noise, timesteps))
    assert_close(velocity, stock.get_velocity(x0, noise, timesteps))


# ----------------------------------------------------------------------------- the attention processor
def test_processor_has_diffusers_call_signature():
    ours = inspect.signature(FastAttnProcessor.__call__).parameters
    theirs = inspect.signature(AttnProcessor2_0.__call__).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == \
        [(p.name, p.kind, p.default) for p in theirs.values()]


def perturbed(module):
    """Random weights everywhere, norms included (their default 1/0 affine would hide a skipped one)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return module.eval()


# (Attention keywords, hidden_states shape, encoder_hidden_states shape or None, temb shape or None)
ATTENTION_CASES = {
    "4d-spatial-group-residual-rescale-d40": (
        dict(query_dim=64, heads=2, dim_head=40, spatial_norm_dim=4, norm_num_groups=8, residual_connection=True,
             rescale_output_factor=2.0, bias=True), (2, 64, 3, 5), None, (2, 4, 2, 3)),
    "3d-cross-qknorm-layernorm-d8": (
        dict(query_dim=24, cross_attention_dim=20, heads=3, dim_head=8, qk_norm="layer_norm",
             cross_attention_norm="layer_norm"), (2, 11, 24), (2, 7, 20), None),
    "3d-cross-groupnorm-d12": (
        dict(query_dim=24, cross_attention_dim=20, heads=2, dim_head=12, cross_attention_norm="group_norm",
             cross_attention_norm_num_groups=4, residual_connection=True), (2, 9, 24), (2, 5, 20), None),
    "4d-self-vae-style-d96": (
        dict(query_dim=96, heads=1, dim_head=96, norm_num_groups=32, residual_connection=True,
             rescale_output_factor=1.5, bias=True, eps=1e-6), (1, 96, 4, 4), None, None),
}


def run_processor(attn, processor, hidden, encoder=None, temb=None, **kwargs):
    attn.set_processor(processor)
    return attn(hidden, encoder_hidden_states=encoder, temb=temb, **kwargs)


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_processor_matches_attn_processor_2_0_on_the_kernel(case, launches):
    kwargs, hidden_shape, encoder_shape, temb_shape = ATTENTION_CASES[case]
    attn = perturbed(Attention(**kwargs))
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(hidden_shape, generator=gen)
    encoder = torch.randn(encoder_shape, generator=gen) if encoder_shape else None
    temb = torch.randn(temb_shape, generator=gen) if temb_shape else None
    with torch.no_grad():
        expected = run_processor(attn, AttnProcessor2_0(), hidden, encoder, temb)
        with fastdiff.use_backend("triton"):
            actual = run_processor(attn, FastAttnProcessor(), hidden, encoder, temb)
    assert launches["attention"] == 1
    assert actual.shape == expected.shape == hidden.shape
    assert_close(actual, expected)


@pytest.mark.parametrize("case", ["mask", "head dim 264", "autograd", "float64"])
def test_processor_runs_sdpa_where_the_kernel_cannot(case, launches):
    attn = perturbed(Attention(query_dim=16, heads=2, dim_head=264 if case == "head dim 264" else 8))
    dtype = torch.float64 if case == "float64" else torch.float32
    attn.to(dtype)
    hidden = torch.randn(2, 6, 16, dtype=dtype, requires_grad=case == "autograd")
    kwargs = {"attention_mask": torch.tensor([[0.0] * 4 + [-1e4] * 2] * 2)} if case == "mask" else {}
    with torch.set_grad_enabled(case == "autograd"):  # the weights require grad: only that case records
        expected = run_processor(attn, AttnProcessor2_0(), hidden, **kwargs)
        with fastdiff.use_backend("triton"):
            actual = run_processor(attn, FastAttnProcessor(), hidden, **kwargs)
    assert launches["attention"] == 0
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    if case == "autograd":
        (grad,) = torch.autograd.grad(actual.sum(), hidden)
        (grad_ref,) = torch.autograd.grad(expected.sum(), hidden)
        torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)


def test_processor_warns_about_the_deprecated_scale_argument_like_diffusers():
    # Attention.forward drops a `scale` keyword; called directly, both processors warn and ignore it
    attn, hidden = perturbed(Attention(query_dim=16, heads=2, dim_head=8)), torch.randn(1, 4, 16)
    with pytest.warns(FutureWarning, match="scale"):
        expected = AttnProcessor2_0()(attn, hidden, scale=0.5)
    with pytest.warns(FutureWarning, match="scale"):
        actual = FastAttnProcessor()(attn, hidden, scale=0.5)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- models
def tiny_unet():
    torch.manual_seed(0)
    # attention_head_dim 12: two heads of 12 at 24 channels (not a power of two); attention in a
    # down block, an up block and the mid block
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(12, 24), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=2, attention_head_dim=12).eval()  # 2 groups: few GroupNorm programs to interpret


def tiny_conditional_unet():
    torch.manual_seed(0)
    # heads = attention_head_dim = 2 (diffusers' naming): head dims 12 and 24; cross-attention to 20-dim tokens
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(24, 48), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=20, attention_head_dim=2, norm_num_groups=2).eval()


def attention_modules(model):
    return [m for m in model.modules() if isinstance(m, Attention)]


@pytest.mark.parametrize("conditional", [False, True], ids=["UNet2DModel", "UNet2DConditionModel"])
def test_accelerated_unet_forward_matches_stock(conditional, launches):
    model = tiny_conditional_unet() if conditional else tiny_unet()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, model.config.in_channels, 8, 8, generator=gen)
    kwargs = {"encoder_hidden_states": torch.randn(2, 5, 20, generator=gen)} if conditional else {}
    with torch.no_grad():
        expected = model(x, 37, **kwargs).sample
        assert accelerate(model) is model
        with fastdiff.use_backend("triton"):
            actual = model(x, 37, **kwargs).sample
    modules = attention_modules(model)
    assert modules and all(isinstance(m.processor, FastAttnProcessor) for m in modules)
    assert launches["attention"] == len(modules)  # every attention module ran the kernel once
    assert launches["group_norm"] == sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules())  # each once
    assert_close(actual, expected)


@pytest.fixture
def stock_group_norm(monkeypatch):
    """GroupNorm on the stock op in an accelerated model: the pipeline tests check the schedulers'
    and attention's kernels, and each interpreted GroupNorm launch costs ~0.1 s here. The GroupNorm
    kernel inside diffusers' models: tests/test_compat_group_norm.py and tests/test_compat_sd.py."""
    from fastdiff.compat import _group_norm

    monkeypatch.setattr(_group_norm, "kernel_takes", lambda norm, x: False)


# ----------------------------------------------------------------------------- pipelines
def tiny_pipeline(kind):
    config = dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    if kind == "ddpm":
        pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler(**config))
    else:
        pipe = diffusers.DDIMPipeline(unet=tiny_unet(), scheduler=diffusers.DDIMScheduler(**config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, **kwargs):
    return pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(5), output_type="pt",
                **kwargs).images


@pytest.mark.parametrize("kind, eta", [("ddpm", None), ("ddim", 0.0), ("ddim", 0.6)])
def test_accelerated_pipeline_gives_the_stock_images(kind, eta, launches, stock_group_norm):
    pipe = tiny_pipeline(kind)
    kwargs = {} if eta is None else {"eta": eta}
    expected = images(pipe, **kwargs)
    assert accelerate(pipe) is pipe
    assert type(pipe.scheduler) is (FastDDPMScheduler if kind == "ddpm" else FastDDIMScheduler)
    with fastdiff.use_backend("triton"):
        actual = images(pipe, **kwargs)
    assert launches[f"{kind}_step"] == 3
    assert launches["attention"] == 3 * len(attention_modules(pipe.unet))
    assert_close(actual, expected)
    assert actual.std() > 0.05  # real images, not a constant both sides agree on


@pytest.mark.parametrize("stock, config", [("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
                                           ("EulerAncestralDiscreteScheduler", {})])
def test_accelerated_multistep_pipeline_gives_the_stock_images(stock, config, launches, stock_group_norm):
    """DDPMPipeline with a multistep scheduler (it passes the generator to step: noise in diffusers' order).
    Linear betas: with the cosine schedule's σ_max (T = 100) diffusers' own float32 Euler-ancestral step
    loses ~1e-4 to cancellation (tests/test_compat_euler.py compares with diffusers in float64 there)."""
    pipe = tiny_pipeline("ddpm")
    pipe.scheduler = getattr(diffusers, stock).from_config(pipe.scheduler.config, beta_schedule="linear", **config)
    expected = images(pipe)
    accelerate(pipe)
    assert type(pipe.scheduler).__name__ == f"Fast{stock}"
    with fastdiff.use_backend("triton"):
        actual = images(pipe)
    assert launches["multistep_update"] == 3
    assert_close(actual, expected)
    assert actual.std() > 0.05


def test_accelerate_is_idempotent():
    pipe = accelerate(tiny_pipeline("ddim"))
    scheduler, processors = pipe.scheduler, [m.processor for m in attention_modules(pipe.unet)]
    assert accelerate(pipe) is pipe and pipe.scheduler is scheduler
    assert [m.processor for m in attention_modules(pipe.unet)] == processors
    assert all(type(p) is FastAttnProcessor for p in processors)
    assert pipe.config.scheduler[1] == "FastDDIMScheduler"


def test_accelerated_pipeline_saves_and_loads(tmp_path):
    pipe = accelerate(tiny_pipeline("ddpm"))
    pipe.save_pretrained(tmp_path)
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is FastDDPMScheduler
    assert loaded.scheduler.config.beta_schedule == "squaredcos_cap_v2"


# ----------------------------------------------------------------------------- unsupported input
def test_accelerate_rejects_what_it_cannot_accelerate():
    with pytest.raises(TypeError, match="pipe_or_model"):
        accelerate("unet")
    with pytest.raises(ValueError, match="no diffusers Attention modules and no GroupNorm"):
        accelerate(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="fastdiff's own UNet2D already runs its fused ops"):
        accelerate(fastdiff.UNet2D(sample_size=8, block_out_channels=(8, 16), attention_resolutions=(4,),
                                   norm_num_groups=4))


def test_a_scheduler_without_a_drop_in_stays_and_the_models_are_still_accelerated(caplog):
    pipe = tiny_pipeline("ddpm")
    # no drop-in; it takes DDPMPipeline's generator (Heun would not)
    pipe.scheduler = diffusers.KDPM2AncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    expected = images(pipe)
    with pytest.warns(UserWarning, match="KDPM2AncestralDiscreteScheduler has no fastdiff drop-in.*stays as it is"), \
            caplog.at_level("INFO", logger="fastdiff"):
        accelerate(pipe)
    assert type(pipe.scheduler) is diffusers.KDPM2AncestralDiscreteScheduler  # left untouched
    assert all(type(m.processor) is FastAttnProcessor for m in attention_modules(pipe.unet))
    assert type(pipe.unet.conv_norm_out).__name__ == "FastGroupNormSiLU"
    summary = [r.getMessage() for r in caplog.records if r.name == "fastdiff"]
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in pipe.unet.modules())
    resnets = sum(isinstance(m, ResnetBlock2D) for m in pipe.unet.modules())  # norm1 and norm2 each fused
    assert summary == ["accelerate(DDPMPipeline): scheduler KDPM2AncestralDiscreteScheduler left as it is; "
                       f"unet: {len(attention_modules(pipe.unet))} attention, {norms} GroupNorm "
                       f"({2 * resnets + 1} with their SiLU)"]
    assert_close(images(pipe), expected)  # the torch backend: the stock ops, the stock images


def test_the_drop_in_gets_the_effective_config_of_a_patched_scheduler():
    """StableDiffusionPipeline's constructor rewrites steps_offset (and clip_sample) of legacy
    configs in place; diffusers' from_config would drop them again, as keys the scheduler took by
    default (``_use_default_values``): the drop-in would sample other timesteps."""
    from diffusers.configuration_utils import FrozenDict

    from fastdiff.compat.diffusers import FastPNDMScheduler

    for stock in (diffusers.PNDMScheduler(), diffusers.DDIMScheduler()):  # made with default arguments
        assert "steps_offset" in stock.config["_use_default_values"]
        stock._internal_dict = FrozenDict({**stock.config, "steps_offset": 1})  # the pipeline's patch
        pipe = tiny_pipeline("ddim")
        pipe.scheduler = stock
        accelerate(pipe)
        fast = pipe.scheduler
        assert type(fast) in (FastPNDMScheduler, FastDDIMScheduler) and dict(fast.config) == dict(stock.config)
        for scheduler in (stock, fast):
            scheduler.set_timesteps(10)
        assert torch.equal(fast.timesteps, stock.timesteps) and fast.timesteps[-1] == 1


@pytest.mark.parametrize("stock", ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
                                   "UniPCMultistepScheduler", "EulerDiscreteScheduler",
                                   "EulerAncestralDiscreteScheduler", "PNDMScheduler"])
def test_accelerate_swaps_in_each_schedulers_twin(stock):
    from fastdiff.compat import diffusers as compat

    pipe = tiny_pipeline("ddpm")
    pipe.scheduler = getattr(diffusers, stock).from_config(pipe.scheduler.config, steps_offset=1)
    accelerate(pipe)
    fast = pipe.scheduler
    assert type(fast) is getattr(compat, f"Fast{stock}") and isinstance(fast, getattr(diffusers, stock))
    assert fast.config.steps_offset == 1 and fast.config.beta_schedule == "squaredcos_cap_v2"  # the same config
    assert accelerate(pipe).scheduler is fast  # idempotent


def test_other_processors_are_kept_with_a_warning():
    model = tiny_unet()
    for module in attention_modules(model):  # the classic processor: not what FastAttnProcessor reproduces
        module.set_processor(AttnProcessor())
    attention_modules(model)[0].set_processor(AttnProcessor2_0())
    with pytest.warns(UserWarning, match="3 attention module\\(s\\) of UNet2DModel keep their processor \\(AttnProcessor\\)"):
        accelerate(model)
    kinds = [type(m.processor) for m in attention_modules(model)]
    assert kinds[0] is FastAttnProcessor and kinds[1:] == [AttnProcessor] * 3
    assert type(model.conv_norm_out).__name__ == "FastGroupNormSiLU"  # the GroupNorms are swapped all the same


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_fp16_conditional_unet_is_as_accurate_as_stock():
    """Stable-Diffusion-sized attention (head dims 40 and 80, 77 text tokens) under the 'auto'
    backend: the accelerated fp16 U-Net's error against fp32 is at most ~2x stock fp16's."""
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=32, block_out_channels=(320, 640), layers_per_block=1, cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8).cuda().eval()
    x, text = torch.randn(2, 4, 32, 32, device="cuda"), torch.randn(2, 77, 768, device="cuda")
    with torch.no_grad(), fastdiff.use_backend("auto"):
        reference = model(x, 500, encoder_hidden_states=text).sample
        model.half()
        stock = model(x.half(), 500, encoder_hidden_states=text.half()).sample.float()
        accelerate(model)
        fast = model(x.half(), 500, encoder_hidden_states=text.half()).sample.float()
    stock_error = (stock - reference).abs().max().item()
    assert (fast - reference).abs().max().item() <= 2 * stock_error + 1e-3


@pytest.mark.gpu
def test_gpu_pipeline_gives_the_stock_images(launches, monkeypatch):
    # TF32 convolutions (cuDNN's default; matmuls default to fp32) would round the two runs' ~1e-7
    # attention differences up to ~1e-4; in true fp32 both pipelines must agree to 1e-5
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    pipe = tiny_pipeline("ddim").to("cuda")
    expected = images(pipe, eta=0.5)
    accelerate(pipe)
    with fastdiff.use_backend("auto"):
        actual = images(pipe, eta=0.5)
    assert launches["ddim_step"] == 3 and launches["attention"] > 0
    assert_close(actual, expected)
