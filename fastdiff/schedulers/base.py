"""What DDPMScheduler and DDIMScheduler share: config checks, the ᾱ table, timesteps, noising."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import ops, validation
from .configuration import ConfigMixin
from ..reference import PREDICTION_TYPES
from .schedule import BETA_SCHEDULES, TIMESTEP_SPACINGS, make_betas, spaced_timesteps


@dataclass
class SchedulerOutput:
    """What ``step`` returns: x_{t-1} and the model's estimate of x0 at this step."""

    prev_sample: torch.Tensor  # (B, C, H, W)
    pred_original_sample: torch.Tensor | None = None  # (B, C, H, W)

    def to_tuple(self) -> tuple:
        return (self.prev_sample, self.pred_original_sample)

    def __getitem__(self, index: int):  # diffusers' outputs index like tuples: step(...)[0]
        return self.to_tuple()[index]


@dataclass
class StepTables:
    """What the sync-free sampling loop (``fastdiff.sampling_loop``) reads at step i, built once
    before the loop: on the device, the U-Net's timestep and the scheduler's row of every step
    (DDPM, DDIM: ᾱ_t and ᾱ_{t-1}; the linear schedulers: a packed ``LinearStep``); on the host,
    which steps draw noise (it decides which launches a step makes, so it cannot live on the device)."""

    timesteps: torch.Tensor  # (n,): t of step i, int64 (float32 where a σ schedule interpolates it)
    rows: torch.Tensor  # (n, W) float32: what the scheduler's update reads at step i
    noisy: tuple[bool, ...]  # step i draws noise
    host_timesteps: tuple  # the timesteps again, for callbacks
    slots: bool = False  # the update keeps memory between steps: the loop holds it (linear.slot_buffers)
    scales_input: bool = False  # the U-Net's input is the sample times rows[i, linear.INPUT_SCALE]

    def __len__(self) -> int:
        return len(self.host_timesteps)

    def to(self, device) -> StepTables:
        return StepTables(self.timesteps.to(device), self.rows.to(device), self.noisy, self.host_timesteps,
                          self.slots, self.scales_input)


class SchedulerBase(ConfigMixin):
    """Common state: betas, alphas, alphas_cumprod (float32, (T,)), timesteps, num_inference_steps."""

    order = 1
    init_noise_sigma = 1.0

    def _setup(self, config) -> None:
        """Check the options every scheduler has, then build the schedule tables."""
        check_config(config)
        self.betas = make_betas(config.num_train_timesteps, config.beta_start, config.beta_end, config.beta_schedule,
                                config.trained_betas, config.get("rescale_betas_zero_snr", False))
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.one = torch.tensor(1.0)
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, config.num_train_timesteps)[::-1].copy().astype(np.int64))

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # --------------------------------------------------------------------- sampling schedule
    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Pick the ``num_inference_steps`` timesteps to visit, spaced by ``config.timestep_spacing``."""
        T = self.config.num_train_timesteps
        self.num_inference_steps = validation.integer("num_inference_steps", num_inference_steps, 1, T)
        timesteps = spaced_timesteps(T, self.num_inference_steps, self.config.timestep_spacing,
                                     self.config.steps_offset)
        self.timesteps = torch.from_numpy(timesteps).to(device)

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """DDPM and DDIM feed the sample to the model unscaled."""
        return sample

    # --------------------------------------------------------------------- training side
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε for per-sample ``timesteps`` (fused op ``q_sample``)."""
        validation.timesteps("timesteps", timesteps, self.config.num_train_timesteps)
        return ops.q_sample(original_samples, noise, timesteps, self.alphas_cumprod)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """The v-prediction target v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (Salimans & Ho 2022)."""
        validation.timesteps("timesteps", timesteps, self.config.num_train_timesteps)
        return ops.q_sample(sample, noise, timesteps, self.alphas_cumprod, target="v_prediction")[1]

    # --------------------------------------------------------------------- the sync-free loop
    def step_tables(self, timesteps, **step_kwargs) -> StepTables:
        """The ``StepTables`` (on the CPU) of a loop over ``timesteps`` (a subset of
        ``self.timesteps`` in order, e.g. SDEdit's tail) with ``step``'s keyword options: the rows
        are the ᾱ pairs ``step`` would use, so that the loop reproduces ``step`` exactly."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}.step_tables called before set_timesteps(num_inference_steps)")
        host = tuple(int(t) for t in timesteps)
        if not host:
            raise ValueError("timesteps must not be empty")
        alphas = torch.stack([torch.stack(self._step_alphas(t)) for t in host])
        noisy = tuple(bool(self._draws_noise(t, **step_kwargs)) for t in host)
        return StepTables(torch.tensor(host, dtype=torch.int64), alphas, noisy, host)

    # --------------------------------------------------------------------- step helpers
    def _check_step(self, model_output, timestep, sample) -> int:
        """Validate a ``step`` call; return the timestep as a Python int."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}.step called before set_timesteps(num_inference_steps)")
        validation.tensor("model_output", model_output, floating=True)
        validation.tensor("sample", sample, floating=True)
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1 or timestep.is_floating_point():
                raise ValueError(f"timestep must be a single integer, got a tensor of shape {tuple(timestep.shape)}")
            timestep = timestep.item()
        if isinstance(timestep, float) and timestep.is_integer():
            timestep = int(timestep)
        validation.timesteps("timestep", timestep, self.config.num_train_timesteps)
        return int(timestep)


