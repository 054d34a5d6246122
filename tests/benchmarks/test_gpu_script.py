"""benchmarks/gpu.sh: every step's command line is one its benchmark accepts, and the steps' time
limits fit the script's budget. A GPU machine is at hand rarely and briefly: a renamed option
found there costs the run."""

import argparse
import importlib
import shlex
from pathlib import Path

import pytest

GPU_SH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.sh"
BUDGET_S = 8 * 60  # "within about 8 minutes": the steps' limits (the checks and the summary take seconds)


def steps() -> list[tuple[str, int, str, list[str]]]:
    """(name, limit in seconds, script, arguments) of each `step` line, continuations joined."""
    found = []
    for line in GPU_SH.read_text().replace("\\\n", " ").splitlines():
        if line.startswith("step "):
            name, limit, python, script, *args = shlex.split(line, comments=True)[1:]
            assert python == "$PY", line
            found.append((name, int(limit), script, args))
    return found


class Checked(Exception):
    """Raised in place of measuring: every benchmark reads the machine once its options passed."""


def test_the_script_has_its_steps_and_they_fit_its_budget():
    names = [name for name, *_ in steps()]
    assert names == ["throughput", "host_loop", "vectorization", "overhead", "scale"]
    assert sum(limit for _, limit, *_ in steps()) <= BUDGET_S
    assert 'benchmarks/summarize.py "$OUT"' in GPU_SH.read_text()


@pytest.mark.parametrize("name,script,args", [(name, script, args) for name, _, script, args in steps()], ids=[s[0] for s in steps()])
def test_each_steps_command_line_is_accepted_by_its_benchmark(name, script, args, tmp_path, monkeypatch):
    """Its options parsed and checked against each other (vectorization's variant names depend on
    the sizes: `vmap-chunk-64` exists at full sizes only), up to where it would start measuring."""
    from benchmarks import common

    parse_args, parsed = argparse.ArgumentParser.parse_args, []

    def recorded(parser, argv=None, namespace=None):
        parsed.append(parse_args(parser, argv, namespace))
        return parsed[-1]

    def stop():
        raise Checked

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", recorded)
    monkeypatch.setattr(common, "machine", stop)
    module = importlib.import_module(f"benchmarks.{Path(script).stem}")
    assert script == f"benchmarks/{name}.py"
    with pytest.raises(Checked):  # (an option it refuses: SystemExit(2) from argparse)
        module.main([str(tmp_path) if a == "$OUT" else a for a in args])
    assert Path(parsed[-1].out) == tmp_path
