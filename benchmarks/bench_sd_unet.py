"""Stable Diffusion 1.5's U-Net in diffusers: stock, accelerated by fastdiff, graphed, compiled.

One timed call is one ``UNet2DConditionModel`` forward at SD 1.5's sizes (sd_models.py: the real
config, random weights, fp16): 64×64×4 latents (512×512 images), batch 2 (one image with
classifier-free guidance: the conditional and unconditional halves in one batch, as the pipelines
run it), 77 text states of 768, a 0-d timestep on the device. That is one sampling step, so the
record's ``steps_per_s`` is a batch-1 pipeline's it/s less its scheduler step (~0.1 ms, no VAE, no
text encoder). Providers, in this order, each a fresh model with the same weights (sd_models):

* diffusers: stock, SDPA (``AttnProcessor2_0``) in every attention;
* fastdiff: ``accelerate(unet)``: ``FastAttnProcessor`` in its 32 attention modules (self and
  cross in 16 transformer blocks: fastdiff's flash-attention kernel at head dims 40/80/160, padded
  to 64/128/256) and fastdiff's GroupNorm(+SiLU) kernel in its 61 GroupNorms, on the triton backend;
* fastdiff_graph: ``accelerate(unet, cuda_graph=True)``: the same, the forward replayed from a
  CUDA graph (skipped while ``accelerate`` has no such keyword);
* diffusers_compile: the stock model ``torch.compile``d (skipped with the reason where
  torch.compile is off, unsupported or fails on this model).

Each provider is checked against the stock model's output (‖out − ref‖ / ‖ref‖ ≤ 2e-2 in fp16)
before it is timed, and each record has ``speedup_vs_diffusers`` (stock median / its median, same
session), ``first_call_s`` (JIT, capture or compile), ``build_s``, the FLOP count by op and the
attention's (heads, head dim) pairs.

Anchor: stable-fast reports 54.5 it/s for diffusers eager (PyTorch 2.1) and 104.6 it/s for
stable-fast (1.92×) on an H100 for SD 1.5 at 512², batch 1 (torch.compile max-autotune: 66.0;
github.com/chengzeyi/stable-fast, README, "Performance Comparison", H100): their it/s is a
whole pipeline step, this file's ``steps_per_s`` its U-Net forward, the bulk of it.

Cost (sd_models.cost): 1.607 TFLOP per forward at B = 2 (counted on the meta device), 1.72 GB of
fp16 weights: compute bound (an H100's ~990 TFLOP/s dense fp16 would take 1.6 ms; stock diffusers
takes ~18 ms there by stable-fast's 54.5 it/s), judged against the bf16 matmul rate the suite
measures (the same tensor-core rate as fp16). Quick tier: B = 2; full: also B = 8 (four images).
CPU tier: the ``tiny`` config at 8×8, fp32, the stock provider only (the others need a GPU), a
smoke test of the machinery (tests/test_bench_sd.py). Not yet run on a GPU.
"""

import pytest

import harness
import sd_models

OP = "sd_unet"
PROVIDERS = list(sd_models.PROVIDERS)
CASES = harness.expand(
    [("sd15_B2_64x64", {"preset": "sd15", "B": 2, "latent": 64, "tokens": sd_models.TEXT_TOKENS}, {"full", "quick"}),
     ("sd15_B8_64x64", {"preset": "sd15", "B": 8, "latent": 64, "tokens": sd_models.TEXT_TOKENS}, {"full"}),
     ("tiny_B2_8x8", {"preset": "tiny", "B": 2, "latent": 8, "tokens": sd_models.TEXT_TOKENS}, {"cpu"})],
    {"full": ("fp16",), "quick": ("fp16",), "cpu": ("fp32",)})


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sd_unet(bench, env, case, provider):
    pytest.importorskip("diffusers", reason="diffusers is not installed")
    sd_models.run_case(bench, env, case, provider, kind="unet", op=OP)
