"""Partitioners: split a training set's samples among N clients.

Each is a frozen dataclass called as `partitioner(labels, num_clients, rng, client_ids=None)` and
returning a `Partition`: one flat index array (client 0's samples, then client 1's, ...) and the
sample count of every client. Nothing is kept per client but two integers, so a partition of
100,000 clients costs the same Python objects as one of 10. `client_ids` (a dataset's natural
owner of every sample) is read by `Natural` only.

Partitioners that draw sizes at random (`Dirichlet(balanced=False)`, `PowerLaw`) or can leave a
client empty (`Shards`, `Natural`) check `min_size`: a draw that leaves a client with fewer
samples is retried up to `max_retries` times, then a ConfigError says which client fell short.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
from collections.abc import Sequence

import numpy as np

from ..config_schema import _plain
from ..errors import ConfigError, require
from ..groups import check_fractions, contiguous_groups


class Partition:
    """`order[offsets[c] : offsets[c] + counts[c]]` are client c's sample indices (sorted).

    It is also a read-only sequence of per-client index arrays (`len`, `[c]`, iteration), made
    on demand for tests and small populations; the store uses `order` and `counts` directly.
    """

    def __init__(self, order: np.ndarray, counts: np.ndarray):
        self.order = np.asarray(order, dtype=np.int64)
        self.counts = np.asarray(counts, dtype=np.int64)
        if self.counts.sum() != len(self.order):
            raise ValueError(f"counts sum to {self.counts.sum()}, order has {len(self.order)} indices")
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)

    @classmethod
    def from_owner(cls, owner: np.ndarray, num_clients: int) -> "Partition":
        """From the client of every sample (-1: the sample is left out); indices sorted within clients."""
        owner = np.asarray(owner)
        kept = np.flatnonzero(owner >= 0)
        held = owner[kept]
        order = kept if _non_decreasing(held) else kept[np.argsort(held, kind="stable")]  # (sorted already: the natural ids of a generated set)
        return cls(order, np.bincount(held, minlength=num_clients)[:num_clients])

    @classmethod
    def from_parts(cls, parts: Sequence[np.ndarray]) -> "Partition":
        parts = [np.asarray(p, dtype=np.int64) for p in parts]
        return cls(np.concatenate(parts) if parts else np.zeros(0, np.int64), np.array([len(p) for p in parts], np.int64))

    def owner(self, num_samples: int) -> np.ndarray:
        """Client of every sample index (-1 for samples no client holds)."""
        out = np.full(num_samples, -1, np.int64)
        out[self.order] = np.repeat(np.arange(len(self.counts)), self.counts)
        return out

    def label_counts(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """[N, num_classes] samples of each label held by each client (one vectorized bincount)."""
        clients = np.repeat(np.arange(len(self.counts)), self.counts)
        flat = clients * num_classes + np.asarray(labels)[self.order]
        return np.bincount(flat, minlength=len(self.counts) * num_classes).reshape(len(self.counts), num_classes)

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, c: int) -> np.ndarray:
        if not -len(self) <= c < len(self):
            raise IndexError(c)
        c %= len(self)
        return self.order[self.offsets[c] : self.offsets[c] + self.counts[c]]

    def __iter__(self):
        return (self[c] for c in range(len(self)))


@dataclasses.dataclass(frozen=True)
class IID:
    """Shuffle, then deal out near-equal shares."""

    def __call__(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator, client_ids=None) -> Partition:
        _check_enough(len(labels), num_clients, 1)
        perm = rng.permutation(len(labels))
        owner = np.empty(len(labels), np.int64)
        owner[perm] = _near_equal_owner(len(labels), num_clients)
        return Partition.from_owner(owner, num_clients)


@dataclasses.dataclass(frozen=True)
class Dirichlet:
    """Label skew: client c's label mix q_c ~ Dirichlet(alpha * C * class prior); smaller alpha, more skew.

    `balanced=True` (default): near-equal client sizes, so every client has floor(n / N) samples
    even at small alpha; each client's labels are drawn from q_c without replacement, falling back
    to the remaining classes when one runs out.
    `balanced=False`: the label-wise split of NIID-Bench: each class is divided among the clients
    in proportions p ~ Dirichlet(alpha * 1_N), so sizes vary too; a draw that leaves some client
    with fewer than `min_size` samples is redrawn, at most `max_retries` times.
    """

    alpha: float = 0.5
    balanced: bool = True
    min_size: int = 1
    max_retries: int = 10

    def __post_init__(self):
        require(self.alpha > 0, "partition.alpha", self.alpha, "> 0")
        require(isinstance(self.balanced, bool), "partition.balanced", self.balanced, "true or false")
        _check_min_size(self.min_size, self.max_retries)

    def __call__(self, labels: np.ndarray, num_clients: int, rng: np.random.Generator, client_ids=None) -> Partition:
        _check_enough(len(labels), num_clients, self.min_size)
        classes, inverse = np.unique(labels, return_inverse=True)
        if not self.balanced:
            return _retry(self, num_clients, lambda: _labelwise_dirichlet(inverse, len(classes), num_clients, self.alpha, rng))
        prior = np.bincount(inverse, minlength=len(classes)) / len(labels)
        return _balanced_allocation(inverse, len(classes), rng, lambda pools: rng.dirichlet(self.alpha * prior * len(classes), size=num_clients), _near_equal_sizes(len(labels), num_clients))


@dataclasses.dataclass(frozen=True)
class Shards:
    """Pathological label skew (McMahan et al. 2017): every client holds `classes_per_client` classes.

    The classes, in a random order, are dealt round-robin (client c gets classes c*k .. c*k + k - 1
    modulo C of that order), so each client has k distinct classes (k <= C) and each class goes to
    near-equally many clients; a class's samples are split near-equally among its holders. With
    N * k < C the classes no client draws are left out.
    """

    classes_per_client: int = 2
    min_size: int = 1
    max_retries: int = 10

    def __post_init__(self):
        require(isinstance(self.classes_per_client, int) and self.classes_per_client >= 1, "partition.classes_per_client", self.classes_per_client, "an integer >= 1")
        _check_min_size(self.min_size, self.max_retries)

    def __call__(self, labels, num_clients, rng, client_ids=None) -> Partition:
        _check_enough(len(labels), num_clients, self.min_size)
        classes, inverse = np.unique(labels, return_inverse=True)
        k, num_classes = self.classes_per_client, len(classes)
        require(k <= num_classes, "partition.classes_per_client", k, f"<= the number of classes ({num_classes})")
        if num_clients * k < num_classes:
            logging.getLogger(__name__).warning(
                "partition=shards: %d clients x classes_per_client=%d hold %d of the %d classes; the other classes' samples are left out",
                num_clients, k, num_clients * k, num_classes,
            )

        def draw():
            cycle = rng.permutation(num_classes)
            held = cycle[(np.arange(num_clients)[:, None] * k + np.arange(k)) % num_classes]  # [N, k]
            return _split_classes_among_holders(inverse, num_classes, held, num_clients, rng)

        holders, smallest = -(-num_clients * k // num_classes), int(np.bincount(inverse).min())
        why = None
        if holders * self.min_size > smallest:
            why = (
                f"classes are dealt to up to {holders} clients each, and the smallest class has {smallest} samples, so some "
                f"holders get none of it: use fewer clients or a smaller partition.classes_per_client (a class has about "
                "num_clients x classes_per_client / classes holders)"
            )
        return _retry(self, num_clients, draw, why)


@dataclasses.dataclass(frozen=True)
class TwoTierDirichlet:
    """Dirichlet between client groups, then within each group (the original AsyncFlower's two-tier split).

    Groups are `fractions` of the population, clients 0.. in group 0 first (as latency and strategy
    group tables). Group g's label mix p_g ~ Dirichlet(group_alpha * C * class prior); its clients'
    mixes q_c ~ Dirichlet(client_alpha * C * p_g); client sizes are near-equal and labels are drawn
    as in `Dirichlet(balanced=True)`. Small group_alpha: groups differ; small client_alpha: clients
    of a group differ.
    """

    fractions: Sequence[float] = (0.8, 0.2)
    group_alpha: float = 0.5
    client_alpha: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "fractions", check_fractions(self.fractions, "partition.fractions"))
        require(self.group_alpha > 0, "partition.group_alpha", self.group_alpha, "> 0")
        require(self.client_alpha > 0, "partition.client_alpha", self.client_alpha, "> 0")

    def __call__(self, labels, num_clients, rng, client_ids=None) -> Partition:
        _check_enough(len(labels), num_clients, 1)
        classes, inverse = np.unique(labels, return_inverse=True)
        num_classes = len(classes)
        prior = np.bincount(inverse, minlength=num_classes) / len(labels)
        groups = contiguous_groups(self.fractions, num_clients)

        def mixes(pools):
            group_mix = rng.dirichlet(self.group_alpha * prior * num_classes, size=len(self.fractions))
            return _log_dirichlet_rows(rng, self.client_alpha * num_classes * group_mix[groups])  # (a class the group lacks: 0)

        return _balanced_allocation(inverse, num_classes, rng, mixes, _near_equal_sizes(len(labels), num_clients), log_mixes=True)


def _label(value) -> int:
    """An integer label of a label subset (a whole float counts), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, numbers.Real, str)) or (isinstance(value, str) and not value.strip().lstrip("-").isdigit()):
        raise ValueError(value)
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and value != int(value):
        raise ValueError(value)
    return int(value)


