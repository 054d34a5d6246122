"""CA2FL, FADAS, MIFA, the FedStaleAsync family and FedBuff with a named server optimizer: batched
simulator vs the naive reference."""

import jax
import numpy as np
import pytest

from asyncflower_jax.engine.reference import run_reference
from asyncflower_jax.experiment import Experiment
from tests.conftest import make_config
from tests.engine.test_simulator import SMALL, max_abs_diff, simulate

RULES = {
    "ca2fl": ("strategy=ca2fl", "strategy.buffer_size=3"),
    "ca2fl_seen": ("strategy=ca2fl", "strategy.buffer_size=3", "strategy.cache_mean=seen"),
    "fadas": ("strategy=fadas", "strategy.buffer_size=3", "strategy.tau_c=1", "strategy.server_lr=0.5"),
    "mifa": ("strategy=mifa", "strategy.buffer_size=3"),
    "fedbuff_adam": ("strategy=fedbuff", "strategy.buffer_size=3", "strategy.server_optimizer=adam"),
    "fedstaleasync_interval": ("strategy=fedstaleasync", "strategy.buffer_size=3", "participation=interval", "strategy.personalized_b=true"),
    "unbiased_fedbuff_uniform": ("strategy=unbiased_fedbuff", "strategy.buffer_size=3", "participation=uniform"),
    "fedstale": ("strategy=fedstale", "participation=frequency"),  # synchronous: fresh updates have staleness 0
    "ace": ("strategy=ace",),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_matches_naive_reference_after_40_aggregations(rule):
    with jax.enable_x64(True):
        cfg = make_config(*SMALL, *RULES[rule], "max_versions=40", "max_updates=null", "precision=float64", "latency=lognormal")
        exp = Experiment(cfg)
        result, sim = simulate(exp)
        ref_params, ref_log = run_reference(exp.strategy, exp.params, exp.trainer, exp.latency, exp.settings)
        assert result.summary["versions"] == len(ref_log) == 40
        assert max(max(e["staleness"]) for e in ref_log) > 0 or rule == "fedstale"
        assert result.summary["mean_train_batch"] > 1  # deferred batching really batched
        assert sim.kernel_traces == 1  # one compilation for the whole run
        assert max_abs_diff(result.params, exp.params) > 1e-3  # the model did move
        assert max_abs_diff(result.params, ref_params) < 1e-5
        clients = [c for e in ref_log for c in e["clients"]]
        assert len(set(clients)) < len(clients)  # some clients returned more than once: memory was read back
        if rule.startswith("ca2fl"):
            seen = np.asarray(result.state.seen)
            assert set(np.flatnonzero(seen)) == set(clients)
        if rule == "mifa":
            rows = np.concatenate([np.asarray(leaf).reshape(leaf.shape[0], -1) for leaf in jax.tree.leaves(result.state.memory)], axis=1)
            assert set(np.flatnonzero(np.any(rows != 0, axis=1))) == set(clients)
        if rule == "fadas":
            # tau_c = 1, server_lr 0.5: a buffer with max staleness >= 3 takes the smaller step 1/tau_max
            assert any(max(e["staleness"]) >= 3 for e in ref_log)
