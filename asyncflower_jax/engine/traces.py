"""Client speed traces (FedScale-style device profiles): a CSV file, one line per client.

    # comment lines and blank lines are skipped
    client,seconds_per_example,bandwidth
    0,0.0021,1250000
    1,0.0150,250000

`client` runs over 0 .. N-1, each exactly once (N = num_clients); `seconds_per_example` is the
client's compute time per training sample and `bandwidth` its link speed in bytes per unit of
time, both > 0. A task of client c takes examples_c * seconds_per_example_c + 2 * model_bytes /
bandwidth_c (the model is downloaded, trained, uploaded), times lognormal(0, noise_sigma) noise.
A malformed file is rejected with the line number of the first bad line.

Client availability traces (FedScale-style on/off behaviour, `availability=trace`) are a second CSV
file, one line per interval in which a client is available:

    client,start,end
    0,0,8.5
    0,20,31
    1,4.25,inf

A client is available at t when start <= t < end for one of its lines. Every client 0 .. N-1 needs
at least one line; `start` is finite and `end` > start (`inf`: available from start on). A client's
lines come in time order (lines of different clients may interleave): an interval never starts
before the previous one of the same client ends, and one that starts exactly where the previous
one ends continues it (the two are merged). Anything else is rejected with the line number of the
first bad line.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np

from ..errors import ConfigError, require
from .latency import LatencyModel, NeedsWork, task_sigma

TRACE_COLUMNS = ("client", "seconds_per_example", "bandwidth")


def _text_lines(path: Path, key: str):
    """(line number, line) of a text file, lines ended by \\n, \\r\\n or \\r (as text mode reads them; a
    byte-order mark is dropped); ConfigError naming `key` and the line where it is not UTF-8 text
    (a binary file gave a UnicodeDecodeError traceback)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = data[: exc.start].decode("utf-8-sig", errors="replace")
        line = len(io.StringIO(before, newline=None).readlines()) + (not before or before.endswith(("\n", "\r")))
        raise ConfigError(
            f"{key}={str(path)!r} is invalid: line {line} is not UTF-8 text ({exc.reason}); a trace is a comma-separated text file"
        ) from None
    yield from enumerate(io.StringIO(text, newline=None), start=1)


def csv_rows(path: Path, key: str, columns: tuple[str, ...], what: str, per: str, num_clients: int):
    """(line number, line, client, value, value) of every data line of a comma-separated trace file
    whose header must be `columns` (a client id in [0, num_clients), then two numbers; blank lines and
    # comments skipped); ConfigError naming `key` or the line."""
    if not path.is_file():
        raise ConfigError(f"{key}={str(path)!r} is invalid: " + ("a directory, not a file" if path.is_dir() else "no such file"))
    header = None
    for number, raw in _text_lines(path, key):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [v.strip() for v in line.split(",")]
        if header is None:
            if tuple(fields) != columns:
                raise ConfigError(f"{path}:{number}: the header must be {','.join(columns)}, not {line!r}")
            header = fields
            continue
        if len(fields) != len(columns):
            raise ConfigError(f"{path}:{number}: expected {len(columns)} comma-separated values ({','.join(columns)}), got {len(fields)}: {line!r}")
        try:
            client, first, second = int(fields[0]), float(fields[1]), float(fields[2])
        except ValueError:
            raise ConfigError(f"{path}:{number}: not numbers: {line!r}") from None
        if not 0 <= client < num_clients:
            raise ConfigError(f"{path}:{number}: client {client} is out of range: num_clients={num_clients} allows 0..{num_clients - 1}")
        yield number, line, client, first, second
    if header is None:
        raise ConfigError(f"{path}: empty {what}: expected the header {','.join(columns)} and one line per {per}")


