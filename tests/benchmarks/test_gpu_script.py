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


class Parsed(Exception):
    """Raised in place of running the benchmark, once its arguments are parsed."""


def test_the_script_has_its_steps_and_they_fit_its_budget():
    names = [name for name, *_ in steps()]
    assert names == ["throughput", "host_loop", "vectorization", "overhead", "scale"]
    assert sum(limit for _, limit, *_ in steps()) <= BUDGET_S
    assert 'benchmarks/summarize.py "$OUT"' in GPU_SH.read_text()


@pytest.mark.parametrize("name,script,args", [(name, script, args) for name, _, script, args in steps()], ids=[s[0] for s in steps()])
def test_each_steps_command_line_is_accepted_by_its_benchmark(name, script, args, tmp_path, monkeypatch):
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, argv=None, namespace=None):
        raise Parsed(parse_args(parser, argv, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    module = importlib.import_module(f"benchmarks.{Path(script).stem}")
    assert script == f"benchmarks/{name}.py"
    with pytest.raises(Parsed) as parsed:  # (an option it does not know: SystemExit(2) from argparse)
        module.main([str(tmp_path) if a == "$OUT" else a for a in args])
    assert Path(parsed.value.args[0].out) == tmp_path
