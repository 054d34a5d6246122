"""Flower's own strategies (`flwr.serverapp.strategy`, Message API) as synchronous rules in the simulator.

`FlowerStrategy` wraps an unmodified Flower `Strategy` (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad,
FedProx, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan, ...). Each aggregation replays one
Flower round: `configure_train(round, current model, ConfigRecord(), grid)` on a grid whose nodes
are the cohort's clients, then `aggregate_train(round, replies)` on one reply per client (its
trained model as an ArrayRecord, its example count in a MetricRecord). The returned ArrayRecord is
the new global model. The simulator's scheduler chooses the clients and their local training is
the `client` config group's; the wrapped strategy only aggregates.

The aggregation runs in numpy inside the Flower object, so it is not jit-compiled and its state
lives in that object (`jittable = False`); `init` starts every run from a fresh copy of the
strategy given, so two runs with the same `FlowerStrategy` give the same result.

What the simulated clients do not apply: anything a strategy sends to clients in its train
config. FedProx's `proximal_mu` (sent as `proximal-mu`) is such a value: local training has no
proximal term, so a FedProx run trains like FedAvg; a warning names the ignored entries once.
FedOpt's `eta_l` is never sent and unused (as in Flower). Sampling settings (`fraction_train`,
`min_train_nodes`) do not choose clients either: every cohort of `cohort_size` clients is
aggregated whole. A strategy that draws from numpy's global generator (the noise of Flower's
server-side differential-privacy wrappers) runs, but is not reproducible from the run's seed.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import random
from collections.abc import Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flower_strategies
from flwr.supercore.logger import FLOWER_LOGGER
from flwr.supercore.task_identity import TaskIdentity

from ..errors import ConfigError, is_integer, is_number, require
from ..strategy.base import NUM_EXAMPLES_KEY, AsyncStrategy
from ..strategy.updates import UpdateBatch
from .in_process_grid import InProcessGrid
from .records import arrayrecord_to_pytree, pytree_to_arrayrecord

log = logging.getLogger(__name__)

STRATEGY_KEY = "strategy.strategy"
COHORT_KEY = "strategy.cohort_size"
#: Train-config entries every Flower round sends; anything else is a setting for the clients.
ROUND_CONFIG_KEYS = frozenset({"server-round"})

#: Flower strategies whose aggregation needs what the simulated clients do not produce.
UNSUPPORTED = {
    "QFedAvg": "it needs each client's training loss in its reply, which the simulated clients do not send",
    "FedXgbBagging": "it aggregates XGBoost models, not the simulator's pytrees of arrays",
    "FedXgbCyclic": "it aggregates XGBoost models, not the simulator's pytrees of arrays",
    "DifferentialPrivacyClientSideFixedClipping": "it relies on clipping done by a client-side mod, which the simulated clients do not run",
    "DifferentialPrivacyClientSideAdaptiveClipping": "it relies on clipping done by a client-side mod, which the simulated clients do not run",
}


class FlowerStrategy(AsyncStrategy):
    """A Flower Message-API strategy, unmodified, as synchronous rounds of `cohort_size` clients.

    `strategy` is a `flwr.serverapp.strategy.Strategy` instance or a config with its `_target_`
    (instantiated here so that a bad target or argument is reported as `strategy.strategy`).
    Rounds are synchronous: a cohort starts from the current model, the round aggregates when
    all `cohort_size` clients are back (staleness 0), then the next cohort starts.

    In a Flower federation the wrapped strategy can be used directly; this object forwards the
    Message-API calls to its working copy unchanged.
    """

    refill = "on_aggregation"
    buffer_key = COHORT_KEY
    jittable = False

    def __init__(self, strategy, cohort_size: int = 10):
        require(
            is_integer(cohort_size) and cohort_size >= 1,
            COHORT_KEY,
            cohort_size,
            "an integer >= 1",
        )
        strategy = _build_flower_strategy(strategy)
        _check_supported(strategy)
        _check_sampling(strategy, cohort_size)
        _check_settings(strategy, cohort_size)
        self.strategy = strategy
        self.cohort_size = cohort_size
        self._weight_key = getattr(_innermost(strategy), "weighted_by_key", NUM_EXAMPLES_KEY)
        self._array_key = getattr(_innermost(strategy), "arrayrecord_key", "arrays")
        self._warned_config: set[str] = set()
        self._reset()

    def _reset(self) -> None:
        self._live = copy.deepcopy(self.strategy)
        self._round = 0

    def __repr__(self) -> str:
        return f"FlowerStrategy({_describe(self.strategy)}, cohort_size={self.cohort_size})"

    def name(self) -> str:
        return type(self.strategy).__name__

    # ---- the simulator's interface ------------------------------------------------------
    def round_delimiter(self, server_round):
        return ("buffer_size", self.cohort_size)

    def init(self, params):
        """A fresh copy of the wrapped strategy; the server state is inside it, so this returns ()."""
        self._reset()
        return ()

    def aggregate(self, params, state, updates: UpdateBatch):
        """One Flower round over the batch's real rows (padding rows are never shown to Flower)."""
        rows = np.flatnonzero(np.asarray(updates.mask))
        trained = jax.device_get(updates.params)
        clients = [int(c) for c in np.asarray(updates.client_id)[rows]]
        counts = np.asarray(updates.num_examples)[rows]
        self._round += 1
        with _flower_context(), _sampling_at_most(self._live, len(clients)):
            grid = _CohortGrid(clients)
            sent = list(self._live.configure_train(self._round, pytree_to_arrayrecord(params), ConfigRecord(), grid))
            self._warn_client_config(sent)
            replies = [
                self._reply(client, jax.tree.map(lambda leaf, i=i: leaf[i], trained), count)
                for i, client, count in zip(rows, clients, counts)
            ]
            arrays, _ = self._live.aggregate_train(self._round, replies)
        if arrays is None:  # the strategy skipped this round (e.g. Bulyan with too few replies)
            return params, state
        new = arrayrecord_to_pytree(arrays, template=params)
        return jax.tree.map(lambda leaf, p: jnp.asarray(leaf, dtype=p.dtype), new, params), state

    def _reply(self, client: int, trained, num_examples) -> Message:
        """The reply a Flower ClientApp sends after training: arrays and example count."""
        count = float(num_examples)
        content = RecordDict(
            {
                self._array_key: pytree_to_arrayrecord(trained),
                "metrics": MetricRecord({self._weight_key: int(count) if count.is_integer() else count}),
            }
        )
        instruction = Message(RecordDict(), dst_node_id=client, message_type=MessageType.TRAIN, group_id=str(self._round))
        return Message(content, reply_to=instruction)

    def _warn_client_config(self, sent: Iterable[Message]) -> None:
        ignored = {}
        for msg in sent:
            for config in msg.content.config_records.values():
                ignored.update({k: v for k, v in config.items() if k not in ROUND_CONFIG_KEYS and k not in self._warned_config})
        if ignored:
            self._warned_config.update(ignored)
            log.warning(
                "%s sends %s to the clients in its train config; the simulated clients ignore it "
                "(their local training is the `client` config group's)",
                type(self.strategy).__name__,
                ", ".join(f"{k}={v!r}" for k, v in sorted(ignored.items())),
            )

    # ---- the Flower interface: forwarded to the wrapped strategy -------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._live.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        return self._live.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._live.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        return self._live.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self._live.summary()


