"""The run directory's name: the strategy's part follows the rule the run runs; an override's value."""

from asyncflower_jax.results.rundir import _strategy_dirname, override_value
from asyncflower_jax.results.runs import FLOWER_ADAPTER, strategy_name

FLOWER = "asyncflower_jax.flower.stock_strategy.FlowerStrategy"


def test_a_run_directory_is_named_after_the_config_group_choice():
    assert _strategy_dirname("fedbuff", []) == "fedbuff"
    assert _strategy_dirname("fedbuff", ["strategy.buffer_size=5", "seed=2"]) == "fedbuff"
    assert _strategy_dirname("flower_fedavg", None) == "flower_fedavg"


def test_a_rule_named_on_the_command_line_names_the_run_directory():
    assert _strategy_dirname("fedasync", ["strategy._target_=my_rules.MyFedAsync", "seed=1"]) == "myfedasync"
    assert _strategy_dirname("fedasync", ["++strategy._target_='my_rules.Momentum_Buffer'"]) == "momentum_buffer"
    # a Flower strategy inside the adapter: the name `strategy=flower_fedmedian` gives
    assert _strategy_dirname("flower_fedavg", ["strategy.strategy._target_=flwr.serverapp.strategy.FedMedian"]) == "flower_fedmedian"
    assert _strategy_dirname("my_adapter", ["strategy.strategy._target_=flwr.serverapp.strategy.Krum"]) == "my_adapter_krum"
    # the outer class wins; a deleted key names nothing
    assert _strategy_dirname("flower_fedavg", ["strategy.strategy._target_=a.Krum", "strategy._target_=b.Mine"]) == "mine"
    assert _strategy_dirname("fedasync", ["~strategy._target_"]) == "fedasync"


def test_a_flower_strategy_run_through_the_adapter_is_named_by_its_own_class():
    from asyncflower_jax.flower.stock_strategy import FlowerStrategy

    assert FlowerStrategy.__name__ == FLOWER_ADAPTER
    config = {"strategy": {"_target_": FLOWER, "cohort_size": 10, "strategy": {"_target_": "flwr.serverapp.strategy.FedMedian"}}}
    assert strategy_name(config) == "FedMedian (Flower)"
    assert strategy_name({}, {"strategy": "FlowerStrategy(FedMedian(fraction_train=1.0), cohort_size=10)"}) == "FedMedian (Flower)"
    assert strategy_name({"strategy": {"_target_": "my_rules.MyFedAsync"}}) == "MyFedAsync"
    assert strategy_name({}, {"strategy": "FedAsync(alpha=0.6, staleness=Polynomial(a=0.5))"}) == "FedAsync"


def test_the_value_an_override_sets_is_the_last_ones_and_a_deletion_sets_none():
    assert override_value(["seed=1", "++strategy.alpha=0.5"], "strategy.alpha") == "0.5"
    assert override_value(["client.num_steps=5", "+client.num_steps = 7"], "client.num_steps") == "7"
    assert override_value(["~client.num_steps", "~client.num_steps=10", "seed=1"], "client.num_steps") is None
    assert override_value(["client.num_steps_x=3"], "client.num_steps") is None and override_value([], "seed") is None
