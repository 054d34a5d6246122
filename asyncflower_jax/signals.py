"""The project's answer to SIGTERM/SIGINT: the first one asks for an orderly stop, a second one
stops at once (KeyboardInterrupt for SIGINT, exit 128 + the signal number for SIGTERM)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from .errors import StoppedAtOnce

RESEND_AFTER = 0.01  # seconds before a signal whose exception Python dropped is sent again


def install(first: Callable[[int], None]) -> Callable[[], None]:
    """Call first(signum) on the first SIGTERM/SIGINT, stop at once on a second one. Returns the
    function that puts the previous handlers back. Only in the main thread (where Python takes
    signals); elsewhere nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    received = []
    raised: list[tuple[BaseException, int, bool]] = []  # what the handler raised: (exception, signal, was it the first)

    def handler(signum, frame):
        if _inside(unraisable, frame):
            # an exception raised in the hook itself is dropped for good (Python hands it to no
            # hook): take the signal again once the hook has returned
            _send_again(signum)
            return
        is_first = not received
        try:
            if not is_first:
                raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
            received.append(signum)
            first(signum)
        except BaseException as exc:
            raised.append((exc, signum, is_first))
            raise

    def unraisable(info):
        """Python drops an exception raised inside a gc callback (JAX runs one at each collection)
        or a __del__, handing it here; when the handler raised it, the signal would be lost with
        it: send it again, from a thread, to be taken once that code has returned."""
        dropped = next((entry for entry in raised if entry[0] is info.exc_value), None)
        if dropped is None:
            return (previous_hook or sys.__unraisablehook__)(info)
        raised.remove(dropped)
        _, signum, is_first = dropped
        if is_first:
            received.remove(signum)
        _send_again(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    # (Python's own hook is named, not held: a parallel sweep's callback pickles `restore`, and
    # pickle refuses the built-in hook while another one is in its place)
    previous_hook = None if sys.unraisablehook is sys.__unraisablehook__ else sys.unraisablehook
    sys.unraisablehook = unraisable

    def restore():
        for sig, old in previous.items():
            signal.signal(sig, old)
        sys.unraisablehook = previous_hook or sys.__unraisablehook__

    return restore


def _send_again(signum: int) -> None:
    """Send this process `signum` again in RESEND_AFTER seconds, from a thread."""
    resend = threading.Timer(RESEND_AFTER, os.kill, (os.getpid(), signum))
    resend.daemon = True
    resend.start()


def _inside(function: Callable, frame) -> bool:
    """Whether `frame` runs in a call of `function`: it, or a frame it called."""
    while frame is not None:
        if frame.f_code is function.__code__:
            return True
        frame = frame.f_back
    return False


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


@contextlib.contextmanager
def held(*signums: int) -> Iterator[None]:
    """Answer `signums` (default SIGTERM and SIGINT) only once the block has run: one that comes
    during it is recorded and raised again after it, for the handlers in place then. For a block
    that must not be cut in two, such as starting a process and recording it (a signal between
    the two leaves the process running, unknown to whoever stops the others). Main thread only
    (where Python takes signals); elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: came.append(signum)) for sig in signums or (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)  # (None: a handler set outside Python)
        for signum in dict.fromkeys(came):
            signal.raise_signal(signum)
