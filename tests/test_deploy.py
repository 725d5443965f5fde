"""Export, load_model and predict on a real tiny run (image files the test writes, one epoch of two ResNet-8s).

Each exported format is loaded in a fresh Python process that cannot import kdarena (an import
hook refuses it): TorchScript with torch.jit.load, ONNX with onnxruntime, safetensors with the
safetensors library plus the model card, the logits then computed by a CIFAR ResNet written here in
plain torch.nn.functional from the card's architecture (so the card and the tensors are enough to
rebuild the network). That process also preprocesses the image files as the card says; both must
match what kdarena eval feeds and computes (inputs within 1e-6, logits within 1e-4, fp32).
The export extra (safetensors, onnx, onnxscript, onnxruntime) is installed by `make test`: no skip.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdarena import config as cfg, load_model, train
from kdarena.cli import main
from kdarena.data.sources import open_source, parse_layout
from kdarena.deploy.card import sha256_of
from kdarena.engine import checkpoint as ckpt
from kdarena.engine.build import build_data_and_group
from kdarena.engine.distributed import DistInfo
from kdarena.engine.evaluation_cli import evaluate_checkpoint
from kdarena.records.folder import read_metrics
from kdarena.methods import Needs

Image = pytest.importorskip("PIL.Image")
CLASSES = ("cat", "dog", "frog")


def write_images(root: Path, classes=CLASSES, train_per_class=24, test_per_class=8, seed=0) -> Path:
    """16x16 RGB PNGs, a colour cue per class (learnable in one epoch)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                x = rng.integers(0, 120, (16, 16, 3))
                x[..., c % 3] += 120
                Image.fromarray(x.astype(np.uint8)).save(folder / f"{k:03d}.png")
    return root


def run_config(root: Path, models=("resnet8", "resnet8"), val_size=12, **extra) -> cfg.Config:
    raw = {"name": "tiny", "seed": 0, "models": list(models), "method": {"name": "independent"},
           "data": {"name": "imagefolder", "root": str(root), "val_size": val_size, "batch_size": 16, "num_workers": 1},
           "perturb": {"enabled": False}, "optim": {"epochs": 1, "lr": 0.05},
           "train": {"device": "cpu", "threads": 1, "progress": False, "tensorboard": False, "precision": "fp32"}}
    for key, value in extra.items():
        raw[key] = value
    return cfg.validate(raw)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        base = tmp_path_factory.mktemp("deploy")
        patch.setenv("KDARENA_CACHE", str(base / "cache"))
        patch.delenv("KDARENA_DATA", raising=False)
        yield base


@pytest.fixture(scope="module")
def run(env):
    root = write_images(env / "data")
    train(run_config(root), run_dir=env / "run")
    return env / "run"


def eval_reference(run_dir: Path, network: str):
    """What kdarena eval computes on the test split: its inputs and the network's (or the ensemble's) scores."""
    state = ckpt.load(run_dir / "checkpoints" / "best.pt", required=ckpt.EVAL_KEYS)
    config = cfg.validate(state["config"])
    data, group = build_data_and_group(config, torch.device("cpu"), DistInfo(), Needs())
    group.load_state_dict(state["group"])
    group.eval()
    xs, scores = [], []
    with torch.no_grad():
        for x, _ in data.test:
            xs.append(x.contiguous())
            logits = [net(x).float() for net in group.networks]
            if network == "ensemble":
                scores.append(torch.stack([F.softmax(z, 1) for z in logits]).mean(0).clamp_min(1e-12).log())
            else:
                scores.append(logits[int(network[3:])])
    return torch.cat(xs), torch.cat(scores)


def best_network(run_dir: Path) -> str:
    record = [r for r in read_metrics(run_dir) if "net0/val_top1" in r][-1]
    scores = [record["net0/val_top1"], record["net1/val_top1"]]
    return f"net{scores.index(max(scores))}"


