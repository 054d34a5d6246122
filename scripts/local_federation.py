#!/usr/bin/env python
"""Run the project in a real Flower federation on this machine: a SuperLink and N SuperNodes on 127.0.0.1.

    python scripts/local_federation.py --nodes 3 -c strategy=fedbuff -c 'overrides="strategy.buffer_size=2"'
    python scripts/local_federation.py --nodes 3 --serve      # start the federation and keep it up

Each SuperNode holds partition i of N of the dataset (`--node-config "partition-id=i num-partitions=N"`);
the run config's `num_clients` is set to N. Without --serve the app in this checkout is submitted with
`flwr run`, the script waits for the ServerApp's summary.json, prints it and stops every process it
started. With --serve it prints the SuperLink connection and waits for Ctrl-C; submit runs yourself with
`FLWR_HOME=<workdir>/flwr-home flwr run . asyncflower-local`. The connection is insecure (plaintext, loopback
only); docs/deployment.md shows how to run with TLS across machines.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asyncflower_jax.errors import ConfigError  # noqa: E402
from asyncflower_jax.experiment import Experiment  # noqa: E402
from asyncflower_jax.flower.local import CONNECTION, LocalFederation  # noqa: E402
from asyncflower_jax.flower.loop import FederationSettings  # noqa: E402
from asyncflower_jax.flower.run_config import compose_config, federation_settings  # noqa: E402
from asyncflower_jax.results.rundir import run_files  # noqa: E402


def parse_value(text: str):
    """A run config value from the command line: TOML-like (true/false, numbers, "quoted strings"), else a string."""
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def declared_run_config() -> dict:
    """The run config pyproject.toml declares, with its defaults (`flwr run -c` accepts only those
    keys, and applies those defaults under the -c entries)."""
    import tomllib

    return dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])


def positive_seconds(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is invalid: must be > 0")
    return value


def check_run_config(run_config: dict) -> str | None:
    """Why the ServerApp would refuse `run_config`, or None: checked here, before a federation is
    started for it (that failure came after the start-up, as nested tracebacks)."""
    declared = declared_run_config()
    keys = list(declared)
    unknown = [k for k in run_config if k not in keys]
    if unknown:
        return (
            f"--run-config {unknown[0]} is invalid: must be one of the keys pyproject.toml declares {keys}; "
            f"set other keys through overrides, e.g. -c 'overrides=\"{unknown[0]}=...\"'"
        )
    full = {**declared, **run_config}
    try:
        exp = Experiment(compose_config(full))  # (what the ServerApp builds first, from what flwr run sends it)
        deployment = federation_settings(full)
        FederationSettings.from_simulation(exp.settings, **deployment)
    except ConfigError as exc:
        return f"--run-config is invalid: {exc}"
    return None


def _terminate(signum, frame):
    """SIGTERM (`kill`, `timeout`, a scheduler) ends the launcher as Ctrl-C does: every process it
    started is stopped on the way out."""
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3, help="number of SuperNodes = partitions = num_clients (default 3)")
    parser.add_argument("-c", "--run-config", action="append", default=[], metavar="KEY=VALUE", help="a run config entry (repeatable)")
    parser.add_argument("--workdir", type=Path, default=None, help="logs, Flower homes and the run directory (default: a new temporary directory)")
    parser.add_argument("--timeout", type=positive_seconds, default=1800.0, help="seconds to wait for the run to finish (default 1800)")
    parser.add_argument("--serve", action="store_true", help="only start the federation and keep it running until Ctrl-C")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error(f"--nodes={args.nodes} is invalid: must be an integer >= 1")
    run_config = {"num_clients": args.nodes}
    for entry in args.run_config:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            parser.error(f"--run-config {entry!r} is invalid: must be KEY=VALUE")
        run_config[key] = parse_value(value)
    if args.workdir is not None and args.workdir.exists() and not args.workdir.is_dir():
        parser.error(f"--workdir {args.workdir} is a file: must be a directory (made if missing)")
    if run_config["num_clients"] != args.nodes:
        parser.error(
            f"--run-config num_clients={run_config['num_clients']!r} is invalid: must be --nodes ({args.nodes}): each SuperNode holds "
            "one client's partition"
        )
    run_config.setdefault("concurrency", args.nodes)
    if not args.serve and (problem := check_run_config({"federation.run_dir": "", **run_config})):
        parser.error(problem)
    named = run_config.get("federation.run_dir") or (args.workdir / "run" if args.workdir is not None else None)
    if not args.serve and named and (present := run_files(Path(named))):  # (the ServerApp would refuse it, silently)
        parser.error(f"the run directory {named} already holds a run ({', '.join(present)}): pass another --workdir (or federation.run_dir)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="asyncflower-federation-"))  # only once the arguments are valid
    run_config.setdefault("federation.run_dir", str(workdir / "run"))

    signal.signal(signal.SIGTERM, _terminate)
    try:
        return _launch(args, workdir, run_config)
    except KeyboardInterrupt:
        print("stopped (Ctrl-C); every process this launcher started was stopped", file=sys.stderr)
        return 130


def _launch(args, workdir: Path, run_config: dict) -> int:
    with LocalFederation(args.nodes, workdir) as fed:
        print(f"SuperLink on 127.0.0.1:{fed.port}, {args.nodes} SuperNodes; logs in {workdir / 'logs'}", flush=True)
        if args.serve:
            print(f"submit runs with: FLWR_HOME={fed.cli_home} {fed.bin_dir / 'flwr'} run {ROOT} {CONNECTION}  (Ctrl-C stops)", flush=True)
            try:
                while True:
                    fed.check_alive()
                    time.sleep(1.0)
            except KeyboardInterrupt:
                return 0
        submitted = time.time()
        run_id = fed.submit(ROOT, run_config)
        print(f"run {run_id} started; results in {run_config['federation.run_dir']}", flush=True)
        summary = fed.wait_for_run_dir(Path(run_config["federation.run_dir"]), args.timeout, run_id, since=submitted)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
