"""fastdiff.diffusers_format: diffusers' UNet2DModel/DDPM/DDIM folders in fastdiff's engine, and back.

Every comparison is against diffusers itself, on tiny random models (all parameters perturbed, so
GroupNorm affine terms and biases count too), in float32, on the suite's torch reference backend.
"""

import ast
import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastdiff
from fastdiff import DDIMScheduler, DiffusionPipeline, UNet2D, UNet2DConfig, diffusers_format

diffusers = pytest.importorskip("diffusers")

# The DDPM family diffusers users write (google/ddpm-* style): attention at the 4x4 level only.
TINY = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(12, 24), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
            norm_eps=1e-6)
TINY_FASTDIFF = UNet2DConfig(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(12, 24),
                             layers_per_block=1, attention_resolutions=(4,), attention_head_dim=6, norm_num_groups=4,
                             norm_eps=1e-6, dropout=0.0)
# linear β over 100 steps leaves ᾱ_T ≈ 0.37: a random U-Net's x0 estimates stay moderate, so most pixels
# of the compared images are not clamped to 0 or 1 (with squaredcos DPM-Solver's would all be)
SCHEDULER = dict(num_train_timesteps=100)
RTOL = 1e-5


def perturbed(model, seed=0):
    """``model`` with every parameter moved off its initial value, in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def diffusers_unet(seed=0, **overrides):
    torch.manual_seed(seed)
    return perturbed(diffusers.UNet2DModel(**{**TINY, **overrides}), seed)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def max_rel(ours, theirs) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def assert_unet_matches(ours: UNet2D, theirs, class_labels=None, size=8):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, ours.config.in_channels, size, size, generator=gen)
    t = torch.tensor([0, 37, 99])
    with torch.no_grad():
        expected = theirs(x, t, class_labels=class_labels).sample
        got = ours(x, t, class_labels=class_labels)
    assert max_rel(got, expected) < RTOL


def fastdiff_images(pipe, seed=7, steps=4, batch=2):
    return pipe(batch_size=batch, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                progress=False).images.permute(0, 2, 3, 1)  # NHWC, as diffusers' numpy output


def diffusers_images(pipe, seed=7, steps=4, batch=2):
    images = pipe(batch_size=batch, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                  output_type="np").images
    return torch.from_numpy(images)


def assert_images_match(ours, theirs):
    """Same images to RTOL, and enough pixels inside (0, 1) that the comparison means something."""
    assert ((theirs > 0) & (theirs < 1)).float().mean() > 0.3
    assert max_rel(ours, theirs) < RTOL


DELETE = object()  # edit_config's value for "remove this key"


def edit_config(folder: Path, **changes) -> Path:
    """Set keys of ``folder/config.json`` (or remove them: ``key=DELETE``)."""
    path = folder / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DELETE:
            data.pop(key)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    """(folder, model): a tiny diffusers UNet2DModel saved by diffusers (read-only: copy to edit)."""
    model = diffusers_unet()
    folder = tmp_path_factory.mktemp("diffusers_unet")
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture
def unet_copy(unet_folder, tmp_path):
    folder = tmp_path / "unet"
    shutil.copytree(unet_folder[0], folder)
    return folder


# ----------------------------------------------------------------------------- diffusers -> fastdiff
def test_a_diffusers_unet_folder_loads_as_the_same_network(unet_folder):
    folder, theirs = unet_folder
    ours = UNet2D.from_pretrained(folder)
    assert ours.config == TINY_FASTDIFF
    assert not ours.training
    theirs_state = theirs.state_dict()
    assert all(torch.equal(v, theirs_state[k]) for k, v in ours.state_dict().items())
    assert_unet_matches(ours, theirs)


# Spellings diffusers builds the same network from: each must load, and still match diffusers.
EQUIVALENT = {
    "square sample_size list, swish, explicit widths": dict(
        sample_size=[8, 8], act_fn="swish", attn_norm_num_groups=4, time_embedding_dim=48, num_train_timesteps=1000),
    "UNetRes aliases, attention everywhere, one head": dict(
        down_block_types=("UNetResAttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UNetResAttnUpBlock2D"),
        attention_head_dim=None, layers_per_block=2, dropout=0.1, norm_eps=1e-5),
    # the down path resamples only below level 0, which has no attention: diffusers never reads it
    "downsample_type of an attention-free down path": dict(downsample_type="resnet"),
    # attention at 8x8 only: the up path upsamples only above its 4x4 level, which has none
    "upsample_type of an attention-free up path": dict(
        down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        upsample_type="resnet"),
    "three levels, attention at 8x8 and 4x4": dict(
        sample_size=16, block_out_channels=(8, 16, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D",
                                                                          "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, in_channels=1,
        out_channels=2),
}


@pytest.mark.parametrize("name", EQUIVALENT)
def test_equivalent_diffusers_configs_load_and_match(name, tmp_path):
    theirs = diffusers_unet(**EQUIVALENT[name])
    theirs.save_pretrained(tmp_path)
    ours = UNet2D.from_pretrained(tmp_path)
    assert_unet_matches(ours, theirs, size=ours.config.sample_size)


def test_a_class_conditional_unet_loads_when_its_last_label_is_marked_as_the_null_class(tmp_path):
    theirs = diffusers_unet(num_class_embeds=4)
    theirs.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"num_class_embeds=4: .*null class.*_fastdiff_null_class\": 3"):
        UNet2D.from_pretrained(tmp_path)  # diffusers' table has no null class: label 3 may be a real class
    edit_config(tmp_path, _fastdiff_null_class=3)
    ours = UNet2D.from_pretrained(tmp_path)
    assert ours.num_classes == 3 and ours.null_class == 3
    assert_unet_matches(ours, theirs, class_labels=torch.tensor([0, 3, 2]))


@pytest.mark.parametrize("pipeline, scheduler", [("DDIMPipeline", "DDIMScheduler"), ("DDPMPipeline", "DDPMScheduler")])
def test_a_diffusers_pipeline_folder_samples_the_same_images(pipeline, scheduler, tmp_path):
    # fastdiff draws the starting noise, then each step's noise, from the generator as diffusers'
    # pipelines do, so whole images from the same seed compare (DDPM's steps draw noise too)
    theirs = quiet(getattr(diffusers, pipeline)(diffusers_unet(), getattr(diffusers, scheduler)(**SCHEDULER)))
    theirs.save_pretrained(tmp_path)
    ours = fastdiff.load_pretrained(tmp_path)
    assert type(ours.scheduler).__name__ == scheduler and ours.guidance_scale == 1.0
    assert_images_match(fastdiff_images(ours), diffusers_images(theirs))


DIFFUSERS_SCHEDULERS = ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                        "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]


@pytest.mark.parametrize("name", DIFFUSERS_SCHEDULERS)
def test_a_ddpm_pipeline_folder_keeps_its_scheduler(name, unet_folder, tmp_path):
    theirs = getattr(diffusers, name)(num_train_timesteps=100, beta_schedule="scaled_linear", steps_offset=1)
    diffusers.DDPMPipeline(unet_folder[1], theirs).save_pretrained(tmp_path)
    ours = fastdiff.load_pretrained(tmp_path).scheduler
    assert type(ours).__name__ == name
    shared = set(ours.config) & set(theirs.config)
    assert {"num_train_timesteps", "beta_schedule", "steps_offset"} <= shared
    assert {k: ours.config[k] for k in shared} == {k: theirs.config[k] for k in shared}


def test_a_ddim_pipeline_folder_runs_ddim_whatever_scheduler_it_saved(unet_folder, tmp_path):
    # DDIMPipeline's constructor turns any scheduler into DDIMScheduler: so does fastdiff's loader
    diffusers.DDPMPipeline(unet_folder[1], diffusers.PNDMScheduler(**SCHEDULER)).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "_class_name": "DDIMPipeline"}))
    theirs = quiet(diffusers.DDIMPipeline.from_pretrained(tmp_path))
    ours = fastdiff.load_pretrained(tmp_path)
    assert type(ours.scheduler) is DDIMScheduler and type(theirs.scheduler).__name__ == "DDIMScheduler"
    assert_images_match(fastdiff_images(ours), diffusers_images(theirs))


def test_a_pipeline_saved_after_accelerate_loads_with_the_native_scheduler(unet_folder, tmp_path):
    # fastdiff.compat.diffusers.accelerate swaps in FastDDPMScheduler, and saving records its module
    diffusers.DDPMPipeline(unet_folder[1], diffusers.DDPMScheduler(**SCHEDULER)).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["scheduler"] = ["fastdiff.compat.diffusers", "FastDDPMScheduler"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    ours = fastdiff.load_pretrained(tmp_path)
    assert type(ours.scheduler) is fastdiff.DDPMScheduler and ours.scheduler.config.num_train_timesteps == 100


def test_sharded_weights_load(unet_folder, tmp_path):
    unet_folder[1].save_pretrained(tmp_path, max_shard_size="30KB")
    assert (tmp_path / diffusers_format.SHARDED_INDEX_NAME).is_file()
    assert not (tmp_path / diffusers_format.WEIGHTS_NAME).exists()
    assert_unet_matches(UNet2D.from_pretrained(tmp_path), unet_folder[1])


def test_pre_0_15_attention_weight_names_load_as_diffusers_loads_them(unet_copy):
    path = unet_copy / diffusers_format.WEIGHTS_NAME
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = load_file(path)
    renamed = {}
    for key, value in state.items():
        for new, former in old.items():
            key = key.replace(f".{new}.", f".{former}.")
        renamed[key] = value
    assert sum(".query.weight" in k for k in renamed) == 4  # the 4x4 level's: 1 down, 2 up; the middle block's
    save_file(renamed, path)
    theirs = diffusers.UNet2DModel.from_pretrained(unet_copy).eval()
    assert_unet_matches(UNet2D.from_pretrained(unet_copy), theirs)


# ----------------------------------------------------------------------------- refusals
# key -> (a value UNet2D cannot express, a fragment of the message naming it)
REFUSED = {
    "down_block_types": (["DownBlock2D", "SkipDownBlock2D"], r"down_block_types\[1\]='SkipDownBlock2D'"),
    "up_block_types": (["UpBlock2D", "UpBlock2D"], r"up_block_types=.*same resolutions.*'AttnUpBlock2D', 'UpBlock2D'"),
    "time_embedding_type": ("fourier", r"time_embedding_type='fourier': UNet2D needs 'positional'"),
    "class_embed_type": ("timestep", r"class_embed_type='timestep': UNet2D needs None"),
    "resnet_time_scale_shift": ("scale_shift", r"resnet_time_scale_shift='scale_shift': UNet2D needs 'default'"),
    "add_attention": (False, r"add_attention=False: UNet2D needs True"),
    "act_fn": ("gelu", r"act_fn='gelu': UNet2D needs 'silu' or 'swish'"),
    "center_input_sample": (True, r"center_input_sample=True: UNet2D needs False"),
    "flip_sin_to_cos": (True, r"flip_sin_to_cos=True: UNet2D needs False"),
    "freq_shift": (0, r"freq_shift=0: UNet2D needs 1"),
    "mid_block_type": (None, r"mid_block_type=None: UNet2D needs 'UNetMidBlock2D'"),
    "mid_block_scale_factor": (2, r"mid_block_scale_factor=2: UNet2D needs 1"),
    "downsample_padding": (1, r"downsample_padding=1: UNet2D needs 0"),
    "upsample_type": ("resnet", r"upsample_type='resnet': UNet2D needs 'conv'"),  # the 4x4 level upsamples
    "time_embedding_dim": (64, r"time_embedding_dim=64: UNet2D needs None or 48"),
    "attn_norm_num_groups": (2, r"attn_norm_num_groups=2: UNet2D needs None or norm_num_groups=4"),
    "sample_size": ([8, 16], r"sample_size=\[8, 16\]: UNet2D needs one size"),
    "num_class_embeds": (True, r"num_class_embeds=True: UNet2D needs None or an int"),
}


@pytest.mark.parametrize("key", REFUSED)
def test_a_config_unet2d_cannot_express_is_refused_by_key(key, unet_copy):
    value, message = REFUSED[key]
    edit_config(unet_copy, **{key: value})
    with pytest.raises(ValueError, match=message) as error:
        UNet2D.from_pretrained(unet_copy)
    assert str(unet_copy / "config.json") in str(error.value)


def test_downsample_type_is_refused_where_an_attention_level_downsamples(unet_copy):
    edit_config(unet_copy, down_block_types=["AttnDownBlock2D", "AttnDownBlock2D"],
                up_block_types=["AttnUpBlock2D", "AttnUpBlock2D"], downsample_type="resnet")
    with pytest.raises(ValueError, match=r"downsample_type='resnet': UNet2D needs 'conv'"):
        UNet2D.from_pretrained(unet_copy)


def test_every_problem_is_listed_at_once_and_defaults_count_for_missing_keys(unet_copy):
    # without flip_sin_to_cos and freq_shift, diffusers builds with its defaults (True, 0)
    edit_config(unet_copy, flip_sin_to_cos=DELETE, freq_shift=DELETE, act_fn="mish")
    with pytest.raises(ValueError) as error:
        UNet2D.from_pretrained(unet_copy)
    assert all(f"- {part}" in str(error.value) for part in ("flip_sin_to_cos=True", "freq_shift=0", "act_fn='mish'"))


def test_an_unknown_config_key_is_refused(unet_copy):
    edit_config(unet_copy, shiny_new_option=1)
    with pytest.raises(ValueError, match=r"unknown UNet2DModel config key\(s\) \['shiny_new_option'\]"):
        UNet2D.from_pretrained(unet_copy)


def test_pickle_weights_are_refused_with_a_clear_message(unet_folder, tmp_path):
    unet_folder[1].save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.bin \(pickle\).*safetensors only"):
        UNet2D.from_pretrained(tmp_path)


def tiny_condition_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def test_a_unet2d_condition_model_is_refused_pointing_to_accelerate(tmp_path):
    tiny_condition_unet().save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match=r"UNet2DConditionModel.*fastdiff\.compat\.diffusers\.accelerate\(pipe\)"):
        UNet2D.from_pretrained(tmp_path / "unet")
    # a Stable Diffusion folder: refused from its model_index.json, before any weights are read
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None], "requires_safety_checker": False}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"StableDiffusionPipeline.*fastdiff\.compat\.diffusers\.accelerate\(pipe\)"):
        fastdiff.load_pretrained(tmp_path)


def test_other_diffusers_pipelines_are_refused_by_name(unet_folder, tmp_path):
    diffusers.DDPMPipeline(unet_folder[1], diffusers.DDPMScheduler()).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "_class_name": "LDMPipeline",
                                                           "vqvae": ["diffusers", "VQModel"]}))
    with pytest.raises(ValueError, match=r"'LDMPipeline'; fastdiff loads diffusers' DDPMPipeline, DDIMPipeline"):
        fastdiff.load_pretrained(tmp_path)


# ----------------------------------------------------------------------------- fastdiff -> diffusers
def fastdiff_pipeline(scheduler, num_classes=None, seed=0):
    torch.manual_seed(seed)
    return DiffusionPipeline(perturbed(UNet2D(TINY_FASTDIFF, num_classes=num_classes), seed), scheduler)


SAVED_AS = {"DDIMScheduler": "DDIMPipeline", "DDPMScheduler": "DDPMPipeline", "PNDMScheduler": "PNDMPipeline",
            "DPMSolverMultistepScheduler": "DDPMPipeline"}


@pytest.mark.parametrize("scheduler", SAVED_AS)
def test_format_diffusers_writes_what_diffusers_loads_and_samples_alike(scheduler, tmp_path):
    ours = fastdiff_pipeline(fastdiff.schedulers.scheduler_class(scheduler)(**SCHEDULER))
    ours.save_pretrained(tmp_path, format="diffusers")
    theirs = quiet(diffusers.DiffusionPipeline.from_pretrained(tmp_path))
    assert type(theirs).__name__ == SAVED_AS[scheduler] and type(theirs.scheduler).__name__ == scheduler
    assert all(theirs.scheduler.config[k] == v for k, v in ours.scheduler.config.items())
    expected = fastdiff_images(ours)
    assert_images_match(expected, diffusers_images(theirs))
    # and fastdiff reads its own diffusers-format folder back: the same model, bit for bit
    back = fastdiff.load_pretrained(tmp_path)
    assert back.unet.config == ours.unet.config and back.scheduler.config == ours.scheduler.config
    torch.testing.assert_close(fastdiff_images(back), expected, rtol=0, atol=0)


@pytest.mark.parametrize("scheduler, options", [
    ("DDIMScheduler", dict(beta_schedule="sigmoid")),
    ("DDIMScheduler", dict(beta_schedule="laplace", rescale_betas_zero_snr=True, prediction_type="v_prediction")),
    ("PNDMScheduler", dict(beta_schedule="laplace")),
    ("DPMSolverMultistepScheduler", dict(beta_schedule="sigmoid")),
    ("DDPMScheduler", dict(variance_type="fixed_large_log")),
], ids=["ddim-sigmoid", "ddim-laplace-zero-snr", "pndm-laplace", "dpm-sigmoid", "ddpm-fixed-large-log"])
def test_format_diffusers_rewrites_what_diffusers_would_compute_otherwise(scheduler, options, tmp_path):
    """diffusers' DDIM, PNDM and DPM-Solver have no sigmoid or laplace betas (they would raise), and its
    DDPM's fixed_large_log is NaN: the folder gets trained_betas, or fixed_large, with the same numbers."""
    ours = fastdiff_pipeline(fastdiff.schedulers.scheduler_class(scheduler)(**SCHEDULER, **options))
    ours.save_pretrained(tmp_path, format="diffusers")
    theirs = quiet(diffusers.DiffusionPipeline.from_pretrained(tmp_path))
    assert torch.equal(theirs.scheduler.alphas_cumprod, ours.scheduler.alphas_cumprod)
    expected = fastdiff_images(ours)
    assert_images_match(expected, diffusers_images(theirs))
    torch.testing.assert_close(fastdiff_images(fastdiff.load_pretrained(tmp_path)), expected, rtol=0, atol=0)
    assert ours.scheduler.config.get("trained_betas") is None  # the pipeline's own scheduler is untouched


