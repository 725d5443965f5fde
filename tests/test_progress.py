"""Progress without a terminal (issue 37): a log file got no progress at all, and evaluation none anywhere."""
from __future__ import annotations

import io

import pytest

from kdarena import progress
from kdarena.config import load
from kdarena.trainer import train


def test_plain_progress_prints_a_line_at_most_every_interval(monkeypatch):
    clock = iter([100.0, 103.0, 111.0, 112.0, 125.5])  # start, then one reading per update
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    bar = progress.progress_bar(40, "epoch 2/5", initial=4, unit="steps", stream=out)
    assert isinstance(bar, progress.PlainProgress)  # a StringIO is no terminal
    bar.set_postfix(loss="1.234", acc="55.0", refresh=False)
    for _ in range(4):
        bar.update(1)
    assert out.getvalue().splitlines() == ["epoch 2/5: 6/40 steps (15%), 11 s, loss=1.234, acc=55.0",
                                           "epoch 2/5: 8/40 steps (20%), 26 s, loss=1.234, acc=55.0"]


def test_training_and_evaluation_print_progress_lines_into_a_log(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # every update prints (the default is every 10 s)
    config = load(None, ["models=[convnet,convnet]", "method.name=cd-mean", "perturb.enabled=false", "data.name=digits",
                         "data.train_subset=128", "data.val_size=64", "data.batch_size=32", "data.eval_batch_size=32",
                         "optim.epochs=1", "train.device=cpu", "train.threads=1", "train.tensorboard=false",
                         "train.progress=true"])
    train(config, run_dir=tmp_path / "run")
    err = capsys.readouterr().err.splitlines()  # pytest's captured stderr is no terminal, as a log file
    assert any(line.startswith("epoch 1/1: 2/2 steps (100%), ") and ", loss=" in line for line in err), err[:3]
    for what in ("evaluating val", "evaluating test", "evaluating mean0 on test"):
        assert any(line.startswith(f"{what}: ") and " batches (100%)" in line for line in err), (what, err[-10:])


def test_predict_on_many_images_prints_progress_lines_into_a_log(monkeypatch, tmp_path, capsys):
    # tqdm wrote carriage-return updates into a log file; now plain lines (every update here)
    pytest.importorskip("PIL")
    from test_deploy import run_config, write_images

    from kdarena.deploy.predict import predict

    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    monkeypatch.setenv("KDARENA_CACHE", str(tmp_path / "cache"))
    root = write_images(tmp_path / "data", train_per_class=8, test_per_class=340)  # 1,020 test images
    train(run_config(root, val_size=3), run_dir=tmp_path / "run")
    capsys.readouterr()
    result = predict(str(tmp_path / "run"), [str(root / "test")], batch_size=512)
    assert len(result.names) == 1020
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("predicting: ")]
    assert [line.split(",")[0] for line in lines] == ["predicting: 512/1020 images (50%)", "predicting: 1020/1020 images (100%)"]
