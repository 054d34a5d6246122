"""What the asynchronous ServerApp and the ClientApp say to each other (record and key names).

Identify (a `query` message, once per node): the reply's MetricRecord `metrics` holds the node's
`partition-id` and `num-partitions` (from its `--node-config`); the partition id is the client
index the strategy sees.

Train (a `train` message per dispatch): the content holds the model as the ArrayRecord `arrays`
(keyed by tree path) and the ConfigRecord `config` with `start-version` (the model's version),
`dispatch-id` (the task's number, from which the client derives its training key exactly as the
simulator does) and `server-round`. The reply holds the trained model as `arrays` and the
MetricRecord `metrics` with `num-examples`, `train-loss` (mean loss of its local steps), and the
echoed `start-version`, `dispatch-id` and `partition-id`.
"""

from ..strategy.base import NUM_EXAMPLES_KEY, START_VERSION_KEY

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

DISPATCH_ID_KEY = "dispatch-id"
SERVER_ROUND_KEY = "server-round"
TRAIN_LOSS_KEY = "train-loss"
PARTITION_ID_KEY = "partition-id"  # Flower's own node-config key (flwr.common.constant.PARTITION_ID_KEY)
NUM_PARTITIONS_KEY = "num-partitions"

__all__ = [
    "ARRAYS",
    "CONFIG",
    "METRICS",
    "DISPATCH_ID_KEY",
    "NUM_EXAMPLES_KEY",
    "NUM_PARTITIONS_KEY",
    "PARTITION_ID_KEY",
    "SERVER_ROUND_KEY",
    "START_VERSION_KEY",
    "TRAIN_LOSS_KEY",
]
