"""SIGINT and SIGTERM routed to the trainer, which checkpoints and then stops."""
from __future__ import annotations

import signal


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
