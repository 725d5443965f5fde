"""The Ray driver never waits forever without a word (issue 36: H9, M9, M11). All on this machine's loopback
address: an HTTP server, and a ``ray.cluster_utils.Cluster`` (a head of 0 CPUs and one worker node of 1 CPU)."""
from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: loopback only

from kdarena import cli  # noqa: E402
from kdarena.errors import UserError  # noqa: E402
from kdarena.experiments.sweep import run_sweep  # noqa: E402
from test_ray_engine import ROOT, _config, _driver, _epochs, _runs, _wait_for  # noqa: E402

pytestmark = pytest.mark.slow


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_an_address_where_an_http_server_listens_is_one_line_within_30_s(tmp_path):
    """H9: ray.init at a port where something else listens waited forever, with no message."""
    pytest.importorskip("ray")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "kdarena.cli", "sweep", str(_config(tmp_path, 1)), "--methods", "dml",
                                 "--seeds", "0", "--engine", "ray", "--address", address, "--out", str(tmp_path / "exp")],
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
        took = time.monotonic() - started
    finally:
        server.shutdown()
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0] == (f"kdarena: error: --address {address}: something listens at {address}, but it is not a Ray cluster "
                        "(no gRPC handshake within 10 s); give the address that ray start --head printed")
    assert took < 30
    assert not list((tmp_path / "exp").glob("dml-seed0*"))


@pytest.mark.parametrize("options, message", [
    (["--address", "garbage"], "--address 'garbage': give auto, HOST:PORT"),
    (["--address", "http://10.0.0.1:80"], "--address 'http://10.0.0.1:80': give auto, HOST:PORT"),
    (["--gpus-per-run", "-1"], "--gpus-per-run must be a fraction in (0, 1] or a whole number of GPUs up to 64, got -1.0"),
    (["--gpus-per-run", "1e308"], "--gpus-per-run must be a fraction in (0, 1] or a whole number of GPUs up to 64, got 1e+308"),
])
def test_bad_ray_options_are_one_line(tmp_path, capsys, options, message):
    """M9: tracebacks from inside Ray."""
    pytest.importorskip("ray")
    rc = cli.main(["sweep", str(_config(tmp_path, 1)), "--methods", "dml", "--seeds", "0", "--engine", "ray", *options,
                   "--out", str(tmp_path / "exp")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0] == f"kdarena: error: {message}" or err[0].startswith(f"kdarena: error: {message}"), err


@pytest.fixture(scope="module")
def one_cpu_cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


@pytest.mark.parametrize("overrides, gpus, message", [
    (["train.threads=64"], None, "run dml-seed0 asks for 64 CPUs (train.threads), but no node of the cluster has that many "
                                 "(the most on one node: 1); lower train.threads"),
    (["train.device=cuda"], None, "run dml-seed0 asks for 1 GPU(s) (train.device=cuda), but no node of the cluster has that "
                                  "many (the most on one node: 0); set train.device=cpu, or join a cluster with GPUs"),
    (["train.device=cuda"], 2.0, "run dml-seed0 asks for 2 GPU(s) (--gpus-per-run 2), but no node of the cluster has that "
                                 "many (the most on one node: 0); set train.device=cpu, or join a cluster with GPUs"),
])
def test_a_run_no_node_can_hold_is_one_line(one_cpu_cluster, tmp_path, overrides, gpus, message):
    """H9: a run asking for resources the cluster lacks waited forever (Ray only logs 'infeasible')."""
    with pytest.raises(UserError) as caught:
        run_sweep(_config(tmp_path, 1), overrides, "dml", "0", tmp_path / "exp", engine="ray",
                  address=one_cpu_cluster.address, gpus_per_run=gpus)
    assert str(caught.value) == message
    assert not (tmp_path / "exp" / "dml-seed0").exists()


def test_sigterm_to_the_driver_checkpoints_the_runs(one_cpu_cluster, tmp_path):
    """M11: SIGTERM aborted the Ray driver without checkpointing its runs; now it is handled as Ctrl-C."""
    exp = tmp_path / "exp"
    driver = _driver(_config(tmp_path, 60), exp, one_cpu_cluster.address, "dml", "0")
    _wait_for(lambda: (exp / "dml-seed0" / "checkpoints" / "last.pt").is_file(), driver)
    driver.send_signal(signal.SIGTERM)
    output = driver.communicate(timeout=120)[0]
    assert driver.returncode == 130, output
    assert "runs checkpoint and stop" in output and "Traceback" not in output, output
    assert _runs(exp)["dml-seed0"]["status"] == "interrupted", output
    assert 0 < len(_epochs(exp / "dml-seed0")) < 60
