"""End-to-end sampling with the DDPM CIFAR-10 U-Net (35.7M parameters, 32×32) at B = 1, 16, 128, 256:
DDIM at 50 steps, and DPM-Solver++(2M) at 10 steps (``sampler`` "dpmpp").

One timed call is a whole sampling run: noise, ``STEPS`` U-Net forwards and scheduler steps, the
images left on the device. Every provider runs the same architecture with the same weights (seed 0):

* fastdiff: ``fastdiff.DiffusionPipeline`` on the triton backend (fused GroupNorm+SiLU, flash
  attention, fused DDIM step, or the fused multistep step for DPM++);
* fastdiff_graph: the same with ``cuda_graph=True`` (GPU only): one pipeline serves every call,
  so the untimed first call captures the step's CUDA graph and every timed call replays it, one
  launch per step instead of the U-Net's hundreds;
* fastdiff_graph_cl: the same after ``unet.to(memory_format=torch.channels_last)`` (GPU only):
  x_t is drawn channels_last and every layer keeps that layout, so cuDNN's tensor-core
  convolutions (NHWC) need no transposes, and the attention block's tokens are views;
* reference: the same pipeline on the torch backend;
* torch_peer: the same, with the U-Net ``torch.compile``d (under compilation ``fastdiff.ops``
  traces the reference, so the U-Net is one graph for Inductor to fuse);
* diffusers: stock ``DDIMPipeline`` on ``UNet2DModel(**config.to_diffusers())`` with our weights
  and SDPA attention (``AttnProcessor2_0``); for DPM++ the stock ``DDPMPipeline`` (the generic
  unconditional loop) with diffusers' ``DPMSolverMultistepScheduler``;
* diffusers_compile: the same with the U-Net ``torch.compile``d;
* diffusers_fastdiff: the stock pipeline after ``fastdiff.compat.diffusers.accelerate(pipe)``,
  skipped when that module is not there or does not take the scheduler (for DPM++ it swaps in
  ``FastDPMSolverMultistepScheduler``).

DPM++ 10 steps against DDIM 50: DPM-Solver++(2M) (``fastdiff.DPMSolverMultistepScheduler()``, second
order) is used at ~10 steps where DDIM needs ~50 (Lu et al. 2022b; whether the samples match is
``fastdiff quality --runs ddim-50 dpm++-10``'s question), so the two samplers' images/s
(``images_per_s`` in every record) at the same B and dtype compare the time to an image. Its
records are named ``<case>_dpmpp`` (so the two samplers' rows stay apart in the tables), its test
ids carry ``dpmpp``; ``DPM_STEPS`` gives its step count per tier (quick: 10, as DDIM's; CPU: 2).
DPM++'s ODE draws no noise inside the loop either.

FLOPs: the U-Net's forward counted once (costs.unet_flops_per_image: ~12.4 GFLOP per image) ×
B × steps; compute bound, judged against the matmul rate of the precision (fp32: TF32, which
cuDNN uses for fp32 convolutions by default). η = 0, so no noise is drawn inside the loop. On a
CPU: the digits U-Net (1.1M parameters) at B = 1, 2 steps, fp32, the eager providers only
(fastdiff_graph and fastdiff_graph_cl are skipped: CUDA graphs need a CUDA GPU). How much of a graphed step is not the
U-Net: bench_step_overhead.py.
"""

import dataclasses
import importlib

import pytest
import torch

import costs
import harness
import fastdiff

OP = "end_to_end"
STEPS = {"full": 50, "quick": 10, "cpu": 2}  # DDIM's
DPM_STEPS = {"full": 10, "quick": 10, "cpu": 2}
# sampler -> (its label in the records, its fastdiff scheduler, its steps per tier)
SAMPLERS = {"ddim": ("DDIM", fastdiff.DDIMScheduler, STEPS),
            "dpmpp": ("DPM++", fastdiff.DPMSolverMultistepScheduler, DPM_STEPS)}