def test_diffusers_folder_round_trips_through_fastdiff(tmp_path):
    first = quiet(diffusers.DDIMPipeline(diffusers_unet(seed=3), diffusers.DDIMScheduler(**SCHEDULER)))
    first.save_pretrained(tmp_path / "theirs")
    fastdiff.load_pretrained(tmp_path / "theirs").save_pretrained(tmp_path / "ours", format="diffusers")
    second = quiet(diffusers.DDIMPipeline.from_pretrained(tmp_path / "ours"))
    public = lambda config: json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))
    assert public(second.unet.config) == public(first.unet.config)
    torch.testing.assert_close(diffusers_images(second), diffusers_images(first), rtol=0, atol=0)


def test_a_class_conditional_unet_saves_for_diffusers_with_its_null_class(tmp_path):
    ours = UNet2D(TINY_FASTDIFF, num_classes=3)
    perturbed(ours)
    ours.save_pretrained(tmp_path, format="diffusers")
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path).eval()
    assert theirs.config.num_class_embeds == 4
    assert_unet_matches(ours, theirs, class_labels=torch.tensor([0, 3, 2]))  # 3: the null class
    back = UNet2D.from_pretrained(tmp_path)
    assert back.config == ours.config


def test_pipelines_diffusers_cannot_run_alike_are_refused_before_writing(tmp_path):
    conditional = fastdiff_pipeline(DDIMScheduler(**SCHEDULER), num_classes=3)
    with pytest.raises(ValueError, match=r"class-conditional.*unet\.save_pretrained\(folder, format='diffusers'\)"):
        conditional.save_pretrained(tmp_path / "a", format="diffusers")
    euler = fastdiff_pipeline(fastdiff.EulerDiscreteScheduler(**SCHEDULER))
    with pytest.raises(ValueError, match=r"no diffusers pipeline samples with EulerDiscreteScheduler"):
        euler.save_pretrained(tmp_path / "b", format="diffusers")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("save", ["pipeline", "unet"])