class _CohortGrid(InProcessGrid):
    """The nodes `configure_train` sees: the cohort's client ids. It delivers no message; the
    simulator trains the clients itself."""

    def __init__(self, node_ids: list[int]):
        self._node_ids = list(node_ids)
        super().__init__()

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def push_messages(self, messages):
        raise RuntimeError("the simulator trains the cohort itself; this grid sends no messages")

    def pull_messages(self, message_ids):
        raise RuntimeError("the simulator trains the cohort itself; this grid receives no messages")

    def send_and_receive(self, messages, *, timeout=None):
        raise RuntimeError("the simulator trains the cohort itself; this grid sends no messages")


@contextlib.contextmanager
def _flower_context() -> Iterator[None]:
    """What Flower's ServerApp runtime provides, for calls made outside one.

    `Message(...)` reads the task identity, which only a ServerApp sets: a stand-in is set while
    the calls run when there is none. Flower logs two INFO lines per round (node sampling, replies
    received): they are held back so a long run's log stays readable (warnings pass). Flower's
    node sampling draws from Python's global `random`: its state is restored afterwards.
    """
    stand_ins = []
    for attr, value in (("run_id", 0), ("node_id", SUPERLINK_NODE_ID), ("task_id", 0)):
        try:
            getattr(TaskIdentity, attr)
        except RuntimeError:
            setattr(TaskIdentity, attr, value)
            stand_ins.append(attr)
    level = FLOWER_LOGGER.level
    FLOWER_LOGGER.setLevel(logging.WARNING)
    rng_state = random.getstate()
    try:
        yield
    finally:
        random.setstate(rng_state)
        FLOWER_LOGGER.setLevel(level)
        for attr in stand_ins:
            setattr(TaskIdentity, attr, None)


