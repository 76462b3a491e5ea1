"""Evaluation sets: many samples as numbered PNGs, split over torchrun ranks, resumable.

    torchrun --nproc-per-node 8 -m fastdiff sample --num-images 50000 --outdir samples/ --npz

Determinism. Image i is drawn from its own generator, seeded ``derived_seed(seed, i)``, with the
class label ``classes[i % len(classes)]``. Images are computed in batches of fixed composition,
batch b = images [b·B, (b+1)·B), whatever the number of processes, so image i meets the same
arithmetic (same batch shapes and neighbours) in a 1-process run, an 8-process run and a resumed
run: on one machine the PNGs are byte-identical. Another ``batch_size`` changes the float results
by ~1e-7 (kernels block differently by batch), which almost never moves an 8-bit pixel.

Sharding and resume. Rank 0 lists the batches that still lack a PNG and broadcasts the list; rank r
takes entries r, r+N, r+2N, ... of it, so no two ranks ever write the same file and a rerun after a
crash regenerates only what is missing (a batch with one missing PNG is recomputed, only that PNG is
written). Each PNG is written atomically (temp file + rename): a killed process leaves no half
image that a rerun would skip. ``DIR/sampling.json`` records the settings and a hash of the
weights; a rerun with different ones is refused rather than mixed into the set. Several nodes need
a shared file system for DIR.

The optional ``DIR/samples.npz`` (``arr_0``: (M, H, W, C) uint8, ``arr_1``: labels for a
conditional model; the layout of guided-diffusion's evaluator) is assembled by rank 0 from the
PNGs once every rank has finished.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed, validation
from .images import to_uint8
from .io import atomic_write, tensors_sha256, write_json

MANIFEST_NAME = "sampling.json"
NPZ_NAME = "samples.npz"
_PNG = re.compile(r"^(\d+)\.png$")
_STALE_TEMP = re.compile(r"^\.\d+\.png\..*\.tmp$")  # atomic_write's temp files, left by a killed process


@dataclass
class SampleManyResult:
    outdir: Path
    num_images: int
    written: int  # PNGs written by all ranks in this run
    skipped: int  # PNGs already present from an earlier run
    npz_path: Path | None


def image_path(outdir: Path, index: int) -> Path:
    """``outdir/000123.png``: zero-padded to 6 digits (wider past 999999, never truncated)."""
    return Path(outdir) / f"{index:06d}.png"


def image_label(index: int, classes: list[int] | None) -> int | None:
    return None if classes is None else classes[index % len(classes)]


def image_generator(seed: int, index: int) -> torch.Generator:
    """Image ``index``'s own CPU generator: its noise is the same on any device and in any batch."""
    return torch.Generator().manual_seed(distributed.derived_seed(seed, index))


def sample_many(pipe, num_images: int, outdir, *, seed: int = 0, batch_size: int = 32,
                num_inference_steps: int = 50, classes: list[int] | None = None,
                guidance_scale: float | None = None, eta: float = 0.0, npz: bool = False,
                progress: bool = True, cuda_graph: bool = False) -> SampleManyResult:
    """Write images 0..num_images−1 of ``pipe`` to ``outdir`` as PNGs, this process's share of them.

    Under torchrun every rank calls this with the same arguments and its ``pipe`` on its own device
    (``fastdiff.distributed.default_device()``); alone, one process writes them all. ``classes``:
    the labels to cycle through for a conditional model (default: every class). Images already in
    ``outdir`` are skipped. ``cuda_graph``: replay each step from a CUDA graph (the same images;
    a short last batch captures its own). Returns counts summed over ranks.
    """
    _check_arguments(num_images, batch_size, seed)
    distributed.init_from_env(pipe.device)
    outdir = Path(outdir)
    classes = _classes(pipe, classes)
    settings = _settings(pipe, seed, batch_size, num_inference_steps, classes, guidance_scale, eta)
    todo, skipped = _plan(outdir, num_images, batch_size, settings)
    mine = todo[distributed.rank()::distributed.world_size()]
    call = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta, cuda_graph=cuda_graph)
    written = _sample_batches(pipe, outdir, mine, num_images, batch_size, seed, classes, call, progress)

    distributed.barrier()  # every PNG is on disk before anyone reads them or reports
    npz_path = None
    if npz:
        if distributed.is_main():
            npz_path = write_npz(outdir, num_images, classes)
        npz_path = outdir / NPZ_NAME
        distributed.barrier()
    written = int(distributed.all_reduce_sum(written, pipe.device))
    return SampleManyResult(outdir=outdir, num_images=num_images, written=written, skipped=skipped,
                            npz_path=npz_path)


def _check_arguments(num_images, batch_size, seed) -> None:
    validation.integer("num_images", num_images, minimum=1)
    validation.integer("batch_size", batch_size, minimum=1)
    validation.seed("seed", seed)


def _classes(pipe, classes) -> list[int] | None:
    if not pipe.unet.is_conditional:
        if classes is not None:
            raise ValueError("classes were given but the U-Net is unconditional (config.num_classes is None)")
        return None
    classes = list(range(pipe.unet.num_classes)) if classes is None else [int(c) for c in classes]
    if not classes or min(classes) < 0 or max(classes) >= pipe.unet.num_classes:
        raise ValueError(f"classes must be a non-empty list in [0, {pipe.unet.num_classes}), got {classes}")
    return classes


