"""fastdiff.compat.diffusers.accelerate on a Stable Diffusion pipeline: diffusers'
``StableDiffusionPipeline`` and ``StableDiffusionImg2ImgPipeline`` with a tiny random U-Net, VAE and
CLIP text encoder and a CLIP tokenizer of a vocabulary written in the test (tests/sd_helpers.py;
nothing is downloaded). Each test runs the stock pipeline, accelerates it, runs it again under the
'triton' backend with the same generator seed, and checks

* the images: equal to ``ATOL`` = 1e-5, absolute, on the pipeline's [0, 1] images. That is the
  tolerance of tests/test_compat_diffusers.py (1e-5 relative to max(1, scale)) for tensors whose
  scale is 1: a tenth of 1e-4, 400× below an 8-bit image's step (1/255). Measured: ≤ 9e-7 for every
  case. The scheduler kernels agree with diffusers to ~1 ulp; the attention and GroupNorm kernels
  differ from SDPA and F.group_norm by summation order only (~1e-7 relative), which
  classifier-free guidance at 7.5 (a difference amplified 7.5×), 3 U-Net passes and the VAE
  decoder bring to ~1e-6 at most. The images are checked to be real ones (std > 0.05, almost no
  pixel clamped to 0 or 1), so the comparison is not one of saturated pixels;
* that the kernels ran, with the launcher counts of ``launches`` against what the stock run did
  (counted there): the scheduler's step kernel once per stock ``scheduler.step`` (``ddpm_step``,
  ``ddim_step``, else ``multistep_update``), the attention kernel once per forward of a diffusers
  ``Attention`` module (U-Net and VAE; CLIP's attention is transformers' own and not swapped), the
  ``q_sample`` kernel once per ``add_noise`` for DDIM img2img, and ``group_norm`` at least once per
  ``torch.nn.functional.group_norm`` call (diffusers' ``nn.GroupNorm`` modules and its attention's
  group norm all call it; at least: a fused GroupNorm+SiLU is one launch for one F.group_norm).
  The stock run itself launches no kernel (checked), and runs on deep copies of the models, since
  accelerate changes modules in place.

Sizes are the interpreter's (tests/sd_helpers.py: why): 8×8 images, 4×4 latents, 16 text tokens, 3
sampling steps; per stock image 77 F.group_norm calls and 25 Attention forwards (PNDM: 98 and 33,
one U-Net pass more; img2img: 87 and 26, the VAE encoder too). About 7-10 s a test, 85 s the file,
on the Triton interpreter (2 shared CPU cores).
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import fastdiff  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402
from fastdiff.compat.diffusers import FastAttnProcessor, accelerate  # noqa: E402
from sd_helpers import IMAGE_SIZE, fresh_components, make_components, make_scheduler, reference_image  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5
STEPS = 3
GUIDANCE = 7.5
PROMPT, NEGATIVE_PROMPT = "a photo of a red cat", "blurry ugly dark"
# diffusers scheduler -> the fastdiff launcher its accelerated step runs
STEP_KERNELS = {
    "DDPMScheduler": "ddpm_step",
    "DDIMScheduler": "ddim_step",
    "PNDMScheduler": "multistep_update",
    "EulerDiscreteScheduler": "multistep_update",
    "EulerAncestralDiscreteScheduler": "multistep_update",
    "DPMSolverMultistepScheduler": "multistep_update",
    "UniPCMultistepScheduler": "multistep_update",
}


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    """The models and tokenizer, built once (seeded); tests take deep copies (``fresh_components``)."""
    return make_components(tmp_path_factory.mktemp("sd_tokenizer"))


def make_pipeline(pipeline_class, components, scheduler_name):
    pipe = pipeline_class(**fresh_components(components), scheduler=make_scheduler(scheduler_name))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def attention_modules(pipe):
    return [m for c in pipe.components.values() if isinstance(c, torch.nn.Module)
            for m in c.modules() if isinstance(m, Attention)]


def generate(pipe, **kwargs):
    return pipe(prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, guidance_scale=GUIDANCE, output_type="pt",
                generator=torch.Generator().manual_seed(11), **kwargs).images


@contextlib.contextmanager
def counting_stock_calls(pipe, monkeypatch):
    """Counts, while the block runs: F.group_norm calls, diffusers Attention forwards, and the
    scheduler's step and add_noise calls (wrapped with functools.wraps: the pipeline inspects
    step's signature to decide whether to pass eta and the generator)."""
    counts = {"group_norm": 0, "attention": 0, "step": 0, "add_noise": 0}

    def counted(name, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return wrapper

    def count_attention(*_):
        counts["attention"] += 1

    hooks = [m.register_forward_pre_hook(count_attention) for m in attention_modules(pipe)]
    try:
        with monkeypatch.context() as patch:
            patch.setattr(torch.nn.functional, "group_norm", counted("group_norm", torch.nn.functional.group_norm))
            for name in ("step", "add_noise"):
                patch.setattr(pipe.scheduler, name, counted(name, getattr(pipe.scheduler, name)))
            yield counts
    finally:
        for hook in hooks:
            hook.remove()


def stock_then_accelerated(pipe, launches, monkeypatch, **kwargs):
    """(stock images, accelerated images under 'triton', the stock run's call counts)."""
    stock_scheduler = type(pipe.scheduler).__name__
    modules = attention_modules(pipe)
    assert modules and all(type(m.processor) is AttnProcessor2_0 for m in modules)  # truly stock
    with counting_stock_calls(pipe, monkeypatch) as stock:
        expected = generate(pipe, **kwargs)
    assert sum(launches.values()) == 0  # the stock run is diffusers' code only

    assert accelerate(pipe) is pipe
    assert type(pipe.scheduler).__name__ == f"Fast{stock_scheduler}"
    assert all(isinstance(m.processor, FastAttnProcessor) for m in attention_modules(pipe))
    with fastdiff.use_backend("triton"):
        actual = generate(pipe, **kwargs)
    return expected, actual, stock


def assert_same_images(actual, expected):
    assert actual.shape == expected.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL)
    inside = ((expected > 0) & (expected < 1)).float().mean().item()
    assert expected.std() > 0.05 and inside > 0.95  # real images, not a constant or clamped pixels


