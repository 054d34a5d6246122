"""Latency models: shapes, positivity, fixed client profiles, sample means and parameter validation."""

import re

import numpy as np
import pytest

from asyncflower_jax.engine.latency import ClientGroups, Constant, Exponential, LogNormal, Pareto
from asyncflower_jax.errors import ConfigError

DRAWS = 200_000  # per client in the mean checks; standard error of an Exp mean is mean/sqrt(DRAWS) ~ 0.2%


def per_client_means(model, profile, rng, draws=DRAWS):
    """Mean duration of each client over `draws` tasks (sampled as one long batch of dispatches)."""
    durations = model.sample(rng, np.repeat(profile, draws)).reshape(len(profile), draws)
    return durations.mean(axis=1)


ALL_MODELS = [Constant(2.5), Exponential(rate=2.0, client_sigma=0.3), LogNormal(1.5, 0.4, 0.6), ClientGroups(), Pareto(1.5, 0.5, 0.5)]


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: type(m).__name__)
def test_shapes_and_positivity(model):
    rng = np.random.default_rng(0)
    profile = model.client_profile(rng, 37)
    assert profile.shape == (37,)
    assert np.all(profile > 0) and np.all(np.isfinite(profile))
    durations = model.sample(rng, profile)
    assert durations.shape == (37,)
    assert np.all(durations > 0) and np.all(np.isfinite(durations))
    assert model.sample(rng, profile[3:4]).shape == (1,)


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: type(m).__name__)
def test_profile_is_a_function_of_the_seed_only(model):
    a = model.client_profile(np.random.default_rng([7, 1]), 50)
    b = model.client_profile(np.random.default_rng([7, 1]), 50)
    np.testing.assert_array_equal(a, b)
    # sampling durations reads the profile but never changes it
    before = a.copy()
    model.sample(np.random.default_rng(3), a)
    np.testing.assert_array_equal(a, before)


def test_constant():
    model = Constant(duration=2.5)
    rng = np.random.default_rng(0)
    profile = model.client_profile(rng, 4)
    np.testing.assert_array_equal(profile, np.ones(4))
    np.testing.assert_array_equal(model.sample(rng, profile), [2.5, 2.5, 2.5, 2.5])


def test_exponential_without_client_spread_has_rate_everywhere():
    # lognormal(0, 0) == 1 exactly, so every client's rate is `rate`
    model = Exponential(rate=2.0, client_sigma=0.0)
    profile = model.client_profile(np.random.default_rng(0), 5)
    np.testing.assert_array_equal(profile, np.full(5, 2.0))
    # mean of Exp(2) = 1/2
    means = per_client_means(model, profile[:1], np.random.default_rng(1))
    np.testing.assert_allclose(means, [0.5], rtol=0.02)


def test_exponential_per_client_means_follow_their_fixed_rates():
    model = Exponential(rate=1.5, client_sigma=0.8)
    profile = model.client_profile(np.random.default_rng(4), 4)
    assert len(np.unique(profile)) == 4  # clients really differ
    means = per_client_means(model, profile, np.random.default_rng(5))
    np.testing.assert_allclose(means, 1.0 / profile, rtol=0.02)  # E[Exp(r)] = 1/r


def test_exponential_profile_distribution():
    # rate * lognormal(0, s): E = rate * exp(s^2/2) = 1.5 * exp(0.08) ~ 1.6249, median = rate
    model = Exponential(rate=1.5, client_sigma=0.4)
    profile = model.client_profile(np.random.default_rng(6), 200_000)
    np.testing.assert_allclose(profile.mean(), 1.5 * np.exp(0.08), rtol=0.01)
    np.testing.assert_allclose(np.median(profile), 1.5, rtol=0.01)


