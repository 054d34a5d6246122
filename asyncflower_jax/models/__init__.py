"""Flax models; the simulator only ever sees `(apply_fn, params)`."""