def _settings(pipe, seed, batch_size, steps, classes, guidance_scale, eta) -> dict:
    """Everything that decides image i's pixels; a resumed run must match it exactly."""
    weights = tensors_sha256({name: t.detach().cpu() for name, t in pipe.unet.state_dict().items()})
    guidance = pipe.guidance_scale if guidance_scale is None else float(guidance_scale)
    return {"seed": seed, "batch_size": batch_size, "num_inference_steps": steps, "classes": classes,
            "guidance_scale": guidance, "eta": float(eta), "scheduler": type(pipe.scheduler).__name__,
            "scheduler_config": json.loads(json.dumps(dict(pipe.scheduler.config))),
            "weights_sha256": weights[:16]}


def _plan(outdir: Path, num_images: int, batch_size: int, settings: dict) -> tuple[list[int], int]:
    """(batches that lack a PNG, PNGs already there), decided by rank 0 and broadcast to all ranks.

    Rank 0 alone looks at the disk, so every rank acts on one identical list; an error there is
    broadcast too, so the other ranks raise it instead of waiting for a list that never comes.
    """
    plan = None
    if distributed.is_main():
        try:
            plan = ("ok", *_scan(outdir, num_images, batch_size, settings))
        except ValueError as err:
            plan = ("error", str(err))
    plan = distributed.broadcast_object(plan)
    if plan[0] == "error":
        raise ValueError(plan[1])
    return plan[1], plan[2]


def _scan(outdir: Path, num_images: int, batch_size: int, settings: dict) -> tuple[list[int], int]:
    if outdir.exists() and not outdir.is_dir():
        raise ValueError(f"outdir: {outdir} exists and is not a directory")
    _check_manifest(outdir, settings)
    for temp in outdir.iterdir():
        if _STALE_TEMP.match(temp.name):
            temp.unlink(missing_ok=True)
    present = {int(m.group(1)) for m in map(_PNG.match, (p.name for p in outdir.iterdir())) if m}
    present = {i for i in present if i < num_images}
    batches = math.ceil(num_images / batch_size)
    todo = [b for b in range(batches)
            if any(i not in present for i in range(b * batch_size, min((b + 1) * batch_size, num_images)))]
    return todo, len(present)


def _check_manifest(outdir: Path, settings: dict) -> None:
    manifest = outdir / MANIFEST_NAME
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        changed = [k for k in settings if saved.get(k) != settings[k]]
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} there vs {settings[k]!r} now" for k in changed)
            raise ValueError(f"outdir: {outdir} holds samples drawn with other settings ({diffs}); "
                             "use another --outdir, or the same settings to resume")
    elif outdir.is_dir() and any(_PNG.match(p.name) for p in outdir.iterdir()):
        raise ValueError(f"outdir: {outdir} holds numbered PNGs but no {MANIFEST_NAME}; "
                         "refusing to mix them with new samples")
    else:
        write_json(settings, manifest)


def _sample_batches(pipe, outdir, batches, num_images, batch_size, seed, classes, call, progress) -> int:
    """Sample this rank's ``batches``; write the PNGs that are missing. Returns how many it wrote."""
    shown = progress and distributed.is_main()
    world = distributed.world_size()
    desc = "sampling" if world == 1 else f"sampling (rank 0 of {world})"
    bar = tqdm(total=len(batches), desc=desc, unit="batch", disable=not shown)
    written = 0
    for b in batches:
        indices = range(b * batch_size, min((b + 1) * batch_size, num_images))
        labels = None if classes is None else [image_label(i, classes) for i in indices]
        generators = [image_generator(seed, i) for i in indices]
        images = pipe(batch_size=len(indices), generator=generators, class_labels=labels, progress=False,
                      **call).images
        for i, pixels in zip(indices, to_uint8(images).numpy()):  # (H, W, C) uint8
            if not image_path(outdir, i).exists():
                write_png(image_path(outdir, i), pixels)
                written += 1
        bar.update(1)
    bar.close()
    return written


def write_png(path: Path, pixels) -> Path:
    """One (H, W, C) uint8 image, atomically: the PNG is complete or absent, never partial."""
    from PIL import Image

    picture = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def write_npz(outdir: Path, num_images: int, classes: list[int] | None) -> Path:
    """``outdir/samples.npz`` from PNGs 0..num_images−1: arr_0 (M, H, W, C) uint8, arr_1 labels."""
    import numpy as np
    from PIL import Image

    arrays = []
    for i in tqdm(range(num_images), desc="npz", disable=num_images < 1000, leave=False):
        with Image.open(image_path(outdir, i)) as picture:
            pixels = np.asarray(picture)
        arrays.append(pixels[..., None] if pixels.ndim == 2 else pixels)
    data = {"arr_0": np.stack(arrays)}
    if classes is not None:
        data["arr_1"] = np.array([image_label(i, classes) for i in range(num_images)], dtype=np.int64)

    def save(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare temp name
            np.savez(f, **data)

    return atomic_write(outdir / NPZ_NAME, save)
