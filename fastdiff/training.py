"""Train a U-Net with the DDPM objective (Ho et al. 2020, Algorithm 1), resumable bit for bit.

One step: x0 from the data, t ~ U{0, ..., T−1}, ε ~ N(0, I); x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε
(``ops.q_sample``); MSE between the model's output and the target (ε, or v for v-prediction);
AdamW with gradient clipping; an exponential moving average (EMA) of the weights, which is what
gets saved for sampling. Labels are replaced by the model's null class with probability
``label_dropout``, so one model serves both terms of classifier-free guidance (Ho & Salimans 2022).

Reproducibility. Everything random in a step is drawn from one CPU ``torch.Generator`` in a fixed
order (batch indices, timesteps, noise, label-dropout coins); dropout inside the model uses torch's
global RNG. A checkpoint holds both RNG states with the weights, the EMA weights and AdamW's
moments, and the learning rate depends on the step only, so resuming from step k replays steps
k+1, ... exactly: on CPU the loss curve and the final weights are bit-identical to an
uninterrupted run. (On CUDA the CUDA RNG state is saved too, but some kernels are not
bit-deterministic, so a resumed run matches only up to that.) No pickle anywhere: the checkpoint is
one safetensors file with JSON metadata.

Several processes (``torchrun --nproc-per-node N -m fastdiff train``): DistributedDataParallel
averages the gradients, so the N model copies, their AdamW states and their EMAs stay identical.
Each rank's batch (``batch_size`` images: the global batch is N × batch_size) comes from
DistributedSampler's partition of the current epoch; its timesteps, noise, label-dropout coins and
dropout masks come from generators seeded by (seed, rank, step), so a step's randomness is a
function of the step and resuming needs no per-rank RNG state. Rank 0 logs and writes the files;
every rank reads the checkpoint on resume (a shared file system across nodes), which must have been
written with the same N. The logged loss is the mean over ranks.

Files in ``out_dir``:
    checkpoint.safetensors  model, EMA, optimizer and RNG tensors; metadata: step, config, losses.
                            Rewritten atomically, so a crash mid-write keeps the previous one.
    pipeline/               the EMA model + a DDIM scheduler: ``fastdiff.load_pretrained(out_dir / "pipeline")``.

Failing early. Before step 1 the run refuses what would otherwise fail or be lost at the end: an
output location it cannot write, a batch larger than the data set, or one whose step cannot fit in
the memory available. A loss or weights that turn NaN/inf stop the run with
``TrainingDivergedError`` before anything of that step is written, so the checkpoint on disk stays
the last good one and no NaN pipeline is saved.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from . import distributed, ops, validation
from .data import load_dataset, num_classes
from .io import load_tensors, read_metadata, save_tensors
from .pipeline import TRAINING_PIPELINE as PIPELINE_DIR

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "fastdiff-train-checkpoint/1"
# Fields a resumed run may change: where it writes, how often, how far it goes, where it runs.
# Every other field changes what a step computes, so resuming with it changed is refused.
RESUMABLE_CHANGES = ("out_dir", "steps", "checkpoint_every", "log_every", "device")


@dataclass
class TrainConfig:
    # "digits" (scikit-learn's 1797 handwritten digits, no download) or a folder of images.
    dataset: str = "digits"
    out_dir: str = "runs/digits"
    # A U-Net preset plus UNet2DConfig fields to override. sample_size, in/out channels and
    # num_classes follow the data unless overridden here.
    model: str = "digits"
    model_overrides: dict = field(default_factory=dict)
    # The digits are 8×8; 16 leaves the U-Net room for two downsamplings.
    image_size: int = 16
    # None: 1 for digits (grayscale), 3 for an image folder.
    channels: int | None = None
    # v_prediction (Salimans & Ho 2022): x̂0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v̂ is well conditioned at every
    # t. An ε model's x̂0 divides by √ᾱ_t, which is 4.9e-5 at the cosine schedule's t = 999: the
    # ε-trained digits model sampled from there (trailing spacing, Karras σ) lost 5-88 points of
    # accuracy (docs/training.md). "epsilon" is DDPM's objective.
    prediction_type: str = "v_prediction"
    # Cosine (Nichol & Dhariwal 2021): the linear schedule drives ᾱ_t below 0.01 for the last third
    # of its 1000 steps, where a 16×16 image is already pure noise and training learns nothing;
    # the cosine schedule has ᾱ_t < 0.01 for only the last 6.5%.
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    # The embedded digits model's recipe (steps, lr, ema_decay, prediction_type): 8000 steps take
    # ~2.3 hours on a 2-core CPU (1.05 s a step, two threads); the loss was 0.076 at 3500 steps, 0.073 at 8000.
    steps: int = 8000
    batch_size: int = 128
    # A 1M-parameter U-Net tolerates a larger rate than the 1e-4 of image-scale models; with
    # warm-up and clipping, 1e-3 is stable on digits (constant after the warm-up).
    lr: float = 1e-3
    # Off: the EMA already smooths the weights, and decay would pull on the norm layers' scales.
    weight_decay: float = 0.0
    # Linear warm-up from 0: Adam's second-moment estimates are poor in the first steps.
    warmup_steps: int = 100
    grad_clip: float = 1.0
    # Averaging horizon ~1/(1 − decay) = 1000 steps, an eighth of the run: long enough to smooth
    # AdamW's noise, short enough not to drag in weights from the first half. Lower it for short
    # runs (0.995 for ~2000 steps). The decay warms up as min(decay, (1 + step)/(10 + step)).
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    checkpoint_every: int = 250
    seed: int = 0
    # "auto": CUDA when available, else CPU.
    device: str = "auto"
    log_every: int = 50

    def __post_init__(self):
        if self.channels is None:
            self.channels = 1 if str(self.dataset) == "digits" else 3
        v, field = validation, lambda name: f"TrainConfig.{name}"
        v.one_of(field("prediction_type"), self.prediction_type, PREDICTION_TYPES)
        v.one_of(field("beta_schedule"), self.beta_schedule, BETA_SCHEDULES)
        for name in ("num_train_timesteps", "steps", "batch_size", "checkpoint_every", "log_every"):
            v.integer(field(name), getattr(self, name), minimum=1)
        v.integer(field("warmup_steps"), self.warmup_steps, minimum=0)
        v.seed(field("seed"), self.seed)
        v.one_of(field("channels"), self.channels, (1, 3))
        v.integer(field("image_size"), self.image_size, minimum=8)
        v.real(field("lr"), self.lr, 0, min_open=True)
        v.real(field("weight_decay"), self.weight_decay, 0)
        v.real(field("grad_clip"), self.grad_clip, 0, min_open=True)
        v.real(field("ema_decay"), self.ema_decay, 0, 1, max_open=True)
        v.real(field("label_dropout"), self.label_dropout, 0, 1)
        if not isinstance(self.model_overrides, dict):
            raise TypeError(f"TrainConfig.model_overrides must be a dict, got {type(self.model_overrides).__name__}")

    def to_dict(self) -> dict:
        """JSON-normal form (tuples as lists), so a config read back from a checkpoint compares equal."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


