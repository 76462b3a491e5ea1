"""The DDPM U-Net (Ho et al. 2020, appendix B) with diffusers' ``UNet2DModel`` module tree.

Layout, per resolution level i (feature maps sample_size / 2**i, channels block_out_channels[i]):
``layers_per_block`` ResNet blocks (+ self-attention at the sizes in ``attention_resolutions``),
then a stride-2 conv; a middle of ResNet → attention → ResNet; an up path mirroring the down path
with ``layers_per_block + 1`` ResNet blocks per level, each eating one skip connection.

The state_dict keys are diffusers' (``down_blocks.0.resnets.0.norm1.weight``,
``mid_block.attentions.0.to_q.weight``, ...), so our weights load with ``strict=True`` into
``diffusers.UNet2DModel(**config.to_diffusers())`` and give the same output, and back.

Every GroupNorm runs through ``ops.group_norm`` (the SiLU after it fused in) and every attention
through ``ops.attention``; the ``nn.GroupNorm`` modules only hold the parameters.

``save_pretrained(folder, format="diffusers")`` writes diffusers' own layout, and ``from_pretrained``
reads it back, as it reads any diffusers ``UNet2DModel`` folder whose config UNet2D computes
exactly (``fastdiff.diffusers_format`` holds the mapping and lists what it refuses).

Caveats: a Python float timestep keeps its fraction (diffusers truncates it to an int); sizes other
than ``sample_size`` run as long as they divide by 2**(levels-1), with attention at the same levels.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import diffusers_format, distributed, ops, validation
from .io import load_tensors, read_json, save_tensors, write_json

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


# ----------------------------------------------------------------------------- config
def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{field} {message}")


@dataclass
class UNet2DConfig:
    sample_size: int = 32  # training height = width
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 256)  # one entry per resolution level
    layers_per_block: int = 2  # ResNet blocks per level on the way down (one more on the way up)
    attention_resolutions: tuple[int, ...] = (16,)  # feature-map sizes with self-attention
    attention_head_dim: int | None = None  # None: one head over all channels, as Ho et al.
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    dropout: float = 0.1
    num_classes: int | None = None  # class-conditional when set; label num_classes is the null class

    def __post_init__(self):
        for field in ("block_out_channels", "attention_resolutions"):  # JSON gives lists; store tuples
            value = getattr(self, field)
            _check(isinstance(value, (list, tuple)), field, f"must be a list or tuple of ints, got {value!r}")
            setattr(self, field, tuple(value))
        for field in ("sample_size", "in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
            validation.integer(field, getattr(self, field), minimum=1)
        channels = self.block_out_channels
        _check(len(channels) > 0, "block_out_channels", "must be a non-empty sequence of positive ints, got ()")
        for c in channels:
            validation.integer("block_out_channels", c, minimum=1)
        _check(all(c % self.norm_num_groups == 0 for c in channels), "block_out_channels",
               f"{channels} must all be divisible by norm_num_groups={self.norm_num_groups}")
        # channels[0] is also the width of the sinusoidal embedding, whose frequencies divide by half-1
        _check(channels[0] >= 4, "block_out_channels", f"[0] must be >= 4, got {channels[0]}")
        levels = len(channels)
        _check(self.sample_size % 2 ** (levels - 1) == 0, "sample_size",
               f"{self.sample_size} must be divisible by 2**(len(block_out_channels)-1) = {2 ** (levels - 1)}")
        for size in self.attention_resolutions:
            _check(size in self.resolutions, "attention_resolutions",
                   f"has {size!r}, which is not a feature-map size of this U-Net; sizes are {self.resolutions}")
        attended = {channels[-1]} | {c for c, attn in zip(channels, self.attention_levels) if attn}
        if self.attention_head_dim is not None:
            validation.integer("attention_head_dim", self.attention_head_dim, minimum=1)
            _check(all(c % self.attention_head_dim == 0 for c in attended), "attention_head_dim",
                   f"{self.attention_head_dim} must divide the channels of every attention layer {sorted(attended)}")
        validation.real("norm_eps", self.norm_eps, 0, min_open=True)
        validation.real("dropout", self.dropout, 0, 1, max_open=True)
        if self.num_classes is not None:
            validation.integer("num_classes", self.num_classes, minimum=1)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size at each level: (32, 16, 8, 4) for CIFAR-10."""
        return tuple(self.sample_size // 2**i for i in range(len(self.block_out_channels)))

    @property
    def attention_levels(self) -> tuple[bool, ...]:
        return tuple(size in self.attention_resolutions for size in self.resolutions)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]  # Ho et al.: ch * 4

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> UNet2DConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a UNet2DConfig dict is needed, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown UNet2DConfig key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str) -> UNet2DConfig:
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(map(repr, PRESETS))}; got {name!r}")
        return cls(**PRESETS[name])

    def to_diffusers(self) -> dict:
        """Keyword arguments for ``diffusers.UNet2DModel`` that build this exact network."""
        return diffusers_format.unet_config_to_diffusers(self)


