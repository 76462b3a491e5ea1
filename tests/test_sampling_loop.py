"""The sync-free sampling loop (``fastdiff.sampling_loop``) and ``pipe(..., cuda_graph=True)``.

On the CPU: the loop equals a loop of public ``Scheduler.step`` calls bit for bit, reads nothing
back to the host (no ``.item()``, no data-dependent branch), and with graph capture stubbed
it captures, replays and reuses the right steps. On a GPU (``-m gpu``): real CUDA graphs give
the same images as the eager loop, and the eager loop runs under ``torch.cuda.set_sync_debug_mode``
("error") without a single synchronisation.
"""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastdiff
from fastdiff import (DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler,
                      EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)
from fastdiff.schedulers.solver import LinearScheduler
from fastdiff.sampling_loop import SamplingLoop, loop_key
from fastdiff.schedulers.ddim import ddim_alphas
from fastdiff.schedulers.ddpm import ddpm_alphas

STEPS = 5
# (scheduler, pipeline keywords): guided and unguided, deterministic and stochastic, SDEdit
CASES = {
    "ddim": (lambda: DDIMScheduler(num_train_timesteps=50), {}),
    "ddim_eta_cfg": (lambda: DDIMScheduler(num_train_timesteps=50),
                     {"eta": 0.5, "class_labels": [0, 1, 2], "guidance_scale": 2.0}),
    "ddpm_labels": (lambda: DDPMScheduler(num_train_timesteps=50), {"class_labels": 1, "guidance_scale": 1.0}),
    "ddpm_offset": (lambda: DDPMScheduler(num_train_timesteps=50, steps_offset=1, variance_type="fixed_large"), {}),
    "ddim_sdedit": (lambda: DDIMScheduler(num_train_timesteps=50, prediction_type="v_prediction"),
                    {"image": torch.linspace(0, 1, 64).reshape(1, 8, 8), "strength": 0.6}),
    # multistep: history slots held by the loop, warm-up and final lower orders, σ-scaled inputs, PRK stages
    "dpm_cfg": (lambda: DPMSolverMultistepScheduler(num_train_timesteps=50),
                {"class_labels": [0, 1, 2], "guidance_scale": 2.0}),
    "sde_dpm3": (lambda: DPMSolverMultistepScheduler(num_train_timesteps=50, algorithm_type="sde-dpmsolver++",
                                                     solver_order=3, lower_order_final=False), {}),
    "unipc_labels": (lambda: UniPCMultistepScheduler(num_train_timesteps=50, solver_order=3), {"class_labels": 1}),
    "euler_karras": (lambda: EulerDiscreteScheduler(num_train_timesteps=50, use_karras_sigmas=True), {}),
    "euler_a_cfg": (lambda: EulerAncestralDiscreteScheduler(num_train_timesteps=50),
                    {"class_labels": [0, 1, 2], "guidance_scale": 2.0}),
    "pndm_prk": (lambda: PNDMScheduler(num_train_timesteps=50), {}),
}


def pipeline(tiny_pipeline, case: str, device: str = "cpu", dtype=torch.float32) -> DiffusionPipeline:
    pipe = tiny_pipeline(device)
    pipe.unet.to(dtype=dtype)
    return DiffusionPipeline(pipe.unet, CASES[case][0](), guidance_scale=1.0)


@torch.no_grad()
def step_by_step(pipe: DiffusionPipeline, generator, batch=3, eta=0.0, class_labels=None, guidance_scale=None,
                 image=None, strength=0.8) -> torch.Tensor:
    """The same sampling written with the public API, one ``Scheduler.step`` per step."""
    unet, scheduler, device = pipe.unet, pipe.scheduler, pipe.device
    shape = (batch, 1, 8, 8)
    scheduler.set_timesteps(STEPS)
    timesteps = scheduler.timesteps
    noise = fastdiff.schedulers.schedule.randn_tensor(shape, generator=generator, device=device, dtype=unet.dtype)
    if image is None:
        x = noise * scheduler.init_noise_sigma
    else:
        timesteps = timesteps[len(timesteps) - int(len(timesteps) * strength):]
        x0 = (image.to(device, unet.dtype) * 2 - 1).expand(shape)
        x = scheduler.add_noise(x0, noise, timesteps[:1].repeat(batch))
    labels = None if class_labels is None else torch.as_tensor(class_labels, device=device).expand(batch)
    kwargs = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    if "generator" in inspect.signature(scheduler.step).parameters:  # not PNDM's (diffusers' signature)
        kwargs["generator"] = generator
    for t in timesteps:
        model_input = scheduler.scale_model_input(x, t)
        if guidance_scale not in (None, 1.0):
            both = unet(torch.cat([model_input] * 2), t, torch.cat([labels, torch.full_like(labels, unet.null_class)]))
            cond, uncond = both.chunk(2)
            kwargs.update(uncond_model_output=uncond, guidance_scale=guidance_scale)
            x = scheduler.step(cond, t, x, **kwargs).prev_sample
        else:
            x = scheduler.step(unet(model_input, t, labels), t, x, **kwargs).prev_sample
    return (x / 2 + 0.5).clamp(0, 1).float()


