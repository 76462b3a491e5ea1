"""fastdiff: a diffusion sampling engine (DDPM, DDIM, DPM-Solver++, UniPC, Euler, PNDM) whose hot path runs
fused Triton kernels."""

__version__ = "0.1.0"

from . import ops, reference
from .backend import get_backend, use_backend
from .schedulers import (DDIMScheduler, DDIMSchedulerOutput, DDPMScheduler, DDPMSchedulerOutput,
                         DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                         PNDMScheduler, PNDMSchedulerOutput, UniPCMultistepScheduler)
from .unet import UNet2D, UNet2DConfig
from .pipeline import DiffusionPipeline, ImagePipelineOutput, load_pretrained

__all__ = [
    "DDIMScheduler", "DDIMSchedulerOutput", "DDPMScheduler", "DDPMSchedulerOutput", "DPMSolverMultistepScheduler",
    "DiffusionPipeline", "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler", "ImagePipelineOutput",
    "PNDMScheduler", "PNDMSchedulerOutput", "UNet2D", "UNet2DConfig", "UniPCMultistepScheduler", "get_backend",
    "load_pretrained", "ops", "reference", "use_backend",
]
