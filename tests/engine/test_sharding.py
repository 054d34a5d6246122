"""Training sharded over several devices gives the one-device results.

XLA_FLAGS=--xla_force_host_platform_device_count=4 makes the CPU show four devices; it must be
set before JAX starts, so each check runs in a fresh Python process.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import compilation_cache_env

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    import numpy as np
    from asyncflower_jax.engine.reference import run_reference
    from asyncflower_jax.engine.simulator import Simulator
    from asyncflower_jax.experiment import Experiment
    from tests.conftest import make_config
    import asyncflower_jax.client.batched as batched

    batched.CPU_SPLIT_FLOPS = 0  # these small models' batches are shared out too
    assert len(jax.devices()) == 4, jax.devices()
    jax.config.update("jax_enable_x64", True)
    SMALL = ["num_clients=40", "concurrency=8", "eval_every=5", "client.num_steps=3", "client.batch_size=8",
             "model.hidden=[32]", "precision=float64", "latency=lognormal", "max_updates=null", "max_versions=25"]

    def leaves(tree):
        return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]

    def run(*overrides):
        exp = Experiment(make_config(*SMALL, *overrides))
        sim = Simulator(exp.strategy, exp.params, exp.trainer, exp.scheduler(), exp.evaluate, exp.settings)
        result = sim.run()
        placed = {d.id for leaf in jax.tree.leaves(result.params) for d in leaf.devices()}
        exp.step_programs = sim._step._cache_size() + sim._steps._cache_size()  # (compiled variants of the aggregation step, one at a time or queued)
        return exp, result, placed

    out = {}
    # each rule with one of the two executions: both executions and both kinds of rounds are
    # sharded; a relaxed run (lookahead), against the reference under the same rule; and results
    # made non-finite (their flags computed on the device that trained them) rejected alike
    cases = ((["strategy=fedasync"], "vmap", ""), (["strategy=fedbuff", "strategy.buffer_size=3"], "map", ""),
             (["strategy=fedasync", "lookahead=4"], "vmap", "/relaxed"), (["strategy=fedasync", "faults.nan=0.1"], "map", "/nan"))
    for rule, execution, tag in cases:
        name = rule[0].split("=")[1] + "/" + execution + tag
        one_exp, one, _ = run(*rule, f"execution={execution}", "devices=1")
        four_exp, four, placed = run(*rule, f"execution={execution}", "devices=4", "chunk_size=8")
        ref, _ = run_reference(one_exp.strategy, one_exp.params, one_exp.trainer, one_exp.latency, one_exp.settings)
        out[name] = {
            "devices": [one_exp.trainer.num_devices, four_exp.trainer.num_devices],
            "mean_train_batch": four.summary["mean_train_batch"],
            "params_vs_one_device": max(float(np.max(np.abs(a - b))) for a, b in zip(leaves(four.params), leaves(one.params))),
            "params_vs_reference": max(float(np.max(np.abs(a - b))) for a, b in zip(leaves(four.params), leaves(ref))),
            "accuracy": [[r["test_accuracy"] for r in one.history], [r["test_accuracy"] for r in four.history]],
            "result_devices": sorted(placed),
            "split_batches": four_exp.trainer.split_batches,
            "step_programs": [one_exp.step_programs, four_exp.step_programs],
            "nonfinite": [one.summary["failures"]["nonfinite"], four.summary["failures"]["nonfinite"]],
        }
    print("RESULT " + json.dumps(out))
    """
)


def run_on_four_devices(script: str, *args: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **compilation_cache_env()}
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.mark.slow
def test_four_devices_equal_one_device_and_the_reference():
    out = run_on_four_devices(SCRIPT)
    assert set(out) == {"fedasync/vmap", "fedbuff/map", "fedasync/vmap/relaxed", "fedasync/map/nan"}
    for name, r in out.items():
        assert r["devices"] == [1, 4], name
        assert r["mean_train_batch"] > 1, name
        assert r["params_vs_one_device"] < 1e-9, (name, r)
        assert r["params_vs_reference"] < 1e-9, (name, r)
        assert r["accuracy"][0] == pytest.approx(r["accuracy"][1], abs=1e-12), name
        assert r["result_devices"] == [0], name  # the model stays on the first device
        assert r["split_batches"] > 0, name  # batches were shared out among the devices
        # results coming back from the other devices are committed to the first, and so is
        # everything there from the start: no program compiles twice for the two kinds of arrays
        assert r["step_programs"] == [1, 1], (name, r)
        assert r["nonfinite"][0] == r["nonfinite"][1] and (r["nonfinite"][0] > 0) == name.endswith("/nan"), (name, r)


