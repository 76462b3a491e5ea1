"""torch.distributed plumbing shared by sharded sampling and DDP training.

fastdiff has no launcher of its own: ``torchrun`` starts the processes and sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous address; :func:`init_from_env` joins the process group that these
describe (NCCL on CUDA, gloo on CPU) and is a no-op for a plain single process. Every helper here
works with or without a process group, so the same code path serves one process and N.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import os

import torch
import torch.distributed as dist

from . import validation


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it; 1 outside torchrun."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {value!r}") from None
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
    return world


def init_from_env(device: torch.device | str | None = None, timeout_minutes: float = 30.0) -> bool:
    """Join the process group torchrun describes, once; True when this process is one of several.

    Under torchrun with WORLD_SIZE > 1: NCCL when this process works on a CUDA ``device`` (it is made
    the current device), gloo for a CPU one (None: CUDA if available). Without torchrun (or with
    WORLD_SIZE=1) nothing is initialised. A group created here is destroyed at exit (NCCL warns
    about a group left alive).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if env_world_size() == 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    device = default_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    atexit.register(_destroy)
    return True


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the process that logs, shows progress and writes shared files."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (the argument is ignored elsewhere)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(value: float, device: torch.device) -> float:
    """The sum of a scalar over all ranks (``value`` itself on one process). ``device``: where the
    collective runs, this process's GPU for NCCL, the CPU for gloo."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item()


def all_reduce_mean(value: float, device: torch.device) -> float:
    """The mean of a scalar over all ranks."""
    return all_reduce_sum(value, device) / world_size()


def all_equal(tensors: list[torch.Tensor], device: torch.device) -> bool:
    """Whether every rank holds bit-identical ``tensors`` (e.g. DDP parameters after training).

    Each rank hashes its bytes; the hashes' min and max over ranks agree only if all are equal.
    """
    if not is_distributed():
        return True
    from .io import tensors_sha256

    digest = tensors_sha256({f"{i:08d}": t.detach().cpu() for i, t in enumerate(tensors)})
    code = int(digest[:14], 16)  # 56 bits: exact in an int64
    low = torch.tensor([code], dtype=torch.int64, device=device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return low.item() == high.item()


def default_device(requested=None, argument: str = "device") -> torch.device:
    """``requested`` (checked: ``validation.device``), or this process's GPU (cuda:LOCAL_RANK under
    torchrun) when there is one, else CPU, for None or "auto".

    A bare "cuda" under torchrun also means this process's own GPU, so N processes never share GPU 0.
    """
    if isinstance(requested, str) and requested.strip().lower() == "auto":
        requested = None
    if requested is not None:
        requested = validation.device(argument, requested)
    if (requested is None or requested == torch.device("cuda")) and torch.cuda.is_available():
        return torch.device("cuda", local_rank() if env_world_size() > 1 else torch.cuda.current_device())
    return torch.device("cpu") if requested is None else requested


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (base seed, image index, rank, step, ...): distinct tuples give
    unrelated streams, unlike ``seed + i`` where seed 0's image 1 is seed 1's image 0."""
    text = ",".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1
