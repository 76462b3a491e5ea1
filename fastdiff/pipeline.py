"""DiffusionPipeline: a U-Net and a scheduler, from noise (or a reference image) to images.

Noise is drawn in diffusers' order (the starting noise, then each step's noise from the same
generator), so a DDIM/DDPM loop here and diffusers' DDIMPipeline/DDPMPipeline with the same model,
scheduler config and seed give the same images.

``from_pretrained`` also loads the folders diffusers' ``DDPMPipeline``/``DDIMPipeline``/``PNDMPipeline``
write, and ``save_pretrained(folder, format="diffusers")`` writes one (``fastdiff.diffusers_format``).
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from . import diffusers_format, validation
from .images import image_grid, save_image_grid
from .io import read_json, write_json
from .sampling_loop import SamplingLoop, check_cuda_graph, loop_key
from .schedulers import SCHEDULERS, DDIMScheduler, SchedulerBase
from .schedulers.schedule import randn_tensor
from .unet import UNet2D

INDEX_NAME = "model_index.json"
EMBEDDED_MODELS = ("digits",)
TRAINING_PIPELINE = "pipeline"  # where `fastdiff train` saves the pipeline inside its --out folder


@dataclass
class ImagePipelineOutput:
    images: torch.Tensor  # (B, C, H, W) float32 in [0, 1]

    def to_pil(self, nrow: int | None = None, scale: int = 1):
        """All images tiled into one PIL image."""
        return image_grid(self.images, nrow=nrow, scale=scale)

    def save_grid(self, path: str | os.PathLike, nrow: int | None = None, scale: int = 1) -> Path:
        return save_image_grid(self.images, path, nrow=nrow, scale=scale)


class DiffusionPipeline:
    """Sample images from ``unet`` with ``scheduler`` (any fastdiff scheduler: DDIM, DDPM, ...).

    ``guidance_scale`` is the classifier-free guidance weight used when a call does not give one
    (1 = no guidance); it is saved with the pipeline.
    """

    def __init__(self, unet: UNet2D, scheduler: SchedulerBase, guidance_scale: float = 1.0):
        if not isinstance(unet, UNet2D):
            raise TypeError(f"unet must be a fastdiff.UNet2D, got {type(unet).__name__}")
        if not isinstance(scheduler, SchedulerBase):
            raise TypeError(f"scheduler must be a fastdiff scheduler ({', '.join(sorted(SCHEDULERS))}), "
                            f"got {type(scheduler).__name__}")
        self.unet, self.scheduler = unet, scheduler
        self.guidance_scale = validation.real("guidance_scale", guidance_scale)
        self._graphed: tuple[tuple, SamplingLoop] | None = None  # (key, loop) of the last cuda_graph=True call

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, device=None, dtype=None) -> "DiffusionPipeline":
        """Move the U-Net: ``device`` 'cpu', 'cuda', 'cuda:1', ...; ``dtype`` a float dtype or its name."""
        device = None if device is None else validation.device("device", device)
        dtype = None if dtype is None else validation.dtype("dtype", dtype)
        self.unet.to(device=device, dtype=dtype)
        return self

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        class_labels=None,
        guidance_scale: float | None = None,
        eta: float = 0.0,
        image: torch.Tensor | None = None,
        strength: float | None = None,
        use_clipped_model_output: bool | None = None,
        progress: bool = True,
        callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
        cuda_graph: bool = False,
        on_nonfinite: str = "raise",
    ) -> ImagePipelineOutput:
        """Generate ``batch_size`` images.

        class_labels: an int (same class for all) or ``batch_size`` ints, for a class-conditional
        U-Net. guidance_scale w: ε = ε_u + w·(ε_c − ε_u), one batched U-Net pass for both.
        eta: DDIM's η (0 = deterministic). image + strength: image-guided sampling (SDEdit, Meng
        et al. 2022): ``image`` ((C, H, W) or (1 or B, C, H, W), in [0, 1]) is noised to the
        step ``strength`` (default 0.8; only with ``image``) of the way into the schedule and
        denoised from there.
        callback(step_index, t, prev_sample, pred_original_sample): called after each step (e.g. by
        ``fastdiff.compare`` to record the trajectory); it must not modify the tensors.

        The loop never reads back to the host (``fastdiff.sampling_loop``): schedule tables and the
        step index live on the device. cuda_graph=True (CUDA only, no callback) replays each step
        from a CUDA graph, captured on the first call and kept for the next call with the same
        shapes and settings; the images are the same as without it.

        Every argument is checked before the first step (``fastdiff.validation``). The result is
        checked once at the end: NaN or infinite images (bad weights, an fp16 overflow) raise
        ``validation.NonFiniteError``, or only warn with ``on_nonfinite="warn"``.
        """
        batch_size = validation.integer("batch_size", batch_size, minimum=1)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
        validation.boolean("progress", progress)
        validation.one_of("on_nonfinite", on_nonfinite, ("raise", "warn"))
        unet, scheduler, device = self.unet, self.scheduler, self.device
        cuda_graph = check_cuda_graph(cuda_graph, device, callback)
        labels = self._labels(class_labels, batch_size)
        guidance = self._guidance(guidance_scale, labels)
        step_kwargs = self._step_kwargs(eta, use_clipped_model_output)
        shape = (batch_size, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        if image is None and strength is not None:
            raise ValueError("strength applies to image-guided sampling only: pass image= too, or drop strength")
        if image is not None:
            strength = validation.real("strength", 0.8 if strength is None else strength, 0, 1, min_open=True)
            x0 = self._reference_image(image, shape)
        scheduler.set_timesteps(num_inference_steps)
        timesteps = scheduler.timesteps

        if image is None:
            sample = randn_tensor(shape, generator=generator, device=device, dtype=unet.dtype)
            sample = sample * scheduler.init_noise_sigma
        else:
            timesteps = self._sdedit_timesteps(timesteps, strength)
            noise = randn_tensor(shape, generator=generator, device=device, dtype=unet.dtype)
            sample = scheduler.add_noise(x0, noise, timesteps[:1].repeat(batch_size))

        if guidance is not None:  # conditional and unconditional halves in one batch
            labels = torch.cat([labels, torch.full_like(labels, unet.null_class)])
        loop = self._loop(timesteps, shape, labels, guidance, step_kwargs, cuda_graph)
        loop.reset(sample, labels)
        sample = loop.run(generator, cuda_graph=cuda_graph, progress=progress, callback=callback)
        validation.finite_result(sample, "the sampled images", on_nonfinite)
        return ImagePipelineOutput(images=(sample / 2 + 0.5).clamp(0, 1).float().contiguous())  # NCHW, as always

    def _loop(self, timesteps, shape, labels, guidance, step_kwargs, cuda_graph: bool) -> SamplingLoop:
        """A new ``SamplingLoop`` over ``timesteps``; with ``cuda_graph``, the kept one (graphs and
        all) when it was made with these settings (``loop_key``), else a new one that replaces it."""
        def new_loop():
            tables = self.scheduler.step_tables(timesteps, **step_kwargs)
            return SamplingLoop(self.unet, self.scheduler, tables, shape, labels, guidance, step_kwargs)

        if not cuda_graph:
            return new_loop()
        key = loop_key(self.unet, self.scheduler, timesteps, shape, labels, guidance, step_kwargs)
        if self._graphed is None or self._graphed[0] != key:
            self._graphed = None  # free the old graphs' memory first
            self._graphed = (key, new_loop())
        return self._graphed[1]

    def _labels(self, class_labels, batch_size: int) -> torch.Tensor | None:
        if class_labels is None:
            return None
        if not self.unet.is_conditional:
            raise ValueError("class_labels were given but the U-Net is unconditional (config.num_classes is None)")
        expected = f"class_labels must be an int, a list of ints or an integer tensor, got {type(class_labels).__name__}"
        if isinstance(class_labels, (str, bytes)) or not isinstance(class_labels, (numbers.Integral, list, tuple,
                                                                                   torch.Tensor)):
            raise TypeError(expected)
        try:
            labels = torch.as_tensor(class_labels, device=self.device)
        except (TypeError, ValueError, RuntimeError):  # a list holding strings or ragged lists
            raise TypeError(f"{expected} {class_labels!r}") from None
        validation.tensor("class_labels", labels, integer=True)
        if labels.ndim == 0:
            labels = labels.expand(batch_size)
        if labels.shape != (batch_size,):
            raise ValueError(f"class_labels must be one int or {batch_size} ints (batch_size), got shape {tuple(labels.shape)}")
        validation.in_range("class_labels", labels, 0, self.unet.num_classes - 1,
                            f" (the model's {self.unet.num_classes} classes)")
        return labels.long()

    def _guidance(self, guidance_scale, labels) -> float | None:
        """The guidance weight to apply, or None for a single (unguided) U-Net pass."""
        if guidance_scale is not None:
            guidance_scale = validation.real("guidance_scale", guidance_scale)
        if guidance_scale is not None and guidance_scale != 1.0:
            if not self.unet.is_conditional:
                raise ValueError("guidance_scale needs a class-conditional U-Net; this one is unconditional")
            if labels is None:
                raise ValueError("guidance_scale needs class_labels (guidance steers towards a class)")
        scale = validation.real("pipeline.guidance_scale", self.guidance_scale) if guidance_scale is None \
            else guidance_scale
        return scale if labels is not None and scale != 1.0 else None

    def _step_kwargs(self, eta: float, use_clipped_model_output) -> dict:
        eta = validation.real("eta", eta, minimum=0)
        if use_clipped_model_output is not None:
            validation.boolean("use_clipped_model_output", use_clipped_model_output)
        if isinstance(self.scheduler, DDIMScheduler):
            return {"eta": eta, "use_clipped_model_output": use_clipped_model_output}
        if eta != 0 or use_clipped_model_output:
            raise ValueError(f"eta and use_clipped_model_output apply to DDIMScheduler only; the scheduler is "
                             f"{type(self.scheduler).__name__}")
        return {}

    def _sdedit_timesteps(self, timesteps: torch.Tensor, strength: float) -> torch.Tensor:
        """The last ``strength`` of the schedule, as diffusers' image-to-image pipelines take it
        (whole steps; a multistep scheduler is told where it begins)."""
        n = self.scheduler.num_inference_steps
        steps = min(int(n * strength), n)
        if steps < 1:
            raise ValueError(f"strength={strength} with num_inference_steps={n} leaves no step to run; "
                             f"use strength >= {1 / n:.3g}")
        start = (n - steps) * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        return timesteps[start:]

    def _reference_image(self, image, shape) -> torch.Tensor:
        """``image`` in [0, 1] as the (B, C, H, W) batch to noise, in [-1, 1] (one read-back to check it)."""
        if not isinstance(image, torch.Tensor) or not image.is_floating_point():
            raise TypeError(f"image must be a float tensor in [0, 1] of shape (C, H, W) or (B, C, H, W), got "
                            f"{image.dtype if isinstance(image, torch.Tensor) else type(image).__name__}")
        if image.ndim == 3:
            image = image[None]
        if image.shape[1:] != shape[1:] or image.shape[0] not in (1, shape[0]):
            one = ", ".join(map(str, shape[1:]))
            counts = "1" if shape[0] == 1 else f"1 or {shape[0]} (batch_size)"
            raise ValueError(f"image must have shape ({one}) or (N, {one}) with N = {counts}, got {tuple(image.shape)}")
        validation.in_range("image", image, 0, 1, " (images are floats in [0, 1], not 0-255)")
        return (image.to(self.device, self.dtype) * 2 - 1).expand(shape)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | os.PathLike, format: str = "fastdiff") -> Path:
        """``dir/unet`` (config.json + weights), ``dir/scheduler``, ``dir/model_index.json``.

        ``format``: 'fastdiff' (keeps ``guidance_scale``) or 'diffusers': the folder diffusers'
        pipeline for the scheduler loads (``DDIMPipeline`` for DDIM, ``PNDMPipeline`` for PNDM,
        ``DDPMPipeline`` for DDPM and DPM-Solver++) and samples with as this pipeline does. Refused
        up front, before anything is written, for a class-conditional U-Net (diffusers' unconditional
        pipelines pass no labels) and for the schedulers no diffusers pipeline runs as fastdiff does
        (Euler, Euler-ancestral, UniPC)."""
        from . import __version__

        root = Path(save_directory)
        if diffusers_format.check_format(format) == "diffusers":
            index = diffusers_format.pipeline_index(type(self.scheduler).__name__, self.unet.is_conditional)
            self.unet.save_pretrained(root / "unet", format="diffusers")
            diffusers_format.scheduler_for_diffusers(self.scheduler).save_config(root / "scheduler")
            write_json(index, root / INDEX_NAME)
            return root
        self.unet.save_pretrained(root / "unet")
        self.scheduler.save_config(root / "scheduler")
        write_json({"_class_name": "DiffusionPipeline", "_fastdiff_version": __version__,
                    "unet": ["fastdiff", "UNet2D"], "scheduler": ["fastdiff", type(self.scheduler).__name__],
                    "guidance_scale": self.guidance_scale}, root / INDEX_NAME)
        return root

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype=None) -> "DiffusionPipeline":
        """Load a folder written by ``save_pretrained`` (either format), an embedded model by name
        ('digits'), or a diffusers ``DDPMPipeline``/``DDIMPipeline``/``PNDMPipeline`` folder whose
        UNet2DModel fastdiff's UNet2D computes exactly, with its scheduler as that pipeline would run
        it (``DDIMPipeline`` turns any scheduler into DDIM, so this does too)."""
        root = _resolve(path)
        index = read_json(root / INDEX_NAME, argument="path")
        if diffusers_format.is_diffusers_index(index):
            scheduler_name = diffusers_format.pipeline_scheduler_name(index, root / INDEX_NAME)
        else:
            scheduler_name = (index.get("scheduler") or [None, None])[1]
        if scheduler_name not in SCHEDULERS:
            raise ValueError(f"path: {root / INDEX_NAME} names scheduler {scheduler_name!r}; "
                             f"expected one of {sorted(SCHEDULERS)}")
        unet = UNet2D.from_pretrained(root / "unet", device=device, dtype=dtype)
        scheduler = SCHEDULERS[scheduler_name].from_pretrained(root / "scheduler")
        return cls(unet, scheduler, guidance_scale=index.get("guidance_scale", 1.0))


def _resolve(path) -> Path:
    if isinstance(path, str) and path in EMBEDDED_MODELS:
        return Path(str(resources.files("fastdiff") / "pretrained" / path))
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder (str or os.PathLike) or an embedded model name "
                        f"({', '.join(EMBEDDED_MODELS)}), got {type(path).__name__}")
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"path: {path!s} is neither a pipeline folder nor an embedded model "
                         f"({', '.join(EMBEDDED_MODELS)})")
    if not (root / INDEX_NAME).is_file() and (root / TRAINING_PIPELINE / INDEX_NAME).is_file():
        raise ValueError(f"path: {root} is a training run's folder; its pipeline is {root / TRAINING_PIPELINE}")
    return root


def load_pretrained(path: str | os.PathLike = "digits", device=None, dtype=None) -> DiffusionPipeline:
    """``DiffusionPipeline.from_pretrained``: 'digits' is the class-conditional model shipped inside fastdiff."""
    return DiffusionPipeline.from_pretrained(path, device=device, dtype=dtype)
