"""Client groups given by fractions of the population (fast/slow clients, device tiers, ...).

Group sizes are f * N rounded by largest remainder, so they always sum to N. Latency models and
strategies that take a group table share this rounding, so `fractions: [0.8, 0.2]` names the same
group sizes everywhere; `contiguous_groups` puts the clients of group 0 first, then group 1, ...
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import require


def check_fractions(fractions: Sequence[float], key: str) -> tuple[float, ...]:
    """`fractions` as a tuple of floats, or a ConfigError naming `key` unless they are >= 0 and sum to 1."""
    fractions = tuple(float(f) for f in fractions)
    require(
        len(fractions) >= 1 and all(f >= 0 for f in fractions) and abs(sum(fractions) - 1) < 1e-6,
        key,
        list(fractions),
        "a non-empty list of fractions >= 0 that sum to 1",
    )
    return fractions


def group_counts(fractions: Sequence[float], num_clients: int) -> np.ndarray:
    """Clients per group: floor(f * N), and the clients left over go to the largest remainders."""
    quotas = np.asarray(fractions, np.float64) * num_clients
    counts = np.floor(quotas + 1e-9).astype(int)  # 0.29 * 100 is 28.999...: not 28
    leftover = np.argsort(-(quotas - counts), kind="stable")[: num_clients - counts.sum()]
    counts[leftover] += 1
    return counts


def contiguous_groups(fractions: Sequence[float], num_clients: int) -> np.ndarray:
    """Group index of every client, clients 0.. in group 0 first (int32 [N])."""
    return np.repeat(np.arange(len(fractions)), group_counts(fractions, num_clients)).astype(np.int32)
