"""fastdiff.unet.UNet2D: diffusers parity (same keys, same numbers), checkpoints, input checks."""

import json

import pytest
import torch

import fastdiff
from fastdiff.io import save_tensors
from fastdiff.unet import UNet2D, UNet2DConfig

# Small configs that each exercise a different path through the network.
CONFIGS = {
    "digits": UNet2DConfig.preset("digits"),
    # unconditional, attention at two resolutions, several heads per attention layer
    "two-attn-heads": UNet2DConfig(sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2,
                                   attention_resolutions=(16, 8), attention_head_dim=16, norm_num_groups=16),
    # odd channel counts (odd time-embedding width), 3 levels at 12 -> 6 -> 3, 2 and 3 heads, 3 classes
    "odd": UNet2DConfig(sample_size=12, in_channels=2, out_channels=5, block_out_channels=(15, 30, 45),
                        layers_per_block=1, attention_resolutions=(6,), attention_head_dim=15, norm_num_groups=5,
                        norm_eps=1e-5, dropout=0.2, num_classes=3),
}


def make_model(cfg: UNet2DConfig, seed: int = 0) -> UNet2D:
    """A model with every parameter random (GroupNorm weights and biases too), in eval mode."""
    torch.manual_seed(seed)
    model = UNet2D(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def inputs(cfg: UNet2DConfig, batch: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    t = torch.tensor([0, 417, 999, 5][:batch])
    labels = None
    if cfg.num_classes is not None:  # include the null class
        labels = torch.tensor([0, cfg.num_classes, cfg.num_classes - 1, 1][:batch])
    return x, t, labels


def diffusers_twin(model: UNet2D):
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.UNet2DModel(**model.config.to_diffusers())
    theirs.load_state_dict(model.state_dict(), strict=True)
    return theirs.eval()


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- architecture
def test_ddpm_cifar10_matches_ho_et_al_parameter_count():
    model = UNet2D.from_preset("ddpm-cifar10")
    assert n_params(model) == 35_746_307  # google/ddpm-cifar10-32
    theirs = diffusers_twin(model)
    assert n_params(theirs) == 35_746_307
    assert model.config.to_diffusers()["down_block_types"] == [
        "DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]


@pytest.mark.parametrize("name", CONFIGS)
def test_module_tree_and_keys_match_diffusers(name):
    model = UNet2D(CONFIGS[name])
    theirs = diffusers_twin(model)
    ours_shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert ours_shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    # every module of ours sits at the same path in diffusers' tree (theirs adds parameterless
    # SiLU/Dropout(0) modules that we fuse or skip)
    assert {n for n, _ in model.named_modules()} <= {n for n, _ in theirs.named_modules()}


def test_digits_preset_is_small_and_conditional():
    model = UNet2D.from_preset("digits")
    assert 500_000 <= n_params(model) <= 1_500_000
    assert model.is_conditional and model.num_classes == 10 and model.null_class == 10
    assert model.class_embedding.num_embeddings == 11
    assert any(block.attentions for block in model.down_blocks) and 8 in model.config.attention_resolutions


# ----------------------------------------------------------------------------- diffusers parity
@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_diffusers(name):
    cfg = CONFIGS[name]
    model = make_model(cfg)
    theirs = diffusers_twin(model)
    x, t, labels = inputs(cfg)
    with torch.no_grad():
        ours = model(x, t, labels)
        expected = theirs(x, t, labels).sample
    assert ours.shape == (x.shape[0], cfg.out_channels, cfg.sample_size, cfg.sample_size)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_scalar_timestep_and_larger_input_match_diffusers():
    cfg = CONFIGS["digits"]
    model = make_model(cfg)
    theirs = diffusers_twin(model)
    x = torch.randn(2, 1, 32, 32)  # twice the training size: still divisible by 4
    labels = torch.tensor([3, 7])
    with torch.no_grad():
        for t in (250, torch.tensor(250)):
            torch.testing.assert_close(model(x, t, labels), theirs(x, t, labels).sample, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- behaviour
def test_backend_torch_equals_default():
    cfg = CONFIGS["two-attn-heads"]
    model = make_model(cfg)
    x, t, labels = inputs(cfg)
    with torch.no_grad():
        default = model(x, t, labels)
        with fastdiff.use_backend("torch"):
            reference = model(x, t, labels)
    torch.testing.assert_close(default, reference, atol=1e-5, rtol=1e-5)


def test_timestep_forms_agree():
    model = make_model(CONFIGS["digits"])
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        expected = model(x, torch.tensor([42, 42, 42]))
        for t in (42, 42.0, torch.tensor(42), torch.tensor([42]), torch.tensor(42.0)):
            torch.testing.assert_close(model(x, t), expected, atol=0, rtol=0)


def test_missing_labels_mean_the_null_class():
    model = make_model(CONFIGS["digits"])
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        unconditional = model(x, 10)
        torch.testing.assert_close(unconditional, model(x, 10, torch.full((2,), model.null_class)))
        assert not torch.allclose(unconditional, model(x, 10, torch.tensor([1, 2])))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = UNet2D.from_preset("digits").train()
    x, t = torch.randn(4, 1, 16, 16), torch.randint(0, 1000, (4,))
    loss = (model(x, t, torch.tensor([0, 3, 9, 10])) - x).pow(2).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())


def test_channels_last_input():
    model = make_model(CONFIGS["digits"])
    x, t, labels = inputs(CONFIGS["digits"])
    with torch.no_grad():
        expected = model(x, t, labels)
        out = model(x.to(memory_format=torch.channels_last), t, labels)
        model.to(memory_format=torch.channels_last)
        out_cl_weights = model(x.to(memory_format=torch.channels_last), t, labels)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_cl_weights, expected, atol=1e-5, rtol=1e-5)


def test_properties_and_overrides():
    model = UNet2D.from_preset("digits", num_classes=None, dropout=0.0)
    assert not model.is_conditional and model.num_classes is None and model.null_class is None
    assert model.class_embedding is None and model.config.dropout == 0.0
    assert model.dtype == torch.float32 and model.device == torch.device("cpu")
    assert model.double().dtype == torch.float64


# ----------------------------------------------------------------------------- config
def test_config_dict_round_trip():
    for cfg in CONFIGS.values():
        d = json.loads(json.dumps(cfg.to_dict()))
        assert UNet2DConfig.from_dict(d) == cfg


@pytest.mark.parametrize("overrides, field", [
    (dict(block_out_channels=(32, 48), norm_num_groups=32), "block_out_channels"),
    (dict(attention_head_dim=48), "attention_head_dim"),
    (dict(sample_size=20), "sample_size"),
    (dict(attention_resolutions=(12,)), "attention_resolutions"),
    (dict(layers_per_block=0), "layers_per_block"),
    (dict(dropout=1.0), "dropout"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(num_classes=0), "num_classes"),
    (dict(block_out_channels=64), "block_out_channels"),
    (dict(block_out_channels=()), "block_out_channels"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        UNet2DConfig(**overrides)


def test_unknown_config_key_and_preset():
    with pytest.raises(ValueError, match="channel_mult"):
        UNet2DConfig.from_dict({"channel_mult": [1, 2]})
    with pytest.raises(ValueError, match="channel_mult"):
        UNet2D(channel_mult=(1, 2))
    with pytest.raises(ValueError, match="digits"):
        UNet2DConfig.preset("mnist")


# ----------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def digits_model():
    return make_model(CONFIGS["digits"])


@pytest.fixture(scope="module")
def unconditional_model():
    return make_model(CONFIGS["two-attn-heads"])


def test_bad_sample(digits_model):
    with pytest.raises(TypeError, match="sample"):
        digits_model(torch.zeros(2, 1, 16, 16, dtype=torch.long), 5)
    for shape in [(2, 3, 16, 16), (2, 1, 16), (2, 1, 18, 16), (0, 1, 16, 16)]:
        with pytest.raises(ValueError, match="sample"):
            digits_model(torch.zeros(shape), 5)


def test_bad_timestep(digits_model):
    with pytest.raises(ValueError, match="timestep"):
        digits_model(torch.zeros(2, 1, 16, 16), torch.tensor([1, 2, 3]))


def test_bad_class_labels(digits_model, unconditional_model):
    x = torch.zeros(2, 1, 16, 16)
    with pytest.raises(ValueError, match="class_labels"):
        unconditional_model(torch.zeros(2, 3, 16, 16), 5, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="class_labels"):
        digits_model(x, 5, torch.tensor([1, 2, 3]))
    for bad in (torch.tensor([1, 11]), torch.tensor([-1, 0])):
        with pytest.raises(ValueError, match="class_labels"):
            digits_model(x, 5, bad)
    for bad in (torch.tensor([1.0, 2.0]), [1, 2], torch.tensor([True, False])):
        with pytest.raises(TypeError, match="class_labels"):
            digits_model(x, 5, bad)


# ----------------------------------------------------------------------------- checkpoints
def test_save_load_round_trip(tmp_path):
    model = make_model(CONFIGS["odd"])
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = UNet2D.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    x, t, labels = inputs(CONFIGS["odd"])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, labels), model(x, t, labels))
    assert UNet2D.from_pretrained(tmp_path / "m", dtype=torch.float64).dtype == torch.float64


@pytest.fixture
def saved(tmp_path):
    model = UNet2D(CONFIGS["odd"])
    model.save_pretrained(tmp_path)
    return tmp_path, model


def test_pickle_is_refused(saved):
    path, model = saved
    torch.save(model.state_dict(), path / "model.safetensors")
    with pytest.raises(ValueError, match="pickle"):
        UNet2D.from_pretrained(path)


def test_truncated_or_missing_weights(saved):
    path, _ = saved
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="safetensors"):
        UNet2D.from_pretrained(path)
    weights.unlink()
    with pytest.raises(ValueError, match="weights"):
        UNet2D.from_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(ValueError, match="config"):
        UNet2D.from_pretrained(path)


def test_weights_that_do_not_fit_the_config(saved):
    path, model = saved
    state = model.state_dict()
    state.pop("conv_out.bias")
    state["extra.weight"] = torch.zeros(1)
    save_tensors(state, path / "model.safetensors")
    with pytest.raises(ValueError, match="conv_out.bias"):
        UNet2D.from_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    UNet2D(CONFIGS["odd"], out_channels=4).save_pretrained(path)
    (path / "config.json").write_text(json.dumps(config))  # config says 5 output channels
    with pytest.raises(ValueError, match="size mismatch"):
        UNet2D.from_pretrained(path)
    (path / "config.json").write_text(json.dumps({**config, "ch_mult": [1, 2]}))
    with pytest.raises(ValueError, match="ch_mult"):
        UNet2D.from_pretrained(path)