class TrainingDivergedError(validation.NonFiniteError):
    """The loss or the weights became NaN or inf. Raised before anything of that step is written:
    the checkpoint on disk is the last good one."""


@dataclass
class TrainResult:
    loss_history: list[float]  # one loss per step, steps 1..step
    pipeline_path: Path  # fastdiff.load_pretrained(pipeline_path)
    checkpoint_path: Path
    step: int
    model: torch.nn.Module | None = None  # the trained weights (this rank's copy, identical on every rank)
    ema: torch.nn.Module | None = None  # their EMA, the weights saved in pipeline_path


# ----------------------------------------------------------------------------- pieces of a step
def build_model(config: TrainConfig, data_classes: int | None):
    """The preset U-Net, its size, channels and classes following the data unless overridden."""
    from .unet import UNet2D

    follow_data = {"sample_size": config.image_size, "in_channels": config.channels,
                   "out_channels": config.channels, "num_classes": data_classes}
    return UNet2D.from_preset(config.model, **{**follow_data, **config.model_overrides})


def build_scheduler(config: TrainConfig):
    """The scheduler saved with the model; its ᾱ table is also the one training noises with."""
    from .schedulers import DDIMScheduler

    # clip_sample=False (diffusers' DDIM default is True): clipping x̂0 to the data's [-1, 1] while the
    # step keeps the unclipped ε̂ drifts with the number of steps. Measured on the embedded digits
    # ε model (cosine schedule): DDIM-50 accuracy 0.925 / confidence 0.895 clipped, 1.000 / 0.964 not.
    # Spacing: "trailing" starts sampling at t = T−1, where x_T is pure noise as the sampler assumes
    # (Lin et al. 2024); a v-prediction model's x̂0 is well conditioned there. An ε model's x̂0 divides
    # by √ᾱ_t, 4.9e-5 at t = 999 on the cosine schedule: from there the ε digits model scored 0.95
    # (trailing) and 0.12 (Karras σ) at DPM-Solver++-10, so ε models keep diffusers' "leading", which
    # starts at t = 900 for 10 steps (docs/training.md).
    spacing = "trailing" if config.prediction_type == "v_prediction" else "leading"
    return DDIMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                         prediction_type=config.prediction_type, clip_sample=False, timestep_spacing=spacing)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant. It depends on the step only (not on ``steps``), so a run
    extended with --resume and a larger --steps continues on the same curve."""
    return config.lr * min(1.0, (step + 1) / (config.warmup_steps + 1))


def draw_batch(images, labels, gen, config: TrainConfig, null_class: int, index: torch.Tensor | None = None):
    """One batch, every random number from ``gen`` in this fixed order (indices with replacement,
    timesteps, noise, label-dropout coins): the whole data pipeline's state is ``gen.get_state()``.
    ``index``: the images to use instead of drawing them (a DistributedSampler's share under DDP)."""
    if index is None:
        index = torch.randint(len(images), (config.batch_size,), generator=gen)  # (B,)
    timesteps = torch.randint(config.num_train_timesteps, (config.batch_size,), generator=gen)  # (B,)
    noise = torch.randn((config.batch_size, *images.shape[1:]), generator=gen)  # (B, C, S, S)
    drop = torch.rand(config.batch_size, generator=gen) < config.label_dropout  # (B,)
    class_labels = None if labels is None else torch.where(drop, null_class, labels[index])
    return images[index], class_labels, timesteps, noise


class EpochShards:
    """This rank's batch indices at any step: DistributedSampler's partition of the epoch the step
    falls in (shuffled by (seed, epoch), disjoint across ranks, the last partial batch dropped)."""

    def __init__(self, num_items: int, config: TrainConfig, rank: int, world: int):
        self.steps_per_epoch = (num_items // world) // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size {config.batch_size} is more than the {num_items // world} images each of "
                             f"the {world} processes gets per epoch ({num_items} in all); lower --batch-size")
        self.sampler = DistributedSampler(range(num_items), num_replicas=world, rank=rank, shuffle=True,
                                          seed=config.seed, drop_last=True)
        self.batch_size, self.epoch, self.order = config.batch_size, None, None

    def __call__(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:  # one permutation per epoch, recomputed on resume from the step alone
            self.sampler.set_epoch(epoch)
            self.epoch, self.order = epoch, torch.tensor(list(self.sampler))
        return self.order[k * self.batch_size:(k + 1) * self.batch_size]  # (B,)


def batch_source(images, labels, gen, config: TrainConfig, null_class: int):
    """``step -> batch``. One process: everything from ``gen``, as :func:`draw_batch` says. Under DDP:
    indices from :class:`EpochShards`; the other draws from a generator seeded by (seed, rank, step),
    and the global RNG (dropout masks) reseeded per step the same way, so ranks differ and a resumed
    run replays each step exactly without any rank's RNG state in the checkpoint."""
    if not distributed.is_distributed():
        return lambda step: draw_batch(images, labels, gen, config, null_class)
    rank = distributed.rank()
    shards = EpochShards(len(images), config, rank, distributed.world_size())

    def batch(step: int):
        torch.manual_seed(distributed.derived_seed(config.seed, rank, step, 1))  # dropout (inside fork_rng)
        step_gen = torch.Generator().manual_seed(distributed.derived_seed(config.seed, rank, step))
        return draw_batch(images, labels, step_gen, config, null_class, index=shards(step))

    return batch


def train_step(model, optimizer, batch, alphas_cumprod, config: TrainConfig, step: int) -> float:
    """Algorithm 1 of Ho et al. on one batch: noise x0 to x_t, regress the target, one AdamW step."""
    device = alphas_cumprod.device
    x0, class_labels, timesteps, noise = (None if t is None else t.to(device) for t in batch)
    x_t, target = ops.q_sample(x0, noise, timesteps, alphas_cumprod, target=config.prediction_type)
    with validation.values_checked():  # drawn in range: checking them would read them back every step
        prediction = model(x_t, timesteps, class_labels=class_labels)
    loss = F.mse_loss(prediction.float(), target.float())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, step)
    optimizer.step()
    return loss.item()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """θ_ema ← decay·θ_ema + (1 − decay)·θ; buffers are copied."""
    for ema_p, p in zip(ema.parameters(), model.parameters()):
        ema_p.lerp_(p, 1 - decay)
    for ema_b, b in zip(ema.buffers(), model.buffers()):
        ema_b.copy_(b)


def ema_decay_at(config: TrainConfig, step: int) -> float:
    return min(config.ema_decay, (1 + step) / (10 + step))


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, config, step, losses, model, ema, optimizer, gen, world_size: int = 1) -> None:
    """One safetensors file; AdamW's per-parameter state flattened to ``optimizer.<key>.<param name>``.
    ``model`` is the bare module (not its DDP wrapper), so names carry no ``module.`` prefix."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for name, param in model.named_parameters():
        for key, value in optimizer.state.get(param, {}).items():  # exp_avg, exp_avg_sq, step
            tensors[f"optimizer.{key}.{name}"] = torch.as_tensor(value)
    tensors["rng.generator"] = gen.get_state()
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    if next(model.parameters()).is_cuda:  # dropout on CUDA draws from the device's own RNG
        tensors["rng.torch_cuda"] = torch.cuda.get_rng_state(next(model.parameters()).device)
    metadata = {"format": CHECKPOINT_FORMAT, "step": str(step), "config": json.dumps(config.to_dict()),
                "loss_history": json.dumps(losses), "world_size": str(world_size)}
    save_tensors(tensors, path, metadata=metadata)


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a training checkpoint; ValueError for anything else."""
    tensors = load_tensors(path, argument="checkpoint")  # refuses pickle, truncated or corrupt files
    metadata = read_metadata(path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint: {path} is a safetensors file but not a fastdiff training checkpoint "
                         f"(metadata format {metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r})")
    return tensors, metadata


