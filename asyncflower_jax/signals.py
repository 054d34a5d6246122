"""The project's answer to SIGTERM/SIGINT: the first one asks for an orderly stop, a second one
stops at once (KeyboardInterrupt for SIGINT, exit 128 + the signal number for SIGTERM)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

from .errors import StoppedAtOnce


def install(first: Callable[[int], None]) -> Callable[[], None]:
    """Call first(signum) on the first SIGTERM/SIGINT, stop at once on a second one. Returns the
    function that puts the previous handlers back. Only in the main thread (where Python takes
    signals); elsewhere nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    received = []

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        received.append(signum)
        first(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore():
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def stop_at_once(signum: int) -> None:
    """`install`'s `first` where no loop could stop in order (a run preparing, or ending): raise
    StoppedAtOnce, which the entry point reports as it does Ctrl-C."""
    raise StoppedAtOnce(signum)


@contextlib.contextmanager
def on_signals(first: Callable[[int], None]) -> Iterator[None]:
    """`install(first)` while the block runs."""
    restore = install(first)
    try:
        yield
    finally:
        restore()
