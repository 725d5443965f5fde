"""Only bad input is a one-line "user error" (exit 2); a bug of ours keeps its traceback."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from kdarena import config as cfg
from kdarena.cli import main
from kdarena.errors import UserError
from kdarena.methods import Independent

TINY = ["models=[convnet]", "method.name=independent", "perturb.enabled=false", "data.name=digits", "data.train_subset=128",
        "data.val_size=32", "data.batch_size=32", "optim.epochs=1", "train.device=cpu", "train.precision=fp32",
        "train.progress=false", "train.tensorboard=false", "train.threads=1"]


def _boom(self, step):
    raise ValueError("a bug inside a method's losses")


def test_an_internal_value_error_is_raised_with_its_traceback_not_reported_as_the_users(tmp_path, monkeypatch, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(cfg.dump(cfg.load(None, TINY)))
    monkeypatch.setattr(Independent, "losses", _boom)
    with pytest.raises(ValueError, match="a bug inside a method's losses"):
        main(["train", str(config), "--out", str(tmp_path / "run")])
    assert "user error" not in capsys.readouterr().err and "kdarena: error" not in capsys.readouterr().err


def test_the_command_line_prints_the_traceback_of_an_internal_error(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(cfg.dump(cfg.load(None, TINY)))
    script = ("import sys\nfrom kdarena.methods import Independent\n"
              "def boom(self, step):\n    raise ValueError('a bug inside a method losses')\n"
              "Independent.losses = boom\nfrom kdarena.cli import main\n"
              f"sys.exit(main(['train', {str(config)!r}, '--out', {str(tmp_path / 'run')!r}]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback (most recent call last)" in done.stderr and "in boom" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "ValueError: a bug inside a method losses"
    assert "kdarena: error" not in done.stderr


def test_bad_input_is_one_line_and_debug_shows_its_traceback(tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    assert main(["train", missing]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdarena: error: ") and "nope.yaml" in err and len(err.splitlines()) == 1
    with pytest.raises(UserError, match="nope.yaml"):
        main(["--debug", "train", missing])


def test_a_missing_optional_dependency_is_a_user_error_naming_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    from kdarena import models
    from kdarena.errors import MissingExtraError

    with pytest.raises(MissingExtraError, match=r"kdarena\[timm\]"):
        models.create("timm:resnet18", num_classes=10)


def test_a_model_that_breaks_inside_its_builder_is_our_bug_an_unknown_name_is_the_users(tmp_path, monkeypatch, capsys):
    """Both raise ValueError inside models.create; only a name the zoo does not know is the user's to fix."""
    from kdarena.models import registry

    config = tmp_path / "c.yaml"
    config.write_text(cfg.dump(cfg.load(None, TINY)))
    assert main(["train", str(config), "models=[nosuchnet]", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kdarena: error: bad value in 'models': unknown model 'nosuchnet'; available: ")
    assert not (tmp_path / "a").exists()

    def broken(num_classes: int, in_channels: int = 3):
        raise ValueError("a shape our builder got wrong")

    monkeypatch.setitem(registry._REGISTRY, "convnet", broken)
    with pytest.raises(ValueError, match="a shape our builder got wrong"):
        main(["train", str(config), "--out", str(tmp_path / "b")])
    assert "kdarena: error" not in capsys.readouterr().err


def test_a_model_timm_does_not_have_is_a_user_error(monkeypatch, tmp_path, capsys):
    """timm (which needs torchvision, absent here) stands in as a module with timm's two calls: create_model
    raises RuntimeError('Unknown model ...') for a name it lacks, which must not surface as a traceback."""
    import types

    from kdarena import models
    from kdarena.errors import ModelSpecError

    fake = types.ModuleType("timm")
    fake.__version__ = "1.0.0"
    fake.is_model = lambda name: name.split(".")[0] == "resnet18"

    def create_model(name, **kwargs):
        raise RuntimeError(f"Unknown model ({name})")

    fake.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", fake)
    with pytest.raises(ModelSpecError, match=r"timm has no model 'resnet19' \(timm 1.0.0\); timm.list_models\('\*resnet19\*'\)"):
        models.create("timm:resnet19", num_classes=10)
    config = tmp_path / "c.yaml"
    config.write_text(cfg.dump(cfg.load(None, TINY)))
    assert main(["train", str(config), "models=[timm:resnet19]", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().startswith("kdarena: error: bad value in 'models': timm has no model 'resnet19'")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_and_exits_128_plus_its_number(tmp_path, monkeypatch, capsys, sig, code):
    # SIGTERM exited 130, SIGINT's code (issue 37): a job scheduler reading the status saw a Ctrl-C
    config = tmp_path / "c.yaml"
    config.write_text(cfg.dump(cfg.load(None, TINY)))
    losses = Independent.losses

    def signalled(self, step):
        os.kill(os.getpid(), sig)  # caught by the trainer's handler: acted on after this step
        return losses(self, step)

    monkeypatch.setattr(Independent, "losses", signalled)
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == code
    assert f"stopped by signal {int(sig)} at step 1;" in capsys.readouterr().err
