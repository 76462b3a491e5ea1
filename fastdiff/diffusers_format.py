"""diffusers' folder layout for fastdiff's U-Net and pipeline, read and written without diffusers.

fastdiff's ``UNet2D`` is diffusers' ``UNet2DModel`` for one family of configs (Ho et al.'s DDPM
U-Net) with the same module tree and state_dict keys, so a diffusers checkpoint of that family is
a config translation away from a fastdiff one. This module holds that translation, both ways, and
the checks that refuse every ``UNet2DModel`` config that ``UNet2D`` would not compute exactly:
loading one anyway would give a model that runs and returns wrong numbers.

The layout diffusers' ``save_pretrained`` writes, and ``DDPMPipeline.from_pretrained`` reads::

    model_index.json                          {"_class_name": "DDIMPipeline", "unet": ["diffusers",
                                               "UNet2DModel"], "scheduler": ["diffusers", "DDIMScheduler"]}
    unet/config.json                          UNet2DModel's constructor keywords, "_class_name"
    unet/diffusion_pytorch_model.safetensors  (or a sharded set: ....safetensors.index.json + shards)
    scheduler/scheduler_config.json           diffusers' scheduler keywords, fastdiff's schedulers' too

Weights are read through ``fastdiff.io`` (safetensors only, never pickle). This module never
imports diffusers: diffusers is an optional extra and ``import fastdiff`` must work without it. The mapping follows diffusers 0.42.1's ``UNet2DModel`` (``DIFFUSERS_VERSION``);
tests/test_diffusers_format.py checks it against the installed diffusers.
"""

from __future__ import annotations

import re
from pathlib import Path

from . import validation
from .io import load_tensors, read_json, save_tensors, write_json

FORMATS = ("fastdiff", "diffusers")  # the ``format=`` choices of save_pretrained
DIFFUSERS_VERSION = "0.42.1"  # the diffusers whose UNet2DModel this mapping follows (written as _diffusers_version)
UNET_CLASS = "UNet2DModel"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SHARDED_INDEX_NAME = WEIGHTS_NAME + ".index.json"
# The label fastdiff's class-conditional UNet2D treats as "no class". diffusers' UNet2DModel has no
# such convention, so fastdiff records it: a private key, which diffusers' UNet2DModel is never
# handed (its loader drops "_" keys) and which it keeps when it saves the model again.
NULL_CLASS_KEY = "_fastdiff_null_class"
ACCELERATE_HINT = ("fastdiff's UNet2D has no text conditioning (cross-attention): load the pipeline with "
                   "diffusers and put fastdiff's kernels into it with fastdiff.compat.diffusers.accelerate(pipe)")

# diffusers.UNet2DModel's constructor defaults (0.42.1): a config.json written by an older diffusers
# lacks the keys added since, and diffusers builds the model with these values for them.
UNET2D_MODEL_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,
}

# Keys whose value UNet2D fixes: the values that build UNet2D's network, and what UNet2D does instead.
_FIXED = {
    "center_input_sample": ((False,), "UNet2D feeds the sample to conv_in unchanged (no 2x-1)"),
    "time_embedding_type": (("positional",), "UNet2D has Ho et al.'s sinusoidal timestep embedding only"),
    "flip_sin_to_cos": ((False,), "UNet2D's sinusoid is [sin | cos]"),
    "freq_shift": ((1,), "UNet2D's frequencies are 10000^(-k/(half-1))"),
    "mid_block_type": (("UNetMidBlock2D",), "UNet2D always has the ResNet-attention-ResNet middle block"),
    "add_attention": ((True,), "UNet2D's middle block always has its attention layer"),
    "mid_block_scale_factor": ((1,), "UNet2D's middle block does not rescale its output"),
    "resnet_time_scale_shift": (("default",), "UNet2D's ResNet blocks add the time embedding (no scale-shift)"),
    "act_fn": (("silu", "swish"), "UNet2D's ResNet blocks use SiLU (diffusers' 'swish' is the same function)"),
    "class_embed_type": ((None,), "UNet2D's only class embedding is a table of num_class_embeds rows"),
}
_DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}  # block type -> has attention
_UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}
# The diffusers pipelines fastdiff's DiffusionPipeline reproduces, each with the scheduler its
# constructor converts the saved one to (None: it keeps the saved one).
PIPELINES = {"DDPMPipeline": None, "DDIMPipeline": "DDIMScheduler", "PNDMPipeline": "PNDMScheduler"}
# The diffusers pipeline that samples with a fastdiff scheduler as DiffusionPipeline does. The others
# have none: DDPMPipeline neither scales the starting noise by init_noise_sigma nor calls
# scale_model_input (Euler, Euler-ancestral need both) and passes generator= to step (UniPC's has none).
PIPELINE_FOR_SCHEDULER = {"DDPMScheduler": "DDPMPipeline", "DDIMScheduler": "DDIMPipeline",
                          "PNDMScheduler": "PNDMPipeline", "DPMSolverMultistepScheduler": "DDPMPipeline"}
