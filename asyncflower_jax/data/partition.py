"""Partitioners: split a training set's indices among N clients.

Each is a frozen dataclass called as `partitioner(labels, num_clients, rng)` and returning one
index array per client.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import ConfigError, require


@dataclasses.dataclass(frozen=True)
class IID:
    """Shuffle, then deal out near-equal shares."""

    def __call__(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
        _check_enough(len(labels), num_clients, 1)
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_clients)]


@dataclasses.dataclass(frozen=True)
class Dirichlet:
    """Label skew: client c's label mix q_c ~ Dirichlet(alpha * class prior), near-equal client sizes.

    Client sizes are equal (up to one sample), so every client has at least floor(n / N)
    samples even at small alpha; labels are drawn from q_c without replacement, falling back to
    the remaining classes when one runs out. Smaller alpha gives more skew.
    """

    alpha: float = 0.5

    def __post_init__(self):
        require(self.alpha > 0, "partition.alpha", self.alpha, "> 0")

    def __call__(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
        _check_enough(len(labels), num_clients, 1)
        classes, inverse = np.unique(labels, return_inverse=True)
        pools = [rng.permutation(np.flatnonzero(inverse == k)) for k in range(len(classes))]
        remaining = np.array([len(p) for p in pools])
        prior = remaining / remaining.sum()
        sizes = np.full(num_clients, len(labels) // num_clients)
        sizes[: len(labels) % num_clients] += 1
        mixes = rng.dirichlet(self.alpha * prior * len(classes), size=num_clients)
        taken = np.zeros(len(classes), dtype=int)
        parts = []
        for client in range(num_clients):
            counts = np.zeros(len(classes), dtype=int)
            need = sizes[client]
            while need > 0:
                probs = mixes[client] * (remaining > 0)
                probs = probs / probs.sum() if probs.sum() > 0 else (remaining > 0) / (remaining > 0).sum()
                draw = np.minimum(rng.multinomial(need, probs), remaining)
                counts += draw
                remaining -= draw
                need -= draw.sum()
            parts.append(np.sort(np.concatenate([pools[k][taken[k] : taken[k] + counts[k]] for k in range(len(classes))])))
            taken += counts
        return parts


def _check_enough(num_samples: int, num_clients: int, min_size: int) -> None:
    if num_samples < num_clients * min_size:
        raise ConfigError(
            f"num_clients={num_clients} is invalid: the training set has {num_samples} samples, "
            f"fewer than {min_size} per client; use at most {num_samples // min_size} clients"
        )
