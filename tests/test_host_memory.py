"""The host-memory check: what /proc/meminfo says is available, and the error a too-large allocation gets."""

import pytest

from asyncflower_jax import host_memory
from asyncflower_jax.errors import ConfigError


def test_available_is_memavailable_plus_free_swap(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\nSwapTotal:       4000000 kB\nSwapFree:        3000000 kB\n")
    assert host_memory.available_bytes(str(meminfo)) == (20_000_000 + 3_000_000) * 1024
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")  # no swap lines
    assert host_memory.available_bytes(str(meminfo)) == 20_000_000 * 1024
    meminfo.write_text("MemTotal:       24000000 kB\n")  # a kernel that does not say
    assert host_memory.available_bytes(str(meminfo)) is None
    assert host_memory.available_bytes(str(tmp_path / "missing")) is None
    assert host_memory.available_bytes() is None or host_memory.available_bytes() > 0  # (this machine's)


def test_require_memory_keeps_a_tenth_free_and_names_both_sizes():
    host_memory.require_memory(9 * 10**9, "x", "y", available=10 * 10**9)  # 90 %: allowed
    with pytest.raises(ConfigError, match=r"the data needs about 9\.5 GB of memory, more than the 10\.0 GB available .*: use less"):
        host_memory.require_memory(int(9.5e9), "the data", "use less", available=10 * 10**9)
    with pytest.raises(ConfigError, match=r"needs about 950\.0 MB of memory, more than the 1\.0 GB available"):
        host_memory.require_memory(int(9.5e8), "the data", "use less", available=10**9)


def test_no_check_where_the_available_memory_is_unknown(monkeypatch):
    monkeypatch.setattr(host_memory, "available_bytes", lambda: None)
    host_memory.require_memory(10**18, "x", "y")  # (nothing raised)
