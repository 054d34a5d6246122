"""Memory: what the host (or an accelerator) has available, and a check that a large allocation
fits before it is made: the kernel's out-of-memory killer ends a process without a word, minutes
into building its data."""

from __future__ import annotations

import os

from .errors import ConfigError


def physical_bytes() -> int:
    """The machine's physical memory."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# Set by a parallel sweep's main process for its jobs (parallel_sweep.SweepStop): how many of them
# run at once. Each job then counts its share of the host's memory, as they all start on a machine
# that none of them has taken memory from yet.
JOBS_AT_ONCE_ENV = "ASYNCFLOWER_JAX_JOBS_AT_ONCE"


def jobs_sharing_memory() -> int:
    """The jobs of a parallel sweep that share this machine's memory (1 for any other run)."""
    try:
        return max(1, int(os.environ.get(JOBS_AT_ONCE_ENV, "1")))
    except ValueError:
        return 1


def available_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """Memory a new allocation can take now without killing anything: the kernel's MemAvailable
    plus free swap, divided among a parallel sweep's jobs (`jobs_sharing_memory`). None where the
    kernel does not say (not Linux)."""
    try:
        with open(meminfo) as f:
            fields = {line.split(":")[0]: line.split()[1:] for line in f}
        if "MemAvailable" not in fields:
            return None
        return sum(int(fields[key][0]) * 1024 for key in ("MemAvailable", "SwapFree") if key in fields) // jobs_sharing_memory()
    except (OSError, ValueError, IndexError):
        return None


def available_on(device) -> int | None:
    """Memory free on `device`: an accelerator's own (its allocator's limit less what it holds), a
    CPU device's the host's (`available_bytes`); None where unknown."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return available_bytes()


def size_text(nbytes: int) -> str:
    """A size for a message: in GB from 1 GB up, else in MB."""
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


HEADROOM = 0.9  # the share of the available memory an allocation may take (the rest: the runtime, the run)


def require_memory(need: int, what: str, advice: str, device=None) -> None:
    """Raise a ConfigError when `what` needs more than HEADROOM of the memory available on
    `device` (`available_on`; the host's by default; no check where that is unknown): it names
    both sizes and the `advice`."""
    available = available_bytes() if device is None else available_on(device)
    if available is not None and need > HEADROOM * available:
        place = "memory and free swap" if device is None or device.platform == "cpu" else f"{device.platform.upper()} memory"
        if jobs_sharing_memory() > 1:
            place += f", this job's share with {jobs_sharing_memory()} jobs of the sweep at once"
        raise ConfigError(f"{what} needs about {size_text(need)} of memory, more than the {size_text(available)} available ({place}): {advice}")
