"""Stopping on a signal: SIGINT (Ctrl-C) and SIGTERM, the exceptions they end in, and the flag that
records the first one so that the code in hand can stop where it is safe to.

Used by the training loop (train._StopFlag: finish the step, save, stop) and the kernel warm-up
(runtime.DeferredSignals: stop between compiled kernels), and by the CLI's SIGTERM handler.
"""
import signal

from .errors import Terminated


def raise_terminated(signum, frame):
    """The CLI's SIGTERM handler outside training: raise Terminated (a KeyboardInterrupt), so that
    `finally` blocks run and the command exits 143 with one line."""
    raise Terminated


def interrupt_for(signum):
    """The exception a stop by signal raises where it is acted on: Terminated for SIGTERM, else
    KeyboardInterrupt (SIGINT)."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


class SignalFlag:
    """Inside the block the first SIGINT or SIGTERM only sets ``signum``; a second raises at once
    (interrupt_for). Subclasses choose which signals to take over (``takes``), what the first one
    does besides (``recorded``) and which handler leaving puts back (``handler_after``). Off the
    main thread nothing is installed."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def takes(self, sig, handler) -> bool:
        """Whether to take over ``sig``, whose handler is ``handler`` now: both signals, always."""
        return True

    def recorded(self) -> None:
        """Called after the first signal is recorded."""

    def handler_after(self, sig, old):
        """The handler of ``sig`` after the block: the one it had before."""
        return old

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                if self.takes(sig, signal.getsignal(sig)):
                    self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise interrupt_for(signum)
        self.signum = signum
        self.recorded()

    def check(self) -> None:
        """Raise the recorded signal, if any."""
        if self.signum is not None:
            raise interrupt_for(self.signum)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, self.handler_after(sig, old))
        return False
