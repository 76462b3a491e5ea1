"""Stable Diffusion 1.5's U-Net and VAE decoder as diffusers builds them: what bench_sd_unet.py and
bench_sd_vae.py time (not a bench file itself: benchmarks/conftest.py collects ``bench_*.py`` only).

The models are built from SD 1.5's own configs (the ``unet/config.json`` and ``vae/config.json`` of
runwayml/stable-diffusion-v1-5, written out below), with random weights: the time of a forward does
not depend on them. Nothing is downloaded and there is no text encoder (so no transformers): the
U-Net's 77×768 text states are random numbers of the CLIP encoder's shape.

* ``sd15``: the real sizes. U-Net: 859.5M parameters, block_out_channels 320/640/1280/1280,
  CrossAttnDownBlock2D ×3 + DownBlock2D, UpBlock2D + CrossAttnUpBlock2D ×3, 2 layers per block,
  ``attention_head_dim=8`` (diffusers' legacy name for 8 heads, so head dims 40/80/160),
  cross_attention_dim 768, 64×64×4 latents. VAE: 128/256/512/512, 4 latent channels, 2 layers per
  block; its decoder (49.5M parameters) turns 64×64 latents into a 512×512 image. Its one
  attention (the mid block's, 1 head of 512 channels over 64×64 = 4096 tokens) has a head dim over
  fastdiff's 256, so ``FastAttnProcessor`` runs SDPA there, as the stock processor does; its
  GroupNorms (up to 128 channels at 512×512) are what ``accelerate`` changes.
* ``tiny``: the same block types at toy widths (32/64 channels, 1 layer per block, 8×8 latents):
  the CPU tier's smoke test of the same code path (tests/test_bench_sd.py).

Providers (``make_call``; every one a fresh model with the same seed-0 weights, in eval mode,
gradients off, every call under ``torch.no_grad``):

* ``diffusers``: the stock model, every attention on ``AttnProcessor2_0`` (SDPA; diffusers'
  default on torch 2, set explicitly);
* ``fastdiff``: ``fastdiff.compat.diffusers.accelerate(model)`` (``FastAttnProcessor`` in every
  attention, fastdiff's GroupNorm kernel in every GroupNorm, the SiLU after it fused where one
  follows), run on the triton backend (on a CPU: the torch backend, where it computes what the
  stock model does);
* ``fastdiff_graph``: ``accelerate(model, cuda_graph=True)``: the same, and the U-Net's forward
  (the VAE's ``decode``) captured into a CUDA graph per input signature and replayed;
* ``diffusers_compile``: the stock model ``.compile(dynamic=False)``d (torch.compile, Inductor's
  default mode).

Costs (``cost``), counted once per model and batch on the meta device (no memory, no time):
FLOPs by torch's FLOP counter (2 per multiply-add of every convolution and matmul, attention's
included; norms, activations and softmax left out), bytes the fewest a forward must move: every
weight it uses read once, its inputs read and its output written once (the activations are left
out, so this floor is loose: for the U-Net at B = 2 its time is about a quarter of the FLOP
floor's on an H100-class GPU, for the VAE under 1%; estimates from datasheet rates).
SD 1.5 at batch 2 with 64×64 latents: 1.607 TFLOP per U-Net forward (convolutions 888 GFLOP,
linear layers 467, attention's two matmuls 252), 1.72 GB of fp16 weights; the VAE decode of one
64×64 latent: 2.51 TFLOP (convolutions 2.47) and 99 MB of weights.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Callable

import torch

import costs
import harness

UNET_CONFIGS = {
    "sd15": {
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
        "flip_sin_to_cos": True, "freq_shift": 0,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "downsample_padding": 1,
        "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
        "cross_attention_dim": 768, "attention_head_dim": 8,
    },
    "tiny": {
        "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 32, "cross_attention_dim": 32,
        "attention_head_dim": 2,
    },
}
VAE_CONFIGS = {
    "sd15": {
        "sample_size": 512, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "act_fn": "silu", "norm_num_groups": 32,
    },
    "tiny": {
        "sample_size": 16, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
        "block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 32,
    },
}
TEXT_TOKENS = 77  # CLIP ViT-L/14's context: every SD 1.x prompt is padded to 77 tokens
TIMESTEP = 500  # any of the 1000 training steps: the U-Net's work does not depend on it
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}  # harness.DTYPES has no fp16
# ‖out − ref‖ / ‖ref‖ against the stock model before a provider is timed. fp16: one forward through
# 16 attention blocks and 22 resnets in fp16, against fp16 SDPA; the flash kernel and Inductor round
# differently, by ~1e-3 (an estimate: not yet run on a GPU); a wrong kernel is off by ~1.
TOLERANCE = {"fp16": 2e-2, "fp32": harness.TOLERANCE["fp32"]}
PROVIDERS = ("diffusers", "fastdiff", "fastdiff_graph", "diffusers_compile")
GRAPH_SKIP = "cuda_graph=True needs a CUDA GPU (there are no CUDA graphs on a CPU)"
# timed()'s arguments: a forward takes ~10-60 ms on an H100-class GPU (estimates), ms on a CPU
TIMING = {"cuda": {"warmup_ms": 200, "rep_ms": 1000, "min_reps": 10, "max_reps": 200, "rounds": 3},
          "cpu": {"warmup_ms": 0, "rep_ms": 20, "min_reps": 2, "max_reps": 5, "rounds": 1}}


class Unavailable(Exception):
    """A provider that cannot run here (its message says why): the bench skips the case with it."""


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def _diffusers():
    try:
        return importlib.import_module("diffusers")
    except ImportError as err:
        raise Unavailable(f"diffusers is not installed ({err})") from err


# ----------------------------------------------------------------------------- models and inputs
def build(kind: str, preset: str, device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The preset's U-Net (``kind`` "unet") or VAE ("vae") with seed-``seed`` weights, built directly
    on ``device`` (no CPU initialisation of 860M parameters, no download), in eval mode with
    gradients off and every attention on SDPA."""
    from diffusers.utils import logging

    config = {"unet": UNET_CONFIGS, "vae": VAE_CONFIGS}[kind][preset]
    cls = model_class(kind)
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(**config)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # .to(dtype) warns that no module is kept in fp32 (there is none to keep)
    try:
        model = model.to(dtype=dtype)
    finally:
        logging.set_verbosity(verbosity)
    return use_sdpa(model.eval().requires_grad_(False))


