"""Reading and writing weights and configs: safetensors and JSON only, written atomically.

Weights never go through pickle: a ``.pt``/``.bin``/``.ckpt`` file, or anything that is not a
valid safetensors file, is refused with a ``ValueError`` naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol 2+ / torch.save zip archive


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_tensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` to a safetensors file atomically (own-storage copies: safetensors refuses
    tensors that share memory, e.g. tied weights or views)."""
    tensors = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path, device: str | torch.device = "cpu", *, argument: str = "weights") -> dict[str, torch.Tensor]:
    """Load a safetensors file; refuse anything else with a ValueError naming ``argument``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{argument}: no weights file at {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_PICKLE_MAGIC):
        raise ValueError(f"{argument}: {path} looks like a pickle/torch.save file; fastdiff loads safetensors "
                         "only (pickle can run arbitrary code). Convert it with safetensors.torch.save_file.")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{argument}: {path} is not a valid safetensors file ({err})") from err


def read_metadata(path) -> dict[str, str]:
    """The string metadata of a safetensors file (after ``load_tensors`` has validated it)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def write_json(obj: Any, path) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path, *, argument: str = "config") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{argument}: no config file at {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{argument}: {path} is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{argument}: {path} must hold a JSON object, got {type(data).__name__}")
    return data