RESUME_SCRIPT = textwrap.dedent(
    """
    import csv, json, os, signal, sys
    from pathlib import Path
    import jax
    from asyncflower_jax import experiment
    from asyncflower_jax.errors import Interrupted
    from asyncflower_jax.runner import run_job
    from tests.conftest import make_config
    import asyncflower_jax.client.batched as batched

    batched.CPU_SPLIT_FLOPS = 0  # this small model's batches are shared out too
    assert len(jax.devices()) == 4, jax.devices()
    ARGS = ["num_clients=30", "concurrency=8", "max_updates=40", "client.num_steps=2", "model.hidden=[16]", "eval_every=5",
            "latency=lognormal", "precision=float64", "checkpoint_every=0", "progress=false"]
    run_dir = Path(sys.argv[1])
    experiment._crash_hook = lambda: (lambda v: os.kill(os.getpid(), signal.SIGTERM) if v == 12 else None)
    try:
        run_job(make_config(*ARGS, "devices=4"), run_dir)
    except Interrupted:
        pass
    experiment._crash_hook = lambda: None
    resumed = run_job(make_config(*ARGS, "devices=2", "resume=true"), run_dir, ["devices=2", "resume=true"])
    full = experiment.Experiment(make_config(*ARGS, "devices=1")).run(None)
    print("RESULT " + json.dumps({
        "resumed_from": resumed["resumed_from_version"],
        "devices": [resumed["training_devices"], full.summary["training_devices"]],
        "versions": [resumed["versions"], full.summary["versions"]],
        "loss": [[float(r["test_loss"]) for r in csv.DictReader(open(run_dir / "metrics.csv"))], [r["test_loss"] for r in full.history]],
    }))
    """
)


@pytest.mark.slow
def test_a_run_checkpointed_on_four_devices_resumes_on_two_and_ends_as_on_one(tmp_path):
    """A run stopped on a machine with four devices continues on one with two (devices is an
    execution setting a resume may change): in float64 its metrics equal a one-device run's."""
    out = run_on_four_devices(RESUME_SCRIPT, str(tmp_path / "run"))
    assert out["resumed_from"] == 13 and out["versions"] == [40, 40] and out["devices"] == [2, 1]
    assert len(out["loss"][0]) == len(out["loss"][1]) > 5
    np.testing.assert_allclose(out["loss"][0], out["loss"][1], rtol=0, atol=1e-9)


