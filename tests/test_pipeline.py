"""DiffusionPipeline: same images as diffusers' pipelines, guidance, SDEdit, persistence, bad input."""

import pytest
import torch

import fastdiff
from fastdiff import DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2D

TINY = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
            attention_resolutions=(4,), norm_num_groups=8, dropout=0.0)


def tiny_pipeline(num_classes=None, scheduler=None, seed=0):
    torch.manual_seed(seed)
    unet = UNet2D(**TINY, num_classes=num_classes).eval()
    return DiffusionPipeline(unet, scheduler or DDIMScheduler(num_train_timesteps=100))


def run(pipe, **kwargs):
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    kwargs.setdefault("num_inference_steps", 5)
    return pipe(progress=False, **kwargs).images


# ----------------------------------------------------------------------------- diffusers parity
@pytest.mark.parametrize("kind, eta", [("ddim", 0.0), ("ddim", 0.5), ("ddim", 1.0), ("ddpm", 0.0), ("pndm", 0.0)])
def test_same_images_as_diffusers_pipeline(kind, eta):
    diffusers = pytest.importorskip("diffusers")
    config = dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    ours_sched = fastdiff.schedulers.scheduler_class(kind).from_config(config)
    pipe = tiny_pipeline(scheduler=ours_sched)
    theirs_unet = diffusers.UNet2DModel(**pipe.unet.config.to_diffusers()).eval()
    theirs_unet.load_state_dict(pipe.unet.state_dict(), strict=True)
    theirs_sched = getattr(diffusers, type(ours_sched).__name__).from_config(ours_sched.config)
    cls = {"ddim": diffusers.DDIMPipeline, "ddpm": diffusers.DDPMPipeline, "pndm": diffusers.PNDMPipeline}[kind]
    theirs = cls(unet=theirs_unet, scheduler=theirs_sched)
    theirs.set_progress_bar_config(disable=True)

    extra = {"eta": eta} if kind == "ddim" else {}
    expected = theirs(batch_size=3, num_inference_steps=8, output_type="np",
                      generator=torch.Generator().manual_seed(7), **extra).images
    ours = run(pipe, batch_size=3, num_inference_steps=8, generator=torch.Generator().manual_seed(7), eta=eta)
    torch.testing.assert_close(ours.permute(0, 2, 3, 1), torch.from_numpy(expected), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- guidance
def test_guidance_batches_cond_and_uncond_passes():
    pipe = tiny_pipeline(num_classes=4)
    w, labels = 3.0, torch.tensor([0, 3])
    images = run(pipe, batch_size=2, class_labels=labels, guidance_scale=w)

    # the same loop by hand: two separate U-Net passes, combined outside the step
    sched, unet = pipe.scheduler, pipe.unet
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    null = torch.full_like(labels, unet.null_class)
    sched.set_timesteps(5)
    with torch.no_grad():
        for t in sched.timesteps:
            cond, uncond = unet(x, t, labels), unet(x, t, null)
            x = sched.step(uncond + w * (cond - uncond), t, x, generator=gen).prev_sample
    torch.testing.assert_close(images, (x / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_guidance_scale_one_is_the_conditional_model():
    pipe = tiny_pipeline(num_classes=4)
    a = run(pipe, batch_size=2, class_labels=[1, 2], guidance_scale=1.0)
    b = run(pipe, batch_size=2, class_labels=[1, 2], guidance_scale=None)  # saved default is 1
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, run(pipe, batch_size=2, class_labels=[3, 0]))


def test_one_label_broadcasts_and_unconditional_uses_null_class():
    pipe = tiny_pipeline(num_classes=4)
    torch.testing.assert_close(run(pipe, batch_size=2, class_labels=2), run(pipe, batch_size=2, class_labels=[2, 2]))
    images = run(pipe, batch_size=2)
    assert images.shape == (2, 3, 8, 8) and images.min() >= 0 and images.max() <= 1


# ----------------------------------------------------------------------------- SDEdit
def test_sdedit_starts_from_the_noised_reference():
    pipe = tiny_pipeline()
    reference = torch.rand(3, 8, 8)
    out = run(pipe, batch_size=2, image=reference, strength=0.4, num_inference_steps=10)
    assert out.shape == (2, 3, 8, 8)
    # 4 of 10 steps: the scheduler ran exactly the last 4 timesteps
    sched = DDIMScheduler(num_train_timesteps=100)
    sched.set_timesteps(10)
    gen = torch.Generator().manual_seed(0)
    timesteps = sched.timesteps[6:]
    noise = torch.randn(2, 3, 8, 8, generator=gen)
    x = sched.add_noise(reference[None].expand(2, -1, -1, -1) * 2 - 1, noise, timesteps[:1].repeat(2))
    with torch.no_grad():
        for t in timesteps:
            x = sched.step(pipe.unet(x, t), t, x, generator=gen).prev_sample
    torch.testing.assert_close(out, (x / 2 + 0.5).clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_sdedit_small_strength_stays_near_the_reference():
    pipe = tiny_pipeline(scheduler=DDIMScheduler(num_train_timesteps=1000))
    reference = torch.rand(1, 3, 8, 8) * 0.5 + 0.25
    near = run(pipe, batch_size=1, image=reference, strength=0.02, num_inference_steps=50)
    far = run(pipe, batch_size=1, image=reference, strength=1.0, num_inference_steps=50)
    assert (near - reference).abs().mean() < 0.1 < (far - reference).abs().mean()


# ----------------------------------------------------------------------------- persistence
def test_save_and_load_pretrained_gives_the_same_images(tmp_path):
    pipe = tiny_pipeline(num_classes=3)
    pipe.guidance_scale = 2.0
    pipe.save_pretrained(tmp_path)
    loaded = fastdiff.load_pretrained(tmp_path)
    assert loaded.guidance_scale == 2.0 and type(loaded.scheduler) is DDIMScheduler
    assert loaded.scheduler.config == pipe.scheduler.config
    torch.testing.assert_close(run(loaded, batch_size=2, class_labels=[0, 2]),
                               run(pipe, batch_size=2, class_labels=[0, 2]), rtol=0, atol=0)


def test_pickle_offered_as_weights_is_refused(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    torch.save(pipe.unet.state_dict(), tmp_path / "unet" / "model.safetensors")
    with pytest.raises(ValueError, match="pickle"):
        fastdiff.load_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_corrupt_weights_are_refused(tmp_path, damage):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    weights = tmp_path / "unet" / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match="weights|safetensors"):
        fastdiff.load_pretrained(tmp_path)


def test_unknown_model_name_is_refused():
    with pytest.raises(ValueError, match="path"):
        fastdiff.load_pretrained("no-such-model")


def test_embedded_digits_model_loads_and_samples():
    pipe = fastdiff.load_pretrained("digits")
    assert pipe.unet.is_conditional and pipe.unet.num_classes == 10
    assert any(block.attentions for block in pipe.unet.down_blocks), "the digits model must use self-attention"
    images = run(pipe, batch_size=10, class_labels=list(range(10)), num_inference_steps=10)
    assert images.shape == (10, 1, 16, 16) and 0 <= images.min() and images.max() <= 1


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(class_labels=[0, 1, 2]), ValueError, "class_labels"),
    (dict(class_labels=[0, 7]), ValueError, "class_labels"),
    (dict(class_labels=[0.5, 1.0]), TypeError, "class_labels"),
    (dict(guidance_scale=2.0), ValueError, "guidance_scale"),
    (dict(image=torch.rand(3, 8, 8), strength=0.0), ValueError, "strength"),
    (dict(image=torch.rand(3, 8, 8), strength=1.5), ValueError, "strength"),
    (dict(image=torch.rand(3, 8, 8), strength=0.01), ValueError, "strength"),
    (dict(image=torch.zeros(3, 8, 8, dtype=torch.uint8)), TypeError, "image"),
    (dict(image=torch.rand(3, 4, 4)), ValueError, "image"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps"),
    (dict(num_inference_steps=101), ValueError, "num_inference_steps"),
    (dict(eta=-1.0), ValueError, "eta"),
])
def test_bad_input_on_a_conditional_model(kwargs, error, match):
    pipe = tiny_pipeline(num_classes=4)
    with pytest.raises(error, match=match):
        run(pipe, batch_size=2, **kwargs)


def test_guidance_or_labels_on_an_unconditional_model():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="unconditional"):
        run(pipe, batch_size=2, class_labels=[0, 1])
    with pytest.raises(ValueError, match="guidance_scale"):
        run(pipe, batch_size=2, guidance_scale=3.0)


def test_eta_on_ddpm_is_refused():
    pipe = tiny_pipeline(scheduler=DDPMScheduler(num_train_timesteps=100))
    with pytest.raises(ValueError, match="eta"):
        run(pipe, batch_size=1, eta=0.5)
