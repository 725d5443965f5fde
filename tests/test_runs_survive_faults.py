"""Fault injection: bad input, numerical faults and crashes never lose a run.

* config: every bad value is one ConfigError line through the CLI (exit 2); a hypothesis fuzz of
  ``config.validate`` / ``config.load`` raises nothing else;
* data: missing, truncated or corrupt files and unreadable images give one line naming the file;
* checkpoints: truncated / foreign checkpoints are refused with the reason, the previous good one
  is used; a full disk mid-write leaves the last checkpoint intact and no temporary file;
* crashes: ``kill -9`` of a training subprocess at several points (before its first checkpoint,
  at seeded random times, inside a checkpoint write) and SIGTERM / SIGINT, each followed by
  ``--resume``: the final weights equal an uninterrupted run's bit for bit;
* numerical faults: a network whose weights turn NaN mid-training, under train.nonfinite
  skip / rebirth / stop.

The counts in RELIABILITY.md come from this file (``pytest tests/test_runs_survive_faults.py``).
"""
from __future__ import annotations

import errno
import gzip
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kdarena.data.datasets as datasets_mod
from kdarena.engine import checkpoint as ckpt
from kdarena import config as cfg
from kdarena.cli import main
from kdarena.models import available, register
from kdarena.models.convnet import ConvNet
from kdarena.records.folder import read_metrics

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# ------------------------------------------------------------------------------ the fault model
# FAULT configures the networks built next (in this process): network number FAULT["network"]
# (in build order) fills its classifier weights with NaN on its FAULT["after"]-th training forward.
FAULT = {"network": None, "after": 0, "created": 0}
SLEEP_ENV = "KDARENA_FAULT_SLEEP"  # seconds each training forward sleeps (subprocess runs: room to kill)
KILL_ENV = "KDARENA_FAULT_KILL_IN_CHECKPOINT_WRITE"  # SIGKILL itself inside the fsync of the N-th checkpoint temp file
KILL_FORWARD_ENV = "KDARENA_FAULT_KILL_AT_FORWARD"  # SIGKILL itself on the N-th training forward


class FaultNet(ConvNet):
    def __init__(self, num_classes: int, in_channels: int, nan_after: int | None):
        super().__init__(num_classes, in_channels, width=8)
        self.nan_after, self.calls = nan_after, 0
        self.sleep = float(os.environ.get(SLEEP_ENV, "0") or 0)
        self.kill_at = int(os.environ.get(KILL_FORWARD_ENV, "0") or 0)

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if self.sleep:
                time.sleep(self.sleep)
            if self.nan_after is not None and self.calls == self.nan_after:
                with torch.no_grad():
                    self.fc.weight.fill_(float("nan"))  # diverged: NaN from now on, until re-born
        return super().forward(x)


if "faultnet" not in available():
    @register("faultnet")
    def faultnet(num_classes: int = 10, in_channels: int = 3, **kwargs) -> FaultNet:
        index = FAULT["created"]
        FAULT["created"] += 1
        return FaultNet(num_classes, in_channels, FAULT["after"] if index == FAULT["network"] else None)


def _install_kill_in_checkpoint_write() -> None:
    """Subprocess side of KILL_ENV: kill -9 ourselves after writing, before renaming, a checkpoint."""
    target = int(os.environ[KILL_ENV])
    real_fsync = os.fsync
    seen = [0]

    def fsync(fd):
        real_fsync(fd)
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return
        if os.path.basename(name).startswith("last.pt.") and name.endswith(".tmp"):
            seen[0] += 1
            if seen[0] == target:
                os.kill(os.getpid(), signal.SIGKILL)

    os.fsync = fsync


if os.environ.get(KILL_ENV):
    _install_kill_in_checkpoint_write()


@pytest.fixture(autouse=True)
def _isolate():
    """Reset the fault model and undo the process-wide torch switches a Trainer sets."""
    FAULT.update(network=None, after=0, created=0)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


TINY = [
    "models=[faultnet,faultnet]", "data.name=digits", "data.train_subset=256", "data.val_size=64",
    "data.batch_size=32", "optim.epochs=2", "optim.lr=0.05", "train.device=cpu", "train.precision=fp32",
    "train.progress=false", "train.tensorboard=false", "train.threads=1",
]  # 192 training samples / 32 = 6 steps per epoch