def check_config(config) -> None:
    """The options of the shared schedule: types, choices, and β values that give a valid ᾱ table
    (0 < β < 1: β ≤ 0 makes ᾱ grow past 1, β ≥ 1 makes it 0 or negative, NaN poisons every step)."""
    T = validation.integer("num_train_timesteps", config.num_train_timesteps, minimum=1)
    validation.one_of("beta_schedule", config.beta_schedule, BETA_SCHEDULES)
    validation.one_of("prediction_type", config.prediction_type, PREDICTION_TYPES)
    validation.one_of("timestep_spacing", config.timestep_spacing, TIMESTEP_SPACINGS)
    validation.integer("steps_offset", config.steps_offset, minimum=0)
    # the options below are not every scheduler's (DPM-Solver has no clip_sample, PNDM no thresholding)
    for flag in ("clip_sample", "thresholding", "rescale_betas_zero_snr"):
        if flag in config:
            validation.boolean(flag, config[flag])
    positive = {"dynamic_thresholding_ratio": 1, "clip_sample_range": None, "sample_max_value": None}
    for name, maximum in positive.items():
        if name in config:
            validation.real(name, config[name], 0, maximum, min_open=True)
    if config.trained_betas is not None:
        try:
            betas = torch.as_tensor(config.trained_betas, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"trained_betas must be a list of numbers, got {type(config.trained_betas).__name__}") from None
        if betas.ndim != 1 or len(betas) != T:
            raise ValueError(f"trained_betas must hold num_train_timesteps = {T} values, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):  # also refuses NaN
            bad = betas[~((betas > 0) & (betas < 1))]
            raise ValueError(f"trained_betas must lie in (0, 1), got {len(bad)} value(s) outside it, e.g. {bad[0].item()}")
    elif config.beta_schedule in ("linear", "scaled_linear", "sigmoid"):  # the schedules that use them
        start = validation.real("beta_start", config.beta_start, 0, 1, min_open=True, max_open=True)
        end = validation.real("beta_end", config.beta_end, 0, 1, min_open=True, max_open=True)
        if start > end:
            raise ValueError(f"beta_start must be <= beta_end, got beta_start={start} > beta_end={end}")


def x0_limits(config) -> dict:
    """The clip/threshold keywords of the fused steps from a scheduler config (fastdiff's or
    diffusers'): thresholding wins over clipping, as in diffusers."""
    return {
        "clip_sample_range": config.clip_sample_range if config.clip_sample else None,
        "dynamic_thresholding_ratio": config.dynamic_thresholding_ratio if config.thresholding else None,
        "sample_max_value": config.sample_max_value,
    }