def check_resumable(saved: dict, config: TrainConfig, path: Path) -> None:
    """Refuse to resume when a field that changes what a step computes differs from the checkpoint's."""
    current = config.to_dict()
    changed = [k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]]
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} in the checkpoint vs {current[k]!r} now" for k in changed)
        raise ValueError(f"cannot resume from {path}: the config differs in fields that change training "
                         f"({diffs}). Only {', '.join(RESUMABLE_CHANGES)} may change on --resume.")


def load_checkpoint(path: Path, config, model, ema, optimizer, gen) -> tuple[int, list[float]]:
    """Restore everything ``save_checkpoint`` wrote; returns (step, loss history)."""
    tensors, metadata = read_checkpoint(path)
    check_resumable(json.loads(metadata["config"]), config, path)
    saved_world, world = int(metadata.get("world_size", "1")), distributed.world_size()
    if saved_world != world:  # another N changes the global batch and every rank's data: not the same run
        raise ValueError(f"cannot resume from {path}: it was written by {saved_world} process(es), this run has "
                         f"{world}; resume with --nproc-per-node x nodes = {saved_world}")

    def section(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        model.load_state_dict(section("model."))
        ema.load_state_dict(section("ema."))
    except RuntimeError as err:
        raise ValueError(f"checkpoint: {path} does not fit this model ({err})") from err
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    state: dict[int, dict] = {}
    for key, value in section("optimizer.").items():
        field_name, param_name = key.split(".", 1)
        state.setdefault(index[param_name], {})[field_name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    gen.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch_cpu"])
    if "rng.torch_cuda" in tensors and next(model.parameters()).is_cuda:
        torch.cuda.set_rng_state(tensors["rng.torch_cuda"], next(model.parameters()).device)
    return int(metadata["step"]), json.loads(metadata["loss_history"])


class Checkpoints:
    """The run's checkpoint file: rank 0 writes it, every rank remembers which step it holds, so a
    run that diverges can say where it can be resumed from."""

    def __init__(self, path: Path, config: TrainConfig, model, ema, optimizer, gen, step: int):
        self.path, self.config = path, config
        self.model, self.ema, self.optimizer, self.gen = model, ema, optimizer, gen
        self.step = step or None  # a run that starts at step > 0 was resumed from a checkpoint of that step

    def save(self, step: int, losses: list[float]) -> None:
        """Called on every rank: each checks its weights (identical across ranks, so all refuse together)."""
        check_finite_weights(step, {"model": self.model, "ema": self.ema}, f"the step-{step} checkpoint", self)
        if distributed.is_main():
            save_checkpoint(self.path, self.config, step, losses, self.model, self.ema, self.optimizer, self.gen,
                            world_size=distributed.world_size())
        self.step = step

    def resume_hint(self) -> str:
        if self.step is None:
            return "No checkpoint had been written yet."
        return (f"{self.path} still holds step {self.step}, the last good one: --resume continues from it "
                f"(`--resume --steps {self.step}` just writes its pipeline). Resuming replays the same steps, "
                "so getting past the divergence takes a new run, e.g. with a lower --lr.")


def check_finite_loss(loss: float, step: int, checkpoints: Checkpoints) -> None:
    """``loss`` is the float ``train_step`` already read back for logging: checking it adds no host sync."""
    if not math.isfinite(loss):
        raise TrainingDivergedError(f"step {step}: the loss is {loss}; training diverged and stopped before "
                                    f"writing anything of this step. {checkpoints.resume_hint()}")


def check_finite_weights(step: int, modules: dict, target: str, checkpoints: Checkpoints) -> None:
    """Refuse to write ``target`` from weights holding NaN/inf. One host sync for all the tensors, at a
    save, which copies every tensor to the host anyway."""
    named = {f"{prefix}.{k}": v for prefix, module in modules.items() for k, v in module.state_dict().items()
             if v.is_floating_point()}
    finite = torch.stack([torch.isfinite(v).all() for v in named.values()]).tolist() if named else []
    bad = [name for name, ok in zip(named, finite) if not ok]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise TrainingDivergedError(f"step {step}: NaN or inf in {shown}; training diverged, refusing to write "
                                    f"{target}. {checkpoints.resume_hint()}")


# ----------------------------------------------------------------------------- checks before step 1
def check_before_training(device: torch.device, *checks) -> None:
    """Run ``checks`` (each raises ValueError) on this rank. Under DDP every rank learns whether any
    failed, so all stop together: one rank stopping alone would leave the others waiting in the first
    all-reduce until the timeout."""
    error = None
    try:
        for check in checks:
            check()
    except ValueError as err:
        error = err
    failed = distributed.all_reduce_sum(float(error is not None), device)
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"{failed:.0f} other process(es) refused to start training; see their messages")


def pipeline_files(path: Path) -> list[Path]:
    """The files ``save_pipeline`` writes under ``path`` (``DiffusionPipeline.save_pretrained``'s layout)."""
    from .schedulers.configuration import CONFIG_NAME
    from .pipeline import INDEX_NAME
    from .unet import CONFIG_FILE, WEIGHTS_FILE

    return [path / INDEX_NAME, path / "unet" / CONFIG_FILE, path / "unet" / WEIGHTS_FILE,
            path / "scheduler" / CONFIG_NAME]


def check_outputs(out_dir: Path) -> None:
    """Every file the run writes must be writable now, not only after the last step (rank 0 writes)."""
    for path in [out_dir / CHECKPOINT_NAME, *pipeline_files(out_dir / PIPELINE_DIR)]:
        validation.output_file("--out", path)


def check_batch_size(config: TrainConfig, num_images: int) -> None:
    """One process draws its batch from the whole data set (with replacement), so a batch larger than
    the data set only repeats images: a typo, not a recipe. Under DDP ``EpochShards`` checks each
    rank's share."""
    if not distributed.is_distributed() and config.batch_size > num_images:
        raise ValueError(f"batch_size {config.batch_size} is more than the {num_images} images in dataset "
                         f"{config.dataset!r}; lower --batch-size to at most {num_images}")


def saved_activation_bytes(model, config: TrainConfig, batch_size: int) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward pass at ``batch_size``, the
    weights excluded (they are counted once, not per image). Views and repeats of one storage count once."""
    device = next(model.parameters()).device
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}  # storage address -> bytes; all alive until the graph is freed, so no reuse

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.zeros(batch_size, config.channels, config.image_size, config.image_size, device=device)
    t = torch.zeros(batch_size, dtype=torch.long, device=device)
    labels = torch.zeros(batch_size, dtype=torch.long, device=device) if model.is_conditional else None
    # fork_rng: the forward's dropout must not move the RNG streams the run replays on resume.
    with torch.random.fork_rng(devices=_cuda_indices(device)), torch.enable_grad(), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, t, class_labels=labels)
    return sum(saved.values())


def step_memory(model, config: TrainConfig) -> tuple[int, int]:
    """(bytes per image, bytes per step whatever the batch) a training step allocates on the model's
    device beyond the weights and the EMA already there.

    Counts: the tensors autograd saves for backward, measured at batch 1 (they scale with the batch:
    every layer's saved input is (B, ...)), the batch's x0 and ε (x_t, the model's input, is among
    the saved tensors), and per parameter its gradient and AdamW's two moments.
    Leaves out: v-prediction's separate target, temporaries inside an op or between two (the
    activation gradients alive at once in backward), the allocator's caching and fragmentation, the
    CUDA context, DDP's gradient buckets, and on the CPU the data set, the process itself and the
    other processes of a torchrun on the same machine. So it is a lower bound: a batch refused for
    exceeding it cannot fit.
    """
    batch_bytes = 2 * config.channels * config.image_size ** 2 * 4  # two float32 (C, S, S) tensors per image
    per_image = saved_activation_bytes(model, config, 1) + batch_bytes
    grads_and_moments = 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return per_image, grads_and_moments


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes this process can still allocate on ``device``, where that number comes from); None where
    it is unknown (no /proc/meminfo, other device types). On the CPU, the smaller of the machine's
    MemAvailable and what this process's memory cgroup still allows (a container's limit)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # torch reuses its cache
        return free + cached, "free on the GPU, torch's cache included"
    if device.type != "cpu":
        return None
    found = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found = int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    headroom = cgroup_headroom()
    if headroom is not None and (found is None or headroom < found[0]):
        found = headroom, "the memory cgroup's limit less its usage: a container's limit"
    return found


CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a number near 2**63


def _cgroup_number(path: Path, key: str | None = None) -> int | None:
    """The integer in a cgroup file (None for "max", a missing file or key); ``key``: a memory.stat line."""
    try:
        text = path.read_text()
    except OSError:
        return None
    if key is not None:
        text = next((line.split()[1] for line in text.splitlines() if line.split()[:1] == [key]), "")
    return int(text) if text.strip().isdigit() else None


def cgroup_headroom(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes this process's memory cgroup and the cgroups above it still allow (the tightest), counting
    reclaimable page cache (inactive files) as free; None where no limit is set or none is readable.
    cgroup v1's memory controller when the process has one, else v2's unified hierarchy."""
    try:
        entries = [line.split(":", 2) for line in proc_cgroup.read_text().splitlines() if line.count(":") >= 2]
    except OSError:
        return None
    v1 = next((path for _, controllers, path in entries if "memory" in controllers.split(",")), None)
    v2 = next((path for hierarchy, controllers, path in entries if hierarchy == "0" and not controllers), None)
    if v1 is not None:
        base, path, files = root / "memory", v1, ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                  "total_inactive_file")
    elif v2 is not None:
        base, path, files = root, v2, ("memory.max", "memory.current", "inactive_file")
    else:
        return None
    leaf = base / path.lstrip("/")
    # a container's cgroup namespace shows its own cgroup as the mount's root: the listed path is not there
    levels = [d for d in (leaf, *leaf.parents) if d == base or base in d.parents] if leaf.is_dir() else [base]
    tightest = None
    for level in levels:
        limit, usage = _cgroup_number(level / files[0]), _cgroup_number(level / files[1])
        if limit is None or limit >= _UNLIMITED or usage is None:
            continue
        headroom = max(limit - usage + (_cgroup_number(level / "memory.stat", files[2]) or 0), 0)
        tightest = headroom if tightest is None else min(tightest, headroom)
    return tightest


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.3g} GiB"


