"""The README's example rule runs as written: hand-computed aggregation, then a short simulation."""

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from asyncflower_jax.engine.simulator import Simulator
from asyncflower_jax.experiment import Experiment
from asyncflower_jax.strategy import UpdateBatch
from tests.conftest import make_config

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_rule():
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "class StalenessMean" in b)
    namespace: dict = {}
    exec(block, namespace)
    return namespace["StalenessMean"]


def test_readme_rule_aggregates_as_documented():
    rule = readme_rule()(buffer_size=2, lr=0.5)
    params = {"w": jnp.array([1.0, 2.0])}
    updates = UpdateBatch(
        params={"w": jnp.array([[0.0, 2.0], [1.0, 0.0], [9.0, 9.0]])},
        start={"w": jnp.array([[1.0, 2.0], [1.0, 2.0], [9.0, 9.0]])},
        staleness=jnp.array([0, 1, 0], jnp.int32),
        num_examples=jnp.ones(3),
        client_id=jnp.arange(3, dtype=jnp.int32),
        mask=jnp.array([True, True, False]),
    )
    new, _ = rule.aggregate(params, rule.init(params), updates)
    # deltas (1, 0) and (0, 2); weights 1/1 and 1/2, divided by count 2: step = (0.5, 0.5)
    np.testing.assert_allclose(new["w"], [1.0 - 0.25, 2.0 - 0.25])


def test_readme_rule_runs_in_the_simulator():
    exp = Experiment(make_config("num_clients=20", "concurrency=4", "max_updates=200", "partition=iid"))
    strategy = readme_rule()(buffer_size=2, lr=1.0)
    result = Simulator(strategy, exp.params, exp.trainer, exp.scheduler(), exp.evaluate, exp.settings).run()
    assert result.summary["versions"] == 100
    assert result.history[-1]["test_accuracy"] > result.history[0]["test_accuracy"] + 0.2


def test_the_settings_table_lists_every_compute_dtype_and_the_hub_default():
    from asyncflower_jax.client.precision import COMPUTE_DTYPES

    text = README.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `compute_dtype`"))
    assert all(f"`{name}`" in row for name in COMPUTE_DTYPES)
    assert "`dataset.offline: true` is their default" in text