def model_class(kind: str) -> type:
    """diffusers' class for ``kind``; the first call imports diffusers' models (seconds)."""
    diffusers = _diffusers()
    return {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL}[kind]


def use_sdpa(model: torch.nn.Module) -> torch.nn.Module:
    """Every attention module on ``AttnProcessor2_0`` (SDPA): diffusers' default on torch 2, set
    explicitly so that the stock side cannot silently run the unfused processor."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    if not attentions:
        raise ValueError(f"{type(model).__name__} has no diffusers Attention modules")
    for module in attentions:
        module.set_processor(AttnProcessor2_0())
    return model


def inputs(kind: str, dims: dict, device, dtype: torch.dtype, seed: int = 1) -> tuple:
    """Random inputs of the case, the same in every provider (never zeros: they can run faster).
    U-Net: (latents (B, 4, h, w), a 0-d int64 timestep, text states (B, 77, 768)), the timestep on
    the device as the pipelines pass ``scheduler.timesteps[i]``. VAE: (latents (B, 4, h, w),),
    divided by SD's scaling factor as the pipelines do before ``vae.decode``."""
    generator = torch.Generator().manual_seed(seed)
    batch, size = dims["B"], dims["latent"]
    if kind == "unet":
        config = UNET_CONFIGS[dims["preset"]]
        latents = torch.randn(batch, config["in_channels"], size, size, generator=generator)
        text = torch.randn(batch, dims["tokens"], config["cross_attention_dim"], generator=generator)
        timestep = torch.tensor(TIMESTEP, dtype=torch.int64)
        return latents.to(device, dtype), timestep.to(device), text.to(device, dtype)
    latents = torch.randn(batch, VAE_CONFIGS[dims["preset"]]["latent_channels"], size, size, generator=generator)
    return ((latents / 0.18215).to(device, dtype),)


def forward(kind: str, model: torch.nn.Module, args: tuple) -> Callable[[], torch.Tensor]:
    """The timed call: one U-Net forward (the pipelines' call, text states by keyword) or one VAE
    decode, under no_grad (the attention kernel has no backward: with autograd on, fastdiff's
    processor would run SDPA)."""
    if kind == "unet":
        latents, timestep, text = args

        def call():
            with torch.no_grad():
                return model(latents, timestep, encoder_hidden_states=text, return_dict=False)[0]
    else:
        (latents,) = args

        def call():
            with torch.no_grad():
                return model.decode(latents, return_dict=False)[0]

    return call


