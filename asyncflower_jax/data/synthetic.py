"""Synthetic(alpha, beta): the FedProx generator of heterogeneous clients (Li et al., MLSys 2020).

Client k has its own softmax-regression model and its own input distribution:

    u_k ~ N(0, alpha^2),  W_k ~ N(u_k, 1) [d x C],  b_k ~ N(u_k, 1) [C]       (model skew)
    B_k ~ N(0, beta^2),   v_k ~ N(B_k, 1) [d]                                    (feature skew)
    x ~ N(v_k, diag(j^-1.2, j = 1..d)),  y = argmax(x W_k + b_k)

(alpha and beta are standard deviations, as in the FedProx generator's code). `iid=True` gives the
"synthetic IID" variant: one global W, b and v = 0 for every client. Client sizes are
floor(lognormal(size_log_mean, size_log_sigma)) + min_size, capped at max_size (FedProx used
lognormal(4, 2) + 50 with 30 clients; the defaults here keep 100,000 clients in a few GB).
Each client's samples are split into its training samples (its natural partition: `client_ids`)
and `test_fraction` of test samples; the centralized test set is a uniform sample of at most
`max_test_samples` of the latter. Everything is generated offline from `data_seed`, in blocks of
clients, with no per-client Python objects.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import require
from ..memory import require_memory
from .dataset import Dataset

log = logging.getLogger(__name__)

BLOCK = 512  # clients generated per vectorized block (bounds the temporary per-sample weight gather)
PER_CLIENT_BYTES = 64  # the per-client draws and counts (float64 / int64 arrays), before any sample


MAX_SKEW = 1e6  # dataset.alpha and dataset.beta (standard deviations around unit-variance draws)


def synthetic(
    num_clients: int,
    alpha: float = 1.0,
    beta: float = 1.0,
    iid: bool = False,
    dimension: int = 60,
    num_classes: int = 10,
    size_log_mean: float = 3.0,
    size_log_sigma: float = 1.0,
    min_size: int = 10,
    max_size: int = 1000,
    test_fraction: float = 0.1,
    max_test_samples: int | None = 10_000,
    data_seed: int = 0,
) -> Dataset:
    require(isinstance(num_clients, int) and num_clients >= 1, "dataset.num_clients", num_clients, "an integer >= 1")
    # beyond MAX_SKEW a model's or input's unit noise is lost to float32 rounding (every label the
    # same class at alpha=1e30) and then the features overflow (beta=1e200: every update non-finite)
    require(0 <= alpha <= MAX_SKEW, "dataset.alpha", alpha, f"in [0, {MAX_SKEW:g}] (FedProx used 0 to 1)")
    require(0 <= beta <= MAX_SKEW, "dataset.beta", beta, f"in [0, {MAX_SKEW:g}] (FedProx used 0 to 1)")
    require(isinstance(dimension, int) and dimension >= 1, "dataset.dimension", dimension, "an integer >= 1")
    require(isinstance(num_classes, int) and num_classes >= 2, "dataset.num_classes", num_classes, "an integer >= 2")
    require(size_log_sigma >= 0, "dataset.size_log_sigma", size_log_sigma, ">= 0")
    require(isinstance(min_size, int) and min_size >= 2, "dataset.min_size", min_size, "an integer >= 2 (one training and one test sample)")
    require(isinstance(max_size, int) and max_size >= min_size, "dataset.max_size", max_size, f"an integer >= dataset.min_size ({min_size})")
    require(0 < test_fraction < 1, "dataset.test_fraction", test_fraction, "in (0, 1)")
    require(np.isfinite(size_log_mean), "dataset.size_log_mean", size_log_mean, "a finite number")
    require(np.isfinite(size_log_sigma), "dataset.size_log_sigma", size_log_sigma, "a finite number >= 0")
    require(max_test_samples is None or (isinstance(max_test_samples, int) and max_test_samples >= 1), "dataset.max_test_samples", max_test_samples, "an integer >= 1 or null")

    rng = np.random.default_rng(data_seed)
    n, d, c = num_clients, dimension, num_classes
    sample_bytes = 4 * d + 4  # (float32 features, an int32 label)
    require_memory(  # at least min_size samples per client, and the per-client draws below: refused before drawing them
        n * (2 * sample_bytes * min_size + PER_CLIENT_BYTES),
        f"the synthetic data of num_clients={n} (at least {n * min_size:,} samples of {d} features: dataset.min_size={min_size} per client)",
        "lower num_clients or dataset.min_size",
    )
    with np.errstate(over="ignore"):  # (a huge size_log_mean: every size is capped at max_size)
        sizes = np.minimum(np.floor(np.minimum(rng.lognormal(size_log_mean, size_log_sigma, n), max_size)).astype(np.int64) + min_size, max_size)
    n_test = np.minimum(np.floor(test_fraction * sizes).astype(np.int64), sizes - 1)  # at least one training sample
    require(
        n_test.sum() > 0, "dataset.test_fraction", test_fraction,
        f"large enough to give a test sample: each client gives floor(test_fraction x its size), and the largest has {int(sizes.max())} (at least {1 / sizes.max():.3g})",
    )
    n_train = sizes - n_test
    blocks = [(lo, min(lo + BLOCK, n)) for lo in range(0, n, BLOCK)]
    most = max(int(sizes[lo:hi].sum()) for lo, hi in blocks)  # samples of the largest block
    # its working buffers (below): two noise draws, the means and x; each sample's model; the products
    block_bytes = most * d * (3 * 8 + 4) + most * d * c * 4 + most * c * 4 + (0 if iid else 2 * min(BLOCK, n) * d * c * 8)
    require_memory(  # the samples, the copy the clients' store puts on the device, and one block's buffers
        2 * sample_bytes * int(sizes.sum()) + block_bytes,
        f"the synthetic data of num_clients={n} (generated {min(BLOCK, n)} clients at a time: {int(sizes.sum()):,} samples of {d} features)",
        "lower num_clients, dataset.size_log_mean or dataset.max_size (the mean client has about "
        f"{sizes.mean():.0f} samples)",
    )
    log.info("generating the synthetic data: %d clients, %s samples of %d features", n, f"{int(sizes.sum()):,}", d)  # (a minute at 1e6 clients)
    scale = np.arange(1, d + 1, dtype=np.float64) ** -0.6  # standard deviations: sqrt(j^-1.2)
    if iid:
        w_global, b_global = rng.normal(0, 1, (d, c)), rng.normal(0, 1, c)
    else:
        u = rng.normal(0, alpha, n)
        big_b = rng.normal(0, beta, n)

    x_train = np.empty((int(n_train.sum()), d), np.float32)
    y_train = np.empty(int(n_train.sum()), np.int32)
    client_ids = np.repeat(np.arange(n, dtype=np.int32), n_train)
    train_at = np.concatenate([[0], np.cumsum(n_train)])
    x_test_parts, y_test_parts = [], []

    # Buffers reused block after block (fresh arrays of this size cost as much in page faults as
    # their arithmetic); the draws have two, one filled while the other is labelled.
    noises = [np.empty((most, d)) for _ in range(2)]
    models = [np.empty((min(BLOCK, n), d, c)) for _ in range(2)] if not iid else None
    means = np.empty((most, d))  # each sample's client input mean
    x = np.empty((most, d), np.float32)
    sample_models = np.empty((most, d, c), np.float32)
    products = np.empty((most, c), np.float32)

    def draw(i: int):
        """Block i's random draws, in the generator's order, into buffer i % 2 (loc + a standard
        normal: the same numbers as rng.normal(loc, 1), drawn faster)."""
        lo, hi = blocks[i]
        k, m = hi - lo, int(sizes[lo:hi].sum())
        if iid:
            w, b, v = np.broadcast_to(w_global, (k, d, c)), np.broadcast_to(b_global, (k, c)), np.zeros((k, d))
        else:
            w = rng.standard_normal(out=models[i % 2][:k])
            w += u[lo:hi, None, None]
            b = u[lo:hi, None] + rng.standard_normal((k, c))
            v = big_b[lo:hi, None] + rng.standard_normal((k, d))
        return w, b, v, rng.standard_normal(out=noises[i % 2][:m])

    # the next block is drawn in a second thread while this one is labelled (numpy releases the GIL
    # in both): the draws stay in one thread, in order, so the data set is the same
    with ThreadPoolExecutor(1) as drawer:
        upcoming = drawer.submit(draw, 0)
        for i, (lo, hi) in enumerate(blocks):
            w, b, v, noise = upcoming.result()
            if i + 1 < len(blocks):
                upcoming = drawer.submit(draw, i + 1)
            k, m = hi - lo, len(noise)
            owner = np.repeat(np.arange(k), sizes[lo:hi])  # block-local client of every sample
            noise *= scale
            # (mode="clip": the owners are in range, and take with out= copies the output under "raise")
            noise += np.take(v, owner, axis=0, out=means[:m], mode="clip")
            x[:m] = noise  # x = v_owner + scale * noise, in float32
            np.take(w.astype(np.float32), owner, axis=0, out=sample_models[:m], mode="clip")
            logits = np.einsum("nd,ndc->nc", x[:m], sample_models[:m], out=products[:m]) + b[owner]
            y = np.argmax(logits, axis=1).astype(np.int32)
            first = np.concatenate([[0], np.cumsum(sizes[lo:hi])[:-1]])
            position = np.arange(m) - first[owner]  # index of the sample within its client
            is_test = position < n_test[lo:hi][owner]
            x_train[train_at[lo] : train_at[hi]] = x[:m][~is_test]
            y_train[train_at[lo] : train_at[hi]] = y[~is_test]
            x_test_parts.append(x[:m][is_test])
            y_test_parts.append(y[is_test])
    x_test, y_test = np.concatenate(x_test_parts), np.concatenate(y_test_parts)
    if max_test_samples is not None and len(y_test) > max_test_samples:
        keep = np.sort(rng.choice(len(y_test), max_test_samples, replace=False))
        x_test, y_test = x_test[keep], y_test[keep]
    return Dataset(x_train, y_train, x_test, y_test, num_classes=c, client_ids=client_ids, name="synthetic")
