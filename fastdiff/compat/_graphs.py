"""CUDA graphs for diffusers models: a forward captured once per input signature, replayed after.

A Stable Diffusion UNet forward launches ~1000 kernels; at batch 1–2 on a fast GPU the launches,
not the math, set the pace. ``GraphedForward`` stands in for a model's ``forward`` (or the VAE's
``decode``): the first call with a new *signature* warms the function up on a side stream and
captures it into a ``torch.cuda.CUDAGraph`` with static input buffers; every later call with that
signature copies its tensors into the buffers, replays the graph and returns clones of the static
outputs (a caller may keep them: the next replay rewrites the buffers, not what it returned).

The signature is everything the captured kernels depend on: each tensor argument's shape, dtype,
device and strides, which optional arguments are given (None vs a tensor), and the value of every
other argument (bools, numbers, strings; ``cross_attention_kwargs`` entries ...). A Python-number
``timestep`` is made the tensor the model itself would make of it first, so a loop that passes
ints does not capture per step. At most ``max_graphs`` signatures are kept (least recently used
dropped first); graphs share one memory pool.

What runs eagerly instead, always giving the stock result: tensors not on one CUDA device (the CPU:
graphs are CUDA-only), autograd recording (grad mode on and a parameter or input requiring grad),
an argument whose value cannot be part of a key (unhashable), and a signature whose capture failed
(e.g. a forward that reads a value back to the host; warned once).

Limits (docs/diffusers.md): new shapes capture again; replays read the parameters in place, so
weights changed in place (``load_state_dict``, LoRA ``fuse_lora``/``unfuse_lora``) are seen,
parameters replaced by new tensors (a new ``nn.Parameter``, ``.to()`` another dtype/device) are
not: call ``reset()`` (``fastdiff.compat.diffusers.reset_cuda_graphs(pipe_or_model)``) after such a
change. Memory: each signature keeps its static inputs, outputs and the pool's intermediates.

This module does not import diffusers.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict
from typing import Any, Callable

import torch

MAX_GRAPHS = 8  # signatures kept per graphed callable
WARMUP_CALLS = 2  # eager runs on the capture stream first: Triton compiles, cuDNN/cuBLAS pick algorithms


# ----------------------------------------------------------------------------- argument trees
def _fields(obj: Any) -> dict | None:
    """A dataclass instance's fields by name (diffusers' ``BaseOutput``s), else None."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return None


def _leaves(obj: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path, leaf) pairs of a tree of tuples, lists, dicts and dataclasses; tensors are leaves."""
    fields = _fields(obj)
    if fields is not None:
        obj = fields
    if isinstance(obj, (tuple, list)):
        return [pair for i, item in enumerate(obj) for pair in _leaves(item, path + (i,))]
    if isinstance(obj, dict):
        return [pair for key, item in obj.items() for pair in _leaves(item, path + (key,))]
    return [(path, obj)]


def _shape_of(obj: Any) -> Any:
    """The tree's structure with tensors blanked out (part of the key), in ``_leaves``' order."""
    fields = _fields(obj)
    if fields is not None:
        return (type(obj), tuple((key, _shape_of(item)) for key, item in fields.items()))
    if isinstance(obj, (tuple, list)):
        return (type(obj), tuple(_shape_of(item) for item in obj))
    if isinstance(obj, dict):
        return (type(obj), tuple((key, _shape_of(item)) for key, item in obj.items()))
    return None if isinstance(obj, torch.Tensor) else ("value", obj)


def _rebuild(obj: Any, tensor: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with every tensor leaf replaced by ``tensor(leaf)``; containers rebuilt as their type
    (diffusers' ``BaseOutput`` dataclasses through their fields, so ``.sample`` and ``[0]`` work)."""
    if isinstance(obj, torch.Tensor):
        return tensor(obj)
    fields = _fields(obj)
    if fields is not None:
        return type(obj)(**{key: _rebuild(item, tensor) for key, item in fields.items()})
    if isinstance(obj, tuple):
        return type(obj)(_rebuild(item, tensor) for item in obj)
    if isinstance(obj, list):
        return [_rebuild(item, tensor) for item in obj]
    if isinstance(obj, dict):
        return type(obj)((key, _rebuild(item, tensor)) for key, item in obj.items())
    return obj