PRESETS = {
    # Ho et al.'s CIFAR-10 model: ch=128, ch_mult=(1,2,2,2), 2 res blocks, attention at 16x16 (35.7M)
    "ddpm-cifar10": dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                         layers_per_block=2, attention_resolutions=(16,), norm_num_groups=32, dropout=0.1),
    # Small class-conditional model for 16x16 digits (1.1M parameters, ~130 MFLOP per image forward):
    # one res block per level keeps a training step cheap enough for a CPU.
    "digits": dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                   layers_per_block=1, attention_resolutions=(8,), norm_num_groups=8, dropout=0.1,
                   num_classes=10),
}


# ----------------------------------------------------------------------------- building blocks
def _norm(norm: nn.GroupNorm, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
    """Apply ``norm``'s parameters through the fused op (optionally with the SiLU that follows)."""
    return ops.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=silu)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Ho et al.'s sinusoidal embedding [sin(t·ω_k) | cos(t·ω_k)], ω_k = max_period^(−k/(dim/2−1)).

    (B,) -> (B, dim) in float32; an odd ``dim`` gets one zero column (as diffusers).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - 1))  # (half,)
    args = timesteps.float()[:, None] * freqs[None, :]  # (B, half)
    return F.pad(torch.cat([args.sin(), args.cos()], dim=1), (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """Sinusoid (ch) -> Linear -> SiLU -> Linear (4·ch)."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """x + conv(drop(SiLU(GN(conv(SiLU(GN(x))) + proj(emb))))), with a 1x1 conv on x when channels change."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNet2DConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_num_groups, in_ch, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(cfg.time_embed_dim, out_ch)
        self.norm2 = nn.GroupNorm(cfg.norm_num_groups, out_ch, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, Cin, H, W), emb = SiLU(time embedding) (B, T) -> (B, Cout, H, W)."""
        h = self.conv1(_norm(self.norm1, x, silu=True))
        h = h + self.time_emb_proj(emb)[:, :, None, None]  # per-channel bias from the timestep
        h = self.conv2(self.dropout(_norm(self.norm2, h, silu=True)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class AttentionBlock(nn.Module):
    """x + out(attention(q, k, v)) over the H·W positions of GN(x): Ho et al.'s self-attention."""

    def __init__(self, channels: int, cfg: UNet2DConfig):
        super().__init__()
        self.heads = 1 if cfg.attention_head_dim is None else channels // cfg.attention_head_dim
        self.group_norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=cfg.norm_eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers' key: to_out.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        tokens = _norm(self.group_norm, x).reshape(b, c, height * width).transpose(1, 2)  # (B, N, C)

        def split_heads(t):  # (B, N, C) -> (B, heads, N, C/heads)
            return t.reshape(b, -1, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = (split_heads(proj(tokens)) for proj in (self.to_q, self.to_k, self.to_v))
        out = ops.attention(q, k, v)  # (B, heads, N, D), scale 1/√D
        out = self.to_out[0](out.transpose(1, 2).reshape(b, -1, c))  # (B, N, C)
        return x + out.transpose(1, 2).reshape(b, c, height, width)


class Downsample(nn.Module):
    """3x3 stride-2 conv; pad right/bottom by one first (TensorFlow 'SAME', as Ho et al.)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """One level down: resnets (+ attention), each output kept as a skip, then an optional downsample."""

    def __init__(self, in_ch, out_ch, cfg: UNet2DConfig, attention: bool, downsample: bool):
        super().__init__()
        layers = range(cfg.layers_per_block)
        self.attentions = nn.ModuleList([AttentionBlock(out_ch, cfg) for _ in layers]) if attention else None
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, cfg) for i in layers])
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if downsample else None

    def forward(self, x, emb, skips: list[torch.Tensor]) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            if self.attentions is not None:
                x = self.attentions[i](x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x


class MidBlock(nn.Module):
    """ResNet -> attention -> ResNet at the lowest resolution."""

    def __init__(self, channels: int, cfg: UNet2DConfig):
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(channels, cfg)])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, cfg) for _ in range(2)])

    def forward(self, x, emb) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x, emb)), emb)


class UpBlock(nn.Module):
    """One level up: each resnet sees [x, a skip] concatenated (+ attention), then an optional upsample."""

    def __init__(self, in_ch, out_ch, skip_chs: list[int], cfg: UNet2DConfig, attention: bool, upsample: bool):
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(out_ch, cfg) for _ in skip_chs]) if attention else None
        self.resnets = nn.ModuleList(  # resnet i eats [x, skip i]: its input has ch(x) + ch(skip) channels
            [ResnetBlock((in_ch if i == 0 else out_ch) + skip, out_ch, cfg) for i, skip in enumerate(skip_chs)])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x, emb, skips: list[torch.Tensor]) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), emb)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


# ----------------------------------------------------------------------------- the U-Net
class UNet2D(nn.Module):
    """ε-prediction U-Net: ``model(x_t, t, class_labels) -> (B, out_channels, H, W)``."""

    def __init__(self, config: UNet2DConfig | None = None, **overrides):
        super().__init__()
        base = (config or UNet2DConfig()).to_dict()
        cfg = self.config = UNet2DConfig.from_dict({**base, **overrides})
        channels, levels = cfg.block_out_channels, len(cfg.block_out_channels)

        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], cfg.time_embed_dim)
        self.class_embedding = None
        if cfg.num_classes is not None:  # one extra row: the null class for classifier-free guidance
            self.class_embedding = nn.Embedding(cfg.num_classes + 1, cfg.time_embed_dim)

        # Down path; skip_chs records the channels of every tensor pushed onto the skip stack.
        self.down_blocks, skip_chs, ch = nn.ModuleList(), [channels[0]], channels[0]
        for i, (out_ch, attn) in enumerate(zip(channels, cfg.attention_levels)):
            last = i == levels - 1
            self.down_blocks.append(DownBlock(ch, out_ch, cfg, attention=attn, downsample=not last))
            skip_chs += [out_ch] * cfg.layers_per_block + ([] if last else [out_ch])
            ch = out_ch

        self.mid_block = MidBlock(ch, cfg)

        # Up path: each level pops layers_per_block + 1 skips, deepest first.
        self.up_blocks = nn.ModuleList()
        for i, (out_ch, attn) in enumerate(zip(reversed(channels), reversed(cfg.attention_levels))):
            popped = [skip_chs.pop() for _ in range(cfg.layers_per_block + 1)]
            self.up_blocks.append(UpBlock(ch, out_ch, popped, cfg, attention=attn, upsample=i < levels - 1))
            ch = out_ch

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, channels[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, 3, padding=1)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> UNet2D:
        return cls(UNet2DConfig.preset(name), **overrides)

    # -- properties
    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    @property
    def memory_format(self) -> torch.memory_format:
        """``torch.channels_last`` after ``unet.to(memory_format=torch.channels_last)``, else
        ``torch.contiguous_format``. Read off ``conv_out``'s weight, whose C/H/W strides tell the
        two apart (``conv_in``'s do not when the image has one channel). Every layer keeps its
        input's layout, so the pipeline draws x_t in this one and the loop never transposes."""
        weight = self.conv_out.weight
        if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous():
            return torch.channels_last
        return torch.contiguous_format

    @property
    def num_classes(self) -> int | None:
        return self.config.num_classes

    @property
    def null_class(self) -> int | None:
        """The label meaning "no class" (classifier-free guidance's unconditional branch)."""
        return self.config.num_classes

    @property
    def is_conditional(self) -> bool:
        return self.config.num_classes is not None

    # -- input checks
    def _check_sample(self, sample) -> None:
        validation.tensor("sample", sample, floating=True)
        factor = 2 ** (len(self.config.block_out_channels) - 1)
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(f"sample must have shape (B, {self.config.in_channels}, H, W), got {tuple(sample.shape)}")
        if sample.shape[0] == 0 or sample.shape[2] % factor or sample.shape[3] % factor:
            raise ValueError(f"sample must have B >= 1 and H, W divisible by {factor} (trained at "
                             f"{self.config.sample_size}x{self.config.sample_size}), got {tuple(sample.shape)}")
        if sample.dtype != self.dtype and not torch.is_autocast_enabled(sample.device.type):
            raise TypeError(f"sample is {sample.dtype} but the U-Net's weights are {self.dtype}: cast one to the "
                            f"other (sample.to({self.dtype}) or unet.to({sample.dtype})), or run under torch.autocast")
        if sample.device != self.device:
            raise ValueError(f"sample is on {sample.device} but the U-Net is on {self.device}: move one of them")

    def _timesteps(self, timestep, batch: int, device) -> torch.Tensor:
        """int/float, () or (B,) tensor -> (B,) on ``device``; finite, >= 0 and below 2**24 (one
        read-back, skipped inside ``validation.values_checked()``)."""
        if isinstance(timestep, (str, bytes, bool)) or not isinstance(timestep, (numbers.Real, torch.Tensor)):
            raise TypeError(f"timestep must be a real number or a tensor, got {type(timestep).__name__}")
        t = torch.as_tensor(timestep, device=device)
        if t.is_complex() or t.dtype == torch.bool or t.numel() not in (1, batch) or t.ndim > 1:
            raise ValueError(f"timestep must be a real number or a tensor of shape () or ({batch},), "
                             f"got {t.dtype} {tuple(t.shape)}")
        validation.unet_timesteps("timestep", t)
        return t.reshape(-1).expand(batch)

    def _class_labels(self, class_labels, batch: int, device) -> torch.Tensor | None:
        if not self.is_conditional:
            if class_labels is not None:
                raise ValueError("class_labels given, but this model is unconditional (num_classes=None)")
            return None
        if class_labels is None:  # no labels: the unconditional (null-class) prediction
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        validation.tensor("class_labels", class_labels, integer=True)
        if class_labels.shape != (batch,):
            raise ValueError(f"class_labels must have shape ({batch},), got {tuple(class_labels.shape)}")
        validation.in_range("class_labels", class_labels, 0, self.null_class, f" ({self.null_class} = null class)")
        return class_labels.to(device)

    # -- forward
    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """sample (B, C, H, W), timestep scalar or (B,), class_labels (B,) ints or None -> (B, C_out, H, W).

        The timesteps must be finite, >= 0 and < 2**24 and the labels in [0, null class]: checked by
        reading them back to the host (a GPU sync, and an error inside a CUDA-graph capture), except
        inside ``validation.values_checked()``, which the sampling loop and training enter after
        checking (or drawing) their values once."""
        self._check_sample(sample)
        batch, device = sample.shape[0], sample.device
        t = self._timesteps(timestep, batch, device)  # (B,)
        labels = self._class_labels(class_labels, batch, device)  # (B,) or None

        # The sinusoid is float32; cast it to the weights' dtype before the MLP (as diffusers).
        emb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0]).to(self.dtype))  # (B, T)
        if labels is not None:
            emb = emb + self.class_embedding(labels)  # diffusers' num_class_embeds: added to the time embedding
        emb = F.silu(emb)  # every ResNet block applies SiLU to emb first: do it once here

        x = self.conv_in(sample)  # (B, ch, H, W)
        skips = [x]
        for block in self.down_blocks:
            x = block(x, emb, skips)
        x = self.mid_block(x, emb)
        for block in self.up_blocks:
            x = block(x, emb, skips)
        return self.conv_out(_norm(self.conv_norm_out, x, silu=True))

    # -- saving and loading
    def save_pretrained(self, directory, format: str = "fastdiff") -> Path:
        """Write ``directory/config.json`` and the weights (each atomically).

        ``format``: 'fastdiff' (UNet2DConfig's fields, ``model.safetensors``) or 'diffusers'
        (``UNet2DModel``'s config, ``diffusion_pytorch_model.safetensors``: what
        ``diffusers.UNet2DModel.from_pretrained`` loads). Both load back with ``from_pretrained``."""
        if diffusers_format.check_format(format) == "diffusers":
            return diffusers_format.save_unet(self.state_dict(), self.config, directory)
        directory = Path(directory)
        save_tensors(self.state_dict(), directory / WEIGHTS_FILE, metadata={"format": "pt"})
        write_json(self.config.to_dict(), directory / CONFIG_FILE)
        return directory

    @classmethod
    def from_pretrained(cls, directory, device=None, dtype: torch.dtype | None = None) -> UNet2D:
        """Load what ``save_pretrained`` wrote (either format), or a diffusers ``UNet2DModel`` folder, in
        eval mode; ``dtype=None`` keeps the saved dtype. ``device``: 'cpu', 'cuda', 'cuda:1', ...;
        ``dtype``: a float dtype or its name ('fp16', 'bf16', ...).

        A diffusers config that UNet2D would not compute exactly (another block type, a Fourier
        time embedding, scale-shift ResNets, ...) is refused with a ValueError listing every such key."""
        device = None if device is None else distributed.default_device(device)
        dtype = None if dtype is None else validation.dtype("dtype", dtype)
        directory = Path(directory)
        data = read_json(directory / CONFIG_FILE, argument="config")
        diffusers = diffusers_format.is_diffusers_config(data)
        if diffusers:  # refuses what UNet2D cannot express, with the file's name
            data = diffusers_format.unet_config_from_diffusers(data, directory / CONFIG_FILE)
        try:
            config = UNet2DConfig.from_dict(data)
        except ValueError as err:
            raise ValueError(f"config: {directory / CONFIG_FILE}: {err}") from err
        if diffusers:
            state, weights = diffusers_format.unet_weights(directory)
        else:
            weights = directory / WEIGHTS_FILE
            state = load_tensors(weights, argument="weights")
        model = cls(config)
        try:  # torch's message names every missing/unexpected key and shape mismatch
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"weights: {weights} does not match its config.json: {err}") from err
        saved_dtype = next((v.dtype for v in state.values() if v.is_floating_point()), None)
        return model.to(device=device, dtype=dtype or saved_dtype).eval()