def write_config(path: Path, *overrides: str) -> Path:
    path.write_text(cfg.dump(cfg.load(None, TINY + list(overrides))))
    return path


def cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.splitlines()
    assert lines and lines[-1].startswith("kdarena: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


# ============================================================================== 1. config errors
BAD_CONFIGS = [  # (override, words the one-line message must contain)
    ("optim.bogus=1", ["optim.bogus", "valid keys in optim", "lr"]),
    ("bogus=1", ["'bogus'", "valid keys in the top level"]),
    ("optim.lr=abc", ["optim.lr", "'abc'", "valid number"]),
    ("optim.lr=0", ["optim.lr", "got 0", "greater than 0", "optim.lr=0.1"]),
    ("optim.lr=-0.5", ["optim.lr", "got -0.5", "greater than 0"]),
    ("optim.lr=.inf", ["optim.lr", "finite"]),
    ("optim.epochs=1.5", ["optim.epochs", "1.5", "integer"]),
    ("models=[faultnet]", ["'models'", "['faultnet']", "at least 2 networks", "method.name=independent"]),
    ("method.name=foo", ["method.name", "'foo'", "'cd'", "method.name=cd"]),
    ("method.alpha=-1", ["method.alpha", "got -1", "greater than or equal to 0"]),
    ("data.name=mnist", ["data.name", "'mnist'", "fashion_mnist", "digits"]),
    ("data.val_size=1.5", ["data.val_size", "1.5", "fraction"]),
    ("data.val_size=x", ["data.val_size", "'x'", "valid integer"]),
    ("perturb.ops=3", ["perturb.ops", "got 3", "'paper'"]),
    ("train.device=gpu0", ["train.device", "'gpu0'", "cuda:N"]),
    ("train.nonfinite=ignore", ["train.nonfinite", "'ignore'", "'rebirth'"]),
    ("optim", ["'optim'", "key=value"]),
    ("=1", ["'=1'", "empty key"]),
]


@pytest.mark.parametrize("override,needles", BAD_CONFIGS, ids=[o for o, _ in BAD_CONFIGS])
def test_bad_config_value_is_one_line_exit_2(tmp_path, capsys, override, needles):
    config = write_config(tmp_path / "c.yaml")
    code, err = cli(capsys, "train", str(config), override, "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,needles", [
    ("models=[faultnet,nosuchnet]", ["'nosuchnet'", "available:", "convnet", "resnet20", "timm:NAME"]),
    ("perturb.ops=[mixup,nosuchop]", ["perturb.ops", "nosuchop", "cutmix"]),
    ("data.batch_size=5000", ["data.batch_size=5000", "larger than the training set"]),
    ("data.val_size=100000", ["data.val_size=100000", "smaller value"]),
])
def test_bad_value_found_while_building_is_one_line_exit_2(tmp_path, capsys, override, needles):
    config = write_config(tmp_path / "c.yaml")
    code, err = cli(capsys, "train", str(config), override, "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, *needles)


def test_bad_yaml_missing_file_directory_binary(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("models: [a, b\n  x: 1\n")
    assert_one_line_error(*cli(capsys, "train", str(tmp_path / "bad.yaml")), "bad.yaml", "not valid YAML", "line 2")
    assert_one_line_error(*cli(capsys, "train", str(tmp_path / "nope.yaml")), "nope.yaml", "does not exist")
    assert_one_line_error(*cli(capsys, "train", str(tmp_path)), "is a directory")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00\x81")
    assert_one_line_error(*cli(capsys, "train", str(tmp_path / "bin.yaml")), "bin.yaml", "UTF-8")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert_one_line_error(*cli(capsys, "train", str(tmp_path / "list.yaml")), "list.yaml", "mapping")


def test_debug_shows_the_traceback(tmp_path):
    config = write_config(tmp_path / "c.yaml")
    with pytest.raises(cfg.ConfigError, match="optim.lr"):
        main(["train", str(config), "optim.lr=0", "--debug"])


# ------------------------------------------------------------------------------ config fuzzing
_KEYS = ["name", "seed", "output", "models", "data", "method", "perturb", "optim", "train", "parameters",
         "lr", "epochs", "batch_size", "val_size", "ops", "alpha", "device", "nonfinite", "every", "betas",
         "milestones", "feature_layers", "bogus"]
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["cd", "dml", "kd", "digits", "paper", "cpu", "auto", "skip", "1e-3", "[1, 2]"]),
)
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.one_of(st.sampled_from(_KEYS), st.text(max_size=6), st.integers()), children, max_size=4)),
    max_leaves=12,
)
_configs = st.dictionaries(st.one_of(st.sampled_from(_KEYS), st.text(max_size=8)), _values, max_size=6)
_override_keys = st.lists(st.sampled_from(_KEYS + ["", " ", "x y"]), min_size=0, max_size=3).map(".".join)
_overrides = st.lists(
    st.one_of(st.builds(lambda k, v: f"{k}={v}", _override_keys, st.text(max_size=15)),
              st.builds(lambda k, v: f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}", _override_keys, _values),
              st.text(max_size=20)),
    max_size=4,
)
FUZZ_EXAMPLES = 200