def test_lognormal():
    model = LogNormal(median=2.0, sigma=0.5, client_sigma=0.7)
    # client medians: median * lognormal(0, 0.7): the median over many clients is ~2.0
    many = model.client_profile(np.random.default_rng(8), 200_000)
    np.testing.assert_allclose(np.median(many), 2.0, rtol=0.01)
    # per client c: durations = m_c * lognormal(0, 0.5): mean m_c * exp(0.125), median m_c
    profile = model.client_profile(np.random.default_rng(9), 3)
    rng = np.random.default_rng(10)
    durations = model.sample(rng, np.repeat(profile, DRAWS)).reshape(3, DRAWS)
    np.testing.assert_allclose(durations.mean(axis=1), profile * np.exp(0.125), rtol=0.02)
    np.testing.assert_allclose(np.median(durations, axis=1), profile, rtol=0.02)


def test_lognormal_zero_sigmas_are_deterministic():
    model = LogNormal(median=3.0, sigma=0.0, client_sigma=0.0)
    profile = model.client_profile(np.random.default_rng(0), 3)
    np.testing.assert_array_equal(profile, [3.0, 3.0, 3.0])
    np.testing.assert_array_equal(model.sample(np.random.default_rng(1), profile), [3.0, 3.0, 3.0])


def test_pareto_quantiles_and_mean():
    # Pareto(shape a, minimum m): P(D > x) = (m / x)^a, so the q-quantile is m (1 - q)^(-1/a);
    # with a = 3 the mean m a / (a - 1) = 1.5 m is finite with finite variance.
    model = Pareto(shape=3.0, minimum=2.0, client_sigma=0.0)
    profile = model.client_profile(np.random.default_rng(0), 2)
    np.testing.assert_array_equal(profile, [2.0, 2.0])
    d = model.sample(np.random.default_rng(1), np.full(DRAWS, 2.0))
    assert d.min() >= 2.0
    for q in (0.5, 0.9, 0.99):
        np.testing.assert_allclose(np.quantile(d, q), 2.0 * (1 - q) ** (-1 / 3), rtol=0.03)
    np.testing.assert_allclose(d.mean(), 3.0, rtol=0.02)


def test_pareto_is_heavier_tailed_than_exponential_of_the_same_median():
    heavy = Pareto(shape=1.5, minimum=1.0).sample(np.random.default_rng(2), np.ones(DRAWS))
    light = Exponential(rate=np.log(2) / np.median(heavy)).sample(np.random.default_rng(3), np.full(DRAWS, np.log(2) / np.median(heavy)))
    np.testing.assert_allclose(np.median(light), np.median(heavy), rtol=0.02)
    assert np.quantile(heavy, 0.999) > 3 * np.quantile(light, 0.999)


def test_client_groups_can_keep_id_order():
    # shuffle=False: clients 0.. in group 0 first (the order strategies' group tables use)
    groups = ClientGroups(fractions=(0.8, 0.2), rates=(2.0, 1.0), shuffle=False).client_groups(np.random.default_rng(0), 10)
    np.testing.assert_array_equal(groups, [0] * 8 + [1] * 2)


def test_client_groups_counts_80_20():
    model = ClientGroups(fractions=(0.8, 0.2), rates=(2.0, 1.0))
    for seed in range(5):
        groups = model.client_groups(np.random.default_rng(seed), 100)
        assert groups.shape == (100,)
        np.testing.assert_array_equal(np.bincount(groups, minlength=2), [80, 20])
        profile = model.client_profile(np.random.default_rng(seed), 100)
        assert np.sum(profile == 2.0) == 80 and np.sum(profile == 1.0) == 20
    # membership is random, not "first 80 clients fast"
    a = model.client_groups(np.random.default_rng(0), 100)
    b = model.client_groups(np.random.default_rng(1), 100)
    assert not np.array_equal(a, b)


def test_client_groups_counts_sum_to_population():
    # 3 groups of 1/3 on 10 clients: floor gives 3, 3, 3 and the leftover client joins one group
    model = ClientGroups(fractions=(1 / 3, 1 / 3, 1 / 3), rates=(1.0, 2.0, 3.0))
    counts = np.bincount(model.client_groups(np.random.default_rng(0), 10), minlength=3)
    assert counts.sum() == 10 and sorted(counts) == [3, 3, 4]


def test_client_groups_exact_counts_for_fractions_not_exact_in_binary():
    model = ClientGroups(fractions=(0.29, 0.71), rates=(2.0, 1.0))
    counts = np.bincount(model.client_groups(np.random.default_rng(0), 100), minlength=2)
    np.testing.assert_array_equal(counts, [29, 71])


