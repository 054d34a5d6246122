"""Memory: what the host (or an accelerator) has available, and the error a too-large allocation gets."""

import pytest

from asyncflower_jax import memory
from asyncflower_jax.errors import ConfigError


class FakeDevice:
    def __init__(self, platform, stats):
        self.platform, self.stats = platform, stats

    def memory_stats(self):
        return self.stats


def test_available_is_memavailable_plus_free_swap(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\nSwapTotal:       4000000 kB\nSwapFree:        3000000 kB\n")
    assert memory.available_bytes(str(meminfo)) == (20_000_000 + 3_000_000) * 1024
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")  # no swap lines
    assert memory.available_bytes(str(meminfo)) == 20_000_000 * 1024
    meminfo.write_text("MemTotal:       24000000 kB\n")  # a kernel that does not say
    assert memory.available_bytes(str(meminfo)) is None
    assert memory.available_bytes(str(tmp_path / "missing")) is None
    assert memory.available_bytes() is None or memory.available_bytes() > 0  # (this machine's)


def test_require_memory_keeps_a_tenth_free_and_names_both_sizes(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 10 * 10**9)
    memory.require_memory(9 * 10**9, "x", "y")  # 90 %: allowed
    with pytest.raises(ConfigError, match=r"the data needs about 9\.5 GB of memory, more than the 10\.0 GB available \(memory and free swap\): use less"):
        memory.require_memory(int(9.5e9), "the data", "use less")
    gpu = FakeDevice("gpu", {"bytes_limit": 10**9, "bytes_in_use": 0})
    with pytest.raises(ConfigError, match=r"needs about 950\.0 MB of memory, more than the 1\.0 GB available \(GPU memory\)"):
        memory.require_memory(int(9.5e8), "the data", "use less", device=gpu)


def test_no_check_where_the_available_memory_is_unknown(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: None)
    memory.require_memory(10**18, "x", "y")  # (nothing raised)


def test_an_accelerators_own_memory_counts_and_a_cpus_is_the_hosts(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 123)
    assert memory.available_on(FakeDevice("gpu", {"bytes_limit": 80_000, "bytes_in_use": 30_000})) == 50_000
    assert memory.available_on(FakeDevice("gpu", None)) == 123  # (an allocator that does not say)
    assert memory.available_on(FakeDevice("cpu", {"bytes_limit": 1})) == 123


def test_a_parallel_sweeps_job_counts_its_share_of_the_memory(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\nSwapFree:        1000000 kB\n")
    monkeypatch.setenv(memory.JOBS_AT_ONCE_ENV, "3")
    assert memory.jobs_sharing_memory() == 3
    assert memory.available_bytes(str(meminfo)) == 21_000_000 * 1024 // 3
    monkeypatch.setattr(memory, "available_bytes", lambda: 10 * 10**9 // 3)
    with pytest.raises(ConfigError, match=r"more than the 3\.3 GB available \(memory and free swap, this job's share with 3 jobs of the sweep at once\)"):
        memory.require_memory(4 * 10**9, "the data", "use less")
    monkeypatch.setenv(memory.JOBS_AT_ONCE_ENV, "x")  # (unreadable: counted as a run alone)
    assert memory.jobs_sharing_memory() == 1