def _only_config_errors(call):
    try:
        return call()
    except cfg.ConfigError as error:
        message = str(error)
        assert message and "\n" not in message, repr(message)
        return None


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=_configs, overrides=_overrides)
def test_fuzz_validate_raises_only_config_error(raw, overrides):
    _only_config_errors(lambda: cfg.validate(raw))
    _only_config_errors(lambda: cfg.validate(cfg.apply_overrides(raw, overrides)))
    _only_config_errors(lambda: cfg.load(None, overrides))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(document=st.one_of(_configs.map(lambda d: yaml.safe_dump(d, allow_unicode=True)), st.text(max_size=60), st.binary(max_size=40)),
       overrides=_overrides)
def test_fuzz_load_raises_only_config_error(document, overrides):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        if isinstance(document, bytes):
            path.write_bytes(document)
        else:
            path.write_text(document, encoding="utf-8")
        _only_config_errors(lambda: cfg.load(path, overrides))


# ============================================================================== 2. data errors
@pytest.fixture
def no_data(tmp_path, monkeypatch):
    """No KDARENA_DATA, an empty cache and no system data directories."""
    monkeypatch.delenv("KDARENA_DATA", raising=False)
    monkeypatch.setenv("KDARENA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets_mod, "SYSTEM_DATA_DIRS", [str(tmp_path / "system")])
    return tmp_path


def _idx(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()


def write_fashion(folder: Path, labels_high: int = 10) -> Path:
    rng = np.random.RandomState(0)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in {"train-images-idx3-ubyte": rng.randint(0, 256, (80, 28, 28)),
                      "train-labels-idx1-ubyte": rng.randint(0, labels_high, 80),
                      "t10k-images-idx3-ubyte": rng.randint(0, 256, (20, 28, 28)),
                      "t10k-labels-idx1-ubyte": rng.randint(0, 10, 20)}.items():
        (folder / (stem + ".gz")).write_bytes(gzip.compress(_idx(arr)))
    return folder


def write_cifar10(root: Path) -> Path:
    top = root / "cifar-10-batches-py"
    top.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.randint(0, 256, (16, 3072)).astype(np.uint8), b"labels": rng.randint(0, 10, 16).tolist()}
        (top / name).write_bytes(pickle.dumps(batch))
    (top / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return top


def data_run(capsys, tmp_path, *overrides):
    config = write_config(tmp_path / "c.yaml", "data.val_size=0", "data.batch_size=8", "data.train_subset=null", "optim.epochs=1")
    return cli(capsys, "train", str(config), *overrides, "--out", str(tmp_path / "run"))


def test_data_missing_files_name_the_folder_and_fix(no_data, capsys):
    empty = no_data / "empty"
    empty.mkdir()
    code, err = data_run(capsys, no_data, "data.name=fashion_mnist", f"data.root={empty}")
    assert_one_line_error(code, err, "Fashion-MNIST not found", str(empty), "data.download=true")
    code, err = data_run(capsys, no_data, "data.name=cifar10", f"data.root={empty}")
    assert_one_line_error(code, err, "cifar10 not found", "data_batch_1", str(empty))


def test_data_truncated_idx_names_the_file(no_data, capsys):
    folder = write_fashion(no_data / "fm")
    images = folder / "train-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-100]))
    code, err = data_run(capsys, no_data, "data.name=fashion_mnist", f"data.root={folder}")
    assert_one_line_error(code, err, str(images), "truncated")
    images.write_bytes(images.read_bytes()[:50])  # a cut-off gzip stream
    code, err = data_run(capsys, no_data, "data.name=fashion_mnist", f"data.root={folder}")
    assert_one_line_error(code, err, str(images), "gzip")


def test_data_labels_out_of_range_name_the_file(no_data, capsys):
    folder = write_fashion(no_data / "fm", labels_high=13)
    code, err = data_run(capsys, no_data, "data.name=fashion_mnist", f"data.root={folder}")
    assert_one_line_error(code, err, "train-labels-idx1-ubyte", "out of range")


def test_data_corrupt_pickle_names_the_file(no_data, capsys):
    top = write_cifar10(no_data / "c10")
    batch = top / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:200])
    code, err = data_run(capsys, no_data, "data.name=cifar10", f"data.root={no_data / 'c10'}")
    assert_one_line_error(code, err, str(batch), "corrupt or truncated")


