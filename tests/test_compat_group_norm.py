"""GroupNorm(+SiLU) on fastdiff's kernel inside diffusers' models (fastdiff/compat/_group_norm.py).

Each swapped class against the stock one it replaces: on the kernel within the dtype's tolerance
(fp32: 1e-5 of the output's scale; fp16/bf16: two units in the last place, the kernel rounding
once where stock rounds after the norm and again after the SiLU), on the 'torch' backend and under
autograd *bitwise* equal (the stock calls run), and launch counts that show which path ran.
Shapes are tiny and groups few: the kernel runs under Triton's interpreter here.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")

import fastdiff  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402
from fastdiff.compat import _group_norm  # noqa: E402
from fastdiff.compat.diffusers import (FastGroupNorm, FastGroupNormSiLU, FastResnetBlock2D,  # noqa: E402
                                       accelerate)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2 * 2.0**-10, torch.bfloat16: 2 * 2.0**-7}


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def assert_close(actual, expected, dtype=torch.float32):
    scale = max(1.0, expected.float().abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=TOLERANCE[dtype] * scale)


def random_affine(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


def layouts(x):
    """x (B, C, H, W) as the kernel meets it: dense, channels_last, and the (B, C, N) channel-strided
    view an attention module's group norm gets."""
    batch, channels = x.shape[:2]
    return {"nchw": x, "channels_last": x.contiguous(memory_format=torch.channels_last),
            "bcn_view": x.flatten(2).transpose(1, 2).contiguous().transpose(1, 2)}


# ----------------------------------------------------------------------------- FastGroupNorm
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "bcn_view"])
def test_group_norm_module_on_the_kernel_matches_stock(dtype, layout, launches):
    stock = random_affine(torch.nn.GroupNorm(2, 8, eps=1e-6)).to(dtype)
    fast = copy.deepcopy(stock)
    assert _group_norm.swap(fast) == {"group_norm": 1, "silu_fused": 0} and type(fast) is FastGroupNorm
    x = layouts(torch.randn(2, 8, 4, 4).mul(3).add(1).to(dtype))[layout]
    with torch.no_grad():
        expected = stock(x)
        with fastdiff.use_backend("triton"):
            actual = fast(x)
    assert launches["group_norm"] == 1
    assert_close(actual, expected, dtype)
    if layout == "channels_last":  # read in place and written in the input's layout
        assert actual.is_contiguous(memory_format=torch.channels_last)


def test_group_norm_module_runs_the_stock_op_where_the_kernel_would_not(launches):
    stock = random_affine(torch.nn.GroupNorm(2, 8))
    fast = copy.deepcopy(stock)
    _group_norm.swap(fast)
    x = torch.randn(2, 8, 4, 4)
    with fastdiff.use_backend("torch"), torch.no_grad():  # the 'torch' backend: the stock op itself
        assert torch.equal(fast(x), stock(x))
    with fastdiff.use_backend("triton"):
        out = fast(x)  # autograd records (the parameters require grad): the stock op, with its backward
        assert torch.equal(out, stock(x))
        out.sum().backward()
        assert fast.weight.grad is not None
        with torch.no_grad():
            assert torch.equal(fast.double()(x.double()), stock.double()(x.double()))  # float64: no kernel
    assert launches["group_norm"] == 0


# ----------------------------------------------------------------------------- FastResnetBlock2D
RESNET_CASES = {
    "temb": dict(in_channels=8, out_channels=8, temb_channels=6),
    "no_temb_vae": dict(in_channels=8, out_channels=8, temb_channels=None),
    "shortcut_groups_out": dict(in_channels=8, out_channels=12, temb_channels=6, groups_out=3),
    "scale_shift": dict(in_channels=8, out_channels=8, temb_channels=6, time_embedding_norm="scale_shift"),
    "skip_time_act_scaled": dict(in_channels=8, out_channels=8, temb_channels=6, skip_time_act=True,
                                 output_scale_factor=2.0),
    "up": dict(in_channels=8, out_channels=8, temb_channels=6, up=True),
    "down": dict(in_channels=8, out_channels=8, temb_channels=6, down=True),
    "mish": dict(in_channels=8, out_channels=8, temb_channels=6, non_linearity="mish"),
}
FUSED = {"scale_shift": 1, "mish": 0}  # norm→SiLU pairs that are one launch (2 elsewhere)


@pytest.mark.parametrize("case", RESNET_CASES)
def test_resnet_block_matches_stock(case, launches):
    stock = random_affine(ResnetBlock2D(groups=2, eps=1e-6, **RESNET_CASES[case])).eval()
    fast = copy.deepcopy(stock)
    counts = _group_norm.swap(fast)
    assert type(fast) is FastResnetBlock2D and counts == {"group_norm": 2, "silu_fused": FUSED.get(case, 2)}
    x = torch.randn(2, 8, 4, 4)
    temb = None if RESNET_CASES[case]["temb_channels"] is None else torch.randn(2, 6)
    with torch.no_grad():
        expected = stock(x, temb)
        with fastdiff.use_backend("torch"):  # the mirrored forward, on the stock norms: bit for bit
            assert torch.equal(fast(x, temb), expected)
        with fastdiff.use_backend("triton"):
            actual = fast(x, temb)
    assert launches["group_norm"] == 2
    assert_close(actual, expected)


