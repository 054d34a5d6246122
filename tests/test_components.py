"""Component groups' number and true/false keys: a value of the wrong type is a ConfigError naming
the full dotted key and the range the constructor states, before instantiate; every shipped yaml passes."""

from pathlib import Path

import pytest

from asyncflower_jax.components import check_types
from asyncflower_jax.config_schema import COMPONENT_GROUPS
from asyncflower_jax.errors import ConfigError
from asyncflower_jax.experiment import build, warn_unread_participation
from tests.conftest import CONF_DIR, make_config

WRONG_TYPES = [
    (["strategy.alpha=abc"], "strategy.alpha='abc' is invalid: must be a number in (0, 1]"),
    (["strategy.staleness.a=abc"], "strategy.staleness.a='abc' is invalid: must be a number >= 0"),
    (["latency=exponential", "latency.rate=abc"], "latency.rate='abc' is invalid: must be a finite number > 0"),
    (["latency=uniform", "latency.high=abc"], "latency.high='abc' is invalid: must be a finite number >= latency.low (0.5)"),
    (["partition.alpha=abc"], "partition.alpha='abc' is invalid: must be a number > 0"),
    (["partition.min_size=[1]"], "partition.min_size=[1] is invalid: must be an integer >= 1"),
    (["client.learning_rate=abc"], "client.learning_rate='abc' is invalid: must be a number > 0"),
    (["strategy=fedbuff", "strategy.server_lr=abc"], "strategy.server_lr='abc' is invalid: must be a number > 0 or null"),
    (["strategy=fedbuff", "strategy.buffer_size=2.5"], "strategy.buffer_size=2.5 is invalid: must be an integer >= 1"),
    (["model=char_lstm", "model.layers=two"], "model.layers='two' is invalid: must be an integer >= 1"),
    # flags: any text but true/false used to be read as true
    (["dataset=synthetic", "dataset.iid=maybe"], "dataset.iid='maybe' is invalid: must be true or false"),
    (["dataset=synthetic", "dataset.iid=1"], "dataset.iid=1 is invalid: must be true or false"),
    (["latency=groups", "latency.shuffle=no"], "latency.shuffle='no' is invalid: must be true or false"),
    (["strategy=fedstaleasync", "strategy.clear_memory=maybe"], "strategy.clear_memory='maybe' is invalid: must be true or false"),
    (["participation=frequency", "participation.as_of_last_participation=maybe"], "participation.as_of_last_participation='maybe' is invalid: must be true or false"),
    (["strategy=fedbuff", "strategy.buffer_size=true"], "strategy.buffer_size=True is invalid: must be an integer >= 1"),
    # a number made a mapping by a mistyped nested key (was Python's "'<' not supported between 'int' and 'DictConfig'")
    (["+strategy.alpha.aa=3"], "strategy.alpha={'aa': 3} is invalid: must be a number in (0, 1]"),
    (["strategy=fedbuff", "+strategy.buffer_size.x=3"], "strategy.buffer_size={'x': 3} is invalid: must be an integer >= 1"),
    # numbers that are not finite, as in the top-level schema (a learning rate of inf was taken, and every update was non-finite)
    (["client.learning_rate=inf"], "client.learning_rate=inf is invalid: must be a finite number > 0"),
    (["strategy=fedbuff", "strategy.server_lr=-inf"], "strategy.server_lr=-inf is invalid: must be a finite number > 0 or null"),
    (["client.momentum=nan"], "client.momentum=nan is invalid: must be a finite number in [0, 1)"),
    (["participation=scalar", "participation.smoothing=inf"], "participation.smoothing=inf is invalid: must be a finite number > 0 or null"),
]


@pytest.mark.parametrize("overrides, message", WRONG_TYPES, ids=[" ".join(o) for o, _ in WRONG_TYPES])
def test_a_wrong_type_names_the_full_key_and_the_allowed_range(overrides, message):
    group = overrides[-1].lstrip("+").split(".")[0]
    with pytest.raises(ConfigError) as err:
        build(make_config(*overrides)[group], group, **({"num_classes": 10} if group == "model" else {}))
    assert str(err.value) == message


def test_every_shipped_component_yaml_passes_the_type_check():
    options = {group: sorted(yaml.stem for yaml in (Path(CONF_DIR) / group).glob("*.yaml")) for group in COMPONENT_GROUPS}
    checked = []
    for i in range(max(map(len, options.values()))):  # (one composed config checks an option of every group)
        chosen = {group: names[i] for group, names in options.items() if i < len(names)}
        cfg = make_config(*(f"{group}={name}" for group, name in chosen.items()), *(f"{group}.path=x" for group, name in chosen.items() if name in ("trace", "file")))
        for group, name in chosen.items():
            check_types(cfg[group], group, **({"num_classes": 10} if group == "model" else {}))
            checked.append(f"{group}={name}")
    assert len(checked) == sum(map(len, options.values())) > 50


def test_keys_it_cannot_type_are_left_to_instantiate():
    with pytest.raises(ConfigError, match=r"strategy.bogus='abc' is invalid: unknown key of FedAsync; its keys are \['alpha', "):
        build(make_config("+strategy.bogus=abc").strategy, "strategy")
    with pytest.raises(ConfigError, match=r"strategy.bufer_size=3 is invalid: unknown key of FedBuff; did you mean strategy.buffer_size\?"):
        build(make_config("strategy=fedbuff", "+strategy.bufer_size=3").strategy, "strategy")
    with pytest.raises(ConfigError, match=r"model.hiden=\[8\] is invalid: unknown key of MLP; did you mean model.hidden\?"):  # (not flax's parent, name)
        build(make_config("+model.hiden=[8]").model, "model", num_classes=10)
    check_types({"_target_": "no.such.Target", "alpha": "abc"}, "strategy")  # instantiate reports the target


@pytest.mark.parametrize(
    "overrides, warned",
    [
        (["strategy=fedbuff", "participation=uniform"], True),
        (["strategy=fedasync", "participation=maximum", "+participation.smoothing=2"], True),
        (["strategy=fedbuff"], False),
        (["strategy=fedstaleasync", "participation=uniform"], False),  # (it reads it)
    ],
)
def test_a_participation_estimator_the_rule_does_not_read_is_warned_about(overrides, warned, caplog):
    warn_unread_participation(make_config(*overrides))
    assert ("is not read by strategy" in caplog.text) is warned