def check_memory(model, config: TrainConfig) -> None:
    """Refuse a batch whose training step cannot fit in the memory available (``step_memory``)."""
    device = next(model.parameters()).device
    available = available_memory(device)
    if available is None:
        return
    free, source = available
    per_image, fixed = step_memory(model, config)
    need = config.batch_size * per_image + fixed
    if need > free:
        fits = (free - fixed) // per_image
        advice = (f"lower --batch-size to {fits} or less" if fits >= 1 else
                  "not even a batch of 1 fits: use a smaller model or another device")
        raise ValueError(f"batch_size {config.batch_size}: a training step needs at least {_gib(need)} on {device} "
                         f"({_gib(per_image)} per image for the activations kept for backward, {_gib(fixed)} for "
                         f"gradients and AdamW's moments), but only {_gib(free)} is available ({source}); {advice}")


# ----------------------------------------------------------------------------- the loop
def resolve_device(name: str) -> torch.device:
    """CUDA when available for "auto", else CPU; under torchrun "auto" and "cuda" mean cuda:LOCAL_RANK."""
    return distributed.default_device(name)


def _cuda_indices(device: torch.device) -> list[int]:
    """The CUDA device whose RNG ``fork_rng`` must save and restore; none on CPU."""
    if device.type != "cuda":
        return []
    return [torch.cuda.current_device() if device.index is None else device.index]


