"""Character-level recurrent model for next-character prediction (LEAF Shakespeare)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..errors import require
from . import Inputs, positive_int

CELLS = ("lstm", "gru")


class CharRNN(nn.Module):
    """Embedding(num_classes, embed) - `layers` x LSTM or GRU(hidden) - dense(num_classes) on the
    last step: LEAF's Shakespeare model is embed 8, 2 LSTM layers of 256, 80 characters.

    Inputs are character indices [B, T] (stored as floats in the client store; cast here)."""

    num_classes: int
    embed: int = 8
    hidden: int = 256
    layers: int = 2
    cell: str = "lstm"
    INPUTS = Inputs("sequences [T] of character codes (integers in [0, num_classes)), e.g. dataset=shakespeare", ranks=(1,), codes=True)

    def __post_init__(self):
        for key in ("embed", "hidden", "layers"):
            positive_int(f"model.{key}", getattr(self, key))
        require(self.cell in CELLS, "model.cell", self.cell, f"one of {CELLS}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        x = nn.Embed(self.num_classes, self.embed)(x.astype(jnp.int32))
        for _ in range(self.layers):
            cell = nn.OptimizedLSTMCell(self.hidden) if self.cell == "lstm" else nn.GRUCell(self.hidden)
            # the cell's zero carry is float32 (its param_dtype); a float64 model's steps return float64, which
            # scan refuses for a float32 carry: the carry takes the wider of the two (bfloat16 inputs: float32, as before)
            carry = cell.initialize_carry(jax.random.key(0), x[:, 0].shape)  # (zeros: the key is not used)
            carry = jax.tree.map(lambda c: c.astype(jnp.promote_types(c.dtype, x.dtype)), carry)
            x = nn.RNN(cell)(x, initial_carry=carry)
        return nn.Dense(self.num_classes)(x[:, -1])