def _build_flower_strategy(spec) -> flower_strategies.Strategy:
    """The Flower strategy named by `spec` (an instance, or a config with `_target_`)."""
    if isinstance(spec, Mapping):  # a dict or an omegaconf DictConfig (built with `_recursive_: false`)
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate
        from omegaconf import DictConfig, OmegaConf

        target = spec.get("_target_")
        require(
            isinstance(target, str),
            STRATEGY_KEY,
            OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else dict(spec),
            "a Flower strategy: a `_target_` such as flwr.serverapp.strategy.FedAvg, with its arguments",
        )
        try:
            spec = instantiate(spec)
        except InstantiationException as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            if isinstance(cause, ImportError):
                raise ConfigError(
                    f"{STRATEGY_KEY}._target_={target!r} is invalid: must name a Flower strategy class "
                    f"such as flwr.serverapp.strategy.FedAvg ({_last_line(cause)})"
                ) from None
            raise ConfigError(f"{STRATEGY_KEY} ({target}): {_first_line(cause)}") from None
    require(
        isinstance(spec, flower_strategies.Strategy) and not isinstance(spec, AsyncStrategy),
        STRATEGY_KEY,
        spec,
        "a Flower Message-API strategy (flwr.serverapp.strategy.Strategy); the project's own rules "
        "run in the simulator without this wrapper",
    )
    return spec


def _check_supported(strategy) -> None:
    for part in _chain(strategy):
        name = type(part).__name__
        if name in UNSUPPORTED and type(part).__module__.startswith("flwr."):
            raise ConfigError(f"{STRATEGY_KEY}={name} is not supported in the simulator: {UNSUPPORTED[name]}")


def _check_sampling(strategy, cohort_size: int) -> None:
    """Flower's `configure_train` waits until `min_available_nodes` and `min_train_nodes` nodes are
    connected; the grid it sees holds the cohort, so both must fit in it."""
    inner = _innermost(strategy)
    fraction = getattr(inner, "fraction_train", 1.0)
    require(
        isinstance(fraction, (int, float)) and 0 < fraction <= 1,
        f"{STRATEGY_KEY}.fraction_train",
        fraction,
        "in (0, 1] (the scheduler picks the cohort of strategy.cohort_size clients; all of it is aggregated)",
    )
    needed = max(getattr(inner, "min_available_nodes", 1), getattr(inner, "min_train_nodes", 1))
    require(
        cohort_size >= needed,
        COHORT_KEY,
        cohort_size,
        f">= the wrapped strategy's min_available_nodes and min_train_nodes ({needed}): "
        "each round's configure_train sees the cohort's clients as the connected nodes",
    )


