"""Flash-style attention forward: O = softmax(Q·Kᵀ·scale)·V, never materialising the Nq×Nk scores.

    q: (B, H, Nq, D), k and v: (B, H, Nk, D) -> out: (B, H, Nq, D) in q's dtype (contiguous);
    scale defaults to 1/√D, as in ``torch.nn.functional.scaled_dot_product_attention``.

One program computes one BLOCK_M-row query block of one (batch, head). It keeps the query block,
an fp32 accumulator and the online-softmax statistics (running max m_i and running sum l_i, in
the log2 domain: log2(e) is folded into the scale, so exp becomes exp2) on chip, and streams K and
V through in BLOCK_N-row blocks (Milakov & Gimelshein 2018; Dao et al., FlashAttention 2022):

    s   = (q·kᵀ)·scale·log2(e)        # (BLOCK_M, BLOCK_N), fp32
    m'  = max(m_i, rowmax(s))
    p   = exp2(s − m')                # masked keys: s = −inf, so p = 0 exactly
    l_i = l_i·exp2(m_i − m') + rowsum(p)
    acc = acc·exp2(m_i − m') + p·v    # p cast to v's dtype first, as flash attention does
    out = acc / l_i

Limits
* dtypes: float32, float16, bfloat16 (q, k, v alike; ``fastdiff.ops`` checks that). float64 raises
  ``Unsupported``. fp16/bf16 run both dots on tensor cores (HMMA on sm_80, HGMMA on sm_90) with fp32
  accumulation; fp32 uses ``input_precision="ieee"`` (exact fp32 FMAs, no TF32), so it agrees with
  the fp32 reference to ~1e-5 but runs on the CUDA cores (~1/15 of the tensor-core rate on H100).
* head dim D: 1..256, any value (40, 80, 160 as in Stable Diffusion; 256 as in the DDPM CIFAR-10
  U-Net); the kernel pads it to BLOCK_D = max(16, next power of two) with masked loads, so a
  non-power-of-two D wastes BLOCK_D/D of the dot FLOPs (D = 40 -> 64: 1.6x). D > 256 raises
  ``Unsupported``.
* sequence lengths: any Nq, Nk >= 1 (self or cross attention); both tails are masked. Nk = 0 gives
  zeros, like the reference. Every K block holds at least one real key, so the running max is
  finite after the first block and no fully-masked block can produce NaN.
* layout: any strides (all four of q, k, v and the output are passed), e.g. q = x.transpose(1, 2)
  views of a (B, N, H, D) projection; nothing is copied. Offsets inside one (batch, head) slice are
  int32 (``Unsupported`` if they could overflow); the batch/head offsets are int64. When D and the
  batch/head/row strides are multiples of 8 elements and the pointers 16-byte aligned (every U-Net
  layout with D = 40, 64, 80, ...), ALIGNED=True tells the compiler so: 16-byte vector loads and
  cp.async pipelining of K/V. Other input (D = 3, a slice starting mid-row) takes ALIGNED=False:
  correct, with scalar loads and no pipelining.
* no causal mask, no dropout, no backward (``fastdiff.ops`` runs the reference under autograd).
* interpreter (TRITON_INTERPRET=1): UPCAST=True runs the dots on fp32 copies of the operands (its
  fp16/bf16 tl.dot is wrong) and rounds fp32 -> bf16 to nearest by hand (its cast truncates, a GPU's
  rounds), so the CPU tests see the GPU's rounding.

Cost per call (B·H slices, T = cdiv(Nq, BLOCK_M) query blocks per slice, s = bytes per element)
* FLOPs: 4·B·H·Nq·Nk·D (two matmuls; the tensor cores do 4·B·H·Nq·Nk·BLOCK_D) + B·H·Nq·Nk exp2.
* bytes: q read once and out written once, 2·B·H·Nq·D·s; k and v read by every query block,
  2·B·H·Nk·D·s·T, from L2 for the most part (a slice's T blocks are numbered consecutively).
* so: from DRAM, self attention (Nq = Nk = N) does ~N/s FLOP per byte, compute bound for any
  N >= 1024 on an H100 (ridge ~300 FLOP/byte in fp16); from L2, 2·BLOCK_M/s FLOP per byte.
  Ceilings on an H100 SXM (not yet measured here): fp16/bf16 tensor cores ~990 TFLOP/s dense, times
  D/BLOCK_D for padded head dims (D = 40: ~620); the exp2 unit (~16/clk/SM: ~3.9e12 exp2/s, one per
  4·D FLOPs) caps D = 40 at ~620 and D = 64 at ~990 TFLOP/s as well, so small-D attention is bound
  by the softmax as much as by the matmuls. fp32 (ieee) is bound by CUDA-core FMAs (~67 TFLOP/s
  peak). Short sequences are bound by parallelism instead: the DDPM CIFAR-10 U-Net's (B = 16,
  H = 1, N = 256, D = 256, BLOCK_M = 64) is 64 programs for 132 SMs, ~1 GFLOP: launch-latency sized.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import POINTER_TYPE, KernelConfig, Unsupported, cdiv, check_device, check_float, interpreting

MAX_HEAD_DIM = 256
LOG2_E = 1.4426950408889634  # log2(e): exp(x) = exp2(x·log2(e))
INT32_MAX = 2**31 - 1


@triton.jit
def _round_to_bf16(x):
    """x (fp32) rounded to the nearest bfloat16 (ties to even), kept in fp32. Interpreter only: its
    fp32 -> bf16 cast truncates, where a GPU's cvt.rn rounds; this makes the two agree."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return ((bits >> 16) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _attention_fwd_kernel(
    Q,  # pointer to q: (B, H, Nq, D), any strides
    K,  # pointer to k: (B, H, Nk, D), any strides
    V,  # pointer to v: (B, H, Nk, D), any strides
    Out,  # pointer to the output: (B, H, Nq, D), q's dtype
    stride_qb,  # q's strides, in elements: batch
    stride_qh,  # ... head
    stride_qm,  # ... query row
    stride_qd,  # ... head-dim column (usually 1)
    stride_kb,  # k's strides, in elements: batch
    stride_kh,  # ... head
    stride_kn,  # ... key row
    stride_kd,  # ... head-dim column (usually 1)
    stride_vb,  # v's strides, in elements: batch
    stride_vh,  # ... head
    stride_vn,  # ... key row
    stride_vd,  # ... head-dim column (usually 1)
    stride_ob,  # the output's strides, in elements: batch
    stride_oh,  # ... head
    stride_om,  # ... query row
    stride_od,  # ... head-dim column (usually 1)
    num_heads,  # H
    seq_q,  # Nq
    seq_k,  # Nk (>= 1)
    head_dim,  # D (<= BLOCK_D)
    qk_scale,  # fp32: scale·log2(e), so that softmax's exp is an exp2
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per loop iteration
    BLOCK_D: tl.constexpr,  # head dim padded to a power of two >= 16
    ALIGNED: tl.constexpr,  # pointers 16-byte aligned; D, batch/head/row strides multiples of 8
    UPCAST: tl.constexpr,  # interpreter only: fp16/bf16 dot operands to fp32 (its low-precision tl.dot is wrong)
):
    # Programs are numbered query block fastest, so the blocks of one (batch, head) run side by
    # side and share its K and V through L2. One flat axis: no 65535 limit on B·H.
    num_m_blocks = tl.cdiv(seq_q, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    pid_bh = pid // num_m_blocks
    batch = (pid_bh // num_heads).to(tl.int64)
    head = (pid_bh % num_heads).to(tl.int64)
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    Out += batch * stride_ob + head * stride_oh
    if ALIGNED:
        # Tell the compiler what the launcher checked and Triton's own specialisation (multiples
        # of 16) misses for D = 40, 80, 160 and their strides: 16-byte vector loads, cp.async.
        Q, K, V, Out = tl.multiple_of(Q, 16), tl.multiple_of(K, 16), tl.multiple_of(V, 16), tl.multiple_of(Out, 16)
        stride_qm, stride_kn = stride_qm // 8 * 8, stride_kn // 8 * 8
        stride_vn, stride_om = stride_vn // 8 * 8, stride_om // 8 * 8
        head_dim = head_dim // 8 * 8

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) key rows of the current block
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,) head-dim columns, the tail past D masked
    mask_m = offs_m < seq_q
    mask_d = offs_d < head_dim

    # the query block stays on chip for the whole loop: (BLOCK_M, BLOCK_D)
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running row max of s (log2 domain)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)  # running Σ p·v

    for start_n in range(0, seq_k, BLOCK_N):
        keys = start_n + offs_n
        mask_n = keys < seq_k
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + keys[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + keys[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)

        # scores in the log2 domain; a key past Nk gets -inf, hence p = 0 exactly
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N) fp32
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # online softmax: rescale what was summed so far to the new running max
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block holds a real key
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # first block: exp2(-inf) = 0
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        # P·V on tensor cores in v's precision (fp16/bf16), accumulated in fp32
        if UPCAST:
            p = _round_to_bf16(p) if v.dtype == tl.bfloat16 else p.to(v.dtype).to(tl.float32)
            v = v.to(tl.float32)
        else:
            p = p.to(v.dtype)
        acc = tl.dot(p, v, acc, input_precision="ieee")
        m_i = m_new

    out = acc / l_i[:, None]
    if UPCAST and Out.dtype.element_ty == tl.bfloat16:
        out = _round_to_bf16(out)  # then the (truncating) cast below is exact
    tl.store(Out + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------- configuration
# (BLOCK_D, dtype, aligned) -> (BLOCK_M, BLOCK_N, num_warps, num_stages), chosen with the AOT tool
# (python -m fastdiff.kernels.aot --only attention, sm_80 and sm_90, under Triton 3.6 and 3.9): no
# entry spills, shared memory (q block + num_stages x (k, v) blocks) fits both, registers <= 255.
# Unaligned input (odd D or strides: no 16-byte vector loads, no cp.async pipelining) needs more
# registers for addresses, so some of its entries are smaller. Triton 3.6's ptxas spilled where
# 3.9's did not (8 to 40 bytes of stack: fp32 D = 16 on sm_80, fp32 D = 128 and fp16/bf16 D = 256
# on sm_90, all unaligned), hence the unaligned tables' 16, 128 and 256 entries. Not yet timed on a
# GPU: these are the flash-attention shapes (BLOCK_M = 128 for D <= 128, 64 for D = 256) cut down
# until nothing spills.
_TENSOR_CORE_TABLE = {  # fp16 / bf16: both dots on tensor cores, fp32 accumulator in registers
    16: (128, 64, 4, 3),
    32: (128, 64, 4, 3),
    64: (128, 64, 8, 3),
    128: (128, 64, 8, 3),
    256: (64, 32, 8, 3),
}
_TENSOR_CORE_UNALIGNED = {**_TENSOR_CORE_TABLE, 128: (64, 64, 8, 3), 256: (64, 16, 8, 3)}
_FP32_TABLE = {  # fp32 with ieee dots: FMAs on the CUDA cores, dot operands in registers
    16: (64, 32, 4, 2),
    32: (64, 32, 8, 2),
    64: (64, 32, 8, 2),
    128: (64, 16, 8, 2),
    256: (32, 16, 8, 2),
}
_FP32_UNALIGNED = {**_FP32_TABLE, 16: (64, 32, 8, 2), 128: (32, 32, 8, 2)}
BLOCK_DS = tuple(sorted(_FP32_TABLE))


def block_d_for(head_dim: int) -> int:
    """The padded head dim: the next power of two, at least 16 (tl.dot's smallest K)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def _choose(block_d: int, dtype: torch.dtype, aligned: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); the launcher and ``launch_configs()`` both call this."""
    if dtype == torch.float32:
        return (_FP32_TABLE if aligned else _FP32_UNALIGNED)[block_d]
    return (_TENSOR_CORE_TABLE if aligned else _TENSOR_CORE_UNALIGNED)[block_d]


def _is_aligned(head_dim: int, *tensors: torch.Tensor) -> bool:
    """True when the ALIGNED hints hold: D and every batch, head and row stride (of a dim longer
    than 1) are multiples of 8 elements, and every base pointer is 16-byte aligned."""
    return head_dim % 8 == 0 and all(
        x.data_ptr() % 16 == 0 and all(stride % 8 == 0 for size, stride in zip(x.shape[:3], x.stride()[:3]) if size > 1)
        for x in tensors)


def launch_configs() -> list[KernelConfig]:
    """Every configuration ``attention`` can launch: 3 dtypes x 5 padded head dims x aligned or not,
    with the GPU value of UPCAST (False). The head-dim strides are given as 1: Triton specialises
    an int argument equal to 1 into a constant, and every U-Net view has a unit head-dim stride."""
    configs = []
    for dtype, pointer in POINTER_TYPE.items():
        for block_d in BLOCK_DS:
            for aligned in (True, False):
                block_m, block_n, num_warps, num_stages = _choose(block_d, dtype, aligned)
                signature = {"Q": pointer, "K": pointer, "V": pointer, "Out": pointer}
                constexprs = {}
                for t, row in (("q", "m"), ("k", "n"), ("v", "n"), ("o", "m")):
                    signature.update({f"stride_{t}b": "i32", f"stride_{t}h": "i32", f"stride_{t}{row}": "i32",
                                      f"stride_{t}d": "constexpr"})
                    constexprs[f"stride_{t}d"] = 1
                signature.update({"num_heads": "i32", "seq_q": "i32", "seq_k": "i32", "head_dim": "i32",
                                  "qk_scale": "fp32"})
                flags = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "ALIGNED": aligned,
                         "UPCAST": False}
                signature.update({name: "constexpr" for name in flags})
                configs.append(KernelConfig(
                    kernel=_attention_fwd_kernel, signature=signature, constexprs={**constexprs, **flags},
                    num_warps=num_warps, num_stages=num_stages, tensor_cores=dtype != torch.float32,
                    tags={"dtype": str(dtype).removeprefix("torch."), "BLOCK_D": block_d, "ALIGNED": aligned,
                          "BLOCK_M": block_m, "BLOCK_N": block_n}))
    return configs


