"""Aggregation rules: each is an `AsyncStrategy` with a pure, jittable `aggregate` kernel."""

from .base import AsyncStrategy
from .ca2fl import CA2FL
from .fadas import FADAS
from .fedasync import FedAsync
from .fedavg import FedAvg
from .fedbuff import FedBuff
from .fedstaleasync import FedStaleAsync, GroupConstant
from .mifa import MIFA
from .server_optimizers import server_optimizer
from .updates import UpdateBatch

__all__ = ["AsyncStrategy", "CA2FL", "FADAS", "FedAsync", "FedAvg", "FedBuff", "FedStaleAsync", "GroupConstant", "MIFA", "UpdateBatch", "server_optimizer"]
