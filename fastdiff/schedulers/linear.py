"""Schedulers whose step is linear, and the one fused op that runs them all.

A step of DPM-Solver, UniPC, Euler(-ancestral) or PNDM is a linear combination, with scalar
coefficients that depend only on the schedule and the step index, of the sample x, the model
output m (after the classifier-free-guidance combine), the step's noise z and a few tensors the
sampler keeps from earlier steps:

    c      = (a·x + b·m + e·z) / d          m converted to what the solver integrates (x̂0 or ε̂)
    x_next = Σ out_j·v_j,   v = (x, c, z, m1, m2, m3, last, acc)
    last   ← Σ last_j·v_j   acc ← Σ acc_j·v_j   (on the steps that set them)
    push c: it becomes m1, m1 becomes m2, ...   (on the steps that push)

m1, m2, m3 are the converted outputs of earlier steps, most recent first; "last" and "acc" are two
more tensors (UniPC's corrected sample, PNDM's Runge-Kutta start and running sum). Each scheduler
writes its equations once, as functions returning a ``LinearStep`` (coefficients by name); the op
``fastdiff.ops.multistep_update`` runs a step in one kernel launch (or in PyTorch, its reference).

Memory. The history is a ring of three slots: a push overwrites the oldest slot and moves no data.
``LinearPlan`` follows the ring while it packs a sequence of steps into rows of floats (layout
``reference.ROW_*``): the rows of a whole sampling run form the device table the sync-free loop
indexes with its device step counter, so every step, lower-order warm-up and final steps
included, replays from one CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..reference import (MULTISTEP_SLOTS, ROW_ACC, ROW_CONVERT, ROW_LAST, ROW_OUT, ROW_PUSH, ROW_READS,
                         ROW_RECONVERT, ROW_SETS, ROW_SIZE)

HISTORY = ("m1", "m2", "m3")  # converted outputs of earlier steps, most recent first (a ring of slots 0-2)
NAMES = ("x", "c", "z", *HISTORY, "last", "acc")  # what a row combines; last = slot 3, acc = slot 4
INPUT_SCALE = ROW_SIZE  # the loop's table holds one more column: the U-Net input scale of the step
TABLE_WIDTH = ROW_SIZE + 1


@dataclass
class LinearStep:
    """One step in the coefficients' own names (see the module docstring).

    ``out``, ``last`` and ``acc`` map names of ``NAMES`` to coefficients (absent: 0); ``last`` or
    ``acc`` None leaves that slot as it is. ``input_scale`` is the factor the model's input is
    scaled by at this step (Euler's 1/√(σ² + 1)); ``noise`` says whether the step uses z.
    """

    convert: tuple[float, float, float, float]  # (a, b, e, d)
    out: dict[str, float]
    # with dynamic thresholding: c ← f·x + g·c after the threshold (ε-space solvers: ε from the thresholded x̂0)
    reconvert: tuple[float, float] = (0.0, 1.0)
    last: dict[str, float] | None = None
    acc: dict[str, float] | None = None
    push: bool = False
    noise: bool = False
    input_scale: float = 1.0

    def uses(self, name: str) -> bool:
        return any(name in row and row[name] != 0 for row in (self.out, self.last or {}, self.acc or {}))

    @property
    def needs_memory(self) -> bool:
        """Whether the step reads or writes a slot (a sampler whose steps never do runs without them)."""
        return self.push or self.last is not None or self.acc is not None or any(
            self.uses(name) for name in (*HISTORY, "last", "acc"))


@dataclass
class LinearPlan:
    """Packs a sequence of ``LinearStep``s into rows, following the history ring: ``pushes`` counts
    the pushes so far, so m_k lives in slot (pushes − k) mod 3."""

    pushes: int = 0
    steps: list[LinearStep] = field(default_factory=list)

    def slot(self, name: str) -> int:
        """The physical slot of ``name`` at the current step."""
        if name in HISTORY:
            k = HISTORY.index(name) + 1
            if k > self.pushes:
                raise ValueError(f"{name} is read before {k} converted outputs were pushed")
            return (self.pushes - k) % 3
        return {"last": 3, "acc": 4}[name]

    def pack(self, step: LinearStep) -> torch.Tensor:
        """The step as a (TABLE_WIDTH,) float32 row (the op reads the first ROW_SIZE); advances the ring."""
        row = torch.zeros(TABLE_WIDTH, dtype=torch.float64)
        row[ROW_CONVERT:ROW_CONVERT + 4] = torch.tensor(step.convert, dtype=torch.float64)
        row[ROW_RECONVERT:ROW_RECONVERT + 2] = torch.tensor(step.reconvert, dtype=torch.float64)
        reads = [False] * MULTISTEP_SLOTS
        for offset, coefficients in ((ROW_OUT, step.out), (ROW_LAST, step.last), (ROW_ACC, step.acc)):
            for name, value in (coefficients or {}).items():
                if name not in NAMES:
                    raise ValueError(f"unknown input {name!r}; a step combines {', '.join(NAMES)}")
                if name == "z" and not step.noise and value != 0:
                    raise ValueError("a step that combines z must set noise=True")
                if value == 0:
                    continue
                j = NAMES.index(name) if name in ("x", "c", "z") else 3 + self.slot(name)
                row[offset + j] = value
                if j >= 3:
                    reads[j - 3] = True
        row[ROW_SETS], row[ROW_SETS + 1] = float(step.last is not None), float(step.acc is not None)
        row[ROW_READS:ROW_READS + MULTISTEP_SLOTS] = torch.tensor(reads, dtype=torch.float64)
        row[ROW_PUSH] = -1.0
        if step.push:
            row[ROW_PUSH] = self.pushes % 3  # the oldest slot: m3's, read above before it is overwritten
            self.pushes += 1
        row[INPUT_SCALE] = step.input_scale
        self.steps.append(step)
        return row.to(torch.float32)


def slot_buffers(like: torch.Tensor) -> torch.Tensor:
    """Zeroed (MULTISTEP_SLOTS, *like.shape) slots, each in ``like``'s memory layout (channels_last
    stays channels_last), so the kernel reads and writes them in place next to the sample."""
    slots = torch.zeros((MULTISTEP_SLOTS, *like.shape), dtype=like.dtype, device=like.device)
    if like.ndim == 4 and like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        b, c, h, w = like.shape
        slots = torch.zeros((MULTISTEP_SLOTS, b, h, w, c), dtype=like.dtype, device=like.device).permute(0, 1, 4, 2, 3)
    return slots
