"""GroupNorm (32 groups) + SiLU, as every ResNet block of a diffusion U-Net runs it.

Providers: fastdiff (``fastdiff.ops`` on the triton backend: statistics, affine and SiLU in one
kernel), reference (the torch backend: fp32 statistics, several full-size passes), torch_peer
(``F.silu(F.group_norm(...))``: PyTorch's native GroupNorm kernel plus one SiLU pass). Memory
bound: x read and y written once at the floor (costs.group_norm), so GB/s against the copy
bandwidth.

Shapes: the DDPM CIFAR-10 U-Net's 32×32 level (128 channels) at B = 1, 16, 128, 256 and its 16×16
level (256 channels), then larger maps up to 268M elements.
"""

import pytest
import torch
import torch.nn.functional as F

import costs
import harness

OP = "group_norm"
GROUPS, EPS = 32, 1e-6  # the U-Net's norm_num_groups and norm_eps

SHAPES = [
    ((1, 128, 32, 32), {"full", "cpu"}),  # CIFAR-10 U-Net, 32x32 level
    ((16, 128, 32, 32), {"full", "quick"}),
    ((128, 128, 32, 32), {"full", "quick"}),
    ((256, 128, 32, 32), {"full"}),
    ((128, 256, 16, 16), {"full"}),  # 16x16 level
    ((16, 320, 64, 64), {"full", "quick"}),  # a 64x64 latent U-Net's first level: 21M elements
    ((16, 128, 256, 256), {"full"}),  # 134M
    ((16, 256, 256, 256), {"full"}),  # 268M
]
CASES = harness.expand([(harness.fmt_shape(shape), {"shape": shape}, tiers) for shape, tiers in SHAPES],
                       {"full": ("fp32", "bf16"), "quick": ("fp32", "bf16"), "cpu": ("fp32",)})


def torch_group_norm_silu(x, num_groups, weight, bias, eps, silu):
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))


@pytest.mark.parametrize("provider", ["fastdiff", "reference", "torch_peer"])
def test_group_norm(bench, env, case, provider):
    bench.skip_unless_runnable(provider)
    shape, dtype, device = case.dims["shape"], case.torch_dtype, env.device
    x = torch.randn(shape, device=device, dtype=dtype)
    weight = 1 + 0.1 * torch.randn(shape[1], device=device, dtype=dtype)
    bias = 0.1 * torch.randn(shape[1], device=device, dtype=dtype)

    call = harness.op_checked(provider, OP, case, x, GROUPS, weight, bias, EPS, silu=True, peer=torch_group_norm_silu)
    cost = costs.group_norm(x.numel(), shape[1], x.element_size(), silu=True)
    bench.run(op=OP, provider=provider, case=case, cost=cost, **call)