@contextlib.contextmanager
def unet_on_reference(unet):
    """The U-Net's own ops on the reference while the loop's steps run on the kernels. Under the
    interpreter the U-Net's attention and GroupNorm kernels cost 30-120 s a case here; they are
    checked in the loop by tests/test_end_to_end_triton.py and on their own by the kernel tests."""
    forward = unet.forward

    def reference_forward(*args, **kwargs):
        with fastdiff.use_backend("torch"):
            return forward(*args, **kwargs)

    unet.forward = reference_forward
    try:
        yield
    finally:
        del unet.forward


def sample(pipe, seed=0, generator_device="cpu", **kwargs) -> torch.Tensor:
    generator = torch.Generator(generator_device).manual_seed(seed)
    return pipe(batch_size=3, num_inference_steps=STEPS, generator=generator, progress=False, **kwargs).images


# ----------------------------------------------------------------------------- the loop = Scheduler.step
def step_op(scheduler) -> str:
    if isinstance(scheduler, LinearScheduler):
        return "multistep_update"
    return "ddim_step" if isinstance(scheduler, DDIMScheduler) else "ddpm_step"


# on 'triton' the steps run on their kernels, the U-Net on the reference (``unet_on_reference``)
@pytest.mark.parametrize("case, backend", [(case, "torch") for case in sorted(CASES)]
                         + [("ddim_eta_cfg", "triton"), ("ddpm_offset", "triton"), ("sde_dpm3", "triton"),
                            ("pndm_prk", "triton"), ("euler_a_cfg", "triton")])
