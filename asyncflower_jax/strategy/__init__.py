"""Aggregation rules: each is an `AsyncStrategy` with a pure, jittable `aggregate` kernel."""

from .base import AsyncStrategy
from .fedasync import FedAsync
from .fedavg import FedAvg
from .fedbuff import FedBuff
from .updates import UpdateBatch

__all__ = ["AsyncStrategy", "FedAsync", "FedAvg", "FedBuff", "UpdateBatch"]