# The numeric settings of Flower's strategies, by attribute name: (test, allowed). Flower checks
# none of them (FedTrimmedAvg checks its beta): a negative learning rate or momentum ran, and
# diverged or stayed at chance.
_UNIT = (lambda v: 0 <= v < 1, "in [0, 1)")
_SETTINGS = {
    "eta": (lambda v: v > 0, "> 0"),
    "eta_l": (lambda v: v > 0, "> 0"),
    "tau": (lambda v: v > 0, "> 0"),
    "beta_1": _UNIT,
    "beta_2": _UNIT,
    "server_learning_rate": (lambda v: v > 0, "> 0"),
    "server_momentum": _UNIT,
    "proximal_mu": (lambda v: v >= 0, ">= 0"),
}


def _check_settings(strategy, cohort_size: int) -> None:
    """The wrapped strategy's numeric settings, and Krum's counts against the cohort it sees."""
    inner = _innermost(strategy)
    for name, (test, allowed) in _SETTINGS.items():
        if hasattr(inner, name):
            value = getattr(inner, name)
            require(is_number(value) and test(value), f"{STRATEGY_KEY}.{name}", value, f"a number {allowed}")
    if hasattr(inner, "num_malicious_nodes"):  # Krum, MultiKrum: each score sums the distances to n - f - 2 neighbours
        f = inner.num_malicious_nodes
        require(
            is_integer(f) and 0 <= f <= cohort_size - 3,
            f"{STRATEGY_KEY}.num_malicious_nodes",
            f,
            f"an integer in [0, strategy.cohort_size - 3] ({cohort_size - 3}): Krum scores each model by its n - f - 2 nearest neighbours",
        )
    if hasattr(inner, "num_nodes_to_select"):
        m = inner.num_nodes_to_select
        require(
            is_integer(m) and 1 <= m <= cohort_size,
            f"{STRATEGY_KEY}.num_nodes_to_select",
            m,
            f"an integer in [1, strategy.cohort_size] ({cohort_size})",
        )


def _chain(strategy) -> list:
    """The strategy and those it wraps (Flower's differential-privacy wrappers hold one in `.strategy`)."""
    chain = [strategy]
    while isinstance(getattr(chain[-1], "strategy", None), flower_strategies.Strategy) and len(chain) < 8:
        chain.append(chain[-1].strategy)
    return chain


def _innermost(strategy):
    return _chain(strategy)[-1]


@contextlib.contextmanager
def _sampling_at_most(strategy, nodes: int) -> Iterator[None]:
    """The wrapped strategy's `min_available_nodes` and `min_train_nodes` lowered to `nodes` for one
    round: a cohort that comes back short (a client dropped out or failed) is aggregated from the
    replies it has, as the project's synchronous rules do; Flower's `configure_train` would wait
    for the missing nodes forever."""
    inner = _innermost(strategy)
    saved = {key: getattr(inner, key) for key in ("min_available_nodes", "min_train_nodes") if hasattr(inner, key)}
    for key, value in saved.items():
        setattr(inner, key, min(value, nodes))
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(inner, key, value)


def _describe(strategy) -> str:
    """`FedAdam(eta=0.01, ...)`: the class and its scalar constructor arguments, for logs and summaries."""
    if not isinstance(strategy, flower_strategies.Strategy):
        return repr(strategy)
    args = []
    for name in inspect.signature(type(strategy).__init__).parameters:
        value = getattr(strategy, name, None)
        if isinstance(value, (bool, int, float, str)):
            args.append(f"{name}={value!r}")
        elif isinstance(value, flower_strategies.Strategy):
            args.append(f"{name}={_describe(value)}")
    return f"{type(strategy).__name__}({', '.join(args)})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _last_line(exc: BaseException) -> str:
    """Hydra's import errors end with the useful line ("Are you sure that 'X' is importable ...?")."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[-1]
