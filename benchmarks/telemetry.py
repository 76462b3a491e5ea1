"""NVML telemetry recorded with every benchmark case: what state the GPU was in when it was timed.

A number means little without the clock it ran at: a card that is hot, power-capped or sharing
its memory runs slower than its datasheet. ``read()`` samples, right after a case's timed loop:

    driver           NVIDIA driver version
    sm_clock_mhz     current SM clock
    power_w          board power draw
    temperature_c    GPU core temperature
    memory_used_mb   device memory in use (all processes)

It never raises. Without nvidia-ml-py, without a driver (a CPU machine) or when a query fails, the
field is None and ``nvml_error`` says why; otherwise ``nvml_error`` is None.
"""

from __future__ import annotations

FIELDS = ("driver", "sm_clock_mhz", "power_w", "temperature_c", "memory_used_mb")

_state: dict = {"initialised": False, "error": None}


def _nvml():
    """The pynvml module, initialised once; raises with a readable message when NVML cannot be used."""
    import pynvml  # nvidia-ml-py; ImportError handled by the caller

    if not _state["initialised"]:
        pynvml.nvmlInit()
        _state["initialised"] = True
    return pynvml


def _handle(pynvml, cuda_index: int):
    """NVML's handle of CUDA device ``cuda_index``. CUDA and NVML number devices differently when
    CUDA_VISIBLE_DEVICES is set, so match by UUID when torch exposes it."""
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception:  # no uuid attribute, or NVML spells it differently: fall back to the index
        return pynvml.nvmlDeviceGetHandleByIndex(cuda_index)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read(cuda_index: int = 0) -> dict:
    """One sample of FIELDS for CUDA device ``cuda_index`` plus ``nvml_error`` (None when all went well)."""
    out: dict = {name: None for name in FIELDS}
    try:
        pynvml = _nvml()
        handle = _handle(pynvml, cuda_index)
    except ImportError:
        return {**out, "nvml_error": "nvidia-ml-py is not installed (pip install nvidia-ml-py)"}
    except Exception as err:  # pynvml.NVMLError: no driver / library, no such device
        return {**out, "nvml_error": f"NVML unavailable: {_text(err) or type(err).__name__}"}

    queries = {
        "driver": lambda: _text(pynvml.nvmlSystemGetDriverVersion()),
        "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
        "power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,  # milliwatts
        "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        "memory_used_mb": lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20,
    }
    failed = []
    for name, query in queries.items():
        try:
            out[name] = query()
        except Exception as err:  # one unsupported query (e.g. power on some boards) loses only its field
            failed.append(f"{name}: {_text(err) or type(err).__name__}")
    return {**out, "nvml_error": "; ".join(failed) or None}