@dataclasses.dataclass(frozen=True)
class GroupLabelSubsets:
    """Each client group sees only its own subset of labels; inside a group, Dirichlet(alpha) skew.

    Groups are `fractions` of the population (clients 0.. in group 0 first). `label_subsets[g]` lists
    group g's labels; null splits the classes into contiguous, near-equal, disjoint blocks, one per
    group. Every label must belong to some group; a label shared by several groups has its samples
    split near-equally among them. Within a group the samples are partitioned by
    `Dirichlet(alpha, balanced=True)` among the group's clients (as the original AsyncFlower did).
    """

    fractions: Sequence[float] = (0.5, 0.5)
    label_subsets: Sequence[Sequence[int]] | None = None
    alpha: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "fractions", check_fractions(self.fractions, "partition.fractions"))
        require(self.alpha > 0, "partition.alpha", self.alpha, "> 0")
        if self.label_subsets is not None:
            try:
                subsets = tuple(tuple(_label(v) for v in s) for s in self.label_subsets)
            except (TypeError, ValueError):
                subsets = None
            require(subsets is not None, "partition.label_subsets", _plain(self.label_subsets), f"a list of {len(self.fractions)} lists of integer labels, one per group of partition.fractions (e.g. [[0, 1], [2, 3]])")
            require(len(subsets) == len(self.fractions) and all(subsets), "partition.label_subsets", [list(s) for s in subsets], f"{len(self.fractions)} non-empty label lists, one per group of partition.fractions")
            object.__setattr__(self, "label_subsets", subsets)

    def __call__(self, labels, num_clients, rng, client_ids=None) -> Partition:
        labels = np.asarray(labels)
        classes, inverse = np.unique(labels, return_inverse=True)
        num_groups = len(self.fractions)
        groups = contiguous_groups(self.fractions, num_clients)
        group_sizes = np.bincount(groups, minlength=num_groups)
        require(group_sizes.min() >= 1, "partition.fractions", list(self.fractions), f"fractions that give every group at least one of the {num_clients} clients")
        if self.label_subsets is None:
            require(len(classes) >= num_groups, "partition.fractions", list(self.fractions), f"at most as many groups as classes ({len(classes)}) when partition.label_subsets is null")
            held = [np.flatnonzero(block) for block in np.eye(num_groups, dtype=bool)[np.repeat(np.arange(num_groups), _near_equal_sizes(len(classes), num_groups))].T]
        else:
            index = {int(c): i for i, c in enumerate(classes)}
            unknown = sorted({v for s in self.label_subsets for v in s} - set(index))
            require(not unknown, "partition.label_subsets", [list(s) for s in self.label_subsets], f"labels of the dataset ({classes.min()}..{classes.max()}); {unknown} are not")
            held = [np.array(sorted({index[v] for v in s})) for s in self.label_subsets]
        covered = np.zeros(len(classes), bool)
        for h in held:
            covered[h] = True
        require(covered.all(), "partition.label_subsets", None if self.label_subsets is None else [list(s) for s in self.label_subsets], f"subsets that cover every label; {classes[~covered].tolist()} belong to no group")
        # 1. samples to groups: each class's samples split near-equally among the groups holding it
        group_of = np.empty(len(labels), np.int64)
        for k in range(len(classes)):
            holders = [g for g in range(num_groups) if k in set(held[g].tolist())]
            idx = rng.permutation(np.flatnonzero(inverse == k))
            group_of[idx] = np.asarray(holders)[_near_equal_owner(len(idx), len(holders))]
        # 2. within each group, balanced Dirichlet among its clients
        owner = np.empty(len(labels), np.int64)
        first = np.concatenate([[0], np.cumsum(group_sizes)[:-1]])
        inner = Dirichlet(alpha=self.alpha)
        for g in range(num_groups):
            idx = np.flatnonzero(group_of == g)
            if len(idx) < group_sizes[g]:
                raise ConfigError(
                    f"partition.fractions={list(self.fractions)} is invalid: group {g} has {group_sizes[g]} clients but only "
                    f"{len(idx)} samples of its labels; use fewer clients or give it more labels"
                )
            part = inner(labels[idx], int(group_sizes[g]), rng)
            owner[idx[part.order]] = first[g] + np.repeat(np.arange(group_sizes[g]), part.counts)
        return Partition.from_owner(owner, num_clients)


