"""SIGINT and SIGTERM routed to the trainer, which checkpoints and then stops."""
from __future__ import annotations

import signal


class Interrupted(Exception):
    """Raised after a SIGINT/SIGTERM once a checkpoint has been written; ``signum`` is the signal that stopped
    the run, so the command line exits 128 + it as a shell does (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


def install_stop_handlers(handler) -> dict:
    """Route SIGINT/SIGTERM to ``handler``; returns the previous handlers for ``signal.signal`` to restore.
    Outside the main thread signals cannot be caught: skipped."""
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    return previous
