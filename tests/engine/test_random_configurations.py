"""Random combinations of the engine's options against the naive reference (float64).

The other engine tests check each option alone (a rule, availability, faults, queued aggregations,
chunk sizes, stop conditions); these draw several at once from fixed seeds, so the options are
also checked together. The seeds below were chosen among the first 40 so that between them they
cover five of the rules drawn (FedAsync, FedAvg, FedBuff with a time window, FedStaleAsync and
FADAS; the others have reference tests of their own), every stop condition, one and several
aggregations per call, no availability model, on/off and diurnal availability, drop_on_leave,
every injected fault with and without a timeout, and both executions (vmap, as on accelerators,
and map, as on the CPU).
"""

import random

import jax
import pytest

from asyncflower_jax.engine.reference import run_reference
from asyncflower_jax.engine.simulator import Simulator
from asyncflower_jax.experiment import Experiment
from tests.conftest import make_config
from tests.engine.test_simulator import max_abs_diff

SMALL = ("client.num_steps=2", "client.batch_size=8", "model.hidden=[16]", "precision=float64")
RULES = [
    ("strategy=fedasync",),
    ("strategy=fedbuff", "strategy.buffer_size={K}"),
    ("strategy=fedavg",),
    ("strategy=fedbuff", "strategy.round_duration=0.7"),
    ("strategy=ca2fl", "strategy.buffer_size={K}"),
    ("strategy=mifa", "strategy.buffer_size={K}"),
    ("strategy=fadas", "strategy.buffer_size={K}", "strategy.tau_c=1"),
    ("strategy=fedstaleasync", "strategy.buffer_size={K}"),
]
AVAILABILITY = {
    "always": (),
    "on_off": ("availability=on_off",),
    "diurnal": ("availability=diurnal",),
    "leave": ("availability=on_off", "availability.drop_on_leave=true"),
}


def draw(seed: int) -> list[str]:
    """The overrides of one random configuration."""
    r = random.Random(seed)
    m = r.choice([1, 2, 3, 5, 8])
    rule = [x.format(K=min(m, r.choice([2, 3, 5]))) for x in r.choice(RULES)]
    overrides = [
        f"num_clients={r.choice([m + 1, 2 * m + 3, 30])}",
        f"concurrency={m}",
        f"eval_every={r.choice([1, 3, 1000])}",
        f"latency={r.choice(['lognormal', 'exponential', 'pareto', 'constant', 'uniform', 'groups'])}",
        f"seed={r.randrange(100)}",
        f"aggregations_per_call={r.choice([1, 2, 4, 64])}",
        f"chunk_size={r.choice([1, 3, 256])}",
        *rule,
        *AVAILABILITY[r.choice(["always", "always", "on_off", "diurnal", "leave"])],
    ]
    overrides += {
        "versions": [f"max_versions={r.randrange(5, 25)}", "max_updates=null"],
        "updates": [f"max_updates={r.randrange(5, 50)}"],
        "time": [f"max_time={r.uniform(3, 12):.3f}", "max_updates=null"],
    }[r.choice(["versions", "updates", "time"])]
    if r.random() < 0.5:
        overrides += [f"faults.dropout={r.choice([0, 0.1])}", f"faults.failure={r.choice([0, 0.1])}", f"faults.nan={r.choice([0, 0.1])}"]
        if r.random() < 0.3:
            overrides.append("faults.timeout=1.5")
    # drawn apart, so the draws above stay those the seeds were chosen for
    overrides.append(f"execution={random.Random(-seed).choice(['vmap', 'map'])}")
    return overrides


@pytest.mark.slow
@pytest.mark.parametrize("seed", [14, 16, 33, 36, 38])
def test_a_random_configuration_matches_the_naive_reference(seed):
    overrides = draw(seed)
    with jax.enable_x64(True):
        exp = Experiment(make_config(*SMALL, *overrides))
        rows, failed = [], []
        sim = Simulator(exp.strategy, exp.params, exp.trainer, exp.scheduler(), exp.evaluate, exp.settings, on_updates=rows.extend, on_failures=failed.extend)
        result = sim.run()
        ref_params, ref_log = run_reference(exp.strategy, exp.params, exp.trainer, exp.latency, exp.settings)
    summary = result.summary
    assert summary["versions"] == len(ref_log) > 0, overrides

    # every aggregation: the same clients with the same staleness, in the same order
    by_version: dict[int, list] = {}
    for row in rows:
        by_version.setdefault(row["version"], []).append((row["client"], row["staleness"]))
    assert by_version == {e["version"]: list(zip(e["clients"], e["staleness"])) for e in ref_log}, overrides
    assert summary["client_updates"] == len(rows)

    # failures by the last aggregation (the summary also counts those after it; one at the same
    # moment may come before or after it in dispatch order)
    last = ref_log[-1]
    for kind, count in last["failures"].items():
        before = sum(f["kind"] == kind and f["sim_time"] < last["sim_time"] for f in failed)
        by_then = sum(f["kind"] == kind and f["sim_time"] <= last["sim_time"] for f in failed)
        assert before <= count <= by_then, (kind, overrides)
    assert sum(summary["failures"].values()) == len(failed)
    if "availability" in summary:  # (counted to the end of the run, and a task that will leave when it is dispatched)
        assert summary["availability"]["waits"] >= last["waits"]
        later = summary["in_flight_at_end"] + sum(f["kind"] == "dropout" and f["sim_time"] >= last["sim_time"] for f in failed)
        assert last["left"] <= summary["availability"]["left_mid_task"] <= last["left"] + later

    assert max_abs_diff(result.params, ref_params) < 1e-9, overrides