def train(config: TrainConfig, progress: bool = True, resume: bool = False) -> TrainResult:
    """Train per ``config``; with ``resume``, continue from ``out_dir/checkpoint.safetensors``.

    Under torchrun (WORLD_SIZE > 1) every rank calls this and trains its DDP replica.
    """
    device = resolve_device(config.device)
    distributed.init_from_env(device)
    out_dir = Path(config.out_dir)
    checkpoint = out_dir / CHECKPOINT_NAME
    if resume and not checkpoint.is_file():
        raise ValueError(f"resume: no checkpoint at {checkpoint}; run without --resume to start training")
    if not resume and checkpoint.is_file():
        raise ValueError(f"{out_dir} already holds a checkpoint; pass --resume to continue it, "
                         "or choose another --out (refusing to overwrite a run)")
    images, labels = load_dataset(config.dataset, config.image_size, config.channels)
    scheduler = build_scheduler(config)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)

    # Seed a private copy of the global RNGs (model init, dropout): the caller's streams are untouched.
    with torch.random.fork_rng(devices=_cuda_indices(device)):
        torch.manual_seed(config.seed)
        model = build_model(config, num_classes(labels)).to(device)
        if not model.is_conditional:  # num_classes=None overridden on labelled data: train unconditionally
            labels = None
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        gen = torch.Generator().manual_seed(config.seed)
        check_before_training(device, lambda: check_batch_size(config, len(images)),
                              lambda: check_memory(model, config),
                              lambda: check_outputs(out_dir) if distributed.is_main() else None)
        step, losses = 0, []
        if resume:
            step, losses = load_checkpoint(checkpoint, config, model, ema, optimizer, gen)
            _remove_stale_temps(out_dir)
            if distributed.is_main():
                logger.info("resumed from %s at step %d", checkpoint, step)
        checkpoints = Checkpoints(checkpoint, config, model, ema, optimizer, gen, step)
        next_batch = batch_source(images, labels, gen, config, model.null_class)
        step = _run_steps(model, ema, optimizer, next_batch, alphas_cumprod, config, step, losses, checkpoints,
                          progress)

    check_finite_weights(step, {"ema": ema}, f"the pipeline to {out_dir / PIPELINE_DIR}", checkpoints)
    if distributed.is_main():
        save_pipeline(ema, scheduler, out_dir / PIPELINE_DIR)
    distributed.barrier()  # every rank returns with the files in place
    return TrainResult(loss_history=losses, pipeline_path=out_dir / PIPELINE_DIR, checkpoint_path=checkpoint,
                       step=step, model=model, ema=ema)