@dataclasses.dataclass(frozen=True)
class Natural:
    """The dataset's own split: one client per natural id (FEMNIST writer, Shakespeare speaker, ...).

    With more ids than `num_clients`, `select` picks which become clients: `random` (a seeded
    sample), `largest` (most samples first) or `first` (smallest ids); the other ids' samples are
    left out. Ids with fewer than `min_size` samples are never selected.
    """

    select: str = "random"
    min_size: int = 1

    def __post_init__(self):
        require(self.select in ("random", "largest", "first"), "partition.select", self.select, "one of ('random', 'largest', 'first')")
        require(isinstance(self.min_size, int) and self.min_size >= 1, "partition.min_size", self.min_size, "an integer >= 1")

    def __call__(self, labels, num_clients, rng, client_ids=None) -> Partition:
        if client_ids is None:
            raise ConfigError(
                "partition='natural' is invalid for this dataset: it has no natural client ids; use a dataset that has "
                "them (synthetic, femnist, shakespeare, a local file with a client-id column) or another partition (iid, dirichlet, ...)"
            )
        ids, code = unique_with_codes(np.asarray(client_ids))
        sizes = np.bincount(code, minlength=len(ids))
        eligible = np.flatnonzero(sizes >= self.min_size)
        if len(eligible) < num_clients:
            raise ConfigError(
                f"num_clients={num_clients} is invalid: the dataset has {len(eligible)} natural clients with at least "
                f"partition.min_size={self.min_size} samples (of {len(ids)}); use at most {len(eligible)} clients"
                + (f", or a partition.min_size of at most {int(np.sort(sizes)[-num_clients])} for {num_clients}" if num_clients <= len(ids) else "")
            )
        if len(eligible) == num_clients:
            chosen = eligible
        elif self.select == "random":
            chosen = np.sort(rng.choice(eligible, num_clients, replace=False))
        elif self.select == "largest":
            chosen = np.sort(eligible[np.argsort(-sizes[eligible], kind="stable")[:num_clients]])
        else:
            chosen = eligible[:num_clients]
        client_of_id = np.full(len(ids), -1, np.int64)
        client_of_id[chosen] = np.arange(num_clients)
        return Partition.from_owner(client_of_id[code], num_clients)


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """Power-law client sizes: size_c = min_size + a share of the rest proportional to w_c ~ Pareto(exponent).

    A smaller exponent gives a heavier tail (for exponent a > 1 the largest 10 % of clients hold
    about 0.1^(1 - 1/a) of the weight). Labels are IID within clients, or Dirichlet(alpha)-skewed
    (`alpha` not null: q_c ~ Dirichlet(alpha * C * prior), drawn without replacement).
    """

    exponent: float = 1.5
    min_size: int = 1
    alpha: float | None = None

    def __post_init__(self):
        require(self.exponent > 0, "partition.exponent", self.exponent, "> 0")
        require(isinstance(self.min_size, int) and self.min_size >= 1, "partition.min_size", self.min_size, "an integer >= 1")
        require(self.alpha is None or self.alpha > 0, "partition.alpha", self.alpha, "> 0 or null (IID labels)")

    def __call__(self, labels, num_clients, rng, client_ids=None) -> Partition:
        _check_enough(len(labels), num_clients, self.min_size)
        log_weights = rng.standard_exponential(num_clients) / self.exponent  # log of Pareto(exponent) on [1, inf) (rng.pareto's draw)
        with np.errstate(over="ignore", invalid="ignore"):
            weights = 1.0 + np.expm1(log_weights)
            shares = weights / weights.sum()
        if not np.isfinite(shares).all():  # (a small exponent: weights beyond float64, shares taken in log space)
            shares = np.exp(log_weights - log_weights.max())
            shares /= shares.sum()
        sizes = self.min_size + rng.multinomial(len(labels) - num_clients * self.min_size, shares)
        if self.alpha is None:
            owner = np.empty(len(labels), np.int64)
            owner[rng.permutation(len(labels))] = np.repeat(np.arange(num_clients), sizes)
            return Partition.from_owner(owner, num_clients)
        classes, inverse = np.unique(labels, return_inverse=True)
        prior = np.bincount(inverse, minlength=len(classes)) / len(labels)
        return _balanced_allocation(inverse, len(classes), rng, lambda pools: rng.dirichlet(self.alpha * prior * len(classes), size=num_clients), sizes)