def test_loop_equals_step_by_step(tiny_pipeline, case, backend, launches):
    pipe = pipeline(tiny_pipeline, case)
    kwargs = CASES[case][1]
    with fastdiff.use_backend(backend), unet_on_reference(pipe.unet):
        images = sample(pipe, **kwargs)
        expected = step_by_step(pipe, torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(images, expected)
    steps = round(len(pipe.scheduler.timesteps) * kwargs.get("strength", 1.0))  # PRK: 4 calls per step
    assert launches[step_op(pipe.scheduler)] == (2 * steps if backend == "triton" else 0)  # the loop's and ours


def test_step_tables_hold_what_step_uses():
    ddim = DDIMScheduler(num_train_timesteps=50)
    ddim.set_timesteps(STEPS)
    tables = ddim.step_tables(ddim.timesteps, eta=0.3, use_clipped_model_output=None)
    assert tables.host_timesteps == tuple(ddim.timesteps.tolist()) and tables.timesteps.dtype == torch.int64
    assert tables.noisy == (True,) * STEPS
    for row, t in zip(tables.rows, tables.host_timesteps):
        assert torch.equal(row, torch.stack(ddim_alphas(ddim, t)))
    assert tables.rows[-1, 1] == 1.0  # set_alpha_to_one: ᾱ before the first timestep

    ddpm = DDPMScheduler(num_train_timesteps=50)
    ddpm.set_timesteps(STEPS)
    tables = ddpm.step_tables(ddpm.timesteps[2:])
    assert tables.noisy == (True, True, False)  # no noise on the step from t = 0
    prev = list(tables.host_timesteps[1:]) + [-1]
    for row, t, t_prev in zip(tables.rows, tables.host_timesteps, prev):
        assert torch.equal(row, torch.stack(ddpm_alphas(ddpm, t, t_prev)))

    with pytest.raises(ValueError, match="before set_timesteps"):
        DDIMScheduler().step_tables([10])


# ----------------------------------------------------------------------------- nothing read back to the host
class HostReads(TorchDispatchMode):
    """Records every op that hands a tensor's value to Python (``.item()``, ``int(t)``,
    ``bool(t)``, ``if t``, ``nonzero``): on a GPU each one waits for the device."""

    OPS = frozenset({torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                     torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default})

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def host_reads(monkeypatch) -> list[str]:
    """The host reads made inside ``SamplingLoop.run`` (setup, which checks the labels once, excluded)."""
    seen: list[str] = []
    run = SamplingLoop.run

    def recorded(self, *args, **kwargs):
        with HostReads() as mode:
            result = run(self, *args, **kwargs)
        seen.extend(mode.seen)
        return result

    monkeypatch.setattr(SamplingLoop, "run", recorded)
    return seen


@pytest.mark.parametrize("case, backend", [("ddim_eta_cfg", "torch"), ("ddpm_labels", "torch"),
                                           ("ddpm_labels", "triton"), ("dpm_cfg", "torch"), ("euler_a_cfg", "torch"),
                                           ("pndm_prk", "torch"), ("unipc_labels", "torch")])
def test_loop_reads_nothing_back(tiny_pipeline, case, backend, host_reads):
    pipe = pipeline(tiny_pipeline, case)
    with fastdiff.use_backend(backend), unet_on_reference(pipe.unet):
        sample(pipe, **CASES[case][1])
    assert host_reads == []


def test_host_read_detector_sees_the_label_check(tiny_pipeline, host_reads, monkeypatch):
    """The detector is not blind: with the per-call value checks back on inside the loop, it fires."""
    monkeypatch.setattr(fastdiff.sampling_loop.validation, "values_checked", contextlib.nullcontext)
    sample(pipeline(tiny_pipeline, "ddpm_labels"), **CASES["ddpm_labels"][1])
    assert "aten._local_scalar_dense.default" in host_reads


# ----------------------------------------------------------------------------- graph orchestration (capture stubbed)
class StubGraph:
    """Stands in for a captured ``step(noisy)``: replaying it runs the step eagerly."""

    def __init__(self, loop, noisy):
        self.loop, self.noisy, self.replays = loop, noisy, 0

    def replay(self):
        self.replays += 1
        self.loop.step(self.noisy)


@pytest.fixture
def stub_capture(monkeypatch) -> list[bool]:
    """Replace CUDA-graph capture (GPU only) by ``StubGraph`` and the side-stream warm-up by a plain
    step; returns the kinds captured."""
    captured: list[bool] = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: "stream")
    monkeypatch.setattr(SamplingLoop, "warm_up", lambda self, noisy: self.step(noisy))

    def capture(self, noisy):
        captured.append(noisy)
        self.graphs[noisy] = StubGraph(self, noisy)
        return self.graphs[noisy]

    monkeypatch.setattr(SamplingLoop, "capture", capture)
    return captured