@pytest.mark.parametrize("workers", [0, 1])
def test_data_unreadable_image_names_the_file(tmp_path, capsys, workers):
    from PIL import Image

    rng = np.random.RandomState(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "img" / split / c).mkdir(parents=True)
            for k in range(4):
                Image.fromarray(rng.randint(0, 256, (10, 10, 3)).astype(np.uint8)).save(tmp_path / "img" / split / c / f"{k}.png")
    broken = tmp_path / "img" / "train" / "b" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    code, err = data_run(capsys, tmp_path, "data.name=imagefolder", f"data.root={tmp_path / 'img'}", "data.batch_size=3",
                         "data.image_size=8", f"data.num_workers={workers}", "method.name=independent", "perturb.enabled=false")
    assert_one_line_error(code, err, str(broken), "cannot read image")


# ============================================================================== 3. checkpoints
def stopped_run(tmp_path: Path, capsys, steps: int = 3, *overrides: str) -> Path:
    config = write_config(tmp_path / "c.yaml", "train.checkpoint_every_steps=1", *overrides)
    run_dir = tmp_path / "run"
    code, err = cli(capsys, "train", str(config), f"train.stop_after_steps={steps}", "--out", str(run_dir))
    assert code == 0, err
    return run_dir


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, caplog):
    run_dir = stopped_run(tmp_path, capsys, 3)
    last, prev = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "last.prev.pt"
    assert ckpt.load(last)["global_step"] == 3 and ckpt.load(prev)["global_step"] == 2
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(ckpt.CheckpointError, match="last.pt.*unreadable \\(truncated or corrupt"):
        ckpt.load(last)
    assert ckpt.load(prev)["global_step"] == 2  # the older one still loads

    code, err = cli(capsys, "train", "--resume", str(run_dir))  # resumes at step 2, saves after step 3 and stops
    assert code == 0, err
    assert "unreadable" in caplog.text and "last.prev.pt" in caplog.text  # said what happened
    assert ckpt.load(last)["global_step"] == 3
    assert ckpt.load(prev)["global_step"] == 2  # the good previous one was not replaced by the bad file
    assert (run_dir / "checkpoints" / "last.corrupt.pt").is_file()  # kept for inspection


def test_truncated_checkpoint_without_a_previous_one_is_a_clear_error(tmp_path, capsys):
    run_dir = stopped_run(tmp_path, capsys, 3)
    last = run_dir / "checkpoints" / "last.pt"
    (run_dir / "checkpoints" / "last.prev.pt").unlink()
    last.write_bytes(b"PK\x03\x04 not really a zip")
    code, err = cli(capsys, "train", "--resume", str(run_dir))
    assert_one_line_error(code, err, str(last), "unreadable")


