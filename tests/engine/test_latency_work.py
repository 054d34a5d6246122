"""Uniform latency, durations proportional to local work and model size, and trace files."""

import numpy as np
import pytest

from asyncflower_jax.engine.latency import Uniform, WorkProportional
from asyncflower_jax.engine.traces import Trace, load_trace
from asyncflower_jax.errors import ConfigError


def test_uniform_range_and_mean():
    model = Uniform(low=0.5, high=2.5)
    rng = np.random.default_rng(0)
    profile = model.client_profile(rng, 3)
    np.testing.assert_array_equal(profile, np.ones(3))  # client_sigma 0: every client alike
    d = model.sample(rng, np.ones(200_000))
    assert d.min() >= 0.5 and d.max() <= 2.5
    assert d.mean() == pytest.approx(1.5, rel=0.01)
    spread = Uniform(low=1.0, high=1.0, client_sigma=0.5)
    prof = spread.client_profile(np.random.default_rng(1), 4)
    np.testing.assert_allclose(spread.sample(rng, prof), prof)  # low == high: the client factor alone
    with pytest.raises(ConfigError, match="latency.high=0.2 is invalid"):
        Uniform(low=0.5, high=0.2)


def test_work_proportional_durations_by_hand():
    model = WorkProportional(seconds_per_example=0.01, bandwidth=100.0, speed_sigma=0.0, bandwidth_sigma=0.0, noise_sigma=0.0)
    bound = model.bind(np.array([10, 200, 50]), model_bytes=400.0)
    profile = bound.client_profile(np.random.default_rng(0), 3)
    np.testing.assert_allclose(profile, [0.1 + 8.0, 2.0 + 8.0, 0.5 + 8.0])  # examples * 0.01 + 2 * 400 / 100
    np.testing.assert_allclose(bound.sample(np.random.default_rng(0), profile), profile)
    with pytest.raises(RuntimeError, match="needs bind"):
        model.client_profile(np.random.default_rng(0), 3)


def test_work_proportional_speed_and_bandwidth_spread_per_client():
    model = WorkProportional(seconds_per_example=1.0, bandwidth=1.0, speed_sigma=0.3, bandwidth_sigma=0.0, noise_sigma=0.0)
    bound = model.bind(np.full(100_000, 2.0), model_bytes=0.0)
    profile = bound.client_profile(np.random.default_rng(0), 100_000)
    # 2 / lognormal(0, 0.3): median 2, mean 2 exp(0.045)
    assert np.median(profile) == pytest.approx(2.0, rel=0.01)
    assert profile.mean() == pytest.approx(2.0 * np.exp(0.045), rel=0.01)


def write_trace(tmp_path, text):
    path = tmp_path / "devices.csv"
    path.write_text(text)
    return str(path)


def test_trace_file_gives_each_clients_durations(tmp_path):
    path = write_trace(tmp_path, "# measured devices\nclient,seconds_per_example,bandwidth\n1,0.5,10\n\n0,0.1,1000\n2,1.0,20\n")
    spe, bw = load_trace(path, 3)
    np.testing.assert_array_equal(spe, [0.1, 0.5, 1.0])
    np.testing.assert_array_equal(bw, [1000, 10, 20])
    bound = Trace(path=path).bind(np.array([20, 20, 40]), model_bytes=100.0)
    profile = bound.client_profile(np.random.default_rng(0), 3)
    np.testing.assert_allclose(profile, [2.0 + 0.2, 10.0 + 20.0, 40.0 + 10.0])
    np.testing.assert_allclose(bound.sample(np.random.default_rng(0), profile), profile)  # noise_sigma 0


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("client,seconds_per_example,bandwidth\n0,0.1,10\n2,0.1,10\n", "2 of the 4 clients have no line (clients 1, 3)"),
        ("client,seconds_per_example,bandwidth\n0,0.1,10\n1,0.1,10\n0,0.2,10\n3,1,1\n2,1,1\n", ":4: client 0 appears again (first on line 2)"),
        ("client,speed\n0,1\n", ":1: the header must be client,seconds_per_example,bandwidth"),
        ("client,seconds_per_example,bandwidth\n0,0.1,10\n1,fast,10\n", ":3: not numbers"),
        ("client,seconds_per_example,bandwidth\n0,0.1\n", ":2: expected 3 comma-separated values"),
        ("client,seconds_per_example,bandwidth\n0,-0.1,10\n", ":2: seconds_per_example and bandwidth must be finite and > 0"),
        ("client,seconds_per_example,bandwidth\n9,0.1,10\n", ":2: client 9 is out of range"),
        ("# nothing\n", "empty trace"),
    ],
)
def test_bad_trace_files_are_rejected_with_the_line_number(tmp_path, text, fragment):
    path = write_trace(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        Trace(path=path).bind(np.ones(4), 1.0)
    assert fragment in str(err.value)
    assert path in str(err.value)


def test_a_trace_that_is_not_text_is_refused_with_its_line_and_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "devices.csv"
    path.write_bytes(b"client,seconds_per_example,bandwidth\n0,0.1,10\n\xff\xfe,1,1\n")
    with pytest.raises(ConfigError, match=r"^latency.path='.*devices.csv' is invalid: line 3 is not UTF-8 text \(invalid start byte\)"):
        load_trace(path, 2)  # (was a UnicodeDecodeError traceback)
    path.write_bytes("\ufeffclient,seconds_per_example,bandwidth\r\n0,0.1,10\r\n1,0.5,20\r\n".encode())
    np.testing.assert_array_equal(load_trace(path, 2)[0], [0.1, 0.5])
    path.write_bytes(b"# old Mac line ends\rclient,seconds_per_example,bandwidth\r0,0.1,10\r1,0.5,20\r")  # (as text mode reads them)
    np.testing.assert_array_equal(load_trace(path, 2)[0], [0.1, 0.5])
    path.write_bytes(b"client,seconds_per_example,bandwidth\r0,0.1,10\r\xff,1,1\r")
    with pytest.raises(ConfigError, match=r"line 3 is not UTF-8 text"):
        load_trace(path, 2)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # (refused in words, without numpy's overflow warning first)
def test_a_trace_beyond_float64_names_the_file_not_other_models_settings(tmp_path):
    from asyncflower_jax.engine.scheduler import Scheduler

    path = write_trace(tmp_path, "client,seconds_per_example,bandwidth\n0,0.1,10\n1,1e307,10\n")
    with pytest.raises(ConfigError, match=r"client 1's speed profile .*; choose values nearer 1 in the latency.path file \(that client's line\), a smaller latency.noise_sigma$"):
        Scheduler(2, Trace(path=path).bind(np.full(2, 1000.0), 1.0), seed=0)  # (it said "lower latency.client_sigma", a key Trace lacks)
    with pytest.raises(ConfigError, match=r"latency.noise_sigma=1000 is invalid: must be a number in \[0, 100\]"):
        Trace(path=path, noise_sigma=1000)


def test_missing_trace_file(tmp_path):
    with pytest.raises(ConfigError, match="latency.path=.* is invalid: no such file"):
        load_trace(tmp_path / "nope.csv", 2)
    with pytest.raises(ConfigError, match="latency.path=.* is invalid: a directory, not a file"):
        load_trace(tmp_path, 2)