PROVIDERS = ["fastdiff", "fastdiff_graph", "fastdiff_graph_cl", "reference", "torch_peer", "diffusers",
             "diffusers_compile", "diffusers_fastdiff"]
COMPILED = ("torch_peer", "diffusers_compile")
GRAPH_SKIP = "cuda_graph=True needs a CUDA GPU (there are no CUDA graphs on a CPU)"

# GPU: the CIFAR-10 U-Net. CPU: the digits architecture (1.1M parameters, 16x16, unconditional
# here because DDIMPipeline passes no labels), where a sampling call takes milliseconds, not seconds.
CASES = harness.expand(
    [(f"{preset}_B{b}", {"preset": preset, "B": b}, tiers)
     for preset, b, tiers in (("ddpm-cifar10", 1, {"full", "quick"}), ("ddpm-cifar10", 16, {"full"}),
                              ("ddpm-cifar10", 128, {"full", "quick"}), ("ddpm-cifar10", 256, {"full"}),
                              ("digits", 1, {"cpu"}))],
    {"full": ("fp32", "bf16"), "quick": ("bf16",), "cpu": ("fp32",)})


def build_unet(preset, device, dtype) -> fastdiff.UNet2D:
    """The preset's U-Net, unconditional, with seed-0 weights (identical in every provider), in eval
    mode (no dropout)."""
    torch.manual_seed(0)
    return fastdiff.UNet2D.from_preset(preset, num_classes=None).eval().to(device=device, dtype=dtype)


def fastdiff_sampler(unet, batch, steps, backend, cuda_graph=False, sampler="ddim"):
    """One pipeline for every call: with ``cuda_graph`` the first call captures the step's graph
    (``pipe._graphed``) and the later calls, same batch and steps, replay it."""
    pipe = fastdiff.DiffusionPipeline(unet, SAMPLERS[sampler][1]())

    def sample():
        with fastdiff.use_backend(backend):
            return pipe(batch_size=batch, num_inference_steps=steps, progress=False, cuda_graph=cuda_graph).images

    return sample


def diffusers_sampler(unet, batch, steps, compile=False, accelerate=False, sampler="ddim"):
    """diffusers' own pipeline: DDIMPipeline (η = 0) for DDIM; DDPMPipeline, the generic loop of
    ``scheduler.step``, with DPMSolverMultistepScheduler for DPM++. Each scheduler from the config of
    fastdiff's (the CIFAR-10 model's linear β schedule)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
    theirs = diffusers.UNet2DModel(**unet.config.to_diffusers())
    theirs.load_state_dict(unet.state_dict(), strict=True)
    theirs = use_sdpa(theirs.eval().to(device=unet.device, dtype=unet.dtype))
    ours = SAMPLERS[sampler][1]()
    scheduler = getattr(diffusers, type(ours).__name__).from_config(ours.config)
    pipeline = diffusers.DDIMPipeline if sampler == "ddim" else diffusers.DDPMPipeline
    pipe = pipeline(unet=theirs, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    if compile:
        harness.reset_compile()
        pipe.unet.compile(dynamic=False)
    if accelerate:
        try:
            pipe = _accelerate()(pipe) or pipe
        except ValueError as err:  # a scheduler accelerate does not swap: nothing of fastdiff's would run
            pytest.skip(f"diffusers_fastdiff: {err}")
    eta = {"eta": 0.0} if sampler == "ddim" else {}
    return lambda: pipe(batch_size=batch, num_inference_steps=steps, output_type="pt", **eta).images


def use_sdpa(model):
    """Every attention of a diffusers model on ``AttnProcessor2_0`` (SDPA): diffusers' default on
    torch 2, set explicitly so that the comparison cannot silently run the unfused processor."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert attentions, "the CIFAR-10 U-Net has attention layers"
    for module in attentions:
        module.set_processor(AttnProcessor2_0())
    return model


