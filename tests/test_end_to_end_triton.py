"""Sampling, training and the CLI run end to end on the Triton backend (on a CPU through Triton's
interpreter, on a tiny model) and agree with the reference backend from the same seed.

The tiny U-Net still takes every kernel path: GroupNorm(+SiLU) in every ResNet block, attention at
4×4 and in the middle block, the fused DDIM/DDPM step with classifier-free guidance, and forward
noising (SDEdit's start, and every training step).
"""

from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff import DDIMScheduler, DDPMScheduler, DiffusionPipeline, backend
from fastdiff.cli import main
from fastdiff.training import TrainConfig, train

pytestmark = [
    pytest.mark.skipif(not backend.triton_available(), reason="triton is not installed"),
    pytest.mark.skipif(not (torch.cuda.is_available() or backend.interpreter_enabled()),
                       reason="the triton backend needs CUDA or TRITON_INTERPRET=1"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("scheduler, kwargs", [
    (DDIMScheduler(num_train_timesteps=50), dict(eta=0.5)),
    (DDPMScheduler(num_train_timesteps=50, variance_type="fixed_small"), {}),
], ids=["ddim-eta0.5", "ddpm"])
def test_guided_sampling_matches_the_reference(scheduler, kwargs, launches, tiny_pipeline):
    pipe = DiffusionPipeline(tiny_pipeline(DEVICE).unet, scheduler, guidance_scale=2.0)
    images = {}
    for name in ("torch", "triton"):
        with fastdiff.use_backend(name):
            images[name] = pipe(batch_size=2, num_inference_steps=2, class_labels=[0, 2], progress=False,
                                generator=torch.Generator().manual_seed(0), **kwargs).images
    step = "ddim_step" if isinstance(scheduler, DDIMScheduler) else "ddpm_step"
    assert launches[step] == 2 and launches["group_norm"] > 0 and launches["attention"] > 0
    torch.testing.assert_close(images["triton"], images["torch"], rtol=1e-4, atol=1e-4)


def test_sdedit_noises_through_the_kernel(launches, tiny_pipeline):
    pipe = DiffusionPipeline(tiny_pipeline(DEVICE).unet, DDIMScheduler(num_train_timesteps=50))
    reference_image = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(1))
    images = {}
    for name in ("torch", "triton"):
        with fastdiff.use_backend(name):
            images[name] = pipe(batch_size=2, num_inference_steps=4, image=reference_image, strength=0.5,
                                generator=torch.Generator().manual_seed(0), progress=False).images
    assert launches["q_sample"] == 1
    torch.testing.assert_close(images["triton"], images["torch"], rtol=1e-4, atol=1e-4)


def test_training_steps_match_the_reference(tmp_path, launches):
    """Noising runs the kernel; the U-Net (under autograd) runs the reference on both backends."""
    losses = {}
    for name in ("torch", "triton"):
        config = TrainConfig(out_dir=str(tmp_path / name), model_overrides=dict(block_out_channels=(8, 16),
                             layers_per_block=1, norm_num_groups=4), batch_size=4, steps=3, checkpoint_every=3,
                             device=DEVICE, prediction_type="v_prediction")
        with fastdiff.use_backend(name):
            losses[name] = train(config, progress=False).loss_history
    assert launches["q_sample"] == 3
    assert launches["group_norm"] == launches["attention"] == 0  # autograd: the reference
    assert losses["triton"] == pytest.approx(losses["torch"], rel=1e-5)


def test_cli_samples_and_trains_with_backend_triton(tmp_path, launches, capsys, tiny_model):
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(tiny_model), "--out", str(out), "--steps", "2", "--batch-size", "2",
                 "--no-progress", "--backend", "triton", "--device", DEVICE]) == 0
    assert out.stat().st_size > 0 and launches["ddim_step"] == 2 and launches["attention"] > 0
    assert main(["train", "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "4",
                 "--backend", "triton", "--device", DEVICE, "--no-progress"]) == 0
    assert launches["q_sample"] == 2