def test_checkpoint_for_another_config_or_model_says_what_differs(tmp_path, capsys):
    run_dir = stopped_run(tmp_path, capsys, 2)
    code, err = cli(capsys, "train", "--resume", str(run_dir), "method.name=dml")
    assert_one_line_error(code, err, "cannot resume", "method.name changed: it is 'cd' in the run but 'dml' now", "--out")
    code, err = cli(capsys, "train", "--resume", str(run_dir), "models=[faultnet,convnet]")
    assert_one_line_error(code, err, "models changed: it is ['faultnet', 'faultnet'] in the run but ['faultnet', 'convnet'] now")
    code, err = cli(capsys, "train", "--resume", str(run_dir), "data.batch_size=16")
    assert_one_line_error(code, err, "global batch of 32")
    # a checkpoint of another run copied into this one (its config.yaml says cd, the checkpoint dml)
    (tmp_path / "other").mkdir()
    other = stopped_run(tmp_path / "other", capsys, 2, "method.name=dml")
    for name in ("last.pt", "last.prev.pt"):
        (run_dir / "checkpoints" / name).write_bytes((other / "checkpoints" / name).read_bytes())
    code, err = cli(capsys, "train", "--resume", str(run_dir))
    assert_one_line_error(code, err, "made for another run", "method.name is 'dml' in the checkpoint but 'cd' now")
    # a file that is not a kdarena checkpoint at all
    torch.save({"weights": torch.zeros(2)}, run_dir / "checkpoints" / "last.pt")
    (run_dir / "checkpoints" / "last.prev.pt").unlink()
    code, err = cli(capsys, "train", "--resume", str(run_dir))
    assert_one_line_error(code, err, "is not a kdarena checkpoint")


