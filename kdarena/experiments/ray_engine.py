"""The sweep on a Ray cluster (``kdarena sweep ... --engine ray [--address ADDR]``): each run one Ray task.

* Without an address Ray starts embedded on this machine (listening on the loopback address only); with
  one (``auto``, ``HOST:PORT``, ``ray://HOST:10001``) the sweep joins that cluster and leaves it running.
* A task asks for what its run's config says: ``num_cpus`` = ``train.threads`` (1 when unset, and the run
  then uses 1 thread), ``num_gpus`` = 1 for a CUDA run (``train.device=cuda``, or ``auto`` on a cluster
  with GPUs), or ``--gpus-per-run F`` (e.g. 0.25: four small runs share one GPU).
* Run directories are written by the workers, so ``--out`` must be a folder every node sees (NFS,
  Lustre, a shared volume): a probe task on each node checks that before anything trains.
* A lost node fails the task with a system error and Ray runs it again elsewhere (up to :data:`RETRIES`
  times); the run resumes from the last checkpoint in its folder (see :mod:`.run_task`). A run that
  fails by itself returns its error as data: recorded as failed, never retried. A run stopped by a
  signal on its node (SIGTERM) checkpoints and is recorded as interrupted; the others go on.
* Ctrl-C asks the sweep's runs to stop: the driver writes a stop file into ``--out``, each task sees it
  within a second, checkpoints after its step in progress and returns "interrupted" (a task not started
  yet returns at once). Ray's own cancellation is the fallback only (a second Ctrl-C, or runs that have
  not stopped after :data:`STOP_WAIT_S`): in Ray 2.60 a task that completes while it is being cancelled
  can crash the driver ("Tried to complete task that was not pending"). The same command again skips
  finished runs and resumes the others.
* ``--address HOST:PORT`` (or ``ray://HOST:PORT``) is tried with a plain TCP connection and a gRPC handshake
  first: nothing listening there, or a server that is not Ray, is one line within seconds, not Ray's minutes
  of retries or an endless wait. A run that no node of the cluster can hold (more CPUs or GPUs than the
  largest node has) is one line naming the resource before anything is submitted. SIGTERM is handled
  as Ctrl-C.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .. import config as cfg
from ..errors import UserError
from .engines import SweepError
from .run_task import error_text, execute_run

#: times Ray runs a task again after its node or worker died (a run's own failure is never retried)
RETRIES = 3
#: seconds to wait for the workers of cancelled tasks to be gone (a rerun must not meet them in a run folder)
CANCEL_WAIT_S = 30.0
#: seconds the runs have after Ctrl-C to checkpoint and return before their tasks are cancelled
STOP_WAIT_S = 120.0
#: seconds between a task's looks for the sweep's stop file
STOP_POLL_S = 0.5
#: seconds to wait for a TCP connection to --address before saying nothing answers there
CONNECT_TIMEOUT_S = 5.0
#: seconds for the server at --address to complete a gRPC handshake (a Ray head answers in milliseconds)
HANDSHAKE_TIMEOUT_S = 10.0
#: the most GPUs one run may ask for (more than any node holds; 1e308 and -1 were tracebacks from Ray)
MAX_GPUS_PER_RUN = 64

log = logging.getLogger("kdarena")


class RayEngineError(UserError):
    """Ray is missing, or the cluster cannot run this sweep (a node cannot see --out)."""


def import_ray(embedded: bool = False):
    """``ray``, or a one-line error naming the extra that installs it."""
    if embedded:
        # An embedded Ray serves this process only: keep it on the loopback address (Ray reads this when imported).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError as error:
        raise RayEngineError(f"--engine ray needs Ray: pip install 'kdarena[ray]' ({error})") from None
    return ray


def _watch_for_stop(stop_file: Path, stop: threading.Event, finished: threading.Event) -> None:
    while not finished.wait(STOP_POLL_S):
        if stop_file.exists():
            stop.set()
            return


def _run_on_node(config: dict[str, Any], run_dir: str, stop_file: str) -> dict[str, Any]:
    """The Ray task: one run, plus the node (and GPUs) Ray gave it; the run stops (checkpointed) once
    ``stop_file`` appears (the driver was interrupted)."""
    import ray

    stop, finished = threading.Event(), threading.Event()
    if Path(stop_file).exists():
        stop.set()
    watcher = threading.Thread(target=_watch_for_stop, args=(Path(stop_file), stop, finished), daemon=True)
    watcher.start()
    try:
        outcome = execute_run(config, run_dir, stop_requested=stop)
    finally:
        finished.set()
        watcher.join()
    context = ray.get_runtime_context()
    outcome["node"] = context.get_node_id()
    outcome["node_ip"] = ray.util.get_node_ip_address()
    gpus = context.get_accelerator_ids().get("GPU") or []
    if gpus:
        outcome["gpu"] = ",".join(str(g) for g in gpus)
    return outcome


def _probe(path: str, token: str) -> str | None:
    """On one node: None if the token the driver wrote into ``path`` reads back, else why not."""
    try:
        found = Path(path).read_text()
    except OSError as error:
        return error_text(error)
    return None if found == token else "another file is at that path there (not the same folder)"


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``HOST:PORT`` or ``ray://HOST:PORT``; None for ``auto``; a one-line error for anything else
    (``--address garbage`` was a traceback from inside Ray)."""
    if address == "auto":
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "://" in host or any(c.isspace() for c in host):
        raise RayEngineError(f"--address {address!r}: give auto, HOST:PORT (the head's GCS, e.g. 10.0.0.5:6379) or "
                             "ray://HOST:PORT (the Ray client server, e.g. ray://10.0.0.5:10001)")
    return host.strip("[]"), int(port)


