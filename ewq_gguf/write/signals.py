"""Ctrl-C and SIGTERM while writing: raised as Interrupted at safe points, so that the temporary files go with them."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

from ..errors import OutputError


class Interrupted(OutputError):
    """SIGTERM or Ctrl-C arrived while writing; exits as a process killed by that signal would report it."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}; nothing was written")
        self.exit_code = 128 + signum


INTERRUPTING_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalGuard:
    """While active, SIGTERM and SIGINT raise Interrupted, so that the temporary files are removed on the way out.

    The exception is raised wherever the main thread is, and code that catches every Exception there (tqdm does,
    starting its monitor thread) would swallow it, so the signal is also recorded and `check()` raises it again at
    the writer's safe points. After `hold()` (putting files in place, cleaning up: work that must finish) a signal
    is only recorded; unless the write is already ending with Interrupted, it is raised again under the previous
    handlers when the guard ends. A signal that is ignored when the guard starts gets no handler: it stays ignored,
    so it is never recorded or raised again either.
    """

    def __init__(self) -> None:
        self.received: Optional[int] = None     # the first signal, raised as Interrupted
        self.held: Optional[int] = None         # a signal that came while holding
        self.holding = False

    def check(self) -> None:
        if self.received is not None:
            raise Interrupted(self.received)

    def hold(self) -> None:
        self.holding = True

    def _interrupt(self, signum: int, frame: object) -> None:
        if self.holding:
            self.held = self.held or signum
            return
        self.received = self.received or signum
        raise Interrupted(signum)

    @contextmanager
    def active(self) -> Iterator["SignalGuard"]:
        if threading.current_thread() is not threading.main_thread():   # only the main thread may set handlers
            yield self
            return
        # A signal the process was started with ignored (`cmd &` in a script, nohup) stays ignored: whoever
        # started us asked for this run not to be interrupted by it.
        previous = {sig: signal.signal(sig, self._interrupt) for sig in INTERRUPTING_SIGNALS
                    if signal.getsignal(sig) is not signal.SIG_IGN}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.held is not None and self.received is None:
                signal.raise_signal(self.held)