@pytest.mark.parametrize("where", ["torch.save", "fsync"])
def test_full_disk_during_a_checkpoint_write_keeps_the_last_one(tmp_path, capsys, monkeypatch, where):
    run_dir = stopped_run(tmp_path, capsys, 2)
    folder = run_dir / "checkpoints"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    real_fsync = os.fsync

    def full_save(state, handle):  # a partial write, then the disk is full
        handle.write(b"PK\x03\x04" + b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_fsync(fd):  # the data cannot reach the disk: only for the checkpoint's temporary file
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("last.pt."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    if where == "torch.save":
        monkeypatch.setattr(ckpt.torch, "save", full_save)
    else:
        if not os.path.isdir("/proc/self/fd"):
            pytest.skip("needs /proc/self/fd")
        monkeypatch.setattr(ckpt.os, "fsync", full_fsync)
    code, err = cli(capsys, "train", "--resume", str(run_dir), "train.stop_after_steps=3")
    monkeypatch.undo()
    assert_one_line_error(code, err, "No space left on device")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # intact, and no temporary file left
    assert ckpt.load(folder / "last.pt")["global_step"] == 2
    code, err = cli(capsys, "train", "--resume", str(run_dir), "train.stop_after_steps=3")  # space freed: goes on
    assert code == 0, err
    assert ckpt.load(folder / "last.pt")["global_step"] == 3


def test_resume_before_the_first_checkpoint_starts_from_step_0(tmp_path, capsys, caplog):
    config = write_config(tmp_path / "c.yaml", "optim.epochs=1")
    full = tmp_path / "full"
    assert cli(capsys, "train", str(config), "--out", str(full))[0] == 0
    crashed = tmp_path / "crashed"  # what a kill between run-dir set-up and the first checkpoint leaves
    crashed.mkdir()
    (crashed / "config.yaml").write_text((full / "config.yaml").read_text())
    (crashed / "metrics.jsonl").write_text('{"epoch": 0, "net0/train_lo')  # a line cut short
    code, err = cli(capsys, "train", "--resume", str(crashed))
    assert code == 0, err
    assert "no checkpoint yet" in caplog.text
    a, b = ckpt.load(full / "checkpoints" / "last.pt"), ckpt.load(crashed / "checkpoints" / "last.pt")
    assert a["global_step"] == b["global_step"] == 6
    assert len(read_metrics(crashed)) == 1


# ============================================================================== 4. numerical faults
def nan_trainer(tmp_path: Path, policy: str, network: int = 1, after: int = 4, *overrides: str):
    from kdarena.trainer import Trainer

    FAULT.update(network=network, after=after, created=0)
    trainer = Trainer(cfg.load(None, TINY + [f"train.nonfinite={policy}", "method.name=cd", *overrides]), tmp_path / policy)
    trainer.step_log = []
    return trainer


def finite_network(state: dict[str, torch.Tensor], i: int) -> bool:
    return all(torch.isfinite(v).all() for k, v in state.items() if k.startswith(f"networks.{i}.") and v.is_floating_point())


def test_nan_network_is_skipped_never_teaches_and_the_others_train_on(tmp_path):
    trainer = nan_trainer(tmp_path, "skip")
    trainer.fit()
    records = read_metrics(trainer.run_dir)
    skipped = [r["net1/skipped_steps"] for r in records]
    assert skipped == [6 - 3, 6] and all(r["net0/skipped_steps"] == 0 for r in records)  # NaN from its 4th step on
    assert all(r["net0/reborn"] == r["net1/reborn"] == 0 for r in records)
    assert all(not np.isfinite(record["losses"][1]) for record in trainer.step_log[3:])
    assert all(record["teacher"] == 0 for record in trainer.step_log[3:])  # the NaN network never teaches
    state = ckpt.load(trainer.run_dir / "checkpoints" / "last.pt")["group"]
    assert finite_network(state, 0) and not finite_network(state, 1)
    assert records[-1]["net0/train_loss"] < records[0]["net0/train_loss"]  # the healthy network learns on
    assert all(np.isfinite(r["net0/train_loss"]) and np.isfinite(r["net1/train_loss"]) for r in records)


def test_nan_network_is_reborn_from_the_teacher_and_trains_on(tmp_path):
    trainer = nan_trainer(tmp_path, "rebirth")
    trainer.fit()
    records = read_metrics(trainer.run_dir)
    assert [r["net1/reborn"] for r in records] == [1, 0] and [r["net1/skipped_steps"] for r in records] == [1, 0]
    log = trainer.step_log
    assert not np.isfinite(log[3]["losses"][1]) and log[3]["teacher"] == 0
    assert all(np.isfinite(record["losses"]).all() for record in log[4:])  # trains on after the rebirth
    state = ckpt.load(trainer.run_dir / "checkpoints" / "last.pt")["group"]
    assert finite_network(state, 0) and finite_network(state, 1)
    assert not torch.equal(state["networks.0.fc.weight"], state["networks.1.fc.weight"])  # not frozen copies


def test_nan_with_stop_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, capsys):
    FAULT.update(network=0, after=4, created=0)
    config = write_config(tmp_path / "c.yaml", "train.nonfinite=stop", "train.checkpoint_every_steps=1")
    code, err = cli(capsys, "train", str(config), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "network(s) [0] produced a non-finite loss at step 3", "train.nonfinite=skip or rebirth", "optim.grad_clip")
    assert ckpt.load(tmp_path / "run" / "checkpoints" / "last.pt")["global_step"] == 3


# ============================================================================== 5. crashes
# One run of 5 epochs x 6 steps (a checkpoint after every step, deterministic fp32 on one thread)
# on a small synthetic Fashion-MNIST-format data set (no scikit-learn import: fast subprocesses),
# stopped six times, each stop followed by --resume. Its final state must equal an uninterrupted
# run's bit for bit.
RUN_ARGS = TINY[:] + ["data.name=fashion_mnist", "optim.epochs=5", "train.checkpoint_every_steps=1",
                      "train.deterministic=true", "method.name=cd", "perturb.ops=paper"]
TOTAL_STEPS = 30
SLEEP = "0.02"  # per training forward: ~50 ms a step, so that kills and signals land mid-training
TIMING_KEYS = ("seconds", "images_per_s")
CRASH_SEED = 20240611


def synthetic_fashion(folder: Path) -> Path:
    """256 + 64 learnable 12x12 images (class template + noise) in IDX files."""
    rng = np.random.RandomState(1)
    templates = rng.randint(0, 256, (10, 12, 12))
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", 256), ("t10k", 64)):
        labels = rng.randint(0, 10, n)
        images = np.clip(templates[labels] * 0.6 + rng.randint(0, 100, (n, 12, 12)), 0, 255)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(images))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels))
    return folder


