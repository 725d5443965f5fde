"""``kdarena sweep --engine ray`` on a real Ray, all on this machine's loopback address, no mocks.

* embedded Ray: the same per-run summaries as the local engine (same seeds, one thread a run);
* a ``ray.cluster_utils.Cluster`` (a head with 0 CPUs, two worker nodes of 1 CPU): the runs spread over
  both nodes; a node removed while its run trains: the run is retried on the other node and resumes from
  its checkpoint (not from epoch 0), with the results of an undisturbed sweep; the driver interrupted
  (SIGINT) mid-sweep, then the same sweep again: finished runs skipped, the rest resumed;
* no Ray installed: one line naming the extra, exit 2; nothing listening at --address: one line, exit 2.
"""
from __future__ import annotations

import io
import json
import re
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

# Before Ray is imported: every node and driver of these tests on 127.0.0.1 (Ray otherwise picks the
# machine's outward address).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from kdarena import cli  # noqa: E402
from kdarena import config as cfg  # noqa: E402
from kdarena.errors import UserError  # noqa: E402
from kdarena.experiments.sweep import SweepError, run_sweep  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BASE = {"models": ["convnet", "convnet"], "data": {"name": "digits", "val_size": 200, "batch_size": 128},
        "perturb": {"enabled": False}, "train": {"progress": False, "tensorboard": False, "threads": 1}}
#: long enough to lose a node mid-run (a checkpoint every epoch) on a fast machine too (CI trains 0.13 s an epoch)
EPOCHS = 12
#: a run the interrupted-driver test stops: far longer than a stop takes to reach it, short enough to resume
LONG_EPOCHS = 60
#: what may differ between two runs of the same config: timings, paths and bookkeeping settings
TIMING = ("wall_seconds", "train_seconds", "eval_seconds", "total_seconds", "images_per_s", "run_dir")


def _config(tmp: Path, epochs: int) -> Path:
    path = tmp / f"digits-e{epochs}.yaml"
    path.write_text(yaml.safe_dump({**BASE, "name": "ray", "output": str(tmp), "optim": {"epochs": epochs}}))
    return path


