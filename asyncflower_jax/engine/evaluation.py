"""Evaluation of the global model: centralized on the held-out test set, and distributed on every
client's validation split.

Both run as one jitted call over fixed-size batches (`jax.lax.map`), so memory stays bounded for
large test sets and large models; padded rows are masked out of every sum. An evaluator's scores
may stay on the device (JAX scalars) until `read_metrics` reads them: the simulator reads each
evaluation at a later one, once computed, so evaluating never makes the host wait for queued
training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..compilation import jit

DISTRIBUTED_COLUMNS = ("client_accuracy_mean", "client_accuracy_p10", "client_accuracy_worst")


def _batched(x, y, batch_size: int):
    """x, y padded to a multiple of batch_size and reshaped [batches, batch_size, ...], plus the mask."""
    n = len(y)
    batches = max(1, -(-n // batch_size))
    pad = batches * batch_size - n
    mask = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
    x = np.concatenate([np.asarray(x), np.zeros((pad, *np.shape(x)[1:]), np.asarray(x).dtype)])
    y = np.concatenate([np.asarray(y), np.zeros(pad, np.asarray(y).dtype)])
    shape = lambda a: a.reshape((batches, batch_size, *a.shape[1:]))  # noqa: E731
    return jax.device_put((shape(x), shape(y), shape(mask)))  # (jnp.asarray would compile a program per array)


def _per_sample(apply_fn, params, xb, yb):
    logits = apply_fn(params, xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb), (jnp.argmax(logits, -1) == yb)


def read_metrics(scores: dict) -> dict[str, float]:
    """An evaluation's scores as host floats (one transfer for those still on the device)."""
    return {name: float(value) for name, value in jax.device_get(scores).items()}


def make_evaluator(apply_fn, x_test, y_test, batch_size: int = 1024):
    """Returns evaluate(params) -> {"test_loss", "test_accuracy"} as JAX scalars (one jitted call
    that does not wait for the device; `read_metrics` reads them)."""
    batch_size = int(min(batch_size, max(len(y_test), 1)))
    xs, ys, masks = _batched(x_test, y_test, batch_size)
    n = len(y_test)

    @jit
    def metrics(params, xs, ys, masks):
        def one(batch):
            xb, yb, mb = batch
            loss, correct = _per_sample(apply_fn, params, xb.astype(jax.tree.leaves(params)[0].dtype), yb)
            return jnp.sum(jnp.where(mb, loss, 0.0)), jnp.sum(jnp.where(mb, correct, 0))

        losses, corrects = jax.lax.map(one, (xs, ys, masks))
        return jnp.sum(losses) / n, jnp.sum(corrects) / n

    def evaluate(params) -> dict[str, jax.Array]:
        loss, acc = metrics(params, xs, ys, masks)
        return {"test_loss": loss, "test_accuracy": acc}

    return evaluate


def make_distributed_evaluator(apply_fn, store, batch_size: int = 4096):
    """Returns evaluate(params) -> the global model's accuracy on every client's validation split,
    summarised as {client_accuracy_mean, client_accuracy_p10, client_accuracy_worst} over the
    clients that have a split.

    `store` is a ClientStore of validation samples. All clients are scored in one jitted call:
    per-sample correctness over the flat store, then a segment sum by client, so the cost grows
    with the validation samples, not with the number of clients.
    """
    counts = np.asarray(store.counts)
    owner = np.repeat(np.arange(len(counts)), counts)
    n = len(owner)
    batch_size = int(min(batch_size, max(n, 1)))
    xs, ys, masks = _batched(np.asarray(store.x), np.asarray(store.y), batch_size)
    owners = jnp.asarray(np.concatenate([owner, np.zeros(xs.shape[0] * batch_size - n, np.int64)]).reshape(xs.shape[0], batch_size))
    has_split = counts > 0
    num_clients = len(counts)

    @jit
    def per_client(params, xs, ys, masks, owners):
        def one(total, batch):
            xb, yb, mb, ob = batch
            _, correct = _per_sample(apply_fn, params, xb.astype(jax.tree.leaves(params)[0].dtype), yb)
            return total + jax.ops.segment_sum(jnp.where(mb, correct, 0).astype(jnp.int32), ob, num_segments=num_clients), None

        total, _ = jax.lax.scan(one, jnp.zeros(num_clients, jnp.int32), (xs, ys, masks, owners))
        return total

    def evaluate(params) -> dict[str, float]:
        correct = np.asarray(per_client(params, xs, ys, masks, owners))
        acc = correct[has_split] / counts[has_split]
        return {
            "client_accuracy_mean": float(acc.mean()),
            "client_accuracy_p10": float(np.percentile(acc, 10)),
            "client_accuracy_worst": float(acc.min()),
        }

    return evaluate
