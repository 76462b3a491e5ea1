"""The denoising loop: no host synchronisation, and optionally replayed from a CUDA graph.

Before the loop, everything a step reads moves to the sampling device once (``StepTables``): the
timestep and the ᾱ pair of every step, plus the step index i, a device int64 that each step
increments itself. A step is then

    t = timesteps[i];  ε̂ = U-Net(x_t, t);  x_{t-1}, x̂0 = fused step(ε̂, x_t, ᾱ[i], z);  x_t ← x_{t-1};  i ← i + 1

with nothing read back to the host, so the CPU queues steps ahead of the GPU. With
``cuda_graph=True`` a step is captured into a CUDA graph (static shapes; x_t, i, z and the labels
are fixed buffers) and replayed: one launch per step instead of the U-Net's hundreds.

Same images: graph and eager runs launch the same kernels on the same inputs. On the CPU the ᾱ
pair stays on the CPU and the fused step computes its coefficients exactly as ``Scheduler.step``
does, so this loop equals a loop of ``step`` calls bit for bit (the pipeline tests compare it with
diffusers' pipelines). On a GPU the ᾱ pair is on the device and the step kernel computes the
coefficients itself, with IEEE roots and divisions (see ``kernels/scheduler_step.py``).

Noise (DDPM on every step but t = 0; DDIM with η > 0) is drawn eagerly from the caller's generator
into the fixed z buffer before each step, in diffusers' order: any generator works, the numbers
are the eager loop's, and no generator state has to be registered with a graph. A CPU generator
draws on the CPU and copies to the device, which waits for the host: the one synchronisation
left (pass a CUDA generator, or none, for a loop with none).

Graphs: one per kind of step (with or without noise), captured the second time that kind comes
up, after an eager step of that kind, on the capture stream, has compiled the Triton kernels and
initialised cuBLAS and cuDNN there. The pipeline keeps the last graphed ``SamplingLoop`` for the next call with the same settings
(``loop_key``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from . import validation
from .backend import get_backend
from .schedulers.base import StepTables
from .schedulers.linear import INPUT_SCALE, slot_buffers
from .schedulers.schedule import randn_tensor


class SamplingLoop:
    """The fixed state of a sampling loop on one device: the sample x_t (updated in place), the step
    index, the noise buffer, the labels and the step tables; ``step`` runs one step on them."""

    def __init__(self, unet, scheduler, tables: StepTables, shape: tuple[int, ...], labels: torch.Tensor | None,
                 guidance: float | None, step_kwargs: dict):
        # x_t and z in the U-Net's layout (UNet2D.memory_format): channels_last in, channels_last out
        like = {"device": unet.device, "dtype": unet.dtype, "memory_format": unet.memory_format}
        self.unet, self.scheduler, self.guidance, self.step_kwargs = unet, scheduler, guidance, dict(step_kwargs)
        self.tables = tables.to(unet.device)
        self.sample = torch.empty(shape, **like)  # x_t
        self.slots = slot_buffers(self.sample) if tables.slots else None  # a multistep sampler's memory
        self.index = torch.zeros(1, dtype=torch.int64, device=unet.device)  # i
        self.noise = torch.empty(shape, **like) if any(tables.noisy) else None  # z
        self.labels = None if labels is None else labels.clone()  # (B,), or (2B,) with guidance
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # noisy -> the captured step
        self.stream: torch.cuda.Stream | None = None  # where graphs are warmed up and captured

    def reset(self, sample: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Start over from x_T = ``sample`` with ``labels``: device copies only."""
        self.sample.copy_(sample)
        self.index.zero_()
        if self.slots is not None:
            self.slots.zero_()
        if labels is not None:
            self.labels.copy_(labels)

    def draw_noise(self, generator) -> None:
        """z for the next step, drawn as diffusers draws it (``randn_tensor``)."""
        self.noise.copy_(randn_tensor(self.noise.shape, generator=generator, device=self.noise.device,
                                      dtype=self.noise.dtype))

    def step(self, noisy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One step at the device-side index; returns (x_{t-1}, x̂0) and leaves x_{t-1} in ``sample``."""
        t = self.tables.timesteps.index_select(0, self.index)  # (1,)
        row = self.tables.rows.index_select(0, self.index)[0]  # (W,): the scheduler's row of this step
        x = self.sample
        model_input = x * row[INPUT_SCALE] if self.tables.scales_input else x  # Euler's 1/√(σ² + 1)
        if self.guidance is None:
            model_output, guide = self.unet(model_input, t, self.labels), {}
        else:  # conditional and unconditional halves in one batch
            model_output, uncond = self.unet(torch.cat([model_input, model_input]), t, self.labels).chunk(2)
            guide = {"uncond_model_output": uncond, "guidance_scale": self.guidance}
        prev_sample, pred_x0 = self.scheduler._update(model_output, x, row, self.noise if noisy else None,
                                                      self.slots, **self.step_kwargs, **guide)
        self.sample.copy_(prev_sample)
        self.index.add_(1)
        return prev_sample, pred_x0

    def warm_up(self, noisy: bool) -> None:
        """``step(noisy)`` run eagerly on the stream graphs are captured on: Triton compiles its
        kernels and cuBLAS/cuDNN make their per-stream handles and workspaces now, since none of
        that may happen inside a capture."""
        current = torch.cuda.current_stream(self.sample.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            self.step(noisy)
        current.wait_stream(self.stream)

    def capture(self, noisy: bool) -> torch.cuda.CUDAGraph:
        """``step(noisy)`` recorded into a CUDA graph on ``self.stream`` (not run: the caller replays it)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self.step(noisy)
        self.graphs[noisy] = graph
        return graph

    def run(self, generator=None, cuda_graph: bool = False, progress: bool = True,
            callback: Callable | None = None) -> torch.Tensor:
        """Every step from the current state; returns x_0 (``self.sample``).

        callback(i, t, prev_sample, pred_original_sample) after each step (eager only: its
        arguments are host ints and the step's own outputs)."""
        seen = set(self.graphs)
        if cuda_graph and self.stream is None:
            self.stream = torch.cuda.Stream(self.sample.device)
        with validation.values_checked():  # the tables come from a checked schedule: no per-step read-back
            self._run_steps(generator, cuda_graph, progress, callback, seen)
        return self.sample

    def _run_steps(self, generator, cuda_graph: bool, progress: bool, callback, seen: set) -> None:
        for i in tqdm(range(len(self.tables)), desc="sampling", disable=not progress, leave=False):
            noisy = self.tables.noisy[i]
            if noisy:
                self.draw_noise(generator)
            if not cuda_graph:
                prev_sample, pred_x0 = self.step(noisy)
                if callback is not None:
                    callback(i, self.tables.host_timesteps[i], prev_sample, pred_x0)
            elif noisy in self.graphs:
                self.graphs[noisy].replay()
            elif noisy in seen:
                self.capture(noisy).replay()
            else:  # the first step of its kind runs eagerly, initialising what the graph needs
                self.warm_up(noisy)
                seen.add(noisy)


def loop_key(unet, scheduler, timesteps, shape, labels, guidance, step_kwargs) -> tuple:
    """Everything a captured step bakes in, cheap to compute on every call: shapes, dtypes and layout, the
    weights' addresses (a graph reads them in place), the scheduler's options and schedule (the
    step tables are a function of them and ``timesteps``), the guidance and the backend. Two
    loops with equal keys replay each other's graphs."""
    weights = _addresses(unet)
    config = repr(sorted((k, repr(v)) for k, v in dict(scheduler.config).items()))
    schedule = (scheduler.num_inference_steps, tuple(scheduler.timesteps.tolist()), tuple(timesteps.tolist()))
    return (id(unet), unet.device, unet.dtype, unet.memory_format, weights, type(scheduler).__name__, config,
            getattr(scheduler, "variance_type", None), schedule, tuple(shape),
            None if labels is None else tuple(labels.shape), guidance, tuple(sorted(step_kwargs.items())),
            get_backend())


def _addresses(module: torch.nn.Module) -> tuple[int, ...]:
    """The data addresses of every parameter and buffer under ``module``. Walks ``_modules``
    directly: ``parameters()`` builds a name for each tensor and costs ~5x more (0.55 ms against
    0.11 ms for the CIFAR-10 U-Net's 328 tensors on the CPU machine here), paid on every call of
    the pipeline."""
    stack, tensors = [module], []
    while stack:
        m = stack.pop()
        tensors += m._parameters.values()
        tensors += m._buffers.values()
        stack += m._modules.values()
    return tuple([t.data_ptr() for t in tensors if t is not None])


def check_cuda_graph(cuda_graph, device: torch.device, callback) -> bool:
    """``cuda_graph`` as a bool, or a clear error where a graph cannot run."""
    validation.boolean("cuda_graph", cuda_graph)
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the pipeline on a CUDA device; it is on {device}")
    if cuda_graph and callback is not None:
        raise ValueError("callback cannot be used with cuda_graph=True: a replayed step returns nothing to "
                         "the host; sample without the graph to follow the steps")
    return cuda_graph