TRAINER_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from asyncflower_jax.client.batched import BatchedTrainer
    from asyncflower_jax.client.local_train import LocalTraining, make_local_train
    from asyncflower_jax.data.store import ClientStore
    from asyncflower_jax.client import batched
    from asyncflower_jax.client.sharding import select_devices
    from asyncflower_jax.memory import physical_bytes

    batched.CPU_SPLIT_FLOPS = 0  # this linear model's batches are shared out too
    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(48, 3)), rng.integers(0, 4, 48).astype(np.int32)
    store = ClientStore.from_partition(x, y, [np.arange(i * 8, (i + 1) * 8) for i in range(6)], dtype=jnp.float64)
    linear = lambda p, xb: xb @ p["w"] + p["b"]
    train = make_local_train(linear, LocalTraining(num_steps=4, batch_size=3, learning_rate=0.2))
    versions = [{"w": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=4))} for _ in range(3)]
    version_idx = np.array([0, 2, 1, 2, 0, 1, 1, 2, 0, 0, 1])
    clients = np.array([4, 0, 1, 3, 2, 5, 0, 1, 1, 3, 2])
    ids = np.arange(20, 31)
    out = {}
    for execution in ("vmap", "map", "auto"):
        trainer = BatchedTrainer(train, store, jax.random.key(3), chunk_size=4, execution=execution, devices=4)
        worst = {}
        for name, n in (("shared", 11), ("first device only", 7)):  # 11: shares of 2, 3, 3 and 3 clients; 7: under 2 per device
            chunks = trainer.train(versions, version_idx[:n], clients[:n], ids[:n])
            rows = [jax.tree.map(lambda leaf: leaf[r], c.params) for c in chunks for r in range(c.n)]
            worst[name] = 0.0
            for i in range(n):
                alone, _ = trainer.train_one(versions[version_idx[i]], int(clients[i]), int(ids[i]))
                worst[name] = max(worst[name], max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(rows[i]), jax.tree.leaves(alone))))
        out[execution] = {"chunks": trainer.chunks(11), "max_diff": worst, "devices": sorted({d.id for c in chunks for d in c.loss.devices()}),
                          "split_batches": trainer.split_batches}
    # CPU devices share the machine's memory: null takes as many as hold a copy of the data each in a quarter of it
    out["selected"] = [len(select_devices(None, replica_bytes=b)) for b in (0, physical_bytes() // 8, physical_bytes() // 4, physical_bytes())]
    print("RESULT " + json.dumps(out))
    """
)


def test_a_batch_shared_out_among_devices_equals_one_at_a_time():
    out = run_on_four_devices(TRAINER_SCRIPT)
    # each share's last chunk padded to a power of two; under map (auto on the CPU) to at least 8
    # rows, capped at the chunk size (padding costs map no training)
    assert out["vmap"]["chunks"] == [[0, 2, 2], [1, 3, 4], [2, 3, 4], [3, 3, 4]]
    assert out["map"]["chunks"] == out["auto"]["chunks"] == [[0, 2, 4], [1, 3, 4], [2, 3, 4], [3, 3, 4]]
    for execution in ("vmap", "map", "auto"):
        r = out[execution]
        assert r["max_diff"]["shared"] < 1e-12 and r["max_diff"]["first device only"] < 1e-12, (execution, r)
        assert r["devices"] == [0]  # every result comes back to the first device
        assert r["split_batches"] == 1  # the batch of 11, not the batch of 7
    assert out["selected"] == [4, 2, 1, 1]


MULTIHOST_SCRIPT = textwrap.dedent(
    """
    import json, sys
    process_id, port = int(sys.argv[1]), sys.argv[2]
    from asyncflower_jax import distributed
    if process_id >= 0:
        assert distributed.initialize({"coordinator_address": f"127.0.0.1:{port}", "num_processes": 2, "process_id": process_id})
    import jax
    import numpy as np
    from asyncflower_jax.engine.simulator import Simulator
    from asyncflower_jax.experiment import Experiment
    from tests.conftest import make_config

    jax.config.update("jax_enable_x64", True)
    overrides = ["num_clients=40", "concurrency=8", "eval_every=5", "client.num_steps=3", "client.batch_size=8", "model.hidden=[32]",
                 "precision=float64", "latency=lognormal", "max_updates=null", "max_versions=20", "strategy=fedbuff", "strategy.buffer_size=3"]
    exp = Experiment(make_config(*overrides))
    result = Simulator(exp.strategy, exp.params, exp.trainer, exp.scheduler(), exp.evaluate, exp.settings).run()
    print("RESULT " + json.dumps({
        "process": jax.process_index(), "processes": jax.process_count(), "devices": exp.trainer.num_devices,
        "leaves": [np.asarray(leaf).ravel()[:50].tolist() for leaf in jax.tree.leaves(result.params)],
        "accuracy": [r["test_accuracy"] for r in result.history], "mean_train_batch": result.summary["mean_train_batch"],
    }))
    """
)


@pytest.mark.slow
def test_two_processes_train_together_and_equal_one_process():
    """Multi-host on one machine: two processes joined by jax.distributed (gloo on CPU), each with one
    device; every chunk of clients is split between them, and both get the one-process result."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **compilation_cache_env()}
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen([sys.executable, "-c", MULTIHOST_SCRIPT, str(i), port], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in (0, 1, -1)  # -1: a plain single-process run
    ]
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-4000:]
        outs.append(json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[len("RESULT ") :]))
    first, second, single = outs
    assert (first["process"], second["process"]) == (0, 1)
    assert first["processes"] == second["processes"] == 2 and single["processes"] == 1
    assert first["devices"] == second["devices"] == 2 and single["devices"] == 1
    assert first["mean_train_batch"] > 1
    for out in (first, second):
        for a, b in zip(out["leaves"], single["leaves"]):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
        assert out["accuracy"] == single["accuracy"]


