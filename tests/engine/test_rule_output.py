"""engine/rule_output.py: a rule's aggregate must return (params, state) laid out as it was given them."""

import jax.numpy as jnp
import numpy as np
import pytest

from asyncflower_jax.engine.rule_output import RuleOutputError, check_aggregate_output
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
