"""asyncflower-jax: batched, exact simulation of asynchronous federated learning in JAX."""

__version__ = "0.1.0"