def test_distributed_settings_are_checked_before_starting_anything():
    from asyncflower_jax import distributed
    from asyncflower_jax.errors import ConfigError

    assert distributed.initialize(None) is False
    assert distributed.initialize(False) is False
    with pytest.raises(ConfigError, match="unknown: \\['hosts'\\]"):
        distributed.initialize({"hosts": 2})
    with pytest.raises(ConfigError, match="distributed=3 is invalid: must be false, true, or a mapping of"):
        distributed.initialize(3)
    with pytest.raises(ConfigError, match="distributed='maybe' is invalid"):
        distributed.initialize("maybe")
    good = {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
    assert distributed.check_mapping(good) == good
    for bad, message in (
        ({"num_processes": 2}, r"sets coordinator_address, num_processes and process_id \(missing: \['coordinator_address', 'process_id'\]\)"),
        ({**good, "num_processes": "abc"}, "distributed.num_processes='abc' is invalid: must be an integer >= 1"),
        ({**good, "process_id": 2}, r"distributed.process_id=2 is invalid: must be an integer in \[0, num_processes=2\)"),
        ({**good, "coordinator_address": "localhost"}, "distributed.coordinator_address='localhost' is invalid: must be a string host:port"),
        ({**good, "local_device_ids": "0"}, "distributed.local_device_ids='0' is invalid"),
    ):
        with pytest.raises(ConfigError, match=message):
            distributed.initialize(bad)  # (refused before JAX starts anything)
    assert distributed.is_writer()  # a single process writes its run directory


def test_cpu_cores_become_devices_before_jax_starts_unless_set_already():
    script = textwrap.dedent(
        """
        import json, os, sys
        import jax
        from asyncflower_jax.client.sharding import expose_cpu_cores
        asked = json.loads(sys.argv[1])
        out = {"set": expose_cpu_cores(asked), "devices": len(jax.devices())}
        out["after_start"] = expose_cpu_cores(asked)  # JAX has started: nothing changes
        print("RESULT " + json.dumps(out))
        """
    )

    def run(asked, xla_flags=None) -> dict:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
        env.pop("XLA_FLAGS", None)
        if xla_flags:
            env["XLA_FLAGS"] = xla_flags
        proc = subprocess.run([sys.executable, "-c", script, json.dumps(asked)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])

    from asyncflower_jax.client.sharding import usable_cores

    cores = usable_cores()
    assert run(cores + 1) == {"set": cores + 1, "devices": cores + 1, "after_start": None}  # more than the cores, if asked
    every_core = {"set": cores, "devices": cores, "after_start": None} if cores > 1 else {"set": None, "devices": 1, "after_start": None}
    assert run(None) == every_core
    assert run(1) == every_core  # a run asking for one trains on the first: a later job of its sweep may ask for more
    assert run("two") == {"set": None, "devices": 1, "after_start": None}  # (the configuration check reports it)
    assert run(3, "--xla_force_host_platform_device_count=2") == {"set": None, "devices": 2, "after_start": None}  # the user's setting stays


def test_more_devices_than_cores_are_made_with_a_warning():
    """`devices` above the cores is deliberate (virtual CPU devices test sharding on a small machine),
    but it trains no faster: run.py's expose_cpu_cores says so."""
    from asyncflower_jax.client.sharding import usable_cores

    script = "import logging, jax\nfrom asyncflower_jax.client.sharding import expose_cpu_cores\nprint(expose_cpu_cores(%d), len(jax.devices()))" % (usable_cores() + 1)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == [str(usable_cores() + 1)] * 2
    assert f"made {usable_cores() + 1} virtual CPU devices for {usable_cores()} usable cores" in proc.stderr