def test_a_bad_format_names_format_and_the_choices(save, tmp_path):
    pipe = fastdiff_pipeline(DDIMScheduler(**SCHEDULER))
    target = pipe if save == "pipeline" else pipe.unet
    with pytest.raises(ValueError, match=r"format must be one of 'fastdiff', 'diffusers'; got 'safetensors'"):
        target.save_pretrained(tmp_path, format="safetensors")
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- the mapping itself
def test_the_defaults_table_is_diffusers_unet2dmodel_signature():
    parameters = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    theirs = {k: list(p.default) if isinstance(p.default, tuple) else p.default
              for k, p in parameters.items() if k != "self"}
    assert theirs == diffusers_format.UNET2D_MODEL_DEFAULTS


@pytest.mark.parametrize("config", [UNet2DConfig.preset("digits"), UNet2DConfig.preset("ddpm-cifar10"),
                                    UNet2DConfig(sample_size=12, block_out_channels=(15, 30, 45),
                                                 attention_resolutions=(12, 3), attention_head_dim=15,
                                                 norm_num_groups=5, num_classes=1)])
def test_writing_then_reading_a_config_gives_it_back(config):
    # two separately written directions: to_diffusers' keys must read back to the same fields
    file = json.loads(json.dumps(diffusers_format.unet_config_file(config)))
    assert UNet2DConfig.from_dict(diffusers_format.unet_config_from_diffusers(file, "config.json")) == config


def test_the_module_never_imports_diffusers():
    tree = ast.parse(Path(diffusers_format.__file__).read_text())
    modules = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    modules += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [m for m in modules if m.split(".")[0] == "diffusers"]