# Attention weights of diffusers before 0.15 (google/ddpm-* on the Hub): diffusers renames them on load.
_OLD_ATTENTION_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_ATTENTION_NAME = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def check_format(format) -> str:
    """``format`` of ``save_pretrained``: 'fastdiff' (the default) or 'diffusers'."""
    validation.one_of("format", format, FORMATS)
    return format


def is_diffusers_config(config: dict) -> bool:
    """fastdiff's unet/config.json holds UNet2DConfig's fields only; diffusers stamps its class on every config."""
    return "_class_name" in config or "_diffusers_version" in config


def is_diffusers_index(index: dict) -> bool:
    """fastdiff's model_index.json names the class 'DiffusionPipeline'; diffusers' names the concrete pipeline."""
    return "_diffusers_version" in index or index.get("_class_name", "DiffusionPipeline") != "DiffusionPipeline"


# ----------------------------------------------------------------------------- diffusers -> fastdiff
def unet_config_from_diffusers(config: dict, where) -> dict:
    """UNet2DConfig's fields for a diffusers ``UNet2DModel`` config.json (``where`` names it in errors).

    Refuses, in one ValueError that lists them all, every key whose value UNet2D would not compute
    exactly, and keys this mapping does not know (a newer diffusers' option could change the network).
    """
    _check_model_class(config.get("_class_name", UNET_CLASS), where)
    unknown = sorted(k for k in config if not k.startswith("_") and k not in UNET2D_MODEL_DEFAULTS)
    if unknown:
        raise ValueError(f"{where}: unknown UNet2DModel config key(s) {unknown}; fastdiff maps the keys of diffusers "
                         f"{DIFFUSERS_VERSION}'s UNet2DModel: {sorted(UNET2D_MODEL_DEFAULTS)}")
    c = {**UNET2D_MODEL_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    problems = [f"{key}={c[key]!r}: UNet2D needs {' or '.join(map(repr, accepted))} ({why})"
                for key, (accepted, why) in _FIXED.items() if c[key] not in accepted]
    attention = _attention_levels(c, problems)
    problems += _layout_problems(c, attention)
    sample_size = _sample_size(c["sample_size"], problems)
    num_classes = _num_classes(c["num_class_embeds"], config.get(NULL_CLASS_KEY), where, problems)
    if problems:
        raise ValueError(f"{where}: this UNet2DModel cannot be loaded as a fastdiff UNet2D, which would compute a "
                         "different network:\n  - " + "\n  - ".join(problems))
    return dict(
        sample_size=sample_size, in_channels=c["in_channels"], out_channels=c["out_channels"],
        block_out_channels=list(c["block_out_channels"]), layers_per_block=c["layers_per_block"],
        attention_resolutions=[sample_size // 2**i for i, attn in enumerate(attention) if attn],
        attention_head_dim=c["attention_head_dim"], norm_num_groups=c["norm_num_groups"], norm_eps=c["norm_eps"],
        dropout=c["dropout"], num_classes=num_classes,
    )


def _check_model_class(name, where) -> None:
    if name == "UNet2DConditionModel":
        raise ValueError(f"{where}: a UNet2DConditionModel (a text-conditioned U-Net, as in Stable Diffusion) "
                         f"cannot be loaded as a fastdiff UNet2D; {ACCELERATE_HINT}")
    if name != UNET_CLASS:
        raise ValueError(f"{where}: _class_name is {name!r}; fastdiff's UNet2D loads diffusers' {UNET_CLASS} only")


def _block_types(c: dict, key: str, known: dict, problems: list) -> list[bool] | None:
    """Which levels of ``key`` (down_block_types / up_block_types) have attention; None if unusable."""
    types = c[key]
    if not isinstance(types, (list, tuple)):
        problems.append(f"{key}={types!r}: must be a list of block type names")
        return None
    levels = []
    for i, name in enumerate(types):
        # diffusers reads "UNetResDownBlock2D" as "DownBlock2D"
        plain = name[len("UNetRes"):] if isinstance(name, str) and name.startswith("UNetRes") else name
        if plain not in known:
            problems.append(f"{key}[{i}]={name!r}: UNet2D's levels are {' or '.join(map(repr, known))}")
            return None
        levels.append(known[plain])
    return levels


def _attention_levels(c: dict, problems: list) -> list[bool]:
    """Attention per level, from the down blocks; the up blocks must mirror them (UNet2D has one list)."""
    down = _block_types(c, "down_block_types", _DOWN_BLOCKS, problems)
    up = _block_types(c, "up_block_types", _UP_BLOCKS, problems)
    channels = c["block_out_channels"]
    if down is None or up is None:
        return []
    if not isinstance(channels, (list, tuple)) or not len(down) == len(up) == len(channels):
        problems.append(f"down_block_types, up_block_types and block_out_channels must have one entry per level; "
                        f"got {len(down)}, {len(up)} and {channels!r}")
        return []
    if up != down[::-1]:
        mirror = ["AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(down)]
        problems.append(f"up_block_types={list(c['up_block_types'])!r}: UNet2D has attention at the same resolutions "
                        f"on the way up as on the way down, so with down_block_types="
                        f"{list(c['down_block_types'])!r} it needs {mirror!r}")
    return down


def _layout_problems(c: dict, attention: list[bool]) -> list[str]:
    """The keys that matter for some layouts only, checked where they change the network."""
    problems, levels = [], len(attention)
    if levels > 1 and c["downsample_padding"] != 0:
        problems.append(f"downsample_padding={c['downsample_padding']!r}: UNet2D needs 0 (it pads right and bottom "
                        "by one before its stride-2 conv, as Ho et al.)")
    # diffusers reads downsample_type/upsample_type in the attention blocks that resample only: the
    # down path resamples below every level but the last, the up path above every level but the first
    if any(attention[:-1]) and c["downsample_type"] != "conv":
        problems.append(f"downsample_type={c['downsample_type']!r}: UNet2D needs 'conv' (a stride-2 conv)")
    if any(attention[1:]) and c["upsample_type"] != "conv":
        problems.append(f"upsample_type={c['upsample_type']!r}: UNet2D needs 'conv' (nearest x2, then a conv)")
    channels = c["block_out_channels"]
    if levels and c["time_embedding_dim"] is not None and c["time_embedding_dim"] != 4 * channels[0]:
        problems.append(f"time_embedding_dim={c['time_embedding_dim']!r}: UNet2D needs None or "
                        f"{4 * channels[0]} (4 x block_out_channels[0])")
    groups = c["attn_norm_num_groups"]
    if groups is not None and groups != c["norm_num_groups"]:
        problems.append(f"attn_norm_num_groups={groups!r}: UNet2D needs None or norm_num_groups="
                        f"{c['norm_num_groups']!r} (one GroupNorm width everywhere)")
    return problems


def _sample_size(value, problems: list) -> int | None:
    """diffusers takes an int or [height, width]; UNet2D's images are square."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"sample_size={value!r}: UNet2D needs one size (square images: an int or [n, n])")
        return None
    return value


def _num_classes(num_class_embeds, null_class, where, problems: list) -> int | None:
    """UNet2D's num_classes: its embedding has num_classes + 1 rows, the last one the null class.
    diffusers' table has no null class, so its last row is taken as one only where fastdiff wrote it."""
    if num_class_embeds is None:
        return None
    if isinstance(num_class_embeds, bool) or not isinstance(num_class_embeds, int) or num_class_embeds < 2:
        problems.append(f"num_class_embeds={num_class_embeds!r}: UNet2D needs None or an int >= 2 "
                        "(its classes plus the null class)")
        return None
    last = num_class_embeds - 1
    if isinstance(null_class, bool) or null_class != last:
        problems.append(f"num_class_embeds={num_class_embeds}: fastdiff's class-conditional UNet2D reserves its last "
                        "label as the null class (used for classifier-free guidance and when no class_labels are "
                        f"given), while diffusers' UNet2DModel has none, so label {last} may be a real class here. "
                        f"If it is this model's unconditional label, add \"{NULL_CLASS_KEY}\": {last} to {where} "
                        f"(fastdiff writes it itself); {NULL_CLASS_KEY} is {null_class!r}")
        return None
    return last


def unet_weights(directory: Path):
    """(state_dict, file) of a diffusers unet/ folder: one safetensors file or a sharded set, never pickle.

    Attention weights under diffusers' pre-0.15 names (query/key/value/proj_attn) get today's names,
    as diffusers renames them when it loads such a file.
    """
    single, index = directory / WEIGHTS_NAME, directory / SHARDED_INDEX_NAME
    if single.is_file():
        state, path = load_tensors(single, argument="weights"), single
    elif index.is_file():
        state, path = _sharded_weights(index), index
    else:
        raise _missing_weights(directory)
    return {_new_attention_key(k): v for k, v in state.items()}, path


def _new_attention_key(key: str) -> str:
    match = _OLD_ATTENTION_KEY.match(key)
    return key if match is None else f"{match[1]}.{_NEW_ATTENTION_NAME[match[2]]}.{match[3]}"


def _sharded_weights(index_path: Path) -> dict:
    """The tensors of every shard that ``index_path``'s weight_map names, checked against it."""
    weight_map = read_json(index_path, argument="weights").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) and Path(f).name == f
                                                   for f in weight_map.values()):
        raise ValueError(f"weights: {index_path} must map each tensor name to a shard file in its folder "
                         f"(a 'weight_map' of file names)")
    state = {}
    for shard in sorted(set(weight_map.values())):
        state.update(load_tensors(index_path.parent / shard, argument="weights"))
    if set(state) != set(weight_map):
        missing, extra = sorted(set(weight_map) - set(state)), sorted(set(state) - set(weight_map))
        raise ValueError(f"weights: the shards of {index_path} do not hold what its weight_map lists "
                         f"(missing {missing[:5]}, not listed {extra[:5]})")
    return state


def _missing_weights(directory: Path) -> ValueError:
    """The error for a folder without safetensors weights: a pickle-only folder gets its own message."""
    pickled = sorted(p.name for p in directory.glob("diffusion_pytorch_model*.bin"))
    if pickled:
        return ValueError(f"weights: {directory} has {', '.join(pickled)} (pickle) but no {WEIGHTS_NAME}; fastdiff "
                          "loads safetensors only, since unpickling a file can run arbitrary code. Where you trust the "
                          "file, convert it once: diffusers.UNet2DModel.from_pretrained(folder).save_pretrained(folder)")
    found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    return ValueError(f"weights: no {WEIGHTS_NAME} (or {SHARDED_INDEX_NAME}) in {directory}; it holds {found}")


# ----------------------------------------------------------------------------- fastdiff -> diffusers
def unet_config_to_diffusers(config) -> dict:
    """Keyword arguments for ``diffusers.UNet2DModel`` that build ``config``'s (a UNet2DConfig) network."""
    down = ["AttnDownBlock2D" if attn else "DownBlock2D" for attn in config.attention_levels]
    up = ["AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(config.attention_levels)]
    return dict(
        sample_size=config.sample_size, in_channels=config.in_channels, out_channels=config.out_channels,
        block_out_channels=list(config.block_out_channels), layers_per_block=config.layers_per_block,
        down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2D", add_attention=True,
        time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1,
        downsample_padding=0, downsample_type="conv", upsample_type="conv", act_fn="silu",
        resnet_time_scale_shift="default", mid_block_scale_factor=1, center_input_sample=False,
        norm_num_groups=config.norm_num_groups, norm_eps=config.norm_eps,
        attention_head_dim=config.attention_head_dim, dropout=config.dropout,
        num_class_embeds=None if config.num_classes is None else config.num_classes + 1,
    )


def unet_config_file(config) -> dict:
    """unet/config.json in diffusers' format: every UNet2DModel key (no diffusers default fills in for
    a missing one), the class, and for a class-conditional U-Net the null-class label."""
    from . import __version__

    data = {**UNET2D_MODEL_DEFAULTS, **unet_config_to_diffusers(config), "_class_name": UNET_CLASS,
            "_diffusers_version": DIFFUSERS_VERSION, "_fastdiff_version": __version__}
    if config.num_classes is not None:
        data[NULL_CLASS_KEY] = config.num_classes
    return data


def save_unet(state_dict: dict, config, directory) -> Path:
    """Write ``directory/config.json`` and ``directory/diffusion_pytorch_model.safetensors`` (atomically each)."""
    directory = Path(directory)
    save_tensors(state_dict, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    write_json(unet_config_file(config), directory / CONFIG_NAME)
    return directory


# ----------------------------------------------------------------------------- pipelines
def pipeline_scheduler_name(index: dict, where) -> str:
    """The scheduler class that samples as a diffusers pipeline folder does: the saved one, or the one
    its pipeline's constructor converts it to (DDIMPipeline always runs DDIM)."""
    pipeline = index.get("_class_name")
    components = {k: v for k, v in index.items() if not k.startswith("_")}
    unet = _component(components.get("unet"))
    if unet[1] == "UNet2DConditionModel":
        raise ValueError(f"path: {where} is a diffusers {pipeline} around a UNet2DConditionModel (a text-conditioned "
                         f"U-Net, as in Stable Diffusion); {ACCELERATE_HINT}")
    if pipeline not in PIPELINES:
        raise ValueError(f"path: {where} is a diffusers {pipeline!r}; fastdiff loads diffusers' "
                         f"{', '.join(PIPELINES)} folders (a UNet2DModel and a scheduler)")
    extra = sorted(set(components) - {"unet", "scheduler"})
    if extra or unet[1] != UNET_CLASS:
        raise ValueError(f"path: {where} must name a unet ({UNET_CLASS}) and a scheduler only, as diffusers' "
                         f"{pipeline} does; it names unet {unet[1]!r}{' and ' + str(extra) if extra else ''}")
    library, saved = _component(components.get("scheduler"))
    if library == "fastdiff.compat.diffusers" and saved.startswith("Fast"):  # a pipeline saved after accelerate()
        saved = saved[len("Fast"):]
    return PIPELINES[pipeline] or saved


def _component(entry) -> tuple:
    """(library, class name) of a model_index.json entry such as ["diffusers", "UNet2DModel"]."""
    if isinstance(entry, (list, tuple)) and len(entry) == 2:
        return tuple(entry)
    return (None, None)


# The β schedules diffusers' classes compute (0.42.1); fastdiff's schedulers take sigmoid and laplace
# everywhere, diffusers' DDIM, PNDM and DPM-Solver raise NotImplementedError for them.
DIFFUSERS_BETA_SCHEDULES = {"DDPMScheduler": ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid")}
COMMON_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def scheduler_for_diffusers(scheduler):
    """``scheduler``, or a twin of it whose config diffusers' class of the same name turns into the
    same numbers. Two configs need rewriting:
    - a β schedule that diffusers' class lacks (sigmoid or laplace outside DDPM): its β table is
      written as ``trained_betas``, before any zero-SNR rescale, which diffusers applies after;
    - DDPM's ``variance_type="fixed_large_log"``: fastdiff gives it σ = √β_t, diffusers NaN (the
      root of log β_t); diffusers' ``fixed_large`` is that σ."""
    from .schedulers.schedule import make_betas

    config, name, changes = scheduler.config, type(scheduler).__name__, {}
    if (config.get("trained_betas") is None
            and config.get("beta_schedule") not in DIFFUSERS_BETA_SCHEDULES.get(name, COMMON_BETA_SCHEDULES)):
        changes["trained_betas"] = make_betas(config.num_train_timesteps, config.beta_start, config.beta_end,
                                              config.beta_schedule).tolist()
    if name == "DDPMScheduler" and config.get("variance_type") == "fixed_large_log":
        changes["variance_type"] = "fixed_large"
    return type(scheduler).from_config(config, **changes) if changes else scheduler


def pipeline_index(scheduler_name: str, conditional: bool) -> dict:
    """model_index.json for a diffusers pipeline that samples as fastdiff's would, or a ValueError
    saying why none does (checked before anything is written)."""
    from . import __version__

    if conditional:
        raise ValueError("format='diffusers': diffusers' unconditional pipelines (DDPMPipeline, DDIMPipeline) never "
                         "pass class labels to the U-Net, so they cannot sample this class-conditional model; save "
                         "the U-Net alone with pipe.unet.save_pretrained(folder, format='diffusers') and pass "
                         "class_labels to diffusers' UNet2DModel yourself (its null class is label num_classes)")
    if scheduler_name not in PIPELINE_FOR_SCHEDULER:
        raise ValueError(f"format='diffusers': no diffusers pipeline samples with {scheduler_name} as fastdiff does "
                         "(DDPMPipeline neither scales the starting noise nor calls scale_model_input, and passes "
                         f"generator= to step); the schedulers it can save are {', '.join(PIPELINE_FOR_SCHEDULER)} "
                         "(e.g. pipe.scheduler = fastdiff.schedulers.swapped(pipe.scheduler, 'ddim')), or save "
                         "with format='fastdiff'")
    return {"_class_name": PIPELINE_FOR_SCHEDULER[scheduler_name], "_diffusers_version": DIFFUSERS_VERSION,
            "_fastdiff_version": __version__, "unet": ["diffusers", UNET_CLASS],
            "scheduler": ["diffusers", scheduler_name]}
