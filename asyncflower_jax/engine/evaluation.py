"""Centralized evaluation of the global model on the held-out test set."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def make_evaluator(apply_fn, x_test, y_test):
    """Returns evaluate(params) -> {"test_loss", "test_accuracy"} (one jitted call, host floats)."""
    x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)

    @jax.jit
    def metrics(params, x, y):
        logits = apply_fn(params, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == y)

    def evaluate(params) -> dict[str, float]:
        loss, acc = metrics(params, x_test.astype(jax.tree.leaves(params)[0].dtype), y_test)
        return {"test_loss": float(loss), "test_accuracy": float(acc)}

    return evaluate
