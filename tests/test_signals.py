"""signals.install: the first SIGTERM/SIGINT calls `first`, a second stops at once; a signal whose
exception Python drops (raised inside a gc callback) is sent again and taken outside it."""

import gc
import os
import signal
import threading
import time

import pytest

from asyncflower_jax import signals
from asyncflower_jax.errors import StoppedAtOnce


def wait_for_signals(seconds=2.0):
    """Sleep in short steps, so a signal sent from another thread is handled here."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.005)


def spin():
    for _ in range(100_000):  # (a signal sent just before is handled at one of these bytecodes)
        pass


@pytest.fixture(autouse=True)
def late_signals_are_recorded():
    """SIGTERM/SIGINT outside the handlers a test installs (a signal sent again after its test
    ended) are recorded, not the end of the test process."""
    late = []
    previous = {sig: signal.signal(sig, lambda signum, frame: late.append(signum)) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield late
    wait_for_signals(5 * signals.RESEND_AFTER)
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@pytest.fixture
def collect_receiving(request):
    """A gc.collect() during which a gc callback sends this process `request.param` once: the Python
    handler then runs in the callback, where an exception it raises is dropped. The callback is in
    place only during that call (a collection Python starts on its own elsewhere would send the
    signal before the test's handlers are installed)."""
    sent = []

    def callback(phase, info):
        if phase == "start" and not sent:
            sent.append(1)
            os.kill(os.getpid(), request.param)
            spin()  # (the handler runs inside the callback)

    def collect():
        gc.callbacks.append(callback)
        try:
            return gc.collect()
        finally:
            gc.callbacks.remove(callback)
            assert sent == [1]

    return collect


def test_the_first_signal_calls_first_and_a_second_stops_at_once():
    seen = []
    restore = signals.install(seen.append)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for_signals(0.05)
        assert seen == [signal.SIGTERM]
        with pytest.raises(SystemExit) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            wait_for_signals()
        assert stop.value.code == 128 + signal.SIGTERM and seen == [signal.SIGTERM]
    finally:
        restore()


class FiresBeforeStartReturns(threading.Timer):
    """A timer whose first one's thread sends its signal while the hook that starts it still
    waits in start() (a loaded machine); `fired` is set per test."""

    fired: list = []

    def start(self):
        if self.fired:
            return super().start()
        self.fired.append(1)
        self.function(*self.args)
        spin()


@pytest.mark.parametrize("collect_receiving", [signal.SIGTERM], indirect=True)
@pytest.mark.parametrize("fires_early", [False, True], ids=["later", "before the hook returns"])
def test_a_first_signal_dropped_in_a_gc_callback_is_taken_after_it(collect_receiving, fires_early, monkeypatch):
    """The signal is sent again; when it comes while the hook still runs (`fires_early`), it is
    sent once more: raised there, it would be dropped for good."""
    monkeypatch.setattr(FiresBeforeStartReturns, "fired", [])
    if fires_early:
        monkeypatch.setattr(threading, "Timer", FiresBeforeStartReturns)
    calls = []

    def first(signum):
        calls.append(signum)
        signals.stop_at_once(signum)

    restore = signals.install(first)
    try:
        with pytest.raises(StoppedAtOnce) as stop:
            collect_receiving()  # the callback's signal raises StoppedAtOnce there, where Python drops it ...
            wait_for_signals()  # ... and it comes again (once more if it lands in a collection again), as the first signal still
        assert stop.value.signum == signal.SIGTERM and len(calls) >= 2 and set(calls) == {signal.SIGTERM}
        assert FiresBeforeStartReturns.fired == ([1] if fires_early else [])
    finally:
        restore()


def test_a_signal_that_comes_while_the_hook_passes_on_another_exception_is_taken_after_it():
    import sys

    class RaisesWhenDeleted:
        def __del__(self):
            raise ValueError("not the handler's")

    passed_on = []

    def hook_before(info):
        passed_on.append(info.exc_value)
        os.kill(os.getpid(), signal.SIGTERM)
        spin()

    previous_hook = sys.unraisablehook
    sys.unraisablehook = hook_before
    restore = signals.install(signals.stop_at_once)
    try:
        with pytest.raises(StoppedAtOnce):
            RaisesWhenDeleted()  # (deleted at once: its exception goes to the hooks)
            wait_for_signals()
        assert [str(exc) for exc in passed_on] == ["not the handler's"]
    finally:
        restore()
        sys.unraisablehook = previous_hook


@pytest.mark.parametrize("collect_receiving", [signal.SIGINT], indirect=True)
def test_a_second_signal_dropped_in_a_gc_callback_is_taken_after_it(collect_receiving):
    seen = []
    restore = signals.install(seen.append)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        wait_for_signals(0.05)
        with pytest.raises(KeyboardInterrupt):
            collect_receiving()
            wait_for_signals()
        assert seen == [signal.SIGINT]
    finally:
        restore()


def test_restore_puts_back_the_handlers_and_the_unraisable_hook():
    import sys

    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), sys.unraisablehook)
    signals.install(lambda signum: None)()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), sys.unraisablehook) == before


def test_a_signal_during_a_held_block_is_answered_after_it(late_signals_are_recorded):
    """signals.held: SIGTERM and SIGINT sent inside the block reach the handlers in place only once
    it has ended, each once, in the order they first came; the handlers are back as they were."""
    answered, inside = [], []

    def record(signum, frame):
        answered.append(signum)

    previous = {sig: signal.signal(sig, record) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with signals.held():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGINT):
                os.kill(os.getpid(), sig)
            wait_for_signals(0.05)
            inside.extend(answered)
        after = list(answered)
        handlers = [signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert inside == [] and after == [signal.SIGINT, signal.SIGTERM]
    assert handlers == [record, record]
    assert late_signals_are_recorded == []


def test_a_held_block_that_names_one_signal_leaves_the_others_alone(late_signals_are_recorded):
    answered = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: answered.append(signum))
    try:
        with signals.held(signal.SIGTERM):
            os.kill(os.getpid(), signal.SIGINT)
            wait_for_signals(0.05)
            assert answered == [signal.SIGINT]  # (not held: answered at once)
    finally:
        signal.signal(signal.SIGINT, previous)