def _tensor_key(x: torch.Tensor) -> tuple:
    return ("tensor", tuple(x.shape), x.dtype, x.device, x.stride())


# ----------------------------------------------------------------------------- capture (the GPU part)
def warm_up(fn: Callable, args: tuple, kwargs: dict, stream) -> None:
    """Run ``fn`` eagerly on ``stream`` (where it is captured next), as torch.cuda.graph asks."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_CALLS):
            fn(*args, **kwargs)
    torch.cuda.current_stream().wait_stream(stream)


def capture(fn: Callable, args: tuple, kwargs: dict, stream, pool) -> tuple[Callable[[], None], Any]:
    """Record ``fn(*args, **kwargs)`` into a CUDA graph; returns (replay, the static output)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        output = fn(*args, **kwargs)
    return graph.replay, output


@dataclasses.dataclass
class _Graph:
    replay: Callable[[], None] | None  # None: capture failed, this signature runs eagerly
    inputs: list[torch.Tensor]  # static buffers, in leaf order
    output: Any = None
    replays: int = 0


class GraphedForward:
    """``fn`` (a model's bound ``forward`` or ``decode``) replayed from CUDA graphs; see the module
    docstring. ``normalize(args, kwargs)`` may rewrite arguments first (a Python timestep into the
    tensor the model would make); ``ignore`` names keyword arguments ``fn`` does not use, left out of
    the key and not passed to the graph (the VAE decode's ``generator``)."""

    def __init__(self, fn: Callable, module: torch.nn.Module, *, max_graphs: int = MAX_GRAPHS,
                 normalize: Callable[[tuple, dict], tuple[tuple, dict]] | None = None, ignore: tuple[str, ...] = ()):
        self.fn, self.module, self.max_graphs = fn, module, max_graphs
        self.normalize, self.ignore = normalize, ignore
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.stream = None
        self.pool = None
        self.captures = 0  # graphs recorded so far (a new shape after eviction counts again)

    def reset(self) -> None:
        """Drop every graph: the next call of each signature captures again (after weights were replaced)."""
        self.graphs.clear()

    def __call__(self, *args, **kwargs):
        call_args, call_kwargs = args, {k: v for k, v in kwargs.items() if k not in self.ignore}
        device = self._graph_device(_leaves((call_args, call_kwargs)))
        if device is None:  # eager, with the arguments as given
            return self.fn(*args, **kwargs)
        if self.normalize is not None:  # only for a graph: on other devices the model picks other dtypes
            call_args, call_kwargs = self.normalize(call_args, call_kwargs)
        leaves = _leaves((call_args, call_kwargs))
        key = self._key(call_args, call_kwargs, leaves)
        if key is None:
            return self.fn(*args, **kwargs)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(call_args, call_kwargs, leaves, device)
            self.graphs[key] = graph
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        if graph.replay is None:
            return self.fn(*args, **kwargs)
        for buffer, (_, leaf) in zip(graph.inputs, (pair for pair in leaves if isinstance(pair[1], torch.Tensor))):
            buffer.copy_(leaf)
        graph.replay()
        graph.replays += 1
        return _rebuild(graph.output, torch.Tensor.clone)

    # ------------------------------------------------------------------ bookkeeping
    def _graph_device(self, leaves) -> torch.device | None:
        """The one CUDA device every tensor (and the module's parameters) is on, or None (run eagerly).
        One-element CPU tensors (a timestep) are allowed: their static buffer lives on the device."""
        tensors = [leaf for _, leaf in leaves if isinstance(leaf, torch.Tensor)]
        big = [t for t in tensors if t.numel() != 1 or t.device.type != "cpu"]
        if not big or not graphs_available(big[0].device):
            return None
        device = big[0].device
        if any(t.device != device for t in big):
            return None
        if torch.is_grad_enabled() and (any(t.requires_grad for t in tensors)
                                        or any(p.requires_grad for p in self.module.parameters())):
            return None  # autograd would record the forward: a graph replay records nothing
        return device

    def _key(self, args, kwargs, leaves) -> tuple | None:
        key = (_shape_of(args), _shape_of(kwargs),
               tuple(_tensor_key(leaf) for _, leaf in leaves if isinstance(leaf, torch.Tensor)))
        try:
            hash(key)
        except TypeError:  # an unhashable argument value: no key, run eagerly
            return None
        return key

    def _capture(self, args, kwargs, leaves, device) -> _Graph:
        tensors = [leaf for _, leaf in leaves if isinstance(leaf, torch.Tensor)]
        inputs = [_static_buffer(t, device) for t in tensors]
        for buffer, t in zip(inputs, tensors):
            buffer.copy_(t)
        buffers = iter(inputs)
        static_args, static_kwargs = _rebuild((args, kwargs), lambda _: next(buffers))
        elsewhere = {str(p.device) for p in self.module.parameters() if p.device != device}
        if elsewhere:  # e.g. CPU offload hooks that move weights in per call: nothing to capture
            warnings.warn(f"cuda_graph: {type(self.module).__name__} has parameters on {', '.join(sorted(elsewhere))}, "
                          f"its input on {device}; running it eagerly", stacklevel=3)
            return _Graph(None, inputs)
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
            self.pool = torch.cuda.graph_pool_handle()
        try:
            warm_up(self.fn, static_args, static_kwargs, self.stream)
            replay, output = capture(self.fn, static_args, static_kwargs, self.stream, self.pool)
        except RuntimeError as error:  # e.g. the forward synchronises with the host: run this signature eagerly
            torch.cuda.synchronize(device)
            warnings.warn(f"cuda_graph: could not capture {type(self.module).__name__} for this input "
                          f"({str(error).splitlines()[0]}); running it eagerly", stacklevel=3)
            return _Graph(None, inputs)
        self.captures += 1
        return _Graph(replay, inputs, output)


