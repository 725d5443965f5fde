"""One run of a sweep, wherever an engine puts it (this process, a pool worker, a Ray task on another node).

The run decides how to start from its own directory when it starts, not when the sweep was planned:
a run retried on a second node after the first was lost finds the checkpoint the first one wrote and
resumes from it instead of starting again at epoch 0.
"""
from __future__ import annotations

import logging
import platform
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from .. import config as cfg
from ..records.folder import checkpoint_path
from ..errors import UserError

log = logging.getLogger("kdarena")

#: A file another process (the tuner, :mod:`.tune`) writes into a run folder to stop that run early: the run
#: checkpoints after its step in progress and returns ``stopped_early`` (a hook any engine carries, since every
#: engine's runs see their own folder)
STOP_EARLY_FILE = "stop-early"
#: seconds between a run's looks for that file
STOP_EARLY_POLL_S = 0.2


def next_action(run_dir: Path) -> str:
    """How an unfinished run starts now: ``resumed`` from its last checkpoint, ``restarted`` (a folder holding
    a run without a checkpoint is moved aside, never deleted) or ``trained`` from scratch."""
    if checkpoint_path(run_dir).is_file():
        return "resumed"
    return "restarted" if run_dir.exists() and any(run_dir.iterdir()) else "trained"


def error_text(error: BaseException) -> str:
    """``Type: first line of the message`` (what the sweep prints and writes into its index)."""
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def execute_run(config: dict[str, Any], run_dir: str, stop_requested: threading.Event | None = None) -> dict[str, Any]:
    """Train one run; returns its outcome as plain data, which crosses process and node boundaries
    (exceptions, with their tracebacks and types, do not always): exactly one of ``summary``, ``error``
    (the run failed by itself: a bad config, a non-finite stop; with ``traceback``, its text, when the failure is
    a bug of ours and not a :class:`~kdarena.errors.UserError`), ``interrupted`` (SIGINT/SIGTERM or
    ``stop_requested``; the run checkpointed first) or ``stopped_early`` (:data:`STOP_EARLY_FILE` appeared
    in the run folder; checkpointed too), and ``action`` (resumed/restarted/trained), ``seconds`` (wall
    time), ``node``."""
    from ..trainer import Interrupted, train

    path = Path(run_dir)
    action = next_action(path)
    outcome: dict[str, Any] = {"action": action, "node": platform.node()}
    if stop_requested is not None and stop_requested.is_set():  # the sweep stopped before this run began
        return {**outcome, "interrupted": "the sweep was interrupted before this run started", "seconds": 0.0,
                "started": False}
    log.info("%s: %s -> %s", path.name, "resuming" if action == "resumed" else "starting", path)
    start = time.perf_counter()
    stop = stop_requested if stop_requested is not None else threading.Event()
    finished = threading.Event()
    watcher = threading.Thread(target=_stop_on_file, args=(path / STOP_EARLY_FILE, stop, finished), daemon=True)
    watcher.start()
    try:
        outcome["summary"] = train(cfg.validate(config), run_dir=path, resume=action == "resumed", force=action == "restarted",
                                   stop_requested=stop)
    except Interrupted as stopped:
        outcome["stopped_early" if (path / STOP_EARLY_FILE).is_file() else "interrupted"] = str(stopped)
    except Exception as error:  # one failed run must not cost the others
        outcome["error"] = error_text(error)
        if not isinstance(error, UserError):  # a bug keeps its traceback, as the CLI keeps it
            outcome["traceback"] = traceback.format_exc()
    finally:
        finished.set()
        watcher.join()
    outcome["seconds"] = time.perf_counter() - start
    return outcome


def _stop_on_file(path: Path, stop: threading.Event, finished: threading.Event) -> None:
    while not finished.wait(STOP_EARLY_POLL_S):
        if path.is_file():
            stop.set()
            return
