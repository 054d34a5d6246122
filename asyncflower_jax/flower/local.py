"""A real Flower federation on this machine: `flower-superlink` and N `flower-supernode` processes on 127.0.0.1.

`LocalFederation` starts the SuperLink and the SuperNodes (node i holds partition i of N) on free
ports, each process in its own session with its own Flower home directory, writes a SuperLink
connection for the `flwr` CLI, submits the app with `flwr run`, waits for the ServerApp's run
directory and, on `stop()` (or leaving the `with` block), ends every process it started and every
process those started (the SuperExec and the ServerApp/ClientApp processes), by process id.

The connection is insecure (plaintext HTTP on the loopback interface), which is what local tests
need; docs/deployment.md shows the TLS flags for a federation across machines. Runtime dependency
installation is off: the processes run in this Python environment, which already has the app's
dependencies (with it on, the SuperLink would try to install them from the network).
scripts/local_federation.py is the command-line launcher.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from ..errors import require
from ..signals import held

CONNECTION = "asyncflower-local"
SUMMARY_FILE = "summary.json"
FAILED_FILE = "failed.json"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, from /proc (None if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), int(fields[19])


def descendants(pid: int) -> set[tuple[int, int]]:
    """(pid, start time) of every live descendant of `pid` (Linux /proc; empty elsewhere)."""
    if not Path("/proc").is_dir():
        return set()
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child[0])
    return out


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    raise ValueError(f"run config value {value!r} must be a bool, int, float or str")


class LocalFederation:
    """See the module docstring. `bin_dir` holds the Flower executables (default: this Python's)."""

    def __init__(self, num_nodes: int, workdir: Path, bin_dir: Path | None = None, startup_timeout: float = 60.0, env: Mapping[str, str] | None = None):
        require(isinstance(num_nodes, int) and num_nodes >= 1, "nodes", num_nodes, "an integer >= 1")
        self.num_nodes = num_nodes
        self.workdir = Path(workdir).resolve()
        self.bin_dir = Path(bin_dir) if bin_dir is not None else Path(sys.executable).parent
        self.startup_timeout = startup_timeout
        self.extra_env = dict(env or {})
        self.port: int | None = None
        self.processes: list[subprocess.Popen] = []
        self._logs: list = []
        self._known: set[tuple[int, int]] = set()  # (pid, start time) of every process seen under ours

    # ---- processes --------------------------------------------------------------------------------
    def _env(self, flwr_home: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"  # the SuperLink starts flower-superexec by name
        env["FLWR_HOME"] = str(flwr_home)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")  # SuperExec looks for new tasks every 0.1 s (Flower's default: 1 s)
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # a local federation reports nothing to flower.ai
        env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")  # nor asks it for a newer release
        return env

    def _spawn(self, name: str, args: list[str], flwr_home: Path) -> subprocess.Popen:
        flwr_home.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "logs" / f"{name}.log", "w")
        self._logs.append(log)
        with held():  # (a Ctrl-C between the start and the record would leave the process running, unknown to stop())
            proc = subprocess.Popen(
                [str(self.bin_dir / args[0]), *args[1:]],
                cwd=self.workdir,
                env=self._env(flwr_home),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() ends it and its children
            )
            self.processes.append(proc)
        return proc

    @property
    def cli_home(self) -> Path:
        """The Flower home of the SuperLink and of the `flwr` CLI (config.toml holds the connection)."""
        return self.workdir / "flwr-home"

    def start(self) -> "LocalFederation":
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        superlink = self._spawn(
            "superlink",
            ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port), "--disable-runtime-dependency-installation"],
            self.cli_home,
        )
        deadline = time.monotonic() + self.startup_timeout
        while not is_listening(self.port):
            if superlink.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the SuperLink did not start listening on 127.0.0.1:{self.port}:\n{self.log_tail('superlink')}")
            time.sleep(0.2)
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        for i in range(self.num_nodes):
            self._spawn(
                f"supernode-{i}",
                [
                    "flower-supernode",
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{self.port}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f"partition-id={i} num-partitions={self.num_nodes}",
                ],
                self.workdir / f"flwr-home-node-{i}",
            )
        self.check_alive()
        return self

    def check_alive(self) -> None:
        """Raise if a process this federation started has exited."""
        self._remember()
        for proc in self.processes:
            if proc.poll() is not None:
                name = Path(self._logs[self.processes.index(proc)].name).stem
                raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{self.log_tail(name)}")

    def _remember(self) -> None:
        for proc in self.processes:
            self._known |= descendants(proc.pid)

    def stop(self, timeout: float = 15.0) -> None:
        """End every process started here and every process under them; idempotent."""
        self._remember()
        for proc in reversed(self.processes):  # the SuperNodes first, the SuperLink last
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)
        # children that live in other sessions (the SuperExec and the apps it runs)
        for pid, started in self._known:
            stat = _proc_stat(pid)
            if stat is not None and stat[1] == started:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and self.alive_descendants():
            time.sleep(0.1)
        for pid, started in self.alive_descendants():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for log in self._logs:
            log.close()

    def alive_descendants(self) -> list[tuple[int, int]]:
        """The processes seen under ours that still run (same pid and start time)."""
        out = []
        for pid, started in self._known:
            stat = _proc_stat(pid)
            if stat is not None and stat[1] == started and not _zombie(pid):
                out.append((pid, started))
        return out

    def __enter__(self) -> "LocalFederation":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- runs ---------------------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the `flwr` CLI against this federation's SuperLink connection."""
        return subprocess.run(
            [str(self.bin_dir / "flwr"), *args],
            cwd=self.workdir,
            env=self._env(self.cli_home),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def submit(self, app_dir: Path, run_config: Mapping | None = None) -> int:
        """`flwr run <app_dir> <connection>` with `run_config` as `-c key=value` overrides; the run id."""
        args = ["run", str(Path(app_dir).resolve()), CONNECTION, "--format", "json"]
        # in one string: Flower merges several --run-config tables shallowly, so a later
        # federation.* entry replaced the earlier ones
        if run_config:
            args += ["--run-config", " ".join(f"{key}={_toml_value(value)}" for key, value in run_config.items())]
        done = self.flwr(*args)
        try:
            payload = json.loads(done.stdout)
        except json.JSONDecodeError:
            payload = {}
        if done.returncode != 0 or not payload.get("success"):
            raise RuntimeError(f"flwr run failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
        self._remember()
        return int(payload["run-id"])

    def run_log(self, run_id: int) -> str:
        """The run's log as the SuperLink keeps it (`flwr log <run id> --show`)."""
        done = self.flwr("log", str(run_id), CONNECTION, "--show", timeout=60)
        return done.stdout + done.stderr

    def wait_for_run_dir(self, run_dir: Path, timeout: float, run_id: int | None = None, since: float | None = None) -> dict:
        """The summary.json the ServerApp writes into `run_dir`; raises if it writes failed.json,
        if a process exits, or after `timeout` seconds (with the logs). With `since` (a time.time()
        before the run was submitted), files older than that are an earlier run's and not waited for."""
        run_dir = Path(run_dir)
        deadline = time.monotonic() + timeout

        def written(name: str) -> bool:
            path = run_dir / name
            return path.is_file() and (since is None or path.stat().st_mtime >= since)

        while time.monotonic() < deadline:
            if written(SUMMARY_FILE):
                return json.loads((run_dir / SUMMARY_FILE).read_text())
            if written(FAILED_FILE):
                failure = json.loads((run_dir / FAILED_FILE).read_text())
                raise RuntimeError(f"the ServerApp failed: {failure.get('error')}: {failure.get('message')}\n{failure.get('traceback', '')}")
            self.check_alive()
            time.sleep(0.5)
        logs = self.run_log(run_id) if run_id is not None else ""
        raise TimeoutError(f"no {SUMMARY_FILE} in {run_dir} after {timeout:g} s\nrun log:\n{logs}\nSuperLink log:\n{self.log_tail('superlink')}")

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.workdir / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


def _zombie(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2 :].split()[0] == "Z"
