"""docs/strategies.md's worked example runs as written: the rule file and its yaml are written to a
temporary package and config directory, then the doc's own hand-computed and exactness tests run."""

import re
import sys
from pathlib import Path

import pytest

from tests.conftest import make_config as compose_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "strategies.md"


def blocks(language: str, marker: str) -> dict[str, str]:
    """{name: code} for the doc's ```language blocks whose first line is `# <marker>: <name>`."""
    found = {}
    for block in re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S):
        first = block.splitlines()[0]
        if first.startswith(f"# {marker}: "):
            found[first[len(f"# {marker}: ") :].strip()] = block
    return found


@pytest.fixture
def doc_rule(tmp_path, monkeypatch):
    """The doc's rule importable as my_rules.momentum_buffer, its yaml in a config directory;
    returns make_config with that directory on Hydra's search path."""
    files = {**blocks("python", "file"), **blocks("yaml", "file")}
    assert set(files) == {"my_rules/momentum_buffer.py", "strategy/momentum_buffer.yaml"}
    package = tmp_path / "my_rules"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "momentum_buffer.py").write_text(files["my_rules/momentum_buffer.py"])
    conf = tmp_path / "conf" / "strategy"
    conf.mkdir(parents=True)
    (conf / "momentum_buffer.yaml").write_text(files["strategy/momentum_buffer.yaml"])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rules", raising=False)
    monkeypatch.delitem(sys.modules, "my_rules.momentum_buffer", raising=False)
    return lambda *overrides: compose_config(*overrides, f"hydra.searchpath=[file://{tmp_path / 'conf'}]")


def test_hand_computed_example(doc_rule):
    exec(blocks("python", "test")["hand-computed"], {})


def test_exactness_example(doc_rule):
    code = blocks("python", "test")["exactness"]
    assert "from tests.conftest import make_config" in code  # (the reader's import; here a make_config that knows the doc's rule)
    exec(re.sub(r"(?m)^from tests\.conftest import make_config.*$", "", code), {"make_config": doc_rule})


def test_yaml_builds_the_rule_and_bad_values_name_the_key(doc_rule):
    from asyncflower_jax.errors import ConfigError
    from asyncflower_jax.experiment import Experiment

    exp = Experiment(doc_rule("strategy=momentum_buffer", "strategy.beta=0.7", "max_updates=20"))
    assert type(exp.strategy).__name__ == "MomentumBuffer" and exp.strategy.beta == 0.7
    with pytest.raises(ConfigError, match=r"strategy\.beta=1\.5 is invalid"):
        Experiment(doc_rule("strategy=momentum_buffer", "strategy.beta=1.5"))
