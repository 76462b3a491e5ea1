"""The schedulers: one file per scheduler, the schedule math they share in ``schedule``.

Every scheduler takes diffusers' constructor keywords (its config) and gives diffusers' numbers;
``fastdiff.DDIMScheduler`` etc. are re-exported from here.
"""

from .ddim import DDIMScheduler, DDIMSchedulerOutput
from .ddpm import DDPMScheduler, DDPMSchedulerOutput

__all__ = ["DDIMScheduler", "DDIMSchedulerOutput", "DDPMScheduler", "DDPMSchedulerOutput"]