def _accelerate():
    try:
        return importlib.import_module("fastdiff.compat.diffusers").accelerate
    except (ImportError, AttributeError) as err:
        pytest.skip(f"diffusers_fastdiff: fastdiff.compat.diffusers.accelerate is not available ({err})")


def make_sampler(provider, unet, batch, steps, sampler="ddim"):
    if provider in ("fastdiff", "fastdiff_graph", "fastdiff_graph_cl", "reference"):
        if provider == "fastdiff_graph_cl":
            unet.to(memory_format=torch.channels_last)
        return fastdiff_sampler(unet, batch, steps, "torch" if provider == "reference" else "triton",
                                cuda_graph=provider.startswith("fastdiff_graph"), sampler=sampler)
    if provider == "torch_peer":
        harness.reset_compile()
        unet.compile(dynamic=False)
        return fastdiff_sampler(unet, batch, steps, "torch", sampler=sampler)
    if provider == "diffusers_fastdiff":
        sample = diffusers_sampler(unet, batch, steps, accelerate=True, sampler=sampler)

        def on_triton():
            with fastdiff.use_backend("triton"):
                return sample()

        return on_triton
    return diffusers_sampler(unet, batch, steps, compile=provider == "diffusers_compile", sampler=sampler)


_reference_images: dict[tuple, torch.Tensor] = {}


def reference_images(case, device, steps, sampler="ddim") -> torch.Tensor:
    """The reference provider's images of this case (seed 0), sampled once and kept for the other
    providers' checks: every provider draws the same noise from the global generator."""
    key = (case.id, device, steps, sampler)
    if key not in _reference_images:
        unet = build_unet(case.dims["preset"], device, case.torch_dtype)
        sample = fastdiff_sampler(unet, case.dims["B"], steps, "torch", sampler=sampler)
        torch.manual_seed(0)
        _reference_images[key] = sample()
    return _reference_images[key]


def sampler_case(case: harness.Case, sampler: str) -> harness.Case:
    """The case as its records name it: DDIM's keep the case's name, DPM++'s are ``<case>_dpmpp``."""
    return case if sampler == "ddim" else dataclasses.replace(case, shape=f"{case.shape}_{sampler}")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_end_to_end(bench, env, case, sampler, provider):
    bench.skip_unless_runnable(provider, compiled=provider in COMPILED)
    if provider in COMPILED and not env.on_gpu:
        pytest.skip(f"{provider}: compiling a U-Net takes minutes on a CPU; GPU only")
    if provider.startswith("fastdiff_graph") and not env.on_gpu:
        pytest.skip(f"{provider}: {GRAPH_SKIP}")
    label, _, steps_by_tier = SAMPLERS[sampler]
    preset, batch, steps = case.dims["preset"], case.dims["B"], steps_by_tier[env.tier]
    unet = build_unet(preset, env.device, case.torch_dtype)
    fn = make_sampler(provider, unet, batch, steps, sampler)
    cost = costs.sampling(costs.unet_flops_per_image(preset), batch, steps)
    # The error against the reference is recorded, not judged: 50 steps compound rounding differences
    # (TF32 convolutions, bf16) in ways no fixed tolerance separates from a bug; the op cases judge.
    expected = None if provider == "reference" else lambda: reference_images(case, env.device, steps, sampler)
    # Seconds per call at large B: no warm-up beyond the untimed first call, 3 timed calls at least.
    info = bench.run(op=OP, provider=provider, case=sampler_case(case, sampler), fn=fn, cost=cost, expected=expected,
                     flush_l2=False, extra={"sampler": f"{label}-{steps}", "steps": steps, "preset": preset},
                     rounds=1, warmup_ms=0, rep_ms=2000 if env.on_gpu else 100, min_reps=3, max_reps=20)
    bench.benchmark.extra_info["images_per_s"] = batch / (info["median_ms"] * 1e-3)