FRESH = r'''
import hashlib, json, sys
class NoKdarena:  # this process must manage without kdarena
    def find_spec(self, name, path=None, target=None):
        if name == "kdarena" or name.startswith("kdarena."):
            raise ImportError("kdarena is not importable here")
sys.meta_path.insert(0, NoKdarena())
import numpy as np, torch, torch.nn.functional as F
from PIL import Image
fmt, model, files, inputs, out = sys.argv[1:6]
card = json.load(open(model + ".card.json"))
sha_ok = hashlib.sha256(open(model, "rb").read()).hexdigest() == card["sha256"]
prep = card["preprocessing"]
mean, std = np.array(prep["mean"], np.float32), np.array(prep["std"], np.float32)
batch = []
for f in json.load(open(files)):
    img = Image.open(f).convert(prep["color"])
    assert list(img.size) == prep["size"]  # the test's images need no resize
    x = np.asarray(img, np.float32).transpose(2, 0, 1)
    batch.append(x * (1 / (255 * std))[:, None, None] - (mean / std)[:, None, None])
x = torch.from_numpy(np.stack(batch))
prep_diff = float((x - torch.from_numpy(np.load(inputs))).abs().max())

def bn(x, s, p):
    return F.batch_norm(x, s[p + ".running_mean"], s[p + ".running_var"], s[p + ".weight"], s[p + ".bias"], False, 0.0, 1e-5)

def cifar_resnet(s, x):  # He et al. 2016, option-A shortcuts: what the card's "resnet8" names
    x = F.relu(bn(F.conv2d(x, s["conv1.weight"], padding=1), s, "bn1"))
    for stage in (1, 2, 3):
        j = 0
        while f"layer{stage}.{j}.conv1.weight" in s:
            p, stride = f"layer{stage}.{j}", 2 if stage > 1 and j == 0 else 1
            y = F.relu(bn(F.conv2d(x, s[p + ".conv1.weight"], stride=stride, padding=1), s, p + ".bn1"))
            y = bn(F.conv2d(y, s[p + ".conv2.weight"], padding=1), s, p + ".bn2")
            short = x[:, :, ::stride, ::stride]
            extra = y.shape[1] - short.shape[1]
            x = F.relu(y + F.pad(short, (0, 0, 0, 0, extra // 2, extra - extra // 2)))
            j += 1
    return F.linear(x.mean(dim=(2, 3)), s["fc.weight"], s["fc.bias"])

with torch.no_grad():
    if fmt == "torchscript":
        scores = torch.jit.load(model)(x)
    elif fmt == "onnx":
        import onnxruntime
        session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
        scores = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    else:
        from safetensors.torch import load_file
        assert all(a.startswith("resnet") for a in card["architecture"])
        state = load_file(model)
        if card["network"] == "ensemble":
            nets = [{k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"networks.{i}.")} for i in range(len(card["architecture"]))]
            scores = torch.stack([F.softmax(cifar_resnet(s, x), 1) for s in nets]).mean(0).clamp_min(1e-12).log()
        else:
            scores = cifar_resnet(state, x)
np.save(out, scores.numpy())
print(json.dumps({"sha_ok": sha_ok, "prep_diff": prep_diff, "kdarena_loaded": any(m.startswith("kdarena") for m in sys.modules)}))
'''


@pytest.mark.parametrize("fmt,network", [("safetensors", "best"), ("torchscript", "best"), ("onnx", "best"),
                                         ("safetensors", "ensemble"), ("onnx", "ensemble")])