def accelerate_function(cuda_graph: bool) -> Callable:
    """``fastdiff.compat.diffusers.accelerate``, or Unavailable saying why (the module missing; with
    ``cuda_graph``, an ``accelerate`` that does not take that keyword yet)."""
    try:
        accelerate = importlib.import_module("fastdiff.compat.diffusers").accelerate
    except (ImportError, AttributeError) as err:
        raise Unavailable(f"fastdiff.compat.diffusers.accelerate is not available ({err})") from err
    if cuda_graph and "cuda_graph" not in inspect.signature(accelerate).parameters:
        raise Unavailable("accelerate(model, cuda_graph=True) is not available: this fastdiff's accelerate has no "
                          "cuda_graph keyword")
    return accelerate


def make_call(provider: str, kind: str, dims: dict, device, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """What ``provider`` times on the case: a fresh model (seed-0 weights) and its forward on the
    case's inputs. The fastdiff providers run on the triton backend on a GPU, on the torch backend
    on a CPU (their Triton kernels would run in the interpreter there)."""
    import fastdiff

    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}; got {provider!r}")
    model = build(kind, dims["preset"], device, dtype)
    if provider == "fastdiff":
        accelerate_function(cuda_graph=False)(model)
    elif provider == "fastdiff_graph":  # the U-Net's forward, the VAE's decode graphed
        model = accelerate_function(cuda_graph=True)(model, cuda_graph=True)
    elif provider == "diffusers_compile":
        from torch import _dynamo

        if not hasattr(torch, "compile") or not _dynamo.is_dynamo_supported():
            raise Unavailable(f"torch.compile is not supported here (torch {torch.__version__})")
        harness.reset_compile()
        model.compile(dynamic=False)
    call = forward(kind, model, inputs(kind, dims, device, dtype))
    call.model = model  # for the record and the tests: what runs (processors, swapped modules, graphs)
    if provider.startswith("fastdiff"):
        backend = "triton" if torch.device(device).type == "cuda" else "torch"
        eager = call

        def call():
            with fastdiff.use_backend(backend):
                return eager()

        call.model = model
    return call


def fast_modules(model: torch.nn.Module) -> dict[str, int]:
    """How many of the model's modules (and attention processors) are fastdiff's: class name -> count."""
    names = [type(m).__name__ for m in model.modules()]
    names += [type(m.processor).__name__ for m in model.modules() if hasattr(m, "processor")]
    return {name: names.count(name) for name in sorted(set(names)) if name.startswith("Fast")}


_reference: dict[tuple, torch.Tensor] = {}


def reference_key(kind: str, dims: dict, device, dtype: torch.dtype) -> tuple:
    return kind, tuple(sorted(dims.items())), str(device), dtype


def reference_output(kind: str, dims: dict, device, dtype: torch.dtype) -> torch.Tensor:
    """The stock model's output on the case's inputs: kept from the ``diffusers`` provider's case when
    it ran first, else computed here once (a model of its own, freed after)."""
    key = reference_key(kind, dims, device, dtype)
    if key not in _reference:
        remember_reference(key, make_call("diffusers", kind, dims, device, dtype))
    return _reference[key]


def remember_reference(key: tuple, call: Callable[[], torch.Tensor]) -> torch.Tensor:
    _reference[key] = call().clone()
    return _reference[key]