def partition_summary(partition: Partition, labels: np.ndarray, num_classes: int) -> tuple[dict, np.ndarray]:
    """(aggregate statistics as a JSON-ready dict, the [N, num_classes] label histogram per client)."""
    hist = partition.label_counts(labels, num_classes)
    sizes = partition.counts
    q = hist / np.maximum(sizes, 1)[:, None]
    log_q = np.zeros_like(q)
    np.log(q, out=log_q, where=q > 0)  # (two [N, C] arrays, not four: at 1e6 clients each costs its page faults)
    q *= log_q  # q log q, 0 where q = 0
    entropy = -q.sum(1)
    stats = {
        "num_clients": int(len(sizes)),
        "num_samples": int(sizes.sum()),
        "size_min": int(sizes.min()),
        "size_mean": float(sizes.mean()),
        "size_median": float(np.median(sizes)),
        "size_max": int(sizes.max()),
        "classes_per_client_mean": float((hist > 0).sum(1).mean()),
        "label_entropy_mean": float(entropy.mean()),
        "label_entropy_max": float(np.log(num_classes)),
    }
    return stats, hist


# ---- helpers ------------------------------------------------------------------------------------
def _non_decreasing(values: np.ndarray) -> bool:
    return bool((values[1:] >= values[:-1]).all())