# ----------------------------------------------------------------------------- launcher
def _check_int32_offsets(name: str, x: torch.Tensor) -> None:
    """Offsets inside one (batch, head) slice are int32 in the kernel."""
    largest = sum((size - 1) * stride for size, stride in zip(x.shape[2:], x.stride()[2:]))
    if largest > INT32_MAX:
        raise Unsupported(f"{name} has a (batch, head) slice spanning {largest + 1} elements; "
                          f"the attention kernel indexes one slice with int32 offsets (< 2**31)")


def _scale_value(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise Unsupported(f"scale must be a number or a one-element tensor, got shape {tuple(scale.shape)}")
        return float(scale.item())
    return float(scale)


def attention(q, k, v, scale=None):
    """softmax(q·kᵀ·scale)·v over (B, H, Nq, D) × (B, H, Nk, D) -> (B, H, Nq, D); the fused twin of
    ``fastdiff.reference.attention`` (same signature and result, to rounding)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float(name, x)
        check_device(name, x)
        _check_int32_offsets(name, x)
    if not (q.device == k.device == v.device):
        raise Unsupported(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise Unsupported(f"head dim D = {head_dim} (q.shape[-1]); the attention kernel takes 1 <= D <= {MAX_HEAD_DIM}")
    qk_scale = _scale_value(scale, head_dim) * LOG2_E

    out = torch.empty((batch, heads, seq_q, head_dim), dtype=q.dtype, device=q.device)  # (B, H, Nq, D)
    if out.numel() == 0:
        return out
    if seq_k == 0:  # softmax over no keys: the reference's empty matmul gives zeros
        return out.zero_()

    block_d = block_d_for(head_dim)
    aligned = _is_aligned(head_dim, q, k, v, out)
    block_m, block_n, num_warps, num_stages = _choose(block_d, q.dtype, aligned)
    grid = (cdiv(seq_q, block_m) * batch * heads,)
    _attention_fwd_kernel[grid](
        q, k, v, out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, seq_q, seq_k, head_dim, qk_scale,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, ALIGNED=aligned, UPCAST=interpreting(),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