def check_reachable(address: str) -> None:
    """A one-line error when nothing at ``address`` speaks Ray's protocol (``auto`` is left to Ray).

    First a plain TCP connection (nothing listening: seconds, not Ray's minutes of retries), then a gRPC
    handshake, which Ray's GCS and client server both answer: ``ray.init`` at a port where another server
    listens (an HTTP server) waited forever without a word.
    """
    target = _host_port(address)
    if target is None:
        return
    host, port = target
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise RayEngineError(f"--address {address}: nothing answers at {host}:{port} ({error.strerror or error}); "
                             "start the cluster there (ray start --head) or fix the address") from None
    import grpc  # Ray's own dependency

    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=HANDSHAKE_TIMEOUT_S)
    except grpc.FutureTimeoutError:
        raise RayEngineError(f"--address {address}: something listens at {host}:{port}, but it is not a Ray cluster (no "
                             f"gRPC handshake within {HANDSHAKE_TIMEOUT_S:.0f} s); give the address that ray start --head "
                             "printed") from None
    finally:
        channel.close()


def _placeable(wants: dict[str, float], nodes: list[dict[str, Any]]) -> bool:
    return any(n["Resources"].get("CPU", 0) >= wants["num_cpus"] and n["Resources"].get("GPU", 0) >= wants["num_gpus"]
               for n in nodes)


