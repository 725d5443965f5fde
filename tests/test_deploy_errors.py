"""Bad input to export, predict and load_model: one line, exit 2, nothing written half-way, no code run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from kdarena import load_model, models, train
from kdarena.cli import main
from kdarena.deploy.card import sha256_of
from kdarena.deploy.errors import ExportError
from kdarena.engine import checkpoint as ckpt
from test_deploy import env, run, run_config, write_images  # noqa: F401  (module fixtures: one tiny run)


def error_line(capsys, *fragments: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines and lines[-1].startswith("kdarena: error: "), captured.err
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "copy"))


class Payload:
    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("case", ["not-a-run", "missing", "damaged", "hostile", "index", "format", "suffix", "folder-out"])
def test_export_refuses_bad_input_and_writes_nothing(run, tmp_path, capsys, case):
    marker = tmp_path / "pwned"
    target = tmp_path / "out" / "net.safetensors"
    source, extra = run, []
    if case in ("missing", "damaged", "hostile"):
        source = copy_run(run, tmp_path)
        best = source / "checkpoints" / "best.pt"
        if case == "missing":
            best.unlink()
        elif case == "damaged":
            best.write_bytes(best.read_bytes()[:5000])
        else:
            state = ckpt.load(best, required=ckpt.EVAL_KEYS)
            state["payload"] = Payload(marker)
            torch.save(state, best)
    if case == "not-a-run":
        source = tmp_path
    if case == "index":
        extra = ["--network", "5"]
    if case == "format":
        extra = ["--format", "parquet"]
    if case == "suffix":
        target = tmp_path / "out" / "net.bin"
    if case == "folder-out":
        target = tmp_path
    code = main(["export", str(source), "--out", str(target), *extra]) if case != "format" else None
    if case == "format":  # argparse's own choice check
        with pytest.raises(SystemExit) as stop:
            main(["export", str(source), "--out", str(target), *extra])
        assert stop.value.code == 2 and "invalid choice: 'parquet'" in capsys.readouterr().err
        return
    assert code == 2
    error_line(capsys, {"not-a-run": "is not a kdarena run", "missing": "does not exist", "damaged": "is unreadable",
                        "hostile": "holds code", "index": "the run has 2 network(s), 0..1",
                        "suffix": "cannot tell the format", "folder-out": "is a folder"}[case])
    assert not marker.exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_failed_export_leaves_the_previous_one_untouched(run, tmp_path, capsys):
    target = tmp_path / "net.safetensors"
    assert main(["export", str(run), "--out", str(target)]) == 0
    before = {p.name: sha256_of(p) for p in tmp_path.iterdir()}
    broken = copy_run(run, tmp_path / "elsewhere")
    (broken / "checkpoints" / "best.pt").write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["export", str(broken), "--out", str(target)]) == 2
    error_line(capsys, "is unreadable")
    assert {p.name: sha256_of(p) for p in tmp_path.iterdir() if p.is_file()} == before  # no temporary file either


def test_best_is_never_chosen_on_test(env, tmp_path, capsys):
    root = write_images(env / "data-noval", seed=3)
    train(run_config(root, val_size=0), run_dir=tmp_path / "noval")
    out = str(tmp_path / "net.safetensors")
    assert main(["export", str(tmp_path / "noval"), "--out", out, "--checkpoint", "last"]) == 2
    error_line(capsys, "--network best", "no validation split")
    assert main(["export", str(tmp_path / "noval"), "--out", out, "--network", "0"]) == 2
    error_line(capsys, "--checkpoint best", "chosen on the test set", "use --checkpoint last")
    assert main(["export", str(tmp_path / "noval"), "--out", out, "--network", "0", "--checkpoint", "last"]) == 0
    assert load_model(out)[1]["accuracy"]["selected_on"] is None


@models.register("test_bessel8")
def _bessel8(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """resnet8 plus a constant term built from an op ONNX has no function for (torch.special.bessel_j0)."""
    class Bessel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = models.create("resnet8", num_classes, in_channels)
            self.feature_layer = "net.pool"

        def forward(self, x):
            return self.net(x) + 0.0 * torch.special.bessel_j0(x.detach()).mean()

    return Bessel()


def test_a_format_the_model_cannot_take(env, tmp_path, capsys):
    train(run_config(env / "data", models=["test_bessel8"]), run_dir=tmp_path / "bessel")
    assert main(["export", str(tmp_path / "bessel"), "--out", str(tmp_path / "x" / "net.onnx")]) == 2
    error_line(capsys, "net0 (test_bessel8) cannot be exported as onnx", "bessel_j0", "try another --format")
    assert not list((tmp_path / "x").iterdir())
    assert main(["export", str(tmp_path / "bessel"), "--out", str(tmp_path / "x" / "net.pt")]) == 0  # TorchScript can


def test_predict_skips_what_is_not_an_image_and_says_so(run, tmp_path, capsys, caplog):
    folder = tmp_path / "mixed" / "dog"
    folder.mkdir(parents=True)
    for name in ("000.png", "001.png"):
        shutil.copy(run.parent / "data" / "test" / "dog" / name, folder / name)
    (folder / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    assert main(["predict", str(run), str(tmp_path / "mixed"), str(notes), "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert f"skipped 1 input(s) that are not images, first: {notes}: not an image file" in caplog.text
    assert "002.png: cannot decode it" in caplog.text
    summary = json.loads(captured.out)["summary"]
    assert summary == {"images": 2, "skipped": 2, "labelled": 2, **{k: summary[k] for k in ("top1", "top5")}}
    assert main(["predict", str(run), str(notes)]) == 2
    error_line(capsys, "no image to predict on", "notes.txt: not an image file")
    assert main(["predict", str(run), str(tmp_path / "nowhere.png")]) == 2
    error_line(capsys, "nowhere.png does not exist")
    assert main(["predict", str(run), str(notes), "--top-k", "0"]) == 2
    error_line(capsys, "--top-k 0")


def test_exports_that_kdarena_does_not_load(run, tmp_path, capsys):
    script = tmp_path / "net.pt"
    assert main(["export", str(run), "--out", str(script)]) == 0  # TorchScript: a program
    with pytest.raises(ExportError, match="is a TorchScript export, a program kdarena does not load"):
        load_model(script)
    weights = tmp_path / "net.safetensors"
    assert main(["export", str(run), "--out", str(weights)]) == 0
    with open(weights, "r+b") as handle:  # one byte of a tensor changed after the export
        handle.seek(-3, 2)
        handle.write(b"\x00")
    assert main(["predict", str(weights), str(run.parent / "data")]) == 2
    error_line(capsys, "does not match its model card (sha256 differs")
    Path(f"{weights}.card.json").unlink()
    with pytest.raises(ExportError, match="has no model card beside it"):
        load_model(weights)


CARD_EDITS = {  # what an edited card says -> the fragment of the one line that names it
    "not-an-object": (lambda card: [card], "the top level must be an object"),
    "architecture-a-string": (lambda card: {**card, "architecture": "resnet8"}, "architecture is 'resnet8'"),
    "unknown-architecture": (lambda card: {**card, "architecture": ["nosuchnet"]}, "names architecture 'nosuchnet'"),
    "two-architectures": (lambda card: {**card, "architecture": ["resnet8", "resnet8"]}, "but architecture names 2"),
    "num-classes-a-string": (lambda card: {**card, "num_classes": "10"}, "num_classes is '10'"),
    "num-classes-not-the-classes": (lambda card: {**card, "num_classes": 11}, "num_classes says 11"),
    "short-shape": (lambda card: {**card, "input": {"shape": [3, 32]}}, "input.shape is list"),
    "zero-std": (lambda card: {**card, "preprocessing": {**card["preprocessing"], "std": [0.0, 1.0, 1.0]}},
                 "preprocessing.std.0 is 0.0"),
    "nan-mean": (lambda card: {**card, "preprocessing": {**card["preprocessing"], "mean": [float("nan")] * 3}},
                 "preprocessing.mean.0 is NaN"),
    "grey-means-for-rgb": (lambda card: {**card, "preprocessing": {**card["preprocessing"], "mean": [0.5]}},
                           "input.shape has 3 channels"),
    "config-a-string": (lambda card: {**card, "config": "x"}, "config is 'x'"),
}


@pytest.mark.parametrize("case", sorted(CARD_EDITS))
def test_an_edited_card_is_one_line_not_a_traceback(run, tmp_path, capsys, case):
    """The sha256 vouches for the weights, not the card beside them: every field predict acts on is checked."""
    weights = tmp_path / "net.safetensors"
    assert main(["export", str(run), "--out", str(weights)]) == 0
    card_path = Path(f"{weights}.card.json")
    edit, fragment = CARD_EDITS[case]
    card_path.write_text(json.dumps(edit(json.loads(card_path.read_text()))))
    capsys.readouterr()
    assert main(["predict", str(weights), str(run.parent / "data")]) == 2
    line = error_line(capsys, fragment)
    assert "export" in line
    with pytest.raises(ExportError, match="card"):
        load_model(weights)


def test_an_outsized_card_is_refused_unread(run, tmp_path, capsys):
    weights = tmp_path / "net.safetensors"
    assert main(["export", str(run), "--out", str(weights)]) == 0
    card_path = Path(f"{weights}.card.json")
    card = json.loads(card_path.read_text())
    card["padding"] = "x" * (5 * 2**20)
    card_path.write_text(json.dumps(card))
    capsys.readouterr()
    assert main(["predict", str(weights), str(run.parent / "data")]) == 2
    error_line(capsys, "over kdarena's limit", "it is not a file kdarena wrote")


def test_an_onnx_file_given_as_weights_is_named_as_a_sentence_names_it(tmp_path):
    from kdarena.engine.weights import WeightsError, read_weights

    onnx_file = tmp_path / "net.onnx"
    onnx_file.write_bytes(b"\x08\x07")
    with pytest.raises(WeightsError, match="is an ONNX export, a program kdarena does not load"):  # was "is a ONNX"
        read_weights(onnx_file)
