"""The bytes each benchmark case must move and the FLOPs it must do: the floor its time is judged by.

Counted before anything is timed, so that every time has a floor to be read against:

* bytes: the fewest a correct implementation moves through device memory, each input read once and
  each output written once. A kernel that re-reads (the reference's temporaries, GroupNorm's
  second pass) moves more; that is the gap the benchmark shows.
* FLOPs: the arithmetic of the formula, an add or a multiply counting one (a fused multiply-add
  two). For the elementwise ops this is a few per element and never the limit: they are memory
  bound on every GPU (well under 1 FLOP per byte; an H100's ridge is ~300 in bf16).

Measured against the ceilings of the same run (benchmarks/conftest.py): GB/s over the device
copy bandwidth, TFLOP/s over a large matmul in the case's precision. ``floor_ms`` is the roofline
time max(bytes / bandwidth, FLOPs / matmul rate); ``bound`` names the larger term.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

# FLOPs per element of each elementwise formula (an exp counts one), as the docstrings below count them.
Q_SAMPLE_FLOPS = 3  # √ᾱ·x0 + √(1−ᾱ)·ε: two multiplies, one add
Q_SAMPLE_V_FLOPS = 3  # v = √ᾱ·ε − √(1−ᾱ)·x0, in the same pass
DDIM_FLOPS = 8  # x̂0 = (x − √(1−ᾱ)·ε)·(1/√ᾱ): 3; clip: 2; √ᾱ'·x̂0 + c·ε: 3
DDPM_FLOPS = 10  # x̂0: 3; clip: 2; posterior mean a·x̂0 + b·x: 3; + σ·z: 2
GROUP_NORM_FLOPS = 8  # mean: 1; squared deviation: 3; (x − μ)·rstd·w + b: 4
SILU_FLOPS = 4  # y·sigmoid(y): exp, add, divide, multiply
GUIDANCE_FLOPS = 3  # m_u + w·(m_c − m_u): subtract, multiply, add
# The steady-state steps of benchmarks/bench_multistep_step.py through fastdiff.ops.multistep_update:
# (slots read, slots written, writes x̂0, FLOPs per element without guidance), as their packed rows say
# (tests/test_bench.py checks the rows). Every step converts c = (a·x + b·m)/d: 4 FLOPs; a sum of n
# terms Σ w_j·v_j: 2n − 1.
MULTISTEP_STEPS = {
    "dpmpp2m": (1, 1, False, 4 + 5),  # reads m1, pushes c; x_next over x, c, m1
    "unipc_bh2": (3, 2, False, 4 + 7 + 7),  # reads m1, m2, last; sets last, pushes c; x_next, last over c, m1, m2, last
    "euler": (0, 0, True, 4 + 3),  # no slots; writes x̂0 = c; x_next over x, c
}


@dataclass(frozen=True)
class Cost:
    bytes: int | None  # fewest bytes through device memory; None where no useful floor is known
    flops: int | None  # arithmetic the op must do; None where it is not modelled

    def floor_ms(self, copy_gbps: float | None, matmul_tflops: float | None) -> float | None:
        """Roofline time: the larger of bytes / bandwidth and FLOPs / matmul rate (None if neither is known)."""
        terms = self._terms(copy_gbps, matmul_tflops)
        return max(terms.values()) if terms else None

    def bound(self, copy_gbps: float | None, matmul_tflops: float | None) -> str | None:
        """'memory' or 'compute': which roofline term is larger."""
        terms = self._terms(copy_gbps, matmul_tflops)
        return max(terms, key=terms.get) if terms else None

    def _terms(self, copy_gbps, matmul_tflops) -> dict[str, float]:
        terms = {}
        if self.bytes is not None and copy_gbps:
            terms["memory"] = self.bytes / (copy_gbps * 1e9) * 1e3
        if self.flops is not None and matmul_tflops:
            terms["compute"] = self.flops / (matmul_tflops * 1e12) * 1e3
        return terms


def elementwise(numel: int, itemsize: int, reads: int, writes: int, flops_per_element: int) -> Cost:
    """``reads`` input and ``writes`` output tensors of ``numel`` elements, each touched once."""
    return Cost(bytes=(reads + writes) * numel * itemsize, flops=flops_per_element * numel)


def q_sample(numel: int, batch: int, itemsize: int, target: str | None = None) -> Cost:
    """Forward noising: read x0 and ε, write x_t (and v when ``target='v_prediction'``), plus one int64
    timestep and one float32 ᾱ per sample. The ε and x0 targets are the inputs themselves: no extra bytes."""
    v = target == "v_prediction"
    base = elementwise(numel, itemsize, reads=2, writes=1 + v, flops_per_element=Q_SAMPLE_FLOPS + v * Q_SAMPLE_V_FLOPS)
    return Cost(bytes=base.bytes + batch * (8 + 4), flops=base.flops)


def ddim_step(numel: int, itemsize: int, guided: bool = False, noise: bool = False) -> Cost:
    """DDIM step (ε-prediction, clipped): read the model output and x_t (+ the unconditional output when
    ``guided``, + z when η > 0 adds noise), write x_{t−1} and x̂0. Guidance adds 3 FLOPs, noise 2."""
    return elementwise(numel, itemsize, reads=2 + guided + noise, writes=2,
                       flops_per_element=DDIM_FLOPS + 3 * guided + 2 * noise)


def ddpm_step(numel: int, itemsize: int, noise: bool = True) -> Cost:
    """DDPM step (ε-prediction, clipped, fixed variance): read the model output, x_t and z (none on the
    last step), write x_{t−1} and x̂0."""
    return elementwise(numel, itemsize, reads=2 + noise, writes=2, flops_per_element=DDPM_FLOPS - 2 * (not noise))


def multistep_step(numel: int, itemsize: int, solver: str, guided: bool = False) -> Cost:
    """One linear multistep step (``MULTISTEP_STEPS[solver]``): read the model output, x (+ the
    unconditional output when ``guided``) and the slots the step reads, write x_{t−1}, the slots it
    sets (c pushed into the history ring; UniPC's corrected sample) and x̂0 where the scheduler returns
    it, each a tensor of ``numel`` elements; plus the step's packed row (ROW_SIZE float32, read once)."""
    from fastdiff.reference import ROW_SIZE

    slots_read, slots_written, writes_x0, flops = MULTISTEP_STEPS[solver]
    base = elementwise(numel, itemsize, reads=2 + guided + slots_read, writes=1 + slots_written + writes_x0,
                       flops_per_element=flops + GUIDANCE_FLOPS * guided)
    return Cost(bytes=base.bytes + 4 * ROW_SIZE, flops=base.flops)


def attention(batch: int, heads: int, n_q: int, n_k: int, head_dim: int, itemsize: int) -> Cost:
    """softmax(q·kᵀ)·v: two matmuls of 2·Nq·Nk·D FLOPs per (batch, head), so 4·B·H·Nq·Nk·D (the softmax's
    exp and sums, ~B·H·Nq·Nk·5, are left out, as every attention benchmark does). Bytes: q, k, v read
    and the output written once: 2·B·H·(Nq + Nk)·D elements."""
    return Cost(bytes=2 * batch * heads * (n_q + n_k) * head_dim * itemsize,
                flops=4 * batch * heads * n_q * n_k * head_dim)


def group_norm(numel: int, channels: int, itemsize: int, silu: bool = True) -> Cost:
    """GroupNorm (+ SiLU): read x once and write y once, plus the weight and bias. A two-pass kernel reads
    x twice; when the group fits on chip the second read comes from cache, so the floor is one read."""
    return Cost(bytes=2 * numel * itemsize + 2 * channels * itemsize,
                flops=(GROUP_NORM_FLOPS + SILU_FLOPS * silu) * numel)


def sampling(flops_per_image: int, batch: int, steps: int) -> Cost:
    """A sampling call: ``steps`` U-Net forwards over ``batch`` images (the scheduler step's FLOPs are
    under 1e-6 of them). No byte floor: the U-Net is compute bound at every batch that fills a GPU."""
    return Cost(bytes=None, flops=flops_per_image * batch * steps)


@functools.cache
def unet_flops_per_image(preset: str, size: int | None = None) -> int:
    """FLOPs of one forward of a fastdiff U-Net preset on one image, counted on the meta device
    (no memory, no time) by torch's FLOP counter: 2 per multiply-add of every conv and matmul."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import fastdiff

    with torch.device("meta"):
        unet = fastdiff.UNet2D.from_preset(preset).eval()
    cfg = unet.config
    size = size or cfg.sample_size
    x = torch.empty(1, cfg.in_channels, size, size, device="meta")
    # The reference path: the fast path does the same math, and the meta device has no kernels.
    with torch.no_grad(), fastdiff.use_backend("torch"), FlopCounterMode(display=False) as counter:
        # no labels: a conditional model then embeds its null class, the same FLOPs as any label
        unet(x, torch.zeros(1, dtype=torch.long, device="meta"))
    return int(counter.get_total_flops())