def unique_with_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(values, return_inverse=True)`, without its sort when `values` is sorted already
    (client ids often are: a generated set's, or a file's written client by client)."""
    if values.ndim != 1 or len(values) == 0 or not _non_decreasing(values):
        return np.unique(values, return_inverse=True)
    first = np.concatenate([[True], values[1:] != values[:-1]])
    return values[first], np.cumsum(first) - 1


def _check_enough(num_samples: int, num_clients: int, min_size: int) -> None:
    """Enough samples for `min_size` per client: blames partition.min_size when one per client
    would fit, num_clients when not even that does."""
    if num_clients <= num_samples < num_clients * min_size:
        raise ConfigError(
            f"partition.min_size={min_size} is invalid: must be at most {num_samples // num_clients} "
            f"(the training set's {num_samples} samples among num_clients={num_clients})"
        )
    if num_samples < num_clients * min_size:
        raise ConfigError(
            f"num_clients={num_clients} is invalid: the training set has {num_samples} samples, "
            f"fewer than {min_size} per client; use at most {num_samples // min_size} clients"
        )


def _check_min_size(min_size, max_retries) -> None:
    require(isinstance(min_size, int) and min_size >= 1, "partition.min_size", min_size, "an integer >= 1")
    require(isinstance(max_retries, int) and max_retries >= 1, "partition.max_retries", max_retries, "an integer >= 1")


def _retry(part, num_clients: int, draw, why: str | None = None) -> Partition:
    """Call `draw()` until every client has >= part.min_size samples, at most part.max_retries times;
    `why`: the reason the draws keep failing, where the partitioner knows it."""
    for _ in range(part.max_retries):
        result = draw()
        if result.counts.min() >= part.min_size:
            return result
    worst = int(np.argmin(result.counts))
    advice = why or ("use fewer clients or a less skewed partition" if part.min_size == 1 else "lower partition.min_size, use fewer clients, or a less skewed partition")
    raise ConfigError(
        f"partition.min_size={part.min_size} is invalid for {part!r} with num_clients={num_clients}: after "
        f"{part.max_retries} draws some client still had fewer samples (client {worst}: {int(result.counts[worst])} in the last draw); "
        + advice
    )


def _near_equal_sizes(n: int, parts: int) -> np.ndarray:
    sizes = np.full(parts, n // parts, np.int64)
    sizes[: n % parts] += 1
    return sizes


def _near_equal_owner(n: int, parts: int) -> np.ndarray:
    """The part of positions 0..n-1 when n is dealt into `parts` contiguous near-equal blocks (larger first)."""
    return np.repeat(np.arange(parts), _near_equal_sizes(n, parts))


def _log_dirichlet_rows(rng: np.random.Generator, concentration: np.ndarray) -> np.ndarray:
    """The log of one Dirichlet draw per row of `concentration` (rows may differ; an entry of 0 is a
    class the row never holds), up to a constant per row: log G(a) = log G(a + 1) + log(U) / a
    (Marsaglia and Tsang). In log space small concentrations keep their order: plain gammas
    underflow to 0 below about 1e-3, and such a row was taken as the uniform mix (a smaller alpha
    gave less skew, not more)."""
    with np.errstate(divide="ignore", over="ignore"):
        return np.log(rng.standard_gamma(concentration + 1)) + np.log(rng.random(concentration.shape)) / concentration


def _balanced_allocation(inverse: np.ndarray, num_classes: int, rng, draw_mixes, sizes: np.ndarray, log_mixes: bool = False) -> Partition:
    """Client c takes sizes[c] samples with labels drawn from its mix without replacement (with
    `log_mixes`, `draw_mixes` gives the logs of the mixes: a client whose classes are taken then
    moves on to its next likeliest, however small its share, and one that holds no class left takes
    the class with the most samples left).

    Class pools are shuffled once; a client's draw is multinomial on its mix restricted to the
    classes that still have samples, repeated until it has its size. Clients draw in a random
    order: the last to draw get what is left of the classes, so in client order the last clients'
    mixes were skewed whatever alpha (at alpha = 1e6, 5.6 classes on average for the last 10 of
    100 digits clients against 7.8 for the first 50), which a latency or strategy group of the
    last clients then shared.
    """
    pools = [rng.permutation(np.flatnonzero(inverse == k)) for k in range(num_classes)]
    remaining = np.array([len(p) for p in pools])
    mixes = draw_mixes(pools)
    num_clients = len(sizes)
    counts = np.zeros((num_clients, num_classes), np.int64)
    for client in rng.permutation(num_clients):
        need = sizes[client]
        while need > 0:
            if log_mixes:
                log_probs = np.where(remaining > 0, mixes[client], -np.inf)
                top = log_probs.max()
                probs = np.exp(log_probs - top) if np.isfinite(top) else np.zeros(num_classes)
            else:
                probs = mixes[client] * (remaining > 0)
            # (a mix with no mass left, none of its classes or a one-hot draw at a tiny alpha: the fullest class, the fewest classes)
            probs = probs / probs.sum() if probs.sum() > 0 else np.eye(num_classes)[np.argmax(remaining)]
            draw = np.minimum(rng.multinomial(need, probs), remaining)
            counts[client] += draw
            remaining -= draw
            need -= draw.sum()
    owner = np.full(len(inverse), -1, np.int64)
    for k in range(num_classes):
        taken = counts[:, k].sum()
        owner[pools[k][:taken]] = np.repeat(np.arange(num_clients), counts[:, k])
    return Partition.from_owner(owner, num_clients)


def _labelwise_dirichlet(inverse: np.ndarray, num_classes: int, num_clients: int, alpha: float, rng) -> Partition:
    owner = np.empty(len(inverse), np.int64)
    for k in range(num_classes):
        idx = rng.permutation(np.flatnonzero(inverse == k))
        share = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.floor(np.cumsum(share) * len(idx)).astype(np.int64)
        cuts[-1] = len(idx)
        counts = np.diff(np.concatenate([[0], cuts]))
        owner[idx] = np.repeat(np.arange(num_clients), counts)
    return Partition.from_owner(owner, num_clients)


def _split_classes_among_holders(inverse, num_classes, held, num_clients, rng) -> Partition:
    """held[c] lists client c's classes; each class's samples go near-equally to its holders."""
    owner = np.empty(len(inverse), np.int64)
    holder_client = np.repeat(np.arange(num_clients), held.shape[1])
    holder_class = held.ravel()
    by_class = np.argsort(holder_class, kind="stable")
    class_start = np.searchsorted(holder_class[by_class], np.arange(num_classes))
    holders_of = np.bincount(holder_class, minlength=num_classes)
    for k in range(num_classes):
        idx = rng.permutation(np.flatnonzero(inverse == k))
        if holders_of[k] == 0:  # fewer than C client slots (N * k < C): this class is left out
            owner[idx] = -1
            continue
        clients = holder_client[by_class[class_start[k] : class_start[k] + holders_of[k]]]
        owner[idx] = clients[_near_equal_owner(len(idx), holders_of[k])]
    return Partition.from_owner(owner, num_clients)
