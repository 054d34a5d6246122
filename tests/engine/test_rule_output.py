"""engine/rule_output.py: a rule's aggregate must return (params, state) laid out as it was given them."""

import re
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from asyncflower_jax.engine.reference import run_reference
from asyncflower_jax.engine.rule_output import RuleOutputError, check_aggregate_output, checked_round_delimiter
from asyncflower_jax.errors import ConfigError
from asyncflower_jax.experiment import Experiment
from asyncflower_jax.strategy import FedAsync
from tests.conftest import make_config

PARAMS = {"dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}
STATE = {"t": jnp.zeros((), jnp.int32)}


class Rule:
    pass


def test_the_same_layout_passes_and_is_returned():
    out = ({"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}, {"t": jnp.ones((), jnp.int32)})
    assert check_aggregate_output(Rule(), PARAMS, STATE, out) is out


@pytest.mark.parametrize(
    "out, message",
    [
        (PARAMS, r"Rule.aggregate returned dict: it must return \(params, state\)"),
        ((PARAMS, STATE, 1), r"returned a tuple of 3: it must return \(params, state\)"),
        (({"dense": {"kernel": jnp.zeros((2, 4, 3)), "bias": jnp.zeros(3)}}, STATE),
         r"params whose leaf \['dense'\]\['kernel'\] is float32\[2,4,3\]: it must keep the shape and dtype it was given, float32\[4,3\] \(was the client axis"),
        (({"dense": {"kernel": jnp.zeros((4, 3), jnp.bfloat16), "bias": jnp.zeros(3)}}, STATE), r"\['dense'\]\['kernel'\] is bfloat16\[4,3\]: .* float32\[4,3\]"),
        ((PARAMS, {"t": jnp.zeros(())}), r"state whose leaf \['t'\] is float32\[\]: it must keep the shape and dtype it was given, int32\[\]"),
        ((PARAMS, {"t": STATE["t"], "extra": jnp.zeros(())}), r"state of another structure than it was given \(leaves added: \[\"\['extra'\]\"\]\)"),
        (({"dense": {"kernel": PARAMS["dense"]["kernel"]}}, STATE), r"params of another structure .*leaves removed: \[\"\['dense'\]\['bias'\]\"\]"),
    ],
)
def test_a_different_layout_names_the_rule_the_part_and_the_leaf(out, message):
    with pytest.raises(RuleOutputError, match=message):
        check_aggregate_output(Rule(), PARAMS, STATE, out)


class GrowingState(FedAsync):
    """FedAsync whose state gains a key after its first step (a scan over queued steps refuses that)."""

    def init(self, params):
        return {"t": jnp.zeros((), jnp.int32)}

    def aggregate(self, params, state, updates):
        params, _ = super().aggregate(params, super().init(params), updates)
        return params, {"t": state["t"] + 1, "extra": jnp.zeros(())}


@pytest.mark.parametrize("per_call", [1, 4])
def test_a_simulation_refuses_a_state_that_changes_one_step_at_a_time_and_queued_alike(per_call):
    exp = Experiment(make_config("num_clients=10", "concurrency=3", "max_updates=6", "model.hidden=[8]", "client.num_steps=1", f"aggregations_per_call={per_call}"))
    exp.strategy = GrowingState()
    with pytest.raises(RuleOutputError, match=r"GrowingState.aggregate returned state of another structure"):
        exp.run()


def test_a_python_scalar_in_the_state_may_come_back_as_any_dtype_of_its_kind():
    """init's Python scalars are weakly typed (int64 under x64): 0 + int32(1) is int32, as scan allows;
    a change of kind (int to float) is still refused. A list of two is taken as the pair."""
    import jax

    def step(out):
        return jax.jit(lambda p, s: check_aggregate_output(Rule(), p, s, out(p, s)))

    with jax.enable_x64(True):
        params = {"w": jnp.zeros(3)}
        _, state = step(lambda p, s: (p, {"t": s["t"] + jnp.int32(1), "u": s["u"] * jnp.float32(0.9)}))(params, {"t": 0, "u": 0.5})
        assert (state["t"].dtype, state["u"].dtype) == (jnp.int32, jnp.float32)
        with pytest.raises(RuleOutputError, match=r"leaf \['t'\] is float64\[\]"):
            step(lambda p, s: (p, {"t": s["t"] * 0.5}))(params, {"t": 0})
    assert isinstance(check_aggregate_output(Rule(), PARAMS, STATE, [PARAMS, STATE]), tuple)


class PythonBranch(FedAsync):
    """FedAsync that reads a staleness with float(): fine on the host, not under jit."""

    def aggregate(self, params, state, updates):
        if float(updates.staleness[0]) > 100:
            return params, state
        return super().aggregate(params, state, updates)


class NumpyWeights(FedAsync):
    def update_weights(self, state, updates):
        return np.asarray(updates.staleness, np.float32)


@pytest.mark.parametrize("rule, method", [(PythonBranch, "aggregate"), (NumpyWeights, "(aggregate|update_weights)")])  # (FedAsync.aggregate calls update_weights)
def test_a_rule_that_cannot_be_compiled_is_named_with_the_way_out(rule, method):
    exp = Experiment(make_config("num_clients=10", "concurrency=3", "max_updates=6", "model.hidden=[8]", "client.num_steps=1"))
    exp.strategy = rule()
    with pytest.raises(RuleOutputError, match=rf"{rule.__name__}\.{method} cannot be compiled \(\w+Error.*set `jittable = False`"):
        exp.run()


class Delimiter(FedAsync):
    """FedAsync whose round_delimiter(r) is delimiters[r] (FedAsync's own from round len(delimiters) on)."""

    def __init__(self, delimiters):
        super().__init__()
        self.delimiters = delimiters

    def round_delimiter(self, server_round):
        return self.delimiters.get(server_round, super().round_delimiter(server_round))


@pytest.mark.parametrize(
    "out, checked",
    [(("buffer_size", 3), ("buffer_size", 3)), (("buffer_size", np.int64(2)), ("buffer_size", 2)), (["round_duration", 1], ("round_duration", 1.0))],
)
def test_a_round_the_engines_can_wait_for_is_returned_as_it_is(out, checked):
    got = checked_round_delimiter(Delimiter({4: out}), 4)
    assert got == checked and type(got[1]) is type(checked[1])


@pytest.mark.parametrize(
    "out",
    [("buffer_size", 0), ("buffer_size", -3), ("buffer_size", 2.5), ("buffer_size", True), ("round_duration", 0.0),
     ("round_duration", float("inf")), ("round_duration", float("nan")), ("buffer", 3), ("buffer_size",), None],
)
def test_a_round_the_engines_cannot_wait_for_names_the_rule_and_the_round(out):
    with pytest.raises(RuleOutputError, match=rf"Delimiter.round_delimiter\(4\) returned {re.escape(repr(out))}: it must return \('buffer_size', K\)"):
        checked_round_delimiter(Delimiter({4: out}), 4)


@pytest.mark.parametrize("engine", ["simulator", "reference"])
def test_a_buffer_of_no_arrivals_in_a_later_round_stops_the_run_with_the_rule_named(engine):
    """It was waited for without end: the run spun at version 2, with no error and no progress."""
    exp = Experiment(make_config("num_clients=10", "concurrency=3", "max_updates=12", "model.hidden=[8]", "client.num_steps=1"))
    exp.strategy = Delimiter({3: ("buffer_size", 0)})
    signal.alarm(120)  # (a hang fails the test instead of the suite)
    try:
        with pytest.raises(RuleOutputError, match=r"Delimiter.round_delimiter\(3\) returned \('buffer_size', 0\)"):
            exp.run() if engine == "simulator" else run_reference(exp.strategy, exp.params, exp.trainer, exp.latency, exp.settings)
    finally:
        signal.alarm(0)


@pytest.mark.parametrize(
    "delimiter, message",
    [(("buffer_size", 0), r"strategy.buffer_size=0 is invalid: must be an integer >= 1"),
     (("round_duration", float("inf")), r"strategy.round_duration=inf is invalid: must be a finite time > 0")],
)
def test_a_first_round_the_engines_cannot_wait_for_is_refused_at_start_up(delimiter, message):
    exp = Experiment(make_config("num_clients=10", "concurrency=3", "max_updates=6", "model.hidden=[8]", "client.num_steps=1"))
    exp.strategy = Delimiter({1: delimiter})
    with pytest.raises(ConfigError, match=message):
        exp.run()


class TextState(FedAsync):
    def init(self, params):
        return {"name": "mine", "t": jnp.zeros(())}


def test_a_state_that_is_not_arrays_names_init():
    """It was JAX's TypeError from inside the server-state memory estimate."""
    with pytest.raises(RuleOutputError, match=r"TextState.init returned a state the engine cannot carry \(.*<class 'str'>.*\): it must be a pytree"):
        Experiment(make_config("num_clients=10", "concurrency=3", "max_updates=6", "model.hidden=[8]", "strategy._target_=tests.engine.test_rule_output.TextState", "~strategy.alpha", "~strategy.staleness"))