# ----------------------------------------------------------------------------- text to image
@pytest.mark.parametrize("scheduler", STEP_KERNELS)
def test_accelerated_sd_pipeline_gives_the_stock_images(scheduler, components, launches, monkeypatch):
    pipe = make_pipeline(diffusers.StableDiffusionPipeline, components, scheduler)
    expected, actual, stock = stock_then_accelerated(pipe, launches, monkeypatch, num_inference_steps=STEPS,
                                                     height=IMAGE_SIZE, width=IMAGE_SIZE)
    # PNDM as SD ships it (skip_prk_steps) takes one step more than asked: the PLMS warm-up
    assert stock["step"] == STEPS + (scheduler == "PNDMScheduler")
    assert launches[STEP_KERNELS[scheduler]] == stock["step"]
    assert launches["attention"] == stock["attention"] > 0
    assert_same_images(actual, expected)
    assert stock["group_norm"] > 0
    assert launches["group_norm"] >= stock["group_norm"]


# ----------------------------------------------------------------------------- image to image
# (scheduler, step keywords, id); DDIM with eta > 0 draws noise from the generator in each step
IMG2IMG_CASES = [("DPMSolverMultistepScheduler", {}, "DPMSolverMultistepScheduler"),
                 ("DDIMScheduler", {"eta": 0.5}, "DDIMScheduler-eta0.5")]


@pytest.mark.parametrize("scheduler, step_kwargs", [case[:2] for case in IMG2IMG_CASES],
                         ids=[case[2] for case in IMG2IMG_CASES])