def comparable(run_dir: Path) -> dict:
    """A run's summary without what two identical runs may differ in (wall time, paths, bookkeeping keys)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    ignored = cfg.marked_keys("bookkeeping")
    summary["config"] = {k: v for k, v in cfg.flatten(summary["config"]).items() if k not in ignored}
    return {k: v for k, v in summary.items() if k not in TIMING}


def _runs(exp: Path) -> dict[str, dict]:
    return {f"{r['label']}-seed{r['seed']}": r for r in json.loads((exp / "sweep.json").read_text())["runs"]}


def _epochs(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _driver(config: Path, exp: Path, address: str, methods: str, seeds: str) -> subprocess.Popen:
    """``kdarena sweep ... --engine ray --address ADDR`` in its own process (what a user starts)."""
    return subprocess.Popen([sys.executable, "-m", "kdarena.cli", "sweep", str(config), "--methods", methods, "--seeds", seeds,
                             "--engine", "ray", "--address", address, "--out", str(exp)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the sweep ended (rc {process.returncode}) before the test could interrupt it:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("timed out waiting for the sweep")
        time.sleep(0.05)


# ----------------------------------------------------------------------------- without Ray
def test_engine_ray_without_ray_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError, as where it is not installed
    rc = cli.main(["sweep", str(_config(tmp_path, 1)), "--methods", "dml", "--seeds", "0", "--engine", "ray", "--out", str(tmp_path / "exp")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "--engine ray needs Ray: pip install 'kdarena[ray]'" in err[0]
    assert not (tmp_path / "exp").exists()  # nothing planned, nothing written


def test_engine_options_are_checked():
    with pytest.raises(SweepError, match="--address and --gpus-per-run are the Ray engine's"):
        run_sweep(None, [], "dml", "0", None, address="auto")
    with pytest.raises(SweepError, match="--jobs is the local engine's"):
        run_sweep(None, [], "dml", "0", None, jobs=2, engine="ray")
    with pytest.raises(UserError, match="--gpus-per-run must be"):
        run_sweep(None, [], "dml", "0", None, engine="ray", gpus_per_run=1.5)


def test_an_address_where_nothing_listens_is_one_line_exit_2(tmp_path, capsys):
    """Ray itself retries such an address for minutes, then raises ConnectionError with a traceback."""
    pytest.importorskip("ray")
    with socket.socket() as probe:  # a port of this machine that nothing listens on once it is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        rc = cli.main(["sweep", str(_config(tmp_path, 1)), "--methods", "dml", "--seeds", "0", "--engine", "ray",
                       "--address", address, "--out", str(tmp_path / "exp")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert f"--address {address}: nothing answers at 127.0.0.1:{port} (Connection refused); start the cluster" in err[0]
        assert not list((tmp_path / "exp").glob("dml-seed0*"))  # nothing trained


def test_a_runs_task_asks_for_its_threads_and_a_gpu_where_it_runs_on_cuda():
    pytest.importorskip("ray")
    from kdarena.experiments.ray_engine import RayEngine

    def asks(overrides: list[str], gpus_per_run: float | None = None, cluster_gpus: float = 0) -> tuple[float, float]:
        config = cfg.load(None, overrides)
        engine = RayEngine("127.0.0.1:1", gpus_per_run)  # no connection is made
        engine.prepare(config)
        assert config.train.progress  # a worker's trainer prints plain progress lines into the driver's log (issue 37)
        wants = engine.resources(config, cluster_gpus)
        return wants["num_cpus"], wants["num_gpus"]

    assert asks([]) == (1, 0)  # threads unset: one thread, one CPU; auto on a cluster without GPUs: none
    assert asks(["train.threads=3", "train.device=cpu"], gpus_per_run=0.5, cluster_gpus=8) == (3, 0)
    assert asks(["train.device=cuda"]) == (1, 1)
    assert asks(["train.device=cuda:0"], gpus_per_run=0.25) == (1, 0.25)
    assert asks(["train.device=auto"], cluster_gpus=2) == (1, 1)


# ----------------------------------------------------------------------------- embedded Ray
def test_embedded_ray_gives_the_local_engines_summaries(tmp_path, capsys):
    pytest.importorskip("ray")
    config = _config(tmp_path, 1)
    local = run_sweep(config, [], "independent,dml", "0,1", tmp_path / "local")
    capsys.readouterr()
    on_ray = run_sweep(config, [], "independent,dml", "0,1", tmp_path / "ray", engine="ray")
    assert [r["status"] for r in on_ray] == [r["status"] for r in local] == ["trained"] * 4
    counted = [line.split("]")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert counted == ["[1/4", "[2/4", "[3/4", "[4/4"], counted  # in the order runs finish ([2/2] came before [1/2])
    for record in on_ray:
        name = Path(record["run_dir"]).name
        assert comparable(tmp_path / "ray" / name) == comparable(tmp_path / "local" / name), name
    index = _runs(tmp_path / "ray")
    assert all(len(r["node"]) == 56 and r["seconds"] > 0 for r in index.values())  # a Ray node id (hex) and the wall time
    assert len({r["node"] for r in index.values()}) == 1  # embedded: one node
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path / "ray")]) == 0
    assert "| dml " in capsys.readouterr().out

    # A run that fails by itself (a non-finite loss with train.nonfinite=stop) is recorded as failed, once.
    diverges = "diverges:method.name=independent;optim.lr=1e30;train.nonfinite=stop"
    with pytest.raises(SweepError, match=r"1 of 3 runs failed: diverges-seed0 \(NonFiniteLossError: network"):
        run_sweep(config, [], f"independent,dml,{diverges}", "0", tmp_path / "ray", engine="ray")
    index = _runs(tmp_path / "ray")
    assert index["diverges-seed0"]["status"] == "failed" and "non-finite loss" in index["diverges-seed0"]["error"]
    assert index["dml-seed0"]["status"] == "skipped" and len(index["dml-seed0"]["node"]) == 56  # where it once trained
    assert not list((tmp_path / "ray").glob("diverges-seed0.old-*"))  # not run again (a retry would move it aside)


# ----------------------------------------------------------------------------- a cluster on this machine
@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    # a lost node is noticed within about a second (the default waits ~15 s of missed health checks)
    system = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": system})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        yield cluster, workers
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def undisturbed(cluster, tmp_path_factory):
    """Two runs of EPOCHS epochs on the two-node cluster, nothing lost."""
    tmp = tmp_path_factory.mktemp("undisturbed")
    config = _config(tmp, EPOCHS)
    records = run_sweep(config, [], "independent,dml", "0", tmp / "exp", engine="ray", address=cluster[0].address)
    return {"tmp": tmp, "config": config, "exp": tmp / "exp", "records": records}


def test_a_ray_sweeps_log_shows_progress_lines_while_runs_train(tmp_path, capfd, monkeypatch):
    # with no terminal (a log file) a Ray sweep printed no progress at all (issue 37); its workers' trainers now
    # print plain lines (every 0 s here, every 10 s by default), which Ray forwards to the driver's output
    pytest.importorskip("ray")  # (before the cluster tests: their Ray's workers would not see the variable)
    monkeypatch.setenv("KDARENA_PROGRESS_EVERY", "0")  # read by the workers Ray starts from this process
    outcome = run_sweep(_config(tmp_path, EPOCHS), ["train.progress=true"], "dml", "0", tmp_path / "exp", engine="ray")
    assert [r["status"] for r in outcome] == ["trained"]
    out = capfd.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if f"epoch 1/{EPOCHS}: " in line and " steps (" in line]
    assert lines and any("steps (100%)" in line for line in lines), (out.out + out.err)[-2000:]


def test_the_sweep_spreads_over_both_nodes(cluster, undisturbed):
    _, workers = cluster
    index = _runs(undisturbed["exp"])
    assert {r["status"] for r in index.values()} == {"trained"}
    assert {r["node"] for r in index.values()} == {w.node_id for w in workers}  # one run on each worker node
    for name in index:
        assert _epochs(undisturbed["exp"] / name) == list(range(EPOCHS))


def test_a_node_that_cannot_see_out_stops_the_sweep_naming_it(cluster, tmp_path):
    """The storage probe, as on a node without the shared folder: there the probe file is not found."""
    from kdarena.experiments.ray_engine import RayEngine, RayEngineError

    ray_cluster, workers = cluster
    engine = RayEngine(ray_cluster.address)
    assert engine._connect()
    try:
        engine.check_storage(tmp_path)  # every node sees this machine's folders
        assert not list(tmp_path.iterdir())  # the probe file is gone
        with pytest.raises(RayEngineError) as caught:
            engine.probe_nodes(tmp_path / "written-on-another-machine", "token")
    finally:
        engine.ray.shutdown()
    message = str(caught.value)
    assert "\n" not in message and f"--out {tmp_path} is not visible from Ray node 127.0.0.1 (" in message
    assert any(f"({w.node_id[:12]})" in message for w in workers) and "FileNotFoundError" in message


def test_a_lost_node_costs_its_run_no_epochs(cluster, undisturbed, tmp_path):
    """A worker node removed while both runs train: its run goes to the other node and resumes from its checkpoint."""
    ray_cluster, workers = cluster
    exp = tmp_path / "exp"
    driver = _driver(undisturbed["config"], exp, ray_cluster.address, "independent,dml", "0")
    names = ["independent-seed0", "dml-seed0"]
    # both runs have checkpointed and neither is done: each is training on its own node. The epoch's metrics
    # line comes before its checkpoint is renamed into place, so wait for the file itself (a node lost in
    # between rightly costs its run a restart: it has nothing to resume from)
    _wait_for(lambda: all((exp / n / "checkpoints" / "last.pt").is_file() for n in names), driver)
    assert not any((exp / n / "summary.json").exists() for n in names)
    lost, survivor = workers
    ray_cluster.remove_node(lost, allow_graceful=False)
    output = driver.communicate(timeout=180)[0]
    assert driver.returncode == 0, output
    workers[:] = [survivor, ray_cluster.add_node(num_cpus=1)]  # two worker nodes again for the next test
    ray_cluster.wait_for_nodes()

    index = _runs(exp)
    assert {r["node"] for r in index.values()} == {survivor.node_id}  # the retried run finished on the other node
    resumed = [n for n in names if (exp / n / "resumes.jsonl").is_file()]
    assert len(resumed) == 1 and index[resumed[0]]["status"] == "resumed", (index, output)
    history = [json.loads(line) for line in (exp / resumed[0] / "resumes.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["step"] > 0  # from its checkpoint, not from epoch 0
    for name in names:
        assert _epochs(exp / name) == list(range(EPOCHS))  # each epoch once: none trained twice into the log
        assert comparable(exp / name) == comparable(undisturbed["exp"] / name), name


def test_an_interrupted_driver_then_the_same_sweep_resumes(cluster, undisturbed, tmp_path):
    """SIGINT to the driver once two runs have finished and a third has checkpointed; then the same sweep again.

    The third run is LONG_EPOCHS long so that it cannot finish in the time the stop takes to reach it (the
    driver writes the stop file, the task looks every STOP_POLL_S, the trainer stops at the next step): with
    runs as short as the others, a fast machine finishes them all before the stop arrives (CI did, at 0.8 s
    a run)."""
    ray_cluster, _ = cluster
    exp = tmp_path / "exp"
    short, long = ["independent-seed0", "dml-seed0"], "long-seed0"
    methods = f"independent,dml,long:method.name=dml;optim.epochs={LONG_EPOCHS}"
    driver = _driver(undisturbed["config"], exp, ray_cluster.address, methods, "0")
    recorded = lambda: (exp / "sweep.json").is_file() and all(_runs(exp).get(n, {}).get("status") == "trained" for n in short)  # noqa: E731
    _wait_for(lambda: recorded() and (exp / long / "checkpoints" / "last.pt").is_file(), driver)
    assert not (exp / long / "summary.json").exists()
    driver.send_signal(signal.SIGINT)
    output = driver.communicate(timeout=120)[0]
    assert driver.returncode == 130, output
    assert "runs checkpoint and stop" in output and "Traceback" not in output, output  # asked, not killed
    assert not (exp / long / "summary.json").exists(), output
    assert _runs(exp)[long]["status"] == "interrupted", output
    stopped_at = len(_epochs(exp / long))
    assert 0 < stopped_at < LONG_EPOCHS

    records = run_sweep(undisturbed["config"], [], methods, "0", exp, engine="ray", address=ray_cluster.address)
    status = {f"{r['label']}-seed{r['seed']}": r["status"] for r in records}
    assert status == {"independent-seed0": "skipped", "dml-seed0": "skipped", long: "resumed"}, status
    history = [json.loads(line) for line in (exp / long / "resumes.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["step"] > 0  # from its checkpoint, not from epoch 0
    assert _epochs(exp / long) == list(range(LONG_EPOCHS))  # each epoch once
    for name in short:  # the undisturbed sweep's runs
        assert comparable(exp / name) == comparable(undisturbed["exp"] / name), name


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_rays_notice_at_start_is_not_written_over_the_sweeps_bar(monkeypatch):
    # "Token authentication is enabled for this Ray cluster..." landed on the progress bar's line (issue 37)
    pytest.importorskip("ray")
    from tqdm import tqdm

    from kdarena.experiments.ray_engine import RayEngine

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)

    class FakeRay:
        def is_initialized(self) -> bool:
            return False

        def init(self, **options) -> None:
            print("NOTICE from ray.init", file=sys.stderr)

    engine = RayEngine(None, None)
    engine.ray = FakeRay()
    bar = tqdm(total=2, desc="sweep", file=sys.stderr)
    assert engine._connect() is True
    bar.close()
    before = terminal.getvalue().split("NOTICE")[0]
    assert re.search(r"it/s\]\r {20,}\r$", before), repr(before[-80:])  # the bar was drawn, then cleared for the notice
