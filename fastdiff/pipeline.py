"""DiffusionPipeline: a U-Net and a scheduler, from noise (or a reference image) to images.

Noise is drawn in diffusers' order (the starting noise, then each step's noise from the same
generator), so a DDIM/DDPM loop here and diffusers' DDIMPipeline/DDPMPipeline with the same model,
scheduler config and seed give the same images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from .images import image_grid, save_image_grid
from .io import read_json, write_json
from .sampling_loop import SamplingLoop, check_cuda_graph, loop_key
from .schedules import randn_tensor
from .scheduling_ddim import DDIMScheduler
from .scheduling_ddpm import DDPMScheduler
from .unet import UNet2D

SCHEDULERS = {cls.__name__: cls for cls in (DDIMScheduler, DDPMScheduler)}
INDEX_NAME = "model_index.json"
EMBEDDED_MODELS = ("digits",)


@dataclass
class ImagePipelineOutput:
    images: torch.Tensor  # (B, C, H, W) float32 in [0, 1]

    def to_pil(self, nrow: int | None = None, scale: int = 1):
        """All images tiled into one PIL image."""
        return image_grid(self.images, nrow=nrow, scale=scale)

    def save_grid(self, path: str | os.PathLike, nrow: int | None = None, scale: int = 1) -> Path:
        return save_image_grid(self.images, path, nrow=nrow, scale=scale)


class DiffusionPipeline:
    """Sample images from ``unet`` with ``scheduler`` (a DDIMScheduler or DDPMScheduler).

    ``guidance_scale`` is the classifier-free guidance weight used when a call does not give one
    (1 = no guidance); it is saved with the pipeline.
    """

    def __init__(self, unet: UNet2D, scheduler: DDIMScheduler | DDPMScheduler, guidance_scale: float = 1.0):
        if not isinstance(unet, UNet2D):
            raise TypeError(f"unet must be a fastdiff.UNet2D, got {type(unet).__name__}")
        if not isinstance(scheduler, tuple(SCHEDULERS.values())):
            raise TypeError(f"scheduler must be a DDIMScheduler or DDPMScheduler, got {type(scheduler).__name__}")
        self.unet, self.scheduler, self.guidance_scale = unet, scheduler, float(guidance_scale)
        self._graphed: tuple[tuple, SamplingLoop] | None = None  # (key, loop) of the last cuda_graph=True call

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, device=None, dtype=None) -> "DiffusionPipeline":
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
        strength: float = 0.8,
        use_clipped_model_output: bool | None = None,
        progress: bool = True,
        callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
        cuda_graph: bool = False,
    ) -> ImagePipelineOutput:
        """Generate ``batch_size`` images.

        class_labels: an int (same class for all) or ``batch_size`` ints, for a class-conditional
        U-Net. guidance_scale w: ε = ε_u + w·(ε_c − ε_u), one batched U-Net pass for both.
        eta: DDIM's η (0 = deterministic). image + strength: image-guided sampling (SDEdit, Meng
        et al. 2022): ``image`` ((C, H, W) or (1 or B, C, H, W), in [0, 1]) is noised to the
        step ``strength`` of the way into the schedule and denoised from there.
        callback(step_index, t, prev_sample, pred_original_sample): called after each step (e.g. by
        ``fastdiff.compare`` to record the trajectory); it must not modify the tensors.

        The loop never reads back to the host (``fastdiff.sampling_loop``): schedule tables and the
        step index live on the device. cuda_graph=True (CUDA only, no callback) replays each step
        from a CUDA graph, captured on the first call and kept for the next call with the same
        shapes and settings; the images are the same as without it.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
        unet, scheduler, device = self.unet, self.scheduler, self.device
        cuda_graph = check_cuda_graph(cuda_graph, device, callback)
        labels = self._labels(class_labels, batch_size)
        guidance = self._guidance(guidance_scale, labels)
        step_kwargs = self._step_kwargs(eta, use_clipped_model_output)
        scheduler.set_timesteps(num_inference_steps)
        timesteps = scheduler.timesteps
        shape = (batch_size, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)

        if image is None:
            sample = randn_tensor(shape, generator=generator, device=device, dtype=unet.dtype)
            sample = sample * scheduler.init_noise_sigma
        else:
            timesteps = self._sdedit_timesteps(timesteps, strength)
            x0 = self._reference_image(image, shape)
            noise = randn_tensor(shape, generator=generator, device=device, dtype=unet.dtype)
            sample = scheduler.add_noise(x0, noise, timesteps[:1].repeat(batch_size))

        if guidance is not None:  # conditional and unconditional halves in one batch
            labels = torch.cat([labels, torch.full_like(labels, unet.null_class)])
        loop = self._loop(timesteps, shape, labels, guidance, step_kwargs, cuda_graph)
        loop.reset(sample, labels)
        sample = loop.run(generator, cuda_graph=cuda_graph, progress=progress, callback=callback)
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
        labels = torch.as_tensor(class_labels, device=self.device)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"class_labels must be integers, got dtype {labels.dtype}")
        if labels.ndim == 0:
            labels = labels.expand(batch_size)
        if labels.shape != (batch_size,):
            raise ValueError(f"class_labels must be one int or {batch_size} ints (batch_size), got shape {tuple(labels.shape)}")
        if labels.min() < 0 or labels.max() >= self.unet.num_classes:
            raise ValueError(f"class_labels must lie in [0, {self.unet.num_classes}), got {labels.tolist()}")
        return labels.long()

    def _guidance(self, guidance_scale, labels) -> float | None:
        """The guidance weight to apply, or None for a single (unguided) U-Net pass."""
        if guidance_scale is not None and guidance_scale != 1.0:
            if not self.unet.is_conditional:
                raise ValueError("guidance_scale needs a class-conditional U-Net; this one is unconditional")
            if labels is None:
                raise ValueError("guidance_scale needs class_labels (guidance steers towards a class)")
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        return scale if labels is not None and scale != 1.0 else None

    def _step_kwargs(self, eta: float, use_clipped_model_output) -> dict:
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if isinstance(self.scheduler, DDIMScheduler):
            return {"eta": eta, "use_clipped_model_output": use_clipped_model_output}
        if eta != 0 or use_clipped_model_output:
            raise ValueError("eta and use_clipped_model_output apply to DDIMScheduler only")
        return {}

    def _sdedit_timesteps(self, timesteps: torch.Tensor, strength: float) -> torch.Tensor:
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        n = len(timesteps)
        steps = min(int(n * strength), n)
        if steps < 1:
            raise ValueError(f"strength={strength} with num_inference_steps={n} leaves no step to run; "
                             f"use strength >= {1 / n:.3g}")
        return timesteps[n - steps:]

    def _reference_image(self, image, shape) -> torch.Tensor:
        if not isinstance(image, torch.Tensor) or not image.is_floating_point():
            raise TypeError("image must be a float tensor in [0, 1] of shape (C, H, W) or (B, C, H, W)")
        if image.ndim == 3:
            image = image[None]
        if image.shape[1:] != shape[1:] or image.shape[0] not in (1, shape[0]):
            raise ValueError(f"image must have shape {tuple(shape[1:])} or (1 or {shape[0]}, *{tuple(shape[1:])}), "
                             f"got {tuple(image.shape)}")
        return (image.to(self.device, self.dtype) * 2 - 1).expand(shape)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """``dir/unet`` (config.json + model.safetensors), ``dir/scheduler``, ``dir/model_index.json``."""
        from . import __version__

        root = Path(save_directory)
        self.unet.save_pretrained(root / "unet")
        self.scheduler.save_config(root / "scheduler")
        write_json({"_class_name": "DiffusionPipeline", "_fastdiff_version": __version__,
                    "unet": ["fastdiff", "UNet2D"], "scheduler": ["fastdiff", type(self.scheduler).__name__],
                    "guidance_scale": self.guidance_scale}, root / INDEX_NAME)
        return root

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype=None) -> "DiffusionPipeline":
        """Load a folder written by ``save_pretrained``, or an embedded model by name ('digits')."""
        root = _resolve(path)
        index = read_json(root / INDEX_NAME, argument="path")
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
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"path: {path!s} is neither a pipeline folder nor an embedded model "
                         f"({', '.join(EMBEDDED_MODELS)})")
    return root


def load_pretrained(path: str | os.PathLike = "digits", device=None, dtype=None) -> DiffusionPipeline:
    """``DiffusionPipeline.from_pretrained``: 'digits' is the class-conditional model shipped inside fastdiff."""
    return DiffusionPipeline.from_pretrained(path, device=device, dtype=dtype)
