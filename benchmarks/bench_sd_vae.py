"""Stable Diffusion 1.5's VAE decoder in diffusers: stock, accelerated by fastdiff, graphed.

One timed call is ``AutoencoderKL.decode`` of 64×64×4 latents into a 512×512 image, at SD 1.5's
config (sd_models.py: random weights, fp16, batch 1), the last step of every text-to-image call.
Providers, each a fresh model with the same weights:

* diffusers: stock, SDPA in the decoder's one attention (the mid block's: 1 head of 512 channels
  over 4096 tokens);
* fastdiff: ``accelerate(vae)``: fastdiff's GroupNorm(+SiLU) kernel in the decoder's 30
  GroupNorms (up to 128 channels × 512×512: 64 MB per tensor in fp16, each a memory-bound pass
  in eager PyTorch), and ``FastAttnProcessor`` in the attention, which runs SDPA all the same (a
  head dim of 512 is over the kernel's 256);
* fastdiff_graph: ``accelerate(vae, cuda_graph=True)``: the same, ``decode`` replayed from a CUDA
  graph (skipped while ``accelerate`` has no such keyword).

No torch.compile here: the U-Net (bench_sd_unet.py) is where the time of a sampling run goes.
Cost: 2.51 TFLOP per decode (the convolutions: 2.47, most at 256 and 512 px with 128-256
channels) and 99 MB of weights: compute bound, judged against the bf16 matmul rate (fp16's).
The decoder's GroupNorms read and write ~64 MB activations at 512 px, so in practice a part of it
is bandwidth bound; the floor counts no activations. CPU tier: the ``tiny`` config decoding 8×8
latents to 16×16, fp32, the stock provider only. Not yet run on a GPU.
"""

import pytest

import harness
import sd_models

OP = "sd_vae"
PROVIDERS = [p for p in sd_models.PROVIDERS if p != "diffusers_compile"]
CASES = harness.expand(
    [("sd15_B1_64x64_to_512x512", {"preset": "sd15", "B": 1, "latent": 64}, {"full", "quick"}),
     ("tiny_B1_8x8_to_16x16", {"preset": "tiny", "B": 1, "latent": 8}, {"cpu"})],
    {"full": ("fp16",), "quick": ("fp16",), "cpu": ("fp32",)})


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sd_vae(bench, env, case, provider):
    pytest.importorskip("diffusers", reason="diffusers is not installed")
    sd_models.run_case(bench, env, case, provider, kind="vae", op=OP)
