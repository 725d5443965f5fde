"""Progress of the long loops (an epoch's steps, an evaluation, a sweep's runs).

On a terminal, a tqdm bar. Where the output goes to a file or a pipe (``kdarena train > log``, a Ray
worker whose output the driver forwards), a bar's carriage returns make no lines, so a plain line is
printed instead every :data:`PLAIN_EVERY_S` seconds: ``epoch 3/60: 120/352 steps (34%), 41 s, loss=1.234``.
"""
from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

#: seconds between two plain progress lines (a log gains a line per 10 s of a long loop, not one per step);
#: $KDARENA_PROGRESS_EVERY sets another interval, for this process and the sweep workers it starts
PLAIN_EVERY_S = float(os.environ.get("KDARENA_PROGRESS_EVERY", "10"))


class PlainProgress:
    """tqdm's update / set_postfix / close / write, printing a plain line at most every ``every`` seconds."""

    def __init__(self, total: int, desc: str, initial: int = 0, unit: str = "it", every: float | None = None,
                 stream: IO[str] | None = None):
        self.total, self.desc, self.n, self.unit = total, desc, initial, unit
        self.every = PLAIN_EVERY_S if every is None else every
        self.stream = stream or sys.stderr
        self.postfix: dict[str, Any] = {}
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float) -> str:
        share = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        tail = "".join(f", {key}={value}" for key, value in self.postfix.items())
        return f"{self.desc}: {self.n}/{self.total} {self.unit}{share}, {now - self.start:.0f} s{tail}"

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = values

    def write(self, text: str) -> None:
        print(text, file=sys.stdout, flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, initial: int = 0, unit: str = "it", stream: IO[str] | None = None):
    """A tqdm bar on a terminal (``stream``, default stderr), else a :class:`PlainProgress`."""
    stream = stream or sys.stderr
    if stream.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, dynamic_ncols=True, mininterval=0.5,
                    file=stream)
    return PlainProgress(total, desc, initial, unit, stream=stream)
