"""GroupNorm(+SiLU) on fastdiff's kernel inside diffusers' models.

Stable Diffusion 1.5's UNet holds 61 GroupNorms (ResNet blocks, the transformer blocks' input
norm), 45 of them followed at once by a SiLU, and runs them all at every sampling step; its VAE
holds 52 (50 with a SiLU; the attention's group norm). Eager PyTorch spends three kernels on the norm and one on the SiLU; ``ops.group_norm`` does
both in one pass. ``swap(model)`` puts it in, in place, by changing module classes (no weights move,
state_dict keys stay, ``save_pretrained`` writes the same files):

* every exact ``torch.nn.GroupNorm`` becomes ``FastGroupNorm`` (a subclass: same parameters);
* every exact ``ResnetBlock2D`` whose nonlinearity is SiLU becomes ``FastResnetBlock2D``, whose
  forward is the stock one with norm1→SiLU and norm2→SiLU each one launch (norm2 alone when
  ``time_embedding_norm="scale_shift"`` puts the scale and shift between them);
* the final ``conv_norm_out``→``conv_act`` of an exact ``UNet2DModel``, ``UNet2DConditionModel`` or
  the VAE's ``Encoder``/``Decoder``: the norm becomes ``FastGroupNormSiLU`` and ``conv_act`` a
  ``SiLUFusedAbove`` identity (those forwards use ``conv_act`` nowhere else).

The stock computation runs, on every backend, for whatever the kernel would not reproduce: the
'torch' backend, autograd (no kernel backward), a dtype or layout the kernel refuses, and modules
of any other class (a user's subclass may change forward). Each of these classes runs exactly the
stock ``F.group_norm`` / activation calls then.

This module imports diffusers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import nn

from .. import ops
from ..backend import resolve
from ._slots import KERNEL_DTYPES

MAX_ELEMENTS = 2**31  # the kernel's int32 offsets (kernels/group_norm.py)

# models whose forward ends in conv_norm_out → conv_act → conv_out and uses conv_act nowhere else
# (checked against diffusers 0.42's source; tests/test_compat_group_norm.py runs each)
FINAL_NORM_OWNERS = (UNet2DModel, UNet2DConditionModel, Encoder, Decoder)


def kernel_takes(norm: nn.GroupNorm, x: torch.Tensor) -> bool:
    """Whether ``ops.group_norm`` on x computes what ``F.group_norm`` with ``norm``'s settings does,
    here, without autograd having to record it."""
    if torch.compiler.is_compiling():  # compiled: the stock ops, which Inductor fuses itself
        return False
    if not isinstance(x, torch.Tensor) or x.dtype not in KERNEL_DTYPES or x.ndim < 2 or x.numel() >= MAX_ELEMENTS:
        return False
    if x.shape[1] != norm.num_channels:  # F.group_norm's own error is the stock behaviour
        return False
    params = [p for p in (norm.weight, norm.bias) if p is not None]
    if any(p.device != x.device or (p.dtype != x.dtype and x.dtype != torch.float32) for p in params):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    return resolve(x) == "triton"


def norm_act(norm: nn.GroupNorm, x: torch.Tensor, act: nn.Module | None) -> torch.Tensor:
    """``act(norm(x))`` (``norm(x)`` when act is None): one kernel launch when ``act`` is a SiLU and
    the kernel takes x, else the stock calls."""
    fuse = act is None or type(act) is nn.SiLU
    if fuse and isinstance(norm, FastGroupNorm) and kernel_takes(norm, x):
        return ops.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=act is not None)
    x = norm(x)
    return x if act is None else act(x)


class FastGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` on ``ops.group_norm``'s kernel where it gives the stock result (channels_last
    and channel-strided views are read in place); ``F.group_norm`` everywhere else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernel_takes(self, x):
            return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


class FastGroupNormSiLU(FastGroupNorm):
    """GroupNorm then SiLU in one module: a model's ``conv_norm_out`` whose ``conv_act`` was fused in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernel_takes(self, x):
            return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=True)
        return F.silu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", silu=True"


class SiLUFusedAbove(nn.Identity):
    """A model's ``conv_act`` after its SiLU moved into ``conv_norm_out`` (``FastGroupNormSiLU``)."""

    def extra_repr(self) -> str:
        return "SiLU applied by conv_norm_out"


class FastResnetBlock2D(ResnetBlock2D):
    """diffusers' ``ResnetBlock2D`` with each GroupNorm and the SiLU after it in one launch.

    The forward is the stock one (diffusers 0.42) step for step; only the norm→activation pairs
    go through ``norm_act``. The deprecated ``scale`` argument takes the stock forward, warning and all.
    """

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs.get("scale") is not None:
            return super().forward(input_tensor, temb, *args, **kwargs)
        act = self.nonlinearity
        hidden_states = norm_act(self.norm1, input_tensor, act)
        if self.upsample is not None:
            if hidden_states.shape[0] >= 64:  # the stock block's workaround for nearest upsampling in NHWC
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)
        hidden_states = self.conv1(hidden_states)

        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = act(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        if self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            hidden_states = norm_act(self.norm2, hidden_states, None)
            hidden_states = act(hidden_states * (1 + time_scale) + time_shift)
        else:
            if self.time_embedding_norm == "default" and temb is not None:
                hidden_states = hidden_states + temb
            hidden_states = norm_act(self.norm2, hidden_states, act)

        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)
        if self.conv_shortcut is not None:
            if self.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor


def swap(model: nn.Module) -> dict[str, int]:
    """Put the classes above into ``model`` in place; idempotent. Returns counts: 'group_norm'
    (modules now on the kernel), 'silu_fused' (norm→SiLU pairs now one launch)."""
    for module in model.modules():
        if type(module) is nn.GroupNorm:
            module.__class__ = FastGroupNorm
        elif type(module) is ResnetBlock2D:
            module.__class__ = FastResnetBlock2D
    norms = sum(isinstance(m, FastGroupNorm) for m in model.modules())
    fused = 0
    for module in model.modules():
        if type(module) is FastResnetBlock2D and type(module.nonlinearity) is nn.SiLU:
            fused += isinstance(module.norm1, FastGroupNorm)
            fused += isinstance(module.norm2, FastGroupNorm) and module.time_embedding_norm != "scale_shift"
    for module in model.modules():
        if type(module) not in FINAL_NORM_OWNERS:
            continue
        norm, act = getattr(module, "conv_norm_out", None), getattr(module, "conv_act", None)
        if type(norm) is FastGroupNorm and type(act) is nn.SiLU:
            norm.__class__ = FastGroupNormSiLU
            module.conv_act = SiLUFusedAbove()
        fused += type(norm) is FastGroupNormSiLU
    return {"group_norm": norms, "silu_fused": fused}