# ----------------------------------------------------------------------------- costs
@functools.cache
def count(kind: str, preset: str, batch: int, latent: int, tokens: int = TEXT_TOKENS) -> dict:
    """FLOPs of one forward (U-Net) or decode (VAE) and the parameters it uses, counted on the meta
    device by torch's FLOP counter, plus the attention modules' (heads, head dim) pairs."""
    from diffusers.models.attention_processor import Attention
    from torch.utils.flop_counter import FlopCounterMode

    model = build(kind, preset, "meta", torch.float32)
    args = inputs(kind, {"preset": preset, "B": batch, "latent": latent, "tokens": tokens}, "meta", torch.float32)
    with FlopCounterMode(display=False) as counter:
        out = forward(kind, model, args)()
    used = model if kind == "unet" else [model.post_quant_conv, model.decoder]
    params = sum(p.numel() for m in (used if isinstance(used, list) else [used]) for p in m.parameters())
    heads = sorted({(m.heads, m.inner_dim // m.heads) for m in model.modules() if isinstance(m, Attention)})
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"flops": int(counter.get_total_flops()), "params": params, "heads": heads, "flops_by_op": by_op,
            "input_numel": sum(a.numel() for a in args if a.is_floating_point()), "output_numel": out.numel()}


def cost(kind: str, dims: dict, itemsize: int) -> costs.Cost:
    """The case's floor: its FLOPs (``count``) and the fewest bytes, every used weight, the float
    inputs and the output in ``itemsize`` bytes per element, each once."""
    c = count(kind, dims["preset"], dims["B"], dims["latent"], dims.get("tokens", TEXT_TOKENS))
    return costs.Cost(bytes=(c["params"] + c["input_numel"] + c["output_numel"]) * itemsize, flops=c["flops"])


def ceiling_key(dtype_name: str, env: harness.Env) -> str:
    """The matmul rate a case is judged by. fp16 on a GPU: the bf16 8192³ matmul's, which the suite
    measures (the tensor cores' fp16 and bf16 rates are the same on sm_80 and sm_90); on a CPU: fp32."""
    if not env.on_gpu:
        return "fp32"
    return "bf16" if dtype_name == "fp16" else harness.ceiling_key(dtype_name, env, "end_to_end")


# ----------------------------------------------------------------------------- one case
_stock_ms: dict[tuple[str, str], float] = {}  # (op, case id) -> the diffusers provider's median this session


def run_case(bench: harness.Recorder, env: harness.Env, case: harness.Case, provider: str, kind: str,
             op: str) -> dict:
    """Build ``provider``'s model for ``case``, call it once (the untimed first call: Triton's JIT,
    the graph capture, the compile), check it against the stock model, time it, and record it with
    its rate (U-Net: ``steps_per_s``, one forward per sampling step; VAE: ``decodes_per_s``) and
    ``speedup_vs_diffusers`` (the stock provider's median over this one's, same session). Returns
    the record (``bench.benchmark.extra_info``)."""
    import time

    import pytest

    bench.skip_unless_runnable(provider, compiled=provider == "diffusers_compile")
    if provider == "fastdiff_graph" and not env.on_gpu:
        pytest.skip(f"{provider}: {GRAPH_SKIP}")
    if provider == "diffusers_compile" and not env.on_gpu:
        pytest.skip(f"{provider}: compiling a U-Net takes minutes on a CPU; GPU only")
    dims, dtype = case.dims, torch_dtype(case.dtype)
    try:
        model_class(kind)  # diffusers' lazy import of its models, before build_s starts
        started = time.perf_counter()
        fn = make_call(provider, kind, dims, env.device, dtype)
    except Unavailable as err:
        pytest.skip(f"{provider}: {err}")
    built = time.perf_counter()
    try:
        out = fn()
        harness.synchronize(env.device)
    except Exception as err:  # noqa: BLE001 -- only torch.compile's failures are a skip, the rest fail the case
        if provider != "diffusers_compile":
            raise
        pytest.skip(f"{provider}: torch.compile failed on this model here ({type(err).__name__}: "
                    f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no message'})")
    first_call_s = time.perf_counter() - built
    if provider == "diffusers":
        remember_reference(reference_key(kind, dims, env.device, dtype), lambda: out)
        expected = None
    else:
        def expected():
            return reference_output(kind, dims, env.device, dtype)
    del out

    cost_ = cost(kind, dims, torch.finfo(dtype).bits // 8)
    counted = count(kind, dims["preset"], dims["B"], dims["latent"], dims.get("tokens", TEXT_TOKENS))
    extra = {"model": kind, "preset": dims["preset"], "batch": dims["B"], "latent": dims["latent"],
             "tokens": dims.get("tokens"), "params": counted["params"], "heads": counted["heads"],
             "flops_by_op": counted["flops_by_op"], "build_s": built - started, "first_call_s": first_call_s,
             "backend": ("triton" if env.on_gpu else "torch") if provider.startswith("fastdiff") else None,
             "fast_modules": fast_modules(fn.model)}
    info = bench.run(op=op, provider=provider, case=case, fn=fn, cost=cost_, expected=expected,
                     tolerance=TOLERANCE[case.dtype], flush_l2=False, extra=extra, **TIMING[env.device])
    median_ms = info["median_ms"]
    if provider == "diffusers":
        _stock_ms[(op, case.id)] = median_ms
    stock_ms = _stock_ms.get((op, case.id))
    # U-Net: a forward of B latents is one sampling step of B/2 images with guidance (stable-fast's
    # it/s at batch 1 is this at B = 2); VAE: a decode of B latents is B images
    rate = ({"steps_per_s": 1e3 / median_ms, "images_per_step": dims["B"] // 2} if kind == "unet" else
            {"decodes_per_s": 1e3 / median_ms, "images_per_s": dims["B"] * 1e3 / median_ms})
    record = bench.benchmark.extra_info
    record.update(rate, speedup_vs_diffusers=stock_ms / median_ms if stock_ms else None,
                  **harness.derive(cost_, median_ms, bench.ceilings, ceiling_key(case.dtype, env)))
    return record