def test_client_groups_sample_means_per_group():
    model = ClientGroups(fractions=(0.8, 0.2), rates=(2.0, 1.0))
    profile = model.client_profile(np.random.default_rng(0), 100)
    fast, slow = np.flatnonzero(profile == 2.0)[0], np.flatnonzero(profile == 1.0)[0]
    means = per_client_means(model, profile[[fast, slow]], np.random.default_rng(1))
    np.testing.assert_allclose(means, [0.5, 1.0], rtol=0.02)  # Exp(2) mean 1/2, Exp(1) mean 1


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: Constant(duration=0.0), "latency.duration"),
        (lambda: Constant(duration=-1.0), "latency.duration"),
        (lambda: Exponential(rate=0.0), "latency.rate"),
        (lambda: Exponential(client_sigma=-0.1), "latency.client_sigma"),
        (lambda: LogNormal(median=0.0), "latency.median"),
        (lambda: LogNormal(sigma=-1.0), "latency.sigma"),
        (lambda: LogNormal(client_sigma=-1.0), "latency.client_sigma"),
        (lambda: ClientGroups(fractions=(0.5, 0.4), rates=(1.0, 2.0)), "latency.fractions"),
        (lambda: ClientGroups(fractions=(0.5, 0.5), rates=(1.0,)), "latency.fractions"),
        (lambda: ClientGroups(fractions=(), rates=()), "latency.fractions"),
        (lambda: ClientGroups(fractions=(1.2, -0.2), rates=(1.0, 2.0)), "latency.fractions"),
        (lambda: ClientGroups(fractions=(0.8, 0.2), rates=(1.0, 0.0)), "latency.rates"),
        (lambda: Pareto(shape=0.0), "latency.shape"),
        (lambda: Pareto(minimum=-1.0), "latency.minimum"),
        (lambda: Pareto(client_sigma=-1.0), "latency.client_sigma"),
        # infinite or NaN values: every time in the run inf, or a clock that never moves
        (lambda: Constant(duration=float("inf")), "latency.duration=inf is invalid: must be a finite number > 0"),
        (lambda: Exponential(rate=float("inf")), "latency.rate=inf is invalid: must be a finite number > 0"),
        (lambda: LogNormal(median=float("nan")), "latency.median=nan is invalid"),
        (lambda: LogNormal(sigma=float("inf")), "latency.sigma=inf is invalid: must be a finite number >= 0"),
        (lambda: ClientGroups(fractions=(0.8, 0.2), rates=(float("inf"), 1.0)), "latency.rates=[inf, 1.0] is invalid: must be finite numbers"),
        (lambda: Pareto(client_sigma=float("inf")), "latency.client_sigma=inf"),
        (lambda: __import__("asyncflower_jax.engine.latency", fromlist=["Uniform"]).Uniform(high=float("inf")), "latency.high=inf is invalid: must be a finite number >= latency.low (0.5)"),
    ],
)
def test_bad_values_raise_config_error_naming_the_key(make, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        make()


@pytest.mark.filterwarnings("error::RuntimeWarning")  # (refused in words, without numpy's overflow warning first)
def test_durations_beyond_float64_are_refused_naming_the_latency():
    """Finite settings can still overflow: a task's draw at a huge sigma, 1 / a tiny rate, a clock
    that sums long tasks; a Pareto shape that makes overflows likely is refused when it is set."""
    from asyncflower_jax.engine.scheduler import Scheduler
    from asyncflower_jax.experiment import Experiment
    from tests.conftest import make_config

    with pytest.raises(ConfigError, match=r"latency.shape=0.0005 is invalid: must be >= 0.03893: a smaller shape draws durations beyond"):
        Pareto(shape=0.0005)
    Pareto(shape=0.04)
    with pytest.raises(ConfigError, match=r"latency.sigma=1000.0 is invalid: must be a number in \[0, 100\] \(beyond it a task's duration passes"):
        LogNormal(sigma=1000.0)  # (it overflowed at the first dispatches, after the run's files were written)
    LogNormal(sigma=100.0)  # (the bound it states is allowed)
    sched = Scheduler(50, LogNormal(median=1e300, sigma=50.0, client_sigma=0.0), seed=0)
    with pytest.raises(ConfigError, match=r"latency: client \d+'s task took inf \(beyond float64's range\) under LogNormal.*: a smaller latency.median, a smaller latency.sigma, a smaller latency.client_sigma$"):
        for _ in range(50):
            sched.dispatch(0)
    sched = Scheduler(10, Constant(duration=1e308), seed=0)
    sched.dispatch(0)
    sched.pop()  # (the clock at 1e308)
    with pytest.raises(ConfigError, match=r"latency: the simulated clock passed float64's range at 1e\+308 \+ 1e\+308 .* choose shorter durations"):
        sched.dispatch(1)
    for latency, remedies in ((LogNormal(client_sigma=400.0), "a smaller latency.median, a smaller latency.sigma, a smaller latency.client_sigma"),
                              (Exponential(rate=1e-320), "a rate nearer 1, a smaller latency.client_sigma")):  # refused before the run
        with pytest.raises(ConfigError, match=rf"latency: client \d+'s speed profile \(its rate or scale\) is .*; choose {remedies}$"):  # (its own settings only)
            Scheduler(50, latency, seed=0)
    # ... by the experiment, before it writes anything (it was refused at the first dispatch, after metrics.csv)
    with pytest.raises(ConfigError, match=r"latency: client \d+'s speed profile"):
        Experiment(make_config("num_clients=20", "concurrency=4", "latency=exponential", "latency.client_sigma=1000"))


def test_a_pareto_shape_of_1_or_less_warns_of_an_infinite_mean(caplog):
    with caplog.at_level("WARNING", logger="asyncflower_jax.engine.latency"):
        Pareto(shape=1.5)
        assert not caplog.records
        Pareto(shape=0.8)
    assert "latency.shape=0.8 <= 1: Pareto durations have an infinite mean" in caplog.text


def sample_one_models(tmp_path):
    """Every latency model, bound where it needs work and model size, with spread client profiles."""
    from asyncflower_jax.engine.latency import Uniform, WorkProportional
    from asyncflower_jax.engine.traces import Trace

    trace = tmp_path / "trace.csv"
    trace.write_text("client,seconds_per_example,bandwidth\n" + "".join(f"{c},{0.01 * (c + 1)},{100.0 * (c + 2)}\n" for c in range(9)))
    work = (np.arange(9) + 1) * 10.0
    return ALL_MODELS + [
        Uniform(0.5, 2.0, client_sigma=0.4),
        WorkProportional(noise_sigma=0.3).bind(work, 1e5),
        Trace(path=str(trace), noise_sigma=0.2).bind(work, 1e3),
    ]


def test_sample_one_draws_what_sample_draws_for_one_client(tmp_path):
    """The scheduler draws one duration per dispatch with sample_one; the naive reference with
    sample of a one-client profile: the same values, bit for bit, from the same stream."""
    for model in sample_one_models(tmp_path):
        profile = model.client_profile(np.random.default_rng(1), 9)
        clients = np.random.default_rng(2).integers(9, size=300)
        a, b = np.random.default_rng(5), np.random.default_rng(5)
        one = [model.sample_one(a, profile[c]) for c in clients]
        sliced = [model.sample(b, profile[c : c + 1])[0] for c in clients]
        assert all(type(x) is float for x in one), type(model).__name__
        assert one == sliced, type(model).__name__
        assert a.random() == b.random()  # and the stream is left where sample leaves it


def test_exponential_durations_are_numpys_exponential_draws():
    """Exponential.sample scales standard draws (4x cheaper) and gives numpy's rng.exponential(1 / rate) bit for bit."""
    for model in (Exponential(rate=2.0, client_sigma=0.7), ClientGroups()):
        profile = model.client_profile(np.random.default_rng(3), 50)
        a, b = np.random.default_rng(4), np.random.default_rng(4)
        np.testing.assert_array_equal(model.sample(a, profile), b.exponential(1.0 / profile))