def launch(run_dir: Path, resume: bool, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m kdarena train`` in a subprocess (via kdarena.cli.main, with this file imported for faultnet)."""
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_runs_survive_faults; "
            "from kdarena.cli import main; sys.exit(main(sys.argv[1:]))")
    args = ["train", "--resume", str(run_dir)] if resume else ["train", str(run_dir.parent / "run.yaml"), "--out", str(run_dir)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           SLEEP_ENV: SLEEP, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, cwd=str(run_dir.parent),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def wait_for_training(proc: subprocess.Popen, config_yaml: Path, old_inode: int | None, timeout: float = 90.0) -> None:
    """Until the (re)started run has (re)written its config.yaml, i.e. its trainer is set up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if inode(config_yaml) not in (None, old_inode):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.002)
    raise AssertionError("the training subprocess did not start")


def finish(proc: subprocess.Popen, timeout: float = 120.0) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def checkpoint_step(run_dir: Path) -> int:
    last = run_dir / "checkpoints" / "last.pt"
    return ckpt.load(last)["global_step"] if last.exists() else 0


def assert_same_run(expected: Path, actual: Path) -> None:
    a, b = ckpt.load(expected / "checkpoints" / "last.pt"), ckpt.load(actual / "checkpoints" / "last.pt")
    assert a["global_step"] == b["global_step"] == TOTAL_STEPS
    assert a["group"].keys() == b["group"].keys()
    different = [k for k in a["group"] if not torch.equal(a["group"][k], b["group"][k])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"
    for key, value in a["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    strip = lambda rs: [{k: v for k, v in r.items() if not any(t in k for t in TIMING_KEYS)} for r in rs]  # noqa: E731
    assert strip(read_metrics(expected)) == strip(read_metrics(actual))
    assert not list((actual / "checkpoints").glob("*.tmp")), "a temporary file was left behind"


def test_kill_9_and_signals_at_random_points_then_resume_is_bitwise_identical(tmp_path, monkeypatch):
    from kdarena.trainer import Trainer

    rng = random.Random(CRASH_SEED)
    data = synthetic_fashion(tmp_path / "data")
    args = RUN_ARGS + [f"data.root={data}"]
    (tmp_path / "run.yaml").write_text(cfg.dump(cfg.load(None, args)))
    monkeypatch.delenv("KDARENA_DATA", raising=False)
    Trainer(cfg.load(None, args), tmp_path / "baseline").fit()  # uninterrupted, in this process

    run_dir = tmp_path / "run"
    config_yaml = run_dir / "config.yaml"
    stops: list[dict] = []

    def stop(how: str, sig: signal.Signals | None = None, delay: float = 0.0, env_extra=None) -> None:
        before = inode(config_yaml)
        proc = launch(run_dir, resume=before is not None, env_extra=env_extra)
        if sig is not None:
            wait_for_training(proc, config_yaml, before)
            time.sleep(delay)
            proc.send_signal(sig)
        code, err = finish(proc)
        stops.append({"how": how, "rc": code, "step": checkpoint_step(run_dir),
                      "tmp_left": len(list((run_dir / "checkpoints").glob("last.pt.*.tmp")))})
        if sig in (signal.SIGTERM, signal.SIGINT):
            assert code == 128 + sig, err  # as a shell reports a process ended by sig
            assert f"stopped by signal {int(sig)} at step {stops[-1]['step']};" in err and f"--resume {run_dir}" in err
            assert "Traceback" not in err
        else:
            assert code == -signal.SIGKILL, (stops, err)  # the kill landed while the run was going

    stop("kill -9 in the first training step, before the first checkpoint", env_extra={KILL_FORWARD_ENV: "1"})
    assert stops[-1]["step"] == 0 and config_yaml.is_file()  # resume must start from step 0
    stop("SIGTERM", signal.SIGTERM, rng.uniform(0.1, 0.4))
    stop("kill -9 at a random time", signal.SIGKILL, rng.uniform(0.1, 0.4))
    stop("SIGINT", signal.SIGINT, rng.uniform(0.1, 0.4))
    stop("kill -9 inside a checkpoint write (after fsync, before the rename)", env_extra={KILL_ENV: str(rng.randint(1, 3))})
    assert stops[-1]["tmp_left"] == 1, stops  # it did land mid-write; the next save removes the leftover
    steps = [s["step"] for s in stops]
    assert steps == sorted(steps) and 0 < steps[1] and steps[-1] < TOTAL_STEPS, stops

    code, err = finish(launch(run_dir, resume=True))
    assert code == 0, err
    assert_same_run(tmp_path / "baseline", run_dir)
    print("stops:", json.dumps(stops))