def test_an_export_runs_without_kdarena_and_gives_the_eval_logits(run, env, tmp_path, fmt, network):
    out = tmp_path / f"net.{fmt}"
    assert main(["export", str(run), "--out", str(out), "--format", fmt, "--network", network]) == 0
    name = best_network(run) if network == "best" else "ensemble"
    x, expected = eval_reference(run, name)
    np.save(tmp_path / "x.npy", x.numpy())
    files = [str(env / "data" / rel) for rel, _ in parse_layout(open_source(str(env / "data"))).test]
    (tmp_path / "files.json").write_text(json.dumps(files))
    done = subprocess.run([sys.executable, "-c", FRESH, fmt, str(out), str(tmp_path / "files.json"), str(tmp_path / "x.npy"),
                           str(tmp_path / "scores.npy")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"sha_ok": True, "prep_diff": pytest.approx(0.0, abs=1e-6), "kdarena_loaded": False}
    got = torch.from_numpy(np.load(tmp_path / "scores.npy"))
    assert got.shape == expected.shape == (24, 3)
    assert (got - expected).abs().max().item() <= 1e-4
    card = json.loads(Path(f"{out}.card.json").read_text())
    assert card["network"] == name and card["format"] == fmt and card["classes"] == list(CLASSES)
    if fmt == "safetensors":  # the very tensors of the checkpoint, nothing else (no optimizer, no RNG state)
        from safetensors.torch import load_file

        group = ckpt.load(run / "checkpoints" / "best.pt", required=ckpt.EVAL_KEYS)["group"]
        saved = load_file(str(out))
        wanted = {k: v for k, v in group.items() if network == "ensemble" or k.startswith(f"networks.{name[3:]}.")}
        rename = (lambda k: k) if network == "ensemble" else (lambda k: k.split(".", 2)[2])
        assert set(saved) == {rename(k) for k in wanted}
        assert all(torch.equal(saved[rename(k)], v) for k, v in wanted.items())


def test_the_model_card_has_every_field(run, tmp_path):
    out = tmp_path / "net.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    card = json.loads(Path(f"{out}.card.json").read_text())
    name = best_network(run)
    assert card["network"] == name and card["architecture"] == ["resnet8"] and card["output"] == "logits"
    assert card["sha256"] == sha256_of(out)
    assert card["source"]["checkpoint_sha256"] == sha256_of(run / "checkpoints" / "best.pt")
    assert card["source"]["epoch"] == 1 and card["source"]["mid_epoch"] is False
    assert card["num_classes"] == 3 and card["input"]["shape"] == [3, 16, 16]
    prep = card["preprocessing"]
    assert prep["color"] == "RGB" and prep["size"] == [16, 16] and prep["resize"] == "area" and len(prep["mean"]) == 3
    record = [r for r in read_metrics(run) if "net0/test_top1" in r][-1]
    for when in ("exported_weights", "last", "best_val"):
        row = card["accuracy"][when]
        assert row["epoch"] == 1
        assert row == {"epoch": 1, **{f"{s}_{m}": record[f"{name}/{s}_{m}"] for s in ("val", "test") for m in ("top1", "top5")}}
    assert card["accuracy"]["selected_on"] == "val"
    assert set(card["versions"]) >= {"kdarena", "torch", "safetensors"}
    assert card["config"]["models"] == ["resnet8", "resnet8"]
    text = Path(f"{out}.card.md").read_text()
    assert name in text and card["sha256"] in text and "best val epoch" in text


def test_load_model_gives_the_network_in_eval_mode(run, tmp_path):
    out = tmp_path / "net.safetensors"
    assert main(["export", str(run), "--out", str(out), "--network", "1", "--checkpoint", "last"]) == 0
    module, card = load_model(out)
    assert card["network"] == "net1" and not module.training
    assert not any(p.requires_grad for p in module.parameters())
    x, expected = eval_reference(run, "net1")  # one epoch: last.pt and best.pt hold the same weights
    with torch.no_grad():
        assert (module(x) - expected).abs().max().item() <= 1e-5
    from_run, run_card = load_model(run, network="ensemble")
    assert run_card["network"] == "ensemble" and run_card["file"] is None and not from_run.training


def test_predict_reproduces_eval_exactly(run, env, capsys):
    evaluated = evaluate_checkpoint(str(run / "checkpoints" / "best.pt"), "test")
    for model, network in ((str(run), "ensemble"), (str(run), "0"), (str(run), "1")):
        assert main(["predict", model, str(env / "data"), "--format", "json", "--network", network, "--top-k", "2"]) == 0
        result = json.loads(capsys.readouterr().out)
        key = "ensemble" if network == "ensemble" else f"net{network}"
        assert result["summary"]["labelled"] == 24 and result["summary"]["skipped"] == 0
        assert result["summary"]["top1"] == evaluated[f"{key}/top1"]
        assert result["summary"]["top5"] == evaluated[f"{key}/top5"]
        _, scores = eval_reference(run, key)
        top = [[CLASSES.index(t["class"]) for t in p["top"]] for p in result["predictions"]]
        assert top == scores.topk(2, dim=1).indices.tolist()
        probs = torch.tensor([[t["probability"] for t in p["top"]] for p in result["predictions"]])
        assert torch.allclose(probs, F.softmax(scores, 1).topk(2, dim=1).values, atol=1e-6)


def test_predict_on_an_export_prints_a_table_and_csv(run, env, tmp_path, capsys):
    out = tmp_path / "net.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    capsys.readouterr()
    evaluated = evaluate_checkpoint(str(run / "checkpoints" / "best.pt"), "test")
    name = best_network(run)
    assert main(["predict", str(out), str(env / "data" / "test")]) == 0  # CLASS folders: labelled by their names
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 24 + 1 and lines[-1].startswith(f"top-1 {evaluated[f'{name}/top1']:.2f}  top-5 ")
    image = str(env / "data" / "test" / "dog" / "003.png")
    assert main(["predict", str(out), image, "--format", "csv", "--top-k", "3"]) == 0
    captured = capsys.readouterr()
    rows = captured.out.splitlines()
    assert rows[0] == "image,label,class1,probability1,class2,probability2,class3,probability3"
    assert rows[1].startswith(f"{image},,") and len(rows) == 2
    assert "none labelled" in captured.err


def test_predict_defaults_a_setting_the_card_lacks_to_the_configs_default(run, env, tmp_path, monkeypatch):
    predicting = importlib.import_module("kdarena.deploy.predict")  # (kdarena.deploy.predict is also the function)
    from kdarena.deploy.export import export_run

    out = tmp_path / "net.safetensors"
    export_run(run, out)
    card_path = Path(f"{out}.card.json")
    card = json.loads(card_path.read_text())
    del card["config"]["train"]["precision"], card["config"]["train"]["channels_last"], card["config"]["data"]["eval_batch_size"]
    card_path.write_text(json.dumps(card))  # a card written by hand: its sha256 vouches for the model file only
    used = []
    monkeypatch.setattr(predicting, "autocast_context", lambda device, precision: used.append(precision) or contextlib.nullcontext())
    result = predicting.predict(str(out), [str(env / "data" / "test")], progress=False)
    assert result.counts["labelled"] == 24
    assert set(used) == {"fp32"}  # an exported file runs in fp32 whatever its run trained in (issue 37)


def test_a_streamed_folder_run_predicts_as_it_evaluates(env, tmp_path, capsys):
    """Folders over data.cache_max_gb are streamed and decoded by another function (bilinear): the card says which."""
    base = cfg.to_dict(run_config(write_images(env / "data-streamed", seed=5)))
    config = cfg.validate({**base, "models": ["resnet8"], "data": {**base["data"], "cache_max_gb": 0, "image_size": 24}})
    train(config, run_dir=tmp_path / "streamed")
    out = tmp_path / "net.safetensors"
    assert main(["export", str(tmp_path / "streamed"), "--out", str(out)]) == 0
    card = json.loads(Path(f"{out}.card.json").read_text())
    prep = card["preprocessing"]  # 16 px files enlarged to 24: bilinear and bicubic differ
    assert prep["resize"] == "bilinear" and prep["size"] == [24, 24] and prep["mean"] == [0.485, 0.456, 0.406]
    capsys.readouterr()
    assert main(["predict", str(out), str(env / "data-streamed"), "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = result["summary"]
    _, scores = eval_reference(tmp_path / "streamed", "net0")  # the same pixels, so the same probabilities
    probs = torch.tensor([[t["probability"] for t in p["top"]] for p in result["predictions"]])
    assert torch.allclose(probs, F.softmax(scores, 1).topk(3, dim=1).values, atol=1e-6)
    evaluated = evaluate_checkpoint(str(tmp_path / "streamed" / "checkpoints" / "best.pt"), "test")
    assert summary["labelled"] == 24
    assert (summary["top1"], summary["top5"]) == (evaluated["net0/top1"], evaluated["net0/top5"])