def check_placeable(name: str, wants: dict[str, float], nodes: list[dict[str, Any]], gpus_per_run: float | None) -> None:
    """A run no node of the cluster can hold waits forever in Ray (it only logs "infeasible"): one line naming what
    it asks for and what the largest node has. (A cluster that adds nodes on demand should be started with them.)"""
    if _placeable(wants, nodes):
        return
    cpus = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
    gpus = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
    if wants["num_gpus"] > gpus:
        why = f"--gpus-per-run {gpus_per_run:g}" if gpus_per_run else "train.device=cuda"
        fix = "lower --gpus-per-run" if gpus and gpus_per_run else "set train.device=cpu, or join a cluster with GPUs"
        raise RayEngineError(f"run {name} asks for {wants['num_gpus']:g} GPU(s) ({why}), but no node of the cluster has "
                             f"that many (the most on one node: {gpus:g}); {fix}")
    raise RayEngineError(f"run {name} asks for {wants['num_cpus']:g} CPUs (train.threads), but no node of the cluster has "
                         f"that many (the most on one node: {cpus:g}); lower train.threads")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (what ``kill``, systemd and schedulers send) handled as Ctrl-C: the runs checkpoint and stop.
    It aborted the driver before, leaving the runs unstopped. Only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class RayEngine:
    name = "ray"

    def __init__(self, address: str | None = None, gpus_per_run: float | None = None):
        if gpus_per_run is not None and not (0 < gpus_per_run <= 1 or (float(gpus_per_run).is_integer()
                                                                          and 1 <= gpus_per_run <= MAX_GPUS_PER_RUN)):
            raise RayEngineError(f"--gpus-per-run must be a fraction in (0, 1] or a whole number of GPUs up to "
                                 f"{MAX_GPUS_PER_RUN}, got {gpus_per_run}")
        if address is not None:
            _host_port(address)
        self.address = address
        self.gpus_per_run = gpus_per_run
        self.ray = import_ray(embedded=address is None)  # fails before anything is planned or trained

    @classmethod
    def from_options(cls, jobs: int, address: str | None, gpus_per_run: float | None) -> "RayEngine":
        if jobs != 1:
            raise SweepError("--jobs is the local engine's; with --engine ray as many runs train at once as the cluster "
                             "has resources for (set train.threads, --gpus-per-run)")
        return cls(address, gpus_per_run)

    def prepare(self, config: cfg.Config) -> None:
        """One thread unless the config says otherwise (the task asks Ray for as many CPUs). A worker's output is no
        terminal: its trainer prints a plain progress line every few seconds, which Ray forwards to the driver's log."""
        if config.train.threads is None:
            config.train.threads = 1

    def resources(self, config: cfg.Config, cluster_gpus: float) -> dict[str, float]:
        """What the run's task asks Ray for: its threads as CPUs, and a GPU (or ``--gpus-per-run``) when it runs on
        CUDA, or on ``auto`` in a cluster that has GPUs (Ray hides the GPUs from a task that asked for none)."""
        device = config.train.device
        wants_gpu = device.startswith("cuda") or (device == "auto" and (self.gpus_per_run or cluster_gpus > 0))
        return {"num_cpus": float(config.train.threads or 1), "num_gpus": (self.gpus_per_run or 1.0) if wants_gpu else 0.0}

    def _connect(self) -> bool:
        """Start or join Ray; True when this sweep started it (and so shuts it down)."""
        from tqdm import tqdm

        ray = self.ray
        if ray.is_initialized():
            return False
        if self.address is None:
            with tqdm.external_write_mode():  # Ray's notices (token authentication) on their own line, not on the bar
                ray.init(include_dashboard=False, configure_logging=False)
            return True
        check_reachable(self.address)
        try:
            with tqdm.external_write_mode():
                ray.init(address=self.address, configure_logging=False)
        except ConnectionError as error:
            raise RayEngineError(f"--address {self.address}: cannot join the Ray cluster there ({error_text(error)}); "
                                 "check the address (ray status on the head node prints it)") from None
        return True

    def check_storage(self, exp_dir: Path) -> None:
        """Every node that can run a task reads back a file written here, or the sweep stops naming the node."""
        probe_path = exp_dir / f".storage-probe-{uuid.uuid4().hex}"
        token = uuid.uuid4().hex
        probe_path.write_text(token)
        try:
            self.probe_nodes(probe_path, token)
        finally:
            probe_path.unlink(missing_ok=True)

    def probe_nodes(self, probe_path: Path, token: str) -> None:
        """One probe task pinned to each live node with CPUs or GPUs: does ``probe_path`` there hold ``token``?"""
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [n for n in ray.nodes() if n.get("Alive") and (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)]
        task = ray.remote(_probe)
        refs = [task.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(probe_path), token) for n in nodes]
        for node, problem in zip(nodes, ray.get(refs)):
            if problem:
                raise RayEngineError(
                    f"--out {probe_path.parent} is not visible from Ray node {node['NodeManagerAddress']} ({node['NodeID'][:12]}): "
                    f"{problem}; --out must be a folder every node sees (NFS, Lustre, a shared volume)")

    def run(self, exp_dir: Path, runs: Sequence[tuple[str, cfg.Config, Path]], done: Callable[[str, dict[str, Any]], None]) -> None:
        """Train ``(name, config, run_dir)`` each as a Ray task; ``done(name, outcome)`` as each finishes."""
        if not runs:
            return
        ray = self.ray
        started = self._connect()
        try:
            exp_dir = exp_dir.resolve()  # the workers' working directory is not ours
            self.check_storage(exp_dir)
            task = ray.remote(_run_on_node)
            gpus = ray.cluster_resources().get("GPU", 0)
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            wants = {name: self.resources(config, gpus) for name, config, _ in runs}
            for name, asks in wants.items():
                check_placeable(name, asks, nodes, self.gpus_per_run)
            stop_file = exp_dir / f".stop-{uuid.uuid4().hex}"  # this sweep's own: a stale one stops no later sweep
            pending = {task.options(max_retries=RETRIES, **wants[name])
                       .remote(cfg.to_dict(config), str(run_dir.resolve()), str(stop_file)): name for name, config, run_dir in runs}
            try:
                with sigterm_as_interrupt():  # a second SIGTERM, like a second Ctrl-C, cuts the wait of _stop short
                    try:
                        self._collect(pending, done)
                    except KeyboardInterrupt:
                        self._stop(pending, done, stop_file)
                        raise
            finally:
                stop_file.unlink(missing_ok=True)
        finally:
            if started:
                ray.shutdown()

    def _collect(self, pending: dict, done: Callable[[str, dict[str, Any]], None], timeout: float | None = None) -> None:
        """``done(name, outcome)`` for each task as it finishes, until none is pending or ``timeout`` passes."""
        ray = self.ray
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            if not ready:
                return
            name = pending.pop(ready[0])
            try:
                outcome = ray.get(ready[0])
            except ray.exceptions.RayError as error:  # retries used up (lost nodes, a crashed worker)
                outcome = {"error": error_text(error)}
            done(name, outcome)

    def _stop(self, pending: dict, done: Callable[[str, dict[str, Any]], None], stop_file: Path) -> None:
        """After Ctrl-C: every run checkpoints and returns; runs still going after STOP_WAIT_S (or a second
        Ctrl-C) are cancelled."""
        if not pending:
            return
        stop_file.write_text("stop\n")
        log.warning("interrupted: %d runs checkpoint and stop (up to %.0f s; Ctrl-C again kills them)", len(pending), STOP_WAIT_S)
        try:
            self._collect(pending, done, timeout=STOP_WAIT_S)
        except KeyboardInterrupt:
            pass
        self._cancel(list(pending))

    def _cancel(self, refs: list) -> None:
        """Cancel the unfinished tasks and wait until their workers are gone. By force: a task cancelled gently
        (a KeyboardInterrupt in the worker) that then returns can crash the driver in Ray 2.60 ("Tried to
        complete task that was not pending"), as can, more rarely, one that completes as it is killed, hence
        only the fallback of :meth:`_stop`; the killed runs lose at most the epoch since their last checkpoint."""
        ray = self.ray
        for ref in refs:
            ray.cancel(ref, force=True)
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT_S)
