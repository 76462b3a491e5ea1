"""Attention softmax(q·kᵀ/√D)·v at the shapes of diffusion U-Nets, self and cross.

Providers: fastdiff (``fastdiff.ops`` on the triton backend: the flash-style kernel), reference
(the torch backend: fp32 scores materialised, then softmax and a second matmul), torch_peer
(``F.scaled_dot_product_attention``: FlashAttention-2 / memory-efficient kernels, PyTorch's best).
FLOPs 4·B·H·Nq·Nk·D, bytes 2·B·H·(Nq + Nk)·D elements (costs.attention): compute bound from
N ≈ 1024 up in bf16 on an H100, so the figure of merit is TFLOP/s against the matmul ceiling of
the same precision (fp32: IEEE, as the fp32 kernel does exact fp32 dots).

Shapes: the DDPM CIFAR-10 U-Net's 16×16 attention (N = 256, one head of D = 256) at B = 1, 16,
128, 256; 32×32 and 64×64 feature maps (N = 1024, 4096) with D = 64, 128, 256; cross attention
to 77 text tokens (Stable Diffusion's shapes).
"""

import pytest
import torch
import torch.nn.functional as F

import costs
import harness

OP = "attention"


def _shape(b, h, nq, nk, d) -> tuple[str, dict]:
    name = f"B{b}_H{h}_N{nq}_D{d}" if nq == nk else f"B{b}_H{h}_Nq{nq}_Nk{nk}_D{d}"
    return name, {"B": b, "H": h, "Nq": nq, "Nk": nk, "D": d}


SHAPES = [  # (B, H, Nq, Nk, D), tiers
    ((1, 1, 256, 256, 256), {"full"}),  # CIFAR-10 U-Net, 16x16
    ((16, 1, 256, 256, 256), {"full"}),
    ((128, 1, 256, 256, 256), {"full", "quick"}),
    ((256, 1, 256, 256, 256), {"full"}),
    ((16, 4, 1024, 1024, 64), {"full"}),  # 32x32 feature map
    ((8, 2, 1024, 1024, 128), {"full"}),
    ((4, 8, 4096, 4096, 64), {"full", "quick"}),  # 64x64 feature map
    ((2, 4, 4096, 4096, 128), {"full"}),
    ((1, 2, 4096, 4096, 256), {"full"}),
    ((4, 8, 4096, 77, 64), {"full", "quick"}),  # cross attention to 77 text tokens
    ((16, 4, 1024, 77, 128), {"full"}),
    ((1, 1, 256, 256, 256), {"cpu"}),
    ((1, 2, 256, 77, 64), {"cpu"}),
]
CASES = harness.expand([(*_shape(*dims), tiers) for dims, tiers in SHAPES],
                       {"full": ("fp32", "bf16"), "quick": ("fp32", "bf16"), "cpu": ("fp32",)})


@pytest.mark.parametrize("provider", ["fastdiff", "reference", "torch_peer"])
def test_attention(bench, env, case, provider):
    bench.skip_unless_runnable(provider)
    b, h, nq, nk, d = (case.dims[k] for k in ("B", "H", "Nq", "Nk", "D"))
    dtype, device = case.torch_dtype, env.device
    q = torch.randn(b, h, nq, d, device=device, dtype=dtype)  # (B, H, Nq, D)
    k, v = (torch.randn(b, h, nk, d, device=device, dtype=dtype) for _ in range(2))  # (B, H, Nk, D)

    call = harness.op_checked(provider, OP, case, q, k, v, peer=F.scaled_dot_product_attention)
    cost = costs.attention(b, h, nq, nk, d, q.element_size())
    bench.run(op=OP, provider=provider, case=case, cost=cost, **call)
