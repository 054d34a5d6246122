"""Multinomial logistic regression: one linear layer on flattened inputs (FedProx's Synthetic model)."""

from __future__ import annotations

import flax.linen as nn


class LogisticRegression(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))
