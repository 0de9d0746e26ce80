"""SIGINT/SIGTERM: finish the current training step, keep what is saved, exit non-zero saying how to resume."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from kdrun.core import distributed
from kdrun.core.errors import KdrunError

_requested: int | None = None


class Interrupted(KdrunError):
    """The run stopped on a signal; the exit code is the shell's 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside, SIGINT and SIGTERM ask the training loop to stop at its next step boundary.

    A second signal is not caught: it stops the process at once, as without kdrun.
    """
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield  # Python delivers signals to the main thread only
        return
    _requested = None
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def request_stop(signum, frame):
        # No logging here: the signal may arrive while the main thread is inside the log handler's write.
        global _requested
        _requested = signum
        for s, handler in previous.items():
            signal.signal(s, handler)

    for s in previous:
        signal.signal(s, request_stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _requested = None


def check_stop(where: str, saved: str) -> None:
    """Raise ``Interrupted`` if a stop was requested; ``where`` and ``saved`` go into its message.

    The ranks of a distributed run stop together, at the same step, when any of them got the signal.
    """
    signum = distributed.max_over_ranks(_requested or 0) or None
    if signum is not None:
        raise Interrupted(f"interrupted by {_name(signum)} {where}; {saved}", signum)


def _name(signum: int) -> str:
    return signal.Signals(signum).name