def make_loop(pipe, case, steps=STEPS, seed=0):
    """The loop the pipeline builds for ``case`` (no labels), reset to seed's x_T."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    step_kwargs = {"eta": CASES[case][1].get("eta", 0.0), "use_clipped_model_output": None} \
        if isinstance(scheduler, DDIMScheduler) else {}
    loop = SamplingLoop(pipe.unet, scheduler, scheduler.step_tables(scheduler.timesteps, **step_kwargs),
                        (3, 1, 8, 8), None, None, step_kwargs)
    loop.reset(torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(seed)), None)
    return loop


@pytest.mark.parametrize("case, kinds", [("ddim", [False]), ("ddpm_offset", [True]), ("ddpm_labels", [True]),
                                         ("dpm_cfg", [False]), ("sde_dpm3", [True]), ("unipc_labels", [False]),
                                         ("euler_karras", [False]), ("euler_a_cfg", [True]), ("pndm_prk", [False])])
def test_graph_mode_captures_once_per_kind_and_reuses(tiny_pipeline, stub_capture, case, kinds, monkeypatch):
    pipe = pipeline(tiny_pipeline, case)
    eager = make_loop(pipe, case).run(torch.Generator().manual_seed(1), progress=False).clone()

    loop = make_loop(pipe, case)
    eager_steps = []
    step = SamplingLoop.step
    monkeypatch.setattr(SamplingLoop, "step", lambda self, noisy: eager_steps.append(noisy) or step(self, noisy))
    graphed = loop.run(torch.Generator().manual_seed(1), cuda_graph=True, progress=False)
    assert torch.equal(graphed, eager)
    assert stub_capture == kinds
    # each kind's first step eager, then replays; a kind seen once (DDPM's t = 0 step) stays eager
    noisy, steps = loop.tables.noisy, len(loop.tables)  # PNDM with PRK: STEPS + 9 steps
    replayed = sum(graph.replays for graph in loop.graphs.values())
    assert replayed == steps - len(set(noisy))
    assert len(eager_steps) == steps  # replays of the stub step eagerly too: every step ran exactly once

    # a second run of the same loop replays from the first step; nothing new is captured (a kind
    # that comes up once per run stays eager)
    eager_steps.clear()
    loop.reset(torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), None)
    again = loop.run(torch.Generator().manual_seed(1), cuda_graph=True, progress=False)
    assert torch.equal(again, eager) and stub_capture == kinds and len(eager_steps) == steps
    assert sum(graph.replays for graph in loop.graphs.values()) == replayed + sum(n in loop.graphs for n in noisy)


def test_pipeline_keeps_the_graphed_loop_for_equal_settings(tiny_pipeline):
    pipe = pipeline(tiny_pipeline, "ddim")
    pipe.scheduler.set_timesteps(STEPS)
    timesteps = pipe.scheduler.timesteps
    labels = torch.tensor([0, 1, 2, 3, 3, 3])
    args = (timesteps, (3, 1, 8, 8), labels, 2.0, {"eta": 0.0, "use_clipped_model_output": None})
    loop = pipe._loop(*args, cuda_graph=True)
    assert pipe._loop(*args, cuda_graph=True) is loop
    assert pipe._loop(*args, cuda_graph=False) is not loop  # eager loops are not kept
    key = loop_key(pipe.unet, pipe.scheduler, *args)
    # whatever a captured graph bakes in changes the key
    assert loop_key(pipe.unet, pipe.scheduler, timesteps[2:], *args[1:]) != key  # SDEdit's tail
    assert loop_key(pipe.unet, pipe.scheduler, timesteps, (4, 1, 8, 8), *args[2:]) != key
    assert loop_key(pipe.unet, pipe.scheduler, *args[:3], 3.0, args[-1]) != key
    assert loop_key(pipe.unet, pipe.scheduler, *args[:4], {"eta": 0.5, "use_clipped_model_output": None}) != key
    with fastdiff.use_backend("triton"):
        assert loop_key(pipe.unet, pipe.scheduler, *args) != key
    assert loop_key(pipe.unet, DDIMScheduler(num_train_timesteps=50, clip_sample=False), *args) != key
    other = DDIMScheduler(num_train_timesteps=50)
    other.set_timesteps(STEPS + 1)  # the same timesteps... of another schedule (DDIM's t − T // n rule)
    assert loop_key(pipe.unet, other, *args) != key
    weight = pipe.unet.conv_in.weight
    weight.data = weight.data.clone()  # a new weight tensor: a graph would read the old address
    assert loop_key(pipe.unet, pipe.scheduler, *args) != key
    key = loop_key(pipe.unet, pipe.scheduler, *args)
    deep = pipe.unet.mid_block.attentions[0].to_q  # a Linear deep in the tree
    deep.bias = torch.nn.Parameter(deep.bias.detach().clone())  # a new Parameter, deep in the tree
    assert loop_key(pipe.unet, pipe.scheduler, *args) != key
    key = loop_key(pipe.unet, pipe.scheduler, *args)
    pipe.unet.to(memory_format=torch.channels_last)
    assert loop_key(pipe.unet, pipe.scheduler, *args) != key
    assert pipe._loop(*args, cuda_graph=True) is not loop


def rgb_pipeline(device="cpu", dtype=torch.float32) -> DiffusionPipeline:
    """The tiny model with 3 image channels: with 1, NCHW and channels_last are the same memory order
    at the U-Net's input and output, and a layout check there could not fail."""
    torch.manual_seed(0)
    unet = fastdiff.UNet2D(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                           attention_resolutions=(4,), norm_num_groups=2, dropout=0.0, num_classes=3)
    return DiffusionPipeline(unet.to(device=device, dtype=dtype).eval(), DDIMScheduler(num_train_timesteps=50))


def channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_channels_last_unet_keeps_the_loop_in_channels_last(backend):
    """After ``unet.to(memory_format=torch.channels_last)`` the loop's x_t and z are channels_last, so
    every U-Net call takes and returns channels_last tensors (no layout transposes around its
    convolutions); the images are those of the NCHW model up to convolution rounding, and NCHW."""
    pipe = rgb_pipeline()
    kwargs = {"batch_size": 2, "num_inference_steps": 2, "eta": 0.5, "class_labels": [0, 2], "guidance_scale": 2.0,
              "progress": False}  # 2 groups, 2 steps: the interpreted U-Net ('triton') costs ~0.1 s per GroupNorm program
    layouts = []
    pipe.unet.register_forward_hook(lambda module, args, out: layouts.append((channels_last(args[0]),
                                                                              channels_last(out))))
    with fastdiff.use_backend(backend):
        expected = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
        assert pipe.unet.memory_format == torch.contiguous_format and layouts == [(False, False)] * 2
        pipe.unet.to(memory_format=torch.channels_last)
        assert pipe.unet.memory_format == torch.channels_last
        layouts.clear()
        images = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert layouts == [(True, True)] * 2
    assert images.is_contiguous() and images.shape == expected.shape
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)


def test_cuda_graph_errors(tiny_pipeline):
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="cuda_graph=True needs the pipeline on a CUDA device"):
        pipe(num_inference_steps=2, cuda_graph=True, progress=False)
    with pytest.raises(TypeError, match="cuda_graph must be True or False"):
        pipe(num_inference_steps=2, cuda_graph="yes", progress=False)


# ----------------------------------------------------------------------------- on a GPU
GPU_CASES = [("ddim", "cuda"), ("ddim_eta_cfg", "cuda"), ("ddpm_labels", "cuda"), ("ddpm_offset", "cpu"),
             ("ddim_sdedit", "cuda"), ("dpm_cfg", "cuda"), ("sde_dpm3", "cuda"), ("unipc_labels", "cuda"),
             ("euler_karras", "cuda"), ("euler_a_cfg", "cpu"), ("pndm_prk", "cuda")]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case, generator_device", GPU_CASES)
def test_cuda_graph_gives_the_same_images(tiny_pipeline, case, generator_device, dtype, backend):
    pipe = pipeline(tiny_pipeline, case, "cuda", dtype)
    kwargs = CASES[case][1]
    with fastdiff.use_backend(backend):
        eager = sample(pipe, 0, generator_device, **kwargs)
        graphed = sample(pipe, 0, generator_device, cuda_graph=True, **kwargs)
        assert torch.equal(graphed, eager)
        loop = pipe._graphed[1]
        graphs = dict(loop.graphs)
        assert graphs  # something was captured
        # the next call with the same settings replays the kept graphs
        graphed = sample(pipe, 1, generator_device, cuda_graph=True, **kwargs)
        assert pipe._graphed[1] is loop and loop.graphs == graphs
        assert torch.equal(graphed, sample(pipe, 1, generator_device, **kwargs))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", ["ddim_eta_cfg", "ddpm_labels", "sde_dpm3", "euler_a_cfg", "pndm_prk"])
def test_eager_loop_never_synchronises(tiny_pipeline, case, backend):
    """``set_sync_debug_mode("error")`` raises on any blocking copy, ``.item()`` or stream sync."""
    pipe = pipeline(tiny_pipeline, case, "cuda")
    run = SamplingLoop.run

    def strict(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return run(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    with fastdiff.use_backend(backend):
        expected = sample(pipe, 0, "cuda", **CASES[case][1])  # compiles the kernels first
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(SamplingLoop, "run", strict)
            images = sample(pipe, 0, "cuda", **CASES[case][1])
    assert torch.equal(images, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_of_a_channels_last_unet(dtype):
    pipe = rgb_pipeline("cuda", dtype)
    pipe.unet.to(memory_format=torch.channels_last)
    kwargs = {"batch_size": 3, "num_inference_steps": STEPS, "eta": 0.5, "progress": False}
    with fastdiff.use_backend("triton"):
        eager = pipe(generator=torch.Generator("cuda").manual_seed(0), **kwargs).images
        graphed = pipe(generator=torch.Generator("cuda").manual_seed(0), cuda_graph=True, **kwargs).images
    assert torch.equal(graphed, eager) and channels_last(pipe._graphed[1].sample)


@pytest.mark.gpu
def test_cuda_graph_refuses_a_callback(tiny_pipeline):
    pipe = tiny_pipeline("cuda")
    with pytest.raises(ValueError, match="callback cannot be used with cuda_graph=True"):
        pipe(num_inference_steps=2, cuda_graph=True, callback=lambda *args: None, progress=False)