def test_accelerated_img2img_pipeline_gives_the_stock_images(scheduler, step_kwargs, components, launches,
                                                             monkeypatch):
    """Guided by a fixed random image: the VAE encodes it (a generator draw), ``add_noise`` noises it
    to the strength's timestep, and sampling starts there (``set_begin_index``): 5 steps at
    strength 0.6 run the last 3."""
    pipe = make_pipeline(diffusers.StableDiffusionImg2ImgPipeline, components, scheduler)
    expected, actual, stock = stock_then_accelerated(pipe, launches, monkeypatch, image=reference_image(),
                                                     strength=0.6, num_inference_steps=5, **step_kwargs)
    assert stock["step"] == 3 and stock["add_noise"] == 1
    assert launches[STEP_KERNELS[scheduler]] == stock["step"]
    if scheduler == "DDIMScheduler":  # DDPM's and DDIM's add_noise are fused (q_sample)
        assert launches["q_sample"] == stock["add_noise"]
    assert launches["attention"] == stock["attention"] > 0
    assert_same_images(actual, expected)
    assert stock["group_norm"] > 0
    assert launches["group_norm"] >= stock["group_norm"]


# ----------------------------------------------------------------------------- the scheduler's effective config
def test_a_scheduler_made_with_default_arguments_keeps_the_pipelines_patch(components):
    """The issue's case: a PNDMScheduler made with default arguments (but SD's skip_prk_steps; PRK
    needs more than 3 steps) so steps_offset=0 is listed in
    ``_use_default_values``). StableDiffusionPipeline's constructor patches steps_offset to 1 in
    place (with a deprecation warning); a drop-in built with diffusers' from_config alone would
    lose the patch and sample other timesteps (a maximum pixel difference of 0.69 was seen). On the
    torch backend the drop-in's step is fastdiff's reference: only the schedule can differ here."""
    with pytest.warns(FutureWarning, match="steps_offset"):
        pipe = diffusers.StableDiffusionPipeline(**fresh_components(components), scheduler=diffusers.PNDMScheduler(skip_prk_steps=True))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.steps_offset == 1 and "steps_offset" in pipe.scheduler.config._use_default_values
    kwargs = dict(num_inference_steps=STEPS, height=IMAGE_SIZE, width=IMAGE_SIZE)
    expected = generate(pipe, **kwargs)
    accelerate(pipe)
    assert type(pipe.scheduler).__name__ == "FastPNDMScheduler" and pipe.scheduler.config.steps_offset == 1
    assert_same_images(generate(pipe, **kwargs), expected)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("scheduler", ["DPMSolverMultistepScheduler", "PNDMScheduler"])
def test_gpu_cuda_graph_pipeline_gives_the_eager_images(scheduler, components, monkeypatch):
    """accelerate(pipe, cuda_graph=True) on a GPU: the UNet forward (one signature: batch 2 with
    guidance) captured once and replayed every step, the VAE decode once; same images as the
    accelerated eager pipeline. TF32 off: both runs then compute in fp32."""
    from fastdiff.compat import _graphs

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    kwargs = dict(num_inference_steps=STEPS, height=IMAGE_SIZE, width=IMAGE_SIZE)
    with fastdiff.use_backend("auto"):
        eager = accelerate(make_pipeline(diffusers.StableDiffusionPipeline, components, scheduler).to("cuda"))
        expected = generate(eager, **kwargs)
        graphed = accelerate(make_pipeline(diffusers.StableDiffusionPipeline, components, scheduler).to("cuda"),
                             cuda_graph=True)
        actual = generate(graphed, **kwargs)
        again = generate(graphed, **kwargs)
    unet_graph, = _graphs.graphed(graphed.unet)
    assert unet_graph.captures == 1 and len(_graphs.graphed(graphed.vae)) == 1
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)
    assert torch.equal(again, actual)