def load_trace(path: str | Path, num_clients: int) -> tuple[np.ndarray, np.ndarray]:
    """(seconds_per_example [N], bandwidth [N]) from a trace file; ConfigError on any defect."""
    spe = np.full(num_clients, np.nan)
    bw = np.full(num_clients, np.nan)
    seen_line = np.zeros(num_clients, np.int64)
    path = Path(path).expanduser()
    for number, line, client, speed, bandwidth in csv_rows(path, "latency.path", TRACE_COLUMNS, "trace", "client", num_clients):
        if seen_line[client]:
            raise ConfigError(f"{path}:{number}: client {client} appears again (first on line {seen_line[client]})")
        if not (np.isfinite(speed) and speed > 0 and np.isfinite(bandwidth) and bandwidth > 0):
            raise ConfigError(f"{path}:{number}: seconds_per_example and bandwidth must be finite and > 0: {line!r}")
        seen_line[client] = number
        spe[client], bw[client] = speed, bandwidth
    missing = np.flatnonzero(seen_line == 0)
    if len(missing):
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise ConfigError(f"{path}: {len(missing)} of the {num_clients} clients have no line (clients {shown}); every client 0..{num_clients - 1} needs one")
    return spe, bw


@dataclasses.dataclass(frozen=True)
class Trace(NeedsWork, LatencyModel):
    """Per-client speed and bandwidth from a trace file (format in this module's docstring)."""

    path: str = ""
    noise_sigma: float = 0.0
    examples: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    model_bytes: float | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        require(isinstance(self.path, str) and self.path != "", "latency.path", self.path, "the path of a trace file")
        task_sigma("noise_sigma", self.noise_sigma)

    def bind(self, examples_per_task, model_bytes):
        load_trace(self.path, len(examples_per_task))  # a bad file stops the run before it starts
        return super().bind(examples_per_task, model_bytes)

    def client_profile(self, rng, num_clients):
        examples, model_bytes = self._bound()
        spe, bandwidth = load_trace(self.path, num_clients)
        with np.errstate(over="ignore"):  # (an infinite profile is refused by check_profile, naming the trace)
            return examples * spe + 2.0 * model_bytes / bandwidth


AVAILABILITY_COLUMNS = ("client", "start", "end")


def load_availability_trace(path: str | Path, num_clients: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, offsets) from an availability trace: client c's intervals are
    starts[offsets[c]:offsets[c + 1]] (and ends), in time order; ConfigError on any defect."""
    clients: list[int] = []
    starts: list[float] = []
    ends: list[float] = []
    last_row = np.full(num_clients, -1, np.int64)  # per client: its latest interval's row in the lists
    last_line = np.zeros(num_clients, np.int64)
    path = Path(path).expanduser()
    for number, line, client, start, end in csv_rows(path, "availability.path", AVAILABILITY_COLUMNS, "availability trace", "interval", num_clients):
        if not np.isfinite(start) or np.isnan(end):
            raise ConfigError(f"{path}:{number}: start must be a finite number and end a number or inf: {line!r}")
        if not end > start:
            raise ConfigError(f"{path}:{number}: end must be > start (an interval [start, end) of availability): {line!r}")
        row = last_row[client]
        if row >= 0:
            previous = f"its interval [{starts[row]}, {ends[row]}) on line {last_line[client]}"
            if start < starts[row]:
                raise ConfigError(
                    f"{path}:{number}: client {client}'s intervals are not in time order: [{start}, {end}) starts before {previous}"
                )
            if start < ends[row]:
                raise ConfigError(f"{path}:{number}: client {client}'s interval [{start}, {end}) overlaps {previous}")
            if start == ends[row]:  # continues the previous interval
                ends[row] = end
                last_line[client] = number
                continue
        last_row[client] = len(clients)
        last_line[client] = number
        clients.append(client)
        starts.append(start)
        ends.append(end)
    missing = np.flatnonzero(last_row < 0)
    if len(missing):
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise ConfigError(
            f"{path}: {len(missing)} of the {num_clients} clients have no interval (clients {shown}); every client 0..{num_clients - 1} "
            "needs at least one line"
        )
    client_ids = np.asarray(clients, np.int64)
    order = np.argsort(client_ids, kind="stable")  # each client's intervals stay in their (time) order
    offsets = np.zeros(num_clients + 1, np.int64)
    np.cumsum(np.bincount(client_ids, minlength=num_clients), out=offsets[1:])
    return np.asarray(starts, np.float64)[order], np.asarray(ends, np.float64)[order], offsets
