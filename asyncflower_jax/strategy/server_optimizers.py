"""Server optimizers for buffered rules, by name: the pseudo-gradient g (a mean of deltas) is fed
to an optax GradientTransformation (Reddi et al. 2021, "Adaptive Federated Optimization").

    sgd       x <- x - lr g                                   optax.sgd(lr)
    fedavgm   m <- momentum m + g;  x <- x - lr m             optax.sgd(lr, momentum=0.9)   (FedAvgM)
    adam      FedAdam                                         optax.adam(lr, eps=tau=1e-3)
    yogi      FedYogi                                         optax.yogi(lr, eps=tau=1e-3)
    adagrad   FedAdagrad                                      optax.adagrad(lr, eps=tau=1e-3)

Extra keyword arguments go to the optax constructor (e.g. b1, b2, momentum, nesterov,
initial_accumulator_value); `tau` is accepted as Reddi et al.'s name for `eps`. The math is
optax's, which differs from the paper's pseudo-code in small ways: adam and yogi apply bias
correction, yogi starts both moments at 1e-6 (not tau^2), adagrad has no first moment, starts its
accumulator at 0.1 and adds eps inside the square root.

A strategy given `server_lr=None` uses DEFAULT_LEARNING_RATES[name] (sgd 1.0, fedavgm 0.3,
adam/yogi 0.01, adagrad 0.1: values that train the default digits run without diverging).
"""

from __future__ import annotations

from collections.abc import Mapping

import optax

from ..errors import ConfigError, is_number, require

SERVER_OPTIMIZERS = ("sgd", "fedavgm", "adam", "yogi", "adagrad")
DEFAULT_TAU = 1e-3
DEFAULT_MOMENTUM = 0.9
#: server_lr used when a strategy's server_lr is null: plain steps for sgd/fedavgm, small adaptive steps.
DEFAULT_LEARNING_RATES = {"sgd": 1.0, "fedavgm": 0.3, "adam": 0.01, "yogi": 0.01, "adagrad": 0.1}


# what the optax constructors' numeric and boolean options may be: (test, allowed) by name
_KWARG_RANGES = {
    "momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "b1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "b2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "eps": (lambda v: v > 0, "a number > 0"),
    "eps_root": (lambda v: v >= 0, "a number >= 0"),
    "initial_accumulator_value": (lambda v: v >= 0, "a number >= 0"),
}
_KWARG_FLAGS = ("nesterov",)


def _check_kwarg(key: str, value, given: str) -> None:
    """Type and range of one optimizer option (`given`: the name the user wrote, tau for eps)."""
    setting = f"strategy.server_optimizer_kwargs.{given}"
    if key in _KWARG_FLAGS:
        require(isinstance(value, bool), setting, value, "true or false")
    elif key in _KWARG_RANGES:
        test, allowed = _KWARG_RANGES[key]
        require(is_number(value) and test(value), setting, value, allowed)


def server_optimizer(name: str, learning_rate: float, **kwargs) -> optax.GradientTransformation:
    """The optax transformation called `name` (one of SERVER_OPTIMIZERS) with `learning_rate`."""
    require(name in SERVER_OPTIMIZERS, "strategy.server_optimizer", name, f"one of {SERVER_OPTIMIZERS}")
    require(learning_rate > 0, "strategy.server_lr", learning_rate, "> 0")
    kwargs = dict(kwargs)
    given = {key: key for key in kwargs}
    if name in ("adam", "yogi", "adagrad"):
        if "tau" in kwargs:
            require("eps" not in kwargs, "strategy.server_optimizer_kwargs", kwargs, "either tau or eps, not both")
            kwargs["eps"] = kwargs.pop("tau")
            given["eps"] = "tau"
        kwargs.setdefault("eps", DEFAULT_TAU)
    if name == "fedavgm":
        kwargs.setdefault("momentum", DEFAULT_MOMENTUM)
    for key, value in kwargs.items():
        if not (name == "sgd" and key == "momentum" and value is None):  # (optax.sgd's own default)
            _check_kwarg(key, value, given.get(key, key))
    factory = {"sgd": optax.sgd, "fedavgm": optax.sgd, "adam": optax.adam, "yogi": optax.yogi, "adagrad": optax.adagrad}[name]
    try:
        return factory(learning_rate, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"strategy.server_optimizer_kwargs={kwargs!r} is invalid for {name!r}: {exc}") from None


def resolve_server_optimizer(
    optimizer: str | optax.GradientTransformation | None,
    server_lr: float | None,
    kwargs: Mapping | None = None,
) -> tuple[optax.GradientTransformation, str, float | None]:
    """(transformation, display name, learning rate) from a strategy's server-optimizer arguments.

    `optimizer` is a name (see `server_optimizer`), an optax GradientTransformation (used as
    is: `server_lr` and `kwargs` are then ignored) or None (= "sgd"). A null `server_lr` picks the
    named optimizer's default from DEFAULT_LEARNING_RATES.
    """
    if optimizer is None:
        optimizer = "sgd"
    if isinstance(optimizer, str):
        require(optimizer in SERVER_OPTIMIZERS, "strategy.server_optimizer", optimizer, f"one of {SERVER_OPTIMIZERS}")
        lr = DEFAULT_LEARNING_RATES[optimizer] if server_lr is None else server_lr
        require(is_number(lr) and lr > 0, "strategy.server_lr", lr, "> 0")
        return server_optimizer(optimizer, float(lr), **dict(kwargs or {})), optimizer, float(lr)
    require(
        isinstance(optimizer, optax.GradientTransformation),
        "strategy.server_optimizer",
        optimizer,
        f"one of {SERVER_OPTIMIZERS} or an optax GradientTransformation",
    )
    if server_lr is not None:
        require(server_lr > 0, "strategy.server_lr", server_lr, "> 0")
    return optimizer, "custom", None if server_lr is None else float(server_lr)