def _static_buffer(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor a graph reads ``t``'s values from: ``t``'s strides (what the kernels were captured
    with), contiguous for a broadcast view (``t.expand(B)``: stride 0, not writable), on ``device``."""
    if any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape)):
        return torch.empty(t.shape, dtype=t.dtype, device=device)
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)


def graphs_available(device: torch.device) -> bool:
    """Whether CUDA graphs can run on ``device`` (tests replace this and ``warm_up``/``capture``)."""
    return device.type == "cuda"


# ----------------------------------------------------------------------------- installing
def timestep_as_tensor(long_for_float: bool) -> Callable[[tuple, dict], tuple[tuple, dict]]:
    """A ``normalize`` for a UNet's (sample, timestep, ...) call: a Python-number timestep becomes
    the tensor the model itself would build from it (``UNet2DModel`` truncates floats to int64:
    ``long_for_float``; ``UNet2DConditionModel`` keeps them as float64)."""

    def normalize(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sample = args[0] if args else kwargs.get("sample")
        if not isinstance(sample, torch.Tensor):
            return args, kwargs
        in_args = len(args) > 1
        timestep = args[1] if in_args else kwargs.get("timestep")
        if isinstance(timestep, bool) or not isinstance(timestep, (int, float)):
            return args, kwargs
        dtype = torch.int64 if isinstance(timestep, int) or long_for_float else torch.float64
        timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
        if in_args:
            return (args[0], timestep, *args[2:]), kwargs
        return args, {**kwargs, "timestep": timestep}

    return normalize


def install(module: torch.nn.Module, method: str, **options) -> GraphedForward:
    """Make ``module.<method>`` a ``GraphedForward`` over the class's own method (an instance
    attribute, so ``module(...)`` and hooks still go through ``nn.Module.__call__``); idempotent."""
    current = module.__dict__.get(method)
    if isinstance(current, GraphedForward):
        return current
    graphed = GraphedForward(getattr(module, method), module, **options)
    setattr(module, method, graphed)
    return graphed


def uninstall(module: torch.nn.Module, method: str) -> bool:
    """Remove an installed ``GraphedForward``; whether there was one."""
    if isinstance(module.__dict__.get(method), GraphedForward):
        delattr(module, method)
        return True
    return False


def graphed(module: torch.nn.Module) -> list[GraphedForward]:
    """The ``GraphedForward`` objects installed on ``module`` and its submodules."""
    return [value for m in module.modules() for value in vars(m).values() if isinstance(value, GraphedForward)]