def test_resnet_block_deprecated_scale_takes_the_stock_forward():
    stock = random_affine(ResnetBlock2D(in_channels=8, temb_channels=6, groups=2)).eval()
    fast = copy.deepcopy(stock)
    _group_norm.swap(fast)
    x, temb = torch.randn(1, 8, 4, 4), torch.randn(1, 6)
    with torch.no_grad(), pytest.warns(FutureWarning, match="scale"):
        assert torch.equal(fast(x, temb, scale=1.0), stock(x, temb))


# ----------------------------------------------------------------------------- swap
class UserGroupNorm(torch.nn.GroupNorm):
    def forward(self, x):
        return super().forward(x) * 2


class UserResnet(ResnetBlock2D):
    pass


def test_swap_changes_only_the_exact_stock_classes_and_keeps_the_weights():
    model = torch.nn.Sequential(torch.nn.GroupNorm(2, 8), UserGroupNorm(2, 8),
                                UserResnet(in_channels=8, temb_channels=None, groups=2))
    state = copy.deepcopy(model.state_dict())
    counts = _group_norm.swap(model)
    assert [type(m) for m in model] == [FastGroupNorm, UserGroupNorm, UserResnet]
    assert type(model[2].norm1) is FastGroupNorm  # the norms inside a user's block are still stock GroupNorms
    assert counts == {"group_norm": 3, "silu_fused": 0}
    assert _group_norm.swap(model) == counts  # idempotent
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def tiny_conditional_unet(**overrides):
    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 24), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12, attention_head_dim=2,
                  norm_num_groups=2)
    return diffusers.UNet2DConditionModel(**{**config, **overrides}).eval()


def tiny_vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=2, latent_channels=4,
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2).eval()


@pytest.fixture
def stock_group_norm_calls(monkeypatch) -> list:
    """One entry per ``F.group_norm`` call (what every stock GroupNorm module runs)."""
    calls, real = [], F.group_norm

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "group_norm", counted)
    return calls


def test_final_norm_and_its_silu_become_one_module():
    unet = tiny_conditional_unet()
    counts = _group_norm.swap(unet)
    assert type(unet.conv_norm_out) is FastGroupNormSiLU and type(unet.conv_act) is _group_norm.SiLUFusedAbove
    resnets = [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]
    assert all(type(m) is FastResnetBlock2D for m in resnets)
    assert counts["silu_fused"] == 2 * len(resnets) + 1
    assert counts["group_norm"] == sum(isinstance(m, torch.nn.GroupNorm) for m in unet.modules())
    gelu = tiny_conditional_unet(act_fn="gelu")  # conv_act is not a SiLU: it stays, the norm alone is swapped
    _group_norm.swap(gelu)
    assert type(gelu.conv_norm_out) is FastGroupNorm and type(gelu.conv_act) is torch.nn.GELU


def test_accelerated_channels_last_unet_runs_every_group_norm_on_the_kernel(launches, stock_group_norm_calls):
    """(NCHW: tests/test_compat_diffusers.py, test_accelerated_unet_forward_matches_stock.)"""
    unet = tiny_conditional_unet().to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 3, 12, generator=gen)
    with torch.no_grad():
        expected = unet(x, 11, encoder_hidden_states=text).sample
        stock_calls = len(stock_group_norm_calls)
        accelerate(unet)
        with fastdiff.use_backend("triton"):
            actual = unet(x, 11, encoder_hidden_states=text).sample
    assert stock_calls > 0 and len(stock_group_norm_calls) == stock_calls  # the accelerated run made none
    assert launches["group_norm"] == stock_calls and launches["attention"] > 0
    assert_close(actual, expected)


def test_accelerated_vae_encodes_and_decodes_on_the_kernel(launches, stock_group_norm_calls):
    vae = tiny_vae()
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(image).latent_dist.mean
        expected = vae.decode(latents).sample
        stock_calls = len(stock_group_norm_calls)
        accelerate(vae)
        assert type(vae.decoder.conv_norm_out) is FastGroupNormSiLU
        assert type(vae.encoder.conv_norm_out) is FastGroupNormSiLU
        with fastdiff.use_backend("triton"):
            fast_latents = vae.encode(image).latent_dist.mean
            actual = vae.decode(latents).sample
    assert len(stock_group_norm_calls) == stock_calls  # every norm of the attention too ran on the kernel
    assert launches["group_norm"] == stock_calls
    assert_close(fast_latents, latents)
    assert_close(actual, expected)
