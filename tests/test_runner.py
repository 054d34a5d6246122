"""runner.run_job's checks of the command line before a run is built."""

import pytest

from asyncflower_jax.errors import ConfigError
from asyncflower_jax.runner import refuse_steps_beside_epochs, run_job
from tests.conftest import make_config


@pytest.mark.parametrize("given", ["client.num_steps=10", "+client.num_steps=10", "++client.num_steps=10"])
def test_num_steps_given_beside_epochs_is_refused_even_at_its_default(tmp_path, given):
    """num_steps=10 is the default, so the training settings cannot see it was given; the command line can."""
    started = []
    with pytest.raises(ConfigError, match=r"client.num_steps=10 is invalid: must be left out with client.epochs=2, which decides the steps"):
        run_job(make_config("client.epochs=2", "client.num_steps=10"), tmp_path / "run", ["client.epochs=2", given], before_start=lambda: started.append(1))
    assert started == []  # refused before JAX or the experiment


def test_num_steps_alone_or_epochs_alone_pass():
    refuse_steps_beside_epochs(make_config("client.num_steps=10"), ["client.num_steps=10"])
    refuse_steps_beside_epochs(make_config("client.epochs=2"), ["client.epochs=2", "client.batch_size=10"])
    refuse_steps_beside_epochs(make_config("client.epochs=2", "~client.num_steps"), ["client.epochs=2", "~client.num_steps"])  # (deleted: not given)
    # a preset's epochs (task=synthetic_logreg sets 20) with num_steps from the command line
    with pytest.raises(ConfigError, match=r"client.num_steps=10 is invalid: .* with client.epochs=20"):
        refuse_steps_beside_epochs(make_config("task=synthetic_logreg", "client.num_steps=10"), ["task=synthetic_logreg", "client.num_steps=10"])
