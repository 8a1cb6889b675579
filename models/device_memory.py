"""How much memory a device has free, and whether an exception means it ran out.

Why: the tiled VAE picks exact (all tiles alive at once) or streamed GroupNorm statistics by comparing
what the exact run would hold with what the device can give, and every stage that retries on
out-of-memory must recognise the error the same way on CUDA, MPS and the CPU. A host that manages
device memory itself (ComfyUI: `--reserve-vram`, evicting other models) injects its own
MemoryProvider; the pipeline never calls the CUDA allocator directly then.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, MemoryError, or an error whose message says memory ran out (MPS, the
    CPU allocator's "can't allocate memory")."""
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), MemoryError) if t)
    message = str(error).lower()
    return isinstance(error, oom_types) or "out of memory" in message or "can't allocate memory" in message


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable from /proc/meminfo (Linux) in bytes."""
    with contextlib.suppress(OSError, ValueError):
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def available_memory(device: torch.device | str) -> int | None:
    """Bytes that new tensors on `device` can still take, or None when the backend cannot tell.

    CUDA counts memory held by PyTorch's caching allocator but unused as free; the CPU reads the
    kernel's MemAvailable (psutil elsewhere, when installed).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "mps":
        with contextlib.suppress(AttributeError, RuntimeError):
            return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
        return None
    if device.type == "cpu":
        available = _meminfo_available()
        if available is None:
            with contextlib.suppress(ImportError):
                import psutil

                available = int(psutil.virtual_memory().available)
        return available
    return None


def free_cached_memory(device: torch.device | str) -> None:
    """Give cached blocks back after an out-of-memory error, before a retry."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


class MemoryProvider:
    """Free memory, room-making and cache release for one run; the default asks PyTorch.

    Hosts subclass it (nodes/comfy_adapter.ComfyMemory) and hand it to the pipeline, which passes it
    down to the tiled VAE: the numerical code stays host-agnostic."""

    def available(self, device: torch.device | str) -> int | None:
        """Bytes new tensors on `device` can take now, or None when unknown."""
        return available_memory(device)

    def make_room(self, device: torch.device | str, needed: int) -> None:
        """Ask the host to free `needed` bytes on `device` (e.g. by unloading other models); a hint."""

    def free_cached(self, device: torch.device | str) -> None:
        """Release cached blocks after an out-of-memory error, before a retry."""
        free_cached_memory(device)


TORCH_MEMORY = MemoryProvider()
