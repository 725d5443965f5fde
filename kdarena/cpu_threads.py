"""CPU threads for a run on a machine other processes are using too (a shared box, a CI runner, a laptop).

Measured (issue 36): beside two busy processes a ResNet step at batch 128 took 1.6-1.9 s with 2 threads,
0.47-0.68 s with 1 thread and 0.66-0.78 s with 2 threads under ``OMP_WAIT_POLICY=PASSIVE``; the quickstart
(2 threads) ran 45x slower than alone. Two causes, two fixes:

* OpenMP threads that finish a parallel region spin, waiting for the next one, on cores another process
  needs. :func:`prefer_passive_waiting` asks them to sleep instead (``OMP_WAIT_POLICY=PASSIVE``) when the
  machine is already busy as kdarena is imported. It must run before torch is imported (the OpenMP
  runtime reads the variable once, as it loads); a policy the user set is kept. On an idle machine the
  policy is left as it is, so a run alone runs as before.
* More threads than free cores make every parallel region wait for its slowest thread, which waits for
  a core. :func:`choose_threads` counts the CPUs this process may use (its affinity mask, which
  ``taskset``, cgroups and schedulers set) and how busy they are (``/proc/stat`` sampled for a quarter
  of a second), and keeps torch's own thread count unless fewer cores are free.

``train.threads`` set by the user is always used as given. ``benchmarks/cpu_threads_under_load.py``
measures both; BENCHMARKS.md has its numbers.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

#: seconds /proc/stat is sampled over to see how busy this process's CPUs are
SAMPLE_S = 0.25
#: the machine counts as busy when its 1-minute load average is above this share of our CPUs
BUSY_SHARE = 0.5


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask; all of them where the OS has none)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def prefer_passive_waiting() -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` when the machine is busy and the user chose no policy; returns the policy
    in force (``""``: OpenMP's default). Call before torch is imported."""
    if "OMP_WAIT_POLICY" not in os.environ:
        try:
            busy = os.getloadavg()[0] > BUSY_SHARE * len(usable_cpus())
        except OSError:  # no load average on this OS
            busy = False
        if busy:
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return os.environ.get("OMP_WAIT_POLICY", "")


def _cpu_jiffies() -> dict[int, tuple[int, int]]:
    """CPU index -> (busy, total) jiffies since boot, from /proc/stat (empty where there is none)."""
    out: dict[int, tuple[int, int]] = {}
    try:
        with open("/proc/stat") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return out
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            values = [int(v) for v in fields]
            idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
            out[int(name[3:])] = (sum(values[:8]) - idle, sum(values[:8]))
    return out


def busy_cpus(cpus: list[int], seconds: float = SAMPLE_S) -> float | None:
    """How many of ``cpus`` other work keeps busy (0.0 .. len(cpus)), sampled over ``seconds``; None if unknown."""
    before = _cpu_jiffies()
    time.sleep(seconds)
    after = _cpu_jiffies()
    shares = []
    for cpu in cpus:
        if cpu in before and cpu in after:
            busy, total = (a - b for a, b in zip(after[cpu], before[cpu]))
            shares.append(busy / total if total > 0 else 0.0)
    return sum(shares) if shares else None


@dataclass(frozen=True)
class ThreadChoice:
    threads: int  # what the run uses
    default: int  # torch's own choice
    usable: int  # CPUs this process may use
    busy: float | None  # of those, how many other work keeps busy
    policy: str  # OMP_WAIT_POLICY in force ("" for OpenMP's default)

    def describe(self) -> str:
        load = "load unknown" if self.busy is None else f"{self.busy:.1f} busy with other work"
        return (f"{self.threads} CPU thread(s) ({self.usable} CPUs usable, {load}; torch's default {self.default}; "
                f"OMP_WAIT_POLICY={self.policy or 'default'}); set train.threads to choose")


def choose_threads(default: int, seconds: float = SAMPLE_S) -> ThreadChoice:
    """torch's ``default`` thread count, lowered to the CPUs other work leaves free (at least one)."""
    cpus = usable_cpus()
    busy = busy_cpus(cpus, seconds)
    free = len(cpus) if busy is None else len(cpus) - busy
    threads = max(1, min(default, len(cpus), int(free + 0.5)))
    return ThreadChoice(threads, default, len(cpus), busy, os.environ.get("OMP_WAIT_POLICY", ""))