def _run_steps(model, ema, optimizer, next_batch, alphas_cumprod, config, step, losses, checkpoints,
               progress) -> int:
    """Steps ``step``+1 .. ``config.steps``; rank 0 logs, every rank calls ``checkpoints.save`` at checkpoints."""
    main = distributed.is_main()
    device = alphas_cumprod.device
    net = model
    if distributed.is_distributed():  # gradients averaged over ranks inside backward()
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    bar = tqdm(total=config.steps, initial=min(step, config.steps), disable=not (progress and main), desc="train")
    while step < config.steps:
        loss = train_step(net, optimizer, next_batch(step), alphas_cumprod, config, step)
        loss = distributed.all_reduce_mean(loss, device)  # NaN on any rank makes it NaN on every rank
        check_finite_loss(loss, step + 1, checkpoints)
        losses.append(loss)
        ema_update(ema, model, ema_decay_at(config, step))
        step += 1
        bar.update(1)
        if main and (step % config.log_every == 0 or step == config.steps):
            recent = losses[-config.log_every:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
            logger.info("step %d: loss %.4f", step, sum(recent) / len(recent))
        if step % config.checkpoint_every == 0 or step == config.steps:
            checkpoints.save(step, losses)
    bar.close()
    # Cheap insurance: DDP keeps replicas equal by construction; a silent divergence would corrupt the EMA.
    if not distributed.all_equal([*model.parameters(), *ema.parameters()], device):
        raise RuntimeError("DDP replicas diverged: model or EMA weights differ between ranks")
    return step


def _remove_stale_temps(out_dir: Path) -> None:
    """Temp files of a checkpoint write that a killed process never renamed (atomic_write's names)."""
    if distributed.is_main():
        for temp in out_dir.glob(f".{CHECKPOINT_NAME}.*.tmp"):
            temp.unlink(missing_ok=True)


def save_pipeline(ema, scheduler, path: Path) -> Path:
    """The EMA weights with the DDIM scheduler, in the layout ``fastdiff.load_pretrained`` reads."""
    from .pipeline import DiffusionPipeline

    DiffusionPipeline(ema, scheduler).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- command line
# Flag → TrainConfig field, for the flags that set one.
FLAG_FIELDS = {"dataset": "dataset", "steps": "steps", "batch_size": "batch_size", "lr": "lr",
               "prediction_type": "prediction_type", "beta_schedule": "beta_schedule", "ema_decay": "ema_decay",
               "label_dropout": "label_dropout", "checkpoint_every": "checkpoint_every", "seed": "seed",
               "device": "device", "image_size": "image_size", "channels": "channels"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``fastdiff train``. A config flag left out means TrainConfig's default, or on
    --resume the checkpoint's value (so its defaults are None here; ``config_from_args`` fills them)."""
    d = TrainConfig()

    def default(value) -> str:
        return f"(default: {value}; on --resume, the checkpoint's)"

    parser.add_argument("--dataset", help="'digits' (scikit-learn, no download) or a folder of images; one "
                        f"subfolder per class makes it class-conditional {default(d.dataset)}")
    parser.add_argument("--out", default=d.out_dir, help="output folder: checkpoint.safetensors and pipeline/ "
                        "(default: %(default)s)")
    parser.add_argument("--steps", type=int, help=f"total optimizer steps {default(d.steps)}")
    parser.add_argument("--batch-size", type=int, help=default(d.batch_size))
    parser.add_argument("--lr", type=float, help=f"peak AdamW learning rate {default(d.lr)}")
    parser.add_argument("--prediction-type", choices=PREDICTION_TYPES,
                        help=f"what the model predicts {default(d.prediction_type)}")
    parser.add_argument("--beta-schedule", choices=BETA_SCHEDULES, help=f"noise schedule {default(d.beta_schedule)}")
    parser.add_argument("--ema-decay", type=float, help=default(d.ema_decay))
    parser.add_argument("--label-dropout", type=float, help="probability of training a sample unconditionally, "
                        f"for classifier-free guidance {default(d.label_dropout)}")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints; one is also written at "
                        f"the end {default(d.checkpoint_every)}")
    parser.add_argument("--seed", type=int, help=default(d.seed))
    parser.add_argument("--device", help=f"cpu, cuda, cuda:1, ... or auto {default(d.device)}")
    parser.add_argument("--image-size", type=int, help=f"square side in pixels {default(d.image_size)}")
    parser.add_argument("--channels", type=int, choices=(1, 3),
                        help="1 or 3 (default: 1 for digits, 3 for an image folder; on --resume, the checkpoint's)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, "
                        "exactly as if it had not stopped, with its settings; --steps may be raised")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The flags given, over the checkpoint's config on --resume (every field, those without a flag
    too), else over TrainConfig's defaults. A flag given on --resume that changes what a step computes
    is still refused by ``train``."""
    given = {name: getattr(args, flag) for flag, name in FLAG_FIELDS.items() if getattr(args, flag) is not None}
    checkpoint = Path(args.out) / CHECKPOINT_NAME
    base = {}
    if args.resume and checkpoint.is_file():  # a missing one is train's error to report
        base = json.loads(read_checkpoint(checkpoint)[1]["config"])
        base = {k: v for k, v in base.items() if k in TrainConfig.__dataclass_fields__}
    return TrainConfig(**{**base, **given, "out_dir": args.out})


def run(args: argparse.Namespace) -> int:
    """``fastdiff train``: build the config from the flags, train, print where the pipeline went."""
    config = config_from_args(args)
    result = train(config, progress=not args.no_progress, resume=args.resume)
    final = result.loss_history[-1] if result.loss_history else float("nan")
    if distributed.is_main():
        print(f"trained {result.step} steps (last loss {final:.4f}); pipeline saved to {result.pipeline_path}")
    return 0
