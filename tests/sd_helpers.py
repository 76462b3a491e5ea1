"""A tiny, random, offline Stable Diffusion: what tests/test_compat_sd.py builds its pipelines from.

Nothing is downloaded: the U-Net, the VAE and the CLIP text encoder are random (seeded) models of
Stable Diffusion's architecture at toy sizes, and the CLIP tokenizer reads a vocabulary written
here (``write_vocabulary``). A plain module like scheduler_helpers.py (pytest puts tests/ on
sys.path); diffusers and transformers are imported by the callers' ``pytest.importorskip`` first.

Sizes (8×8 RGB images ↔ 4×4×4 latents, 16 text tokens of width 20), chosen for the Triton
interpreter, where a launch costs ~30 ms per program (GroupNorm: one per sample and group) and little
more for more elements at these sizes: ~80 GroupNorm and ~25 attention launches per image at batch 2
(classifier-free guidance) set the time, not the tensor sizes.

* U-Net: channels 12/24 (4×4 then 2×2), one layer per block, cross-attention in the first down
  block, the mid block and the last up block (8 ``Attention`` modules: self + cross in each
  transformer block), 2 heads (diffusers' ``attention_head_dim`` is the head count for this model)
  of dims 6 and 12, neither a power of two. GroupNorm with 1 group: 2 groups made the whole
  test_compat_sd.py 113 s instead of 83 s on 2 shared CPU cores; the VAE's GroupNorms, the same
  swapped classes (ResNet blocks, attention group norm, the final norm + SiLU), have 2.
* VAE: channels 8/16, GroupNorm with 2 groups, one attention module in each of the encoder's and
  decoder's mid blocks (1 head of 16), scale factor 2.
* Text encoder: 1 CLIP layer, hidden size 20 (the U-Net's cross_attention_dim), 2 heads.

Every norm's affine parameters are perturbed away from their 1/0 defaults, so a swapped-in norm
that dropped its weight or bias would change the images.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

SEED = 0
IMAGE_SIZE = 8  # pixels; latents are IMAGE_SIZE // 2
UNET_CHANNELS, UNET_GROUPS, UNET_HEADS = (12, 24), 1, 2
VAE_CHANNELS, VAE_GROUPS = (8, 16), 2
CROSS_ATTENTION_DIM = 20
MAX_TOKENS = 16  # tokenizer.model_max_length: the pipeline pads every prompt to this many tokens
WORDS = ("a", "photo", "of", "red", "cat", "on", "the", "sky", "blurry", "dark", "ugly")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Stable Diffusion v1's scheduler_config.json (its PNDM, skip_prk_steps; clip_sample is a DDIM/DDPM key it
# carries too): each scheduler is made from it with from_config, as users swap schedulers on an SD
# pipeline (from_config ignores the keys a class does not take)
SD_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                           beta_end=0.012, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                           clip_sample=False)


# ----------------------------------------------------------------------------- the tokenizer
def _bpe_pieces(word: str) -> list[str]:
    """A word as CLIP's BPE starts it: one piece per character, the last one with '</w>'."""
    return [*word[:-1], word[-1] + "</w>"]


def write_vocabulary(folder: Path) -> Path:
    """vocab.json and merges.txt of a byte-level BPE vocabulary for CLIPTokenizer: the two special
    tokens, every lowercase letter (alone and word-final), and WORDS, each merged left to right
    into one token. Returns ``folder``."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = [BOS, EOS, *letters, *(c + "</w>" for c in letters)]
    merges = []
    for word in WORDS:
        pieces = _bpe_pieces(word)
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            if merge not in merges:
                merges.append(merge)
            if pieces[0] not in tokens:
                tokens.append(pieces[0])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def make_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_vocabulary(folder), model_max_length=MAX_TOKENS)
    for word in WORDS:  # each word is one token of its own, none falls back to the unknown token
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, (word, ids)
    return tokenizer


# ----------------------------------------------------------------------------- the models
def _perturb_norms(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """GroupNorm / LayerNorm affine parameters 1 + 0.2·z and 0.2·z (seeded) instead of 1 and 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and module.weight is not None:
                module.weight.add_(0.2 * torch.randn(module.weight.shape, generator=gen))
                module.bias.add_(0.2 * torch.randn(module.bias.shape, generator=gen))
    return model.eval()


def make_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, block_out_channels=UNET_CHANNELS,
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM, attention_head_dim=UNET_HEADS, norm_num_groups=UNET_GROUPS)
    return _perturb_norms(unet, SEED + 1)


def make_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=VAE_CHANNELS, layers_per_block=1,
        latent_channels=4, norm_num_groups=VAE_GROUPS, sample_size=IMAGE_SIZE)
    return _perturb_norms(vae, SEED + 2)


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CROSS_ATTENTION_DIM, intermediate_size=2 * CROSS_ATTENTION_DIM,
        projection_dim=CROSS_ATTENTION_DIM, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return _perturb_norms(CLIPTextModel(config), SEED + 3)


def make_components(folder: Path) -> dict:
    """The pipeline components but the scheduler: build once, hand out with ``fresh_components``."""
    tokenizer = make_tokenizer(folder)
    return dict(unet=make_unet(), vae=make_vae(), text_encoder=make_text_encoder(tokenizer), tokenizer=tokenizer)


def fresh_components(components: dict) -> dict:
    """Deep copies of the models (accelerate changes them in place: attention processors, and the
    classes of GroupNorm and ResNet modules) with the shared, stateless tokenizer, plus the
    pipeline's no-safety-checker settings."""
    models = {name: copy.deepcopy(value) for name, value in components.items() if name != "tokenizer"}
    return dict(models, tokenizer=components["tokenizer"], safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)


def make_scheduler(name: str):
    """A fresh diffusers scheduler ``name`` from Stable Diffusion's config (schedulers carry state)."""
    import diffusers

    return getattr(diffusers, name).from_config(SD_SCHEDULER_CONFIG)


def reference_image(seed: int = 3) -> torch.Tensor:
    """A fixed random (1, 3, IMAGE_SIZE, IMAGE_SIZE) image in [0, 1] for img2img."""
    return torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
