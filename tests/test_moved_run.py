"""A run whose training data moved (issue 37): it recorded what its networks take in (inputs.json) when it
started training, so export and ``predict RUN`` need no data; eval, which needs the data, names the
override. The card states the fp32 accuracy of the exported network, and ``kdarena predict FILE`` runs it
in fp32, as onnxruntime does."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kdarena import train
from kdarena.cli import main
from kdarena.deploy.inputs import batches, gather
from kdarena.deploy.predict import predict
from kdarena.engine.evaluation_cli import evaluate_checkpoint
from kdarena.records.inputs import RunInputs
from test_deploy import CLASSES, run_config, write_images

onnxruntime = pytest.importorskip("onnxruntime")


@pytest.fixture()
def moved(tmp_path, monkeypatch):
    """A run trained (bf16 autocast, as auto gives on a CPU with bf16) on a folder that then moved."""
    monkeypatch.setenv("KDARENA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KDARENA_DATA", raising=False)
    root = write_images(tmp_path / "data")
    config = run_config(root)
    config.train.precision = "bf16"
    train(config, run_dir=tmp_path / "run")
    shutil.rmtree(tmp_path / "cache")  # the decoded images are gone too: nothing is left to rebuild the data from
    return tmp_path / "run", root.rename(tmp_path / "elsewhere")


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def test_a_run_whose_data_moved_exports_and_predicts_without_data_root(moved, tmp_path, capsys):
    run, data = moved
    inputs = RunInputs.model_validate(json.loads((run / "inputs.json").read_text()))
    assert inputs.classes == list(CLASSES) and inputs.input.shape == [3, 16, 16] and inputs.preprocessing.color == "RGB"
    out = tmp_path / "net.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0, _error(capsys)
    card = json.loads(Path(f"{out}.card.json").read_text())
    assert card["input"]["shape"] == [3, 16, 16] and card["classes"] == list(CLASSES)
    accuracy = card["accuracy"]
    assert "exported_file" not in accuracy and accuracy["measured_in"] == "bf16"  # not measured: no data at export
    assert "measured in bf16" in Path(f"{out}.card.md").read_text()
    capsys.readouterr()
    assert main(["predict", str(run), str(data / "test"), "--format", "json"]) == 0, _error(capsys)
    assert json.loads(capsys.readouterr().out)["summary"]["labelled"] == 24
    # eval needs the data itself: the error names the override that finds it, which then works
    assert main(["eval", str(run / "checkpoints" / "best.pt")]) == 2
    assert "data.root=" in _error(capsys)
    assert evaluate_checkpoint(str(run / "checkpoints" / "best.pt"), "test", [f"data.root={data}"])["net0/top1"] >= 0


def test_predict_run_takes_data_root_for_a_run_trained_before_inputs_json(moved, capsys):
    run, data = moved
    (run / "inputs.json").unlink()  # as a run trained by an older kdarena
    assert main(["predict", str(run), str(data / "test")]) == 2
    assert "pass data.root=" in _error(capsys)
    assert main(["predict", str(run), str(data / "test"), f"data.root={data}", "--format", "json"]) == 0, _error(capsys)
    assert json.loads(capsys.readouterr().out)["summary"]["labelled"] == 24


def test_the_card_states_the_fp32_accuracy_of_the_file_and_predict_matches_onnxruntime(moved, tmp_path, capsys):
    run, data = moved
    out = tmp_path / "net.onnx"
    assert main(["export", str(run), "--out", str(out), f"data.root={data}"]) == 0, _error(capsys)
    card = json.loads(Path(f"{out}.card.json").read_text())
    measured = card["accuracy"]["exported_file"]
    # the file itself, in onnxruntime, on the run's test split (the images under test/, preprocessed as the card says)
    images = gather([str(data / "test")], card["classes"], None)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    hits, probs_onnx = 0, []
    for x, _, labels in batches(images, card, 64, 1):
        logits = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        hits += int((logits.argmax(1) == torch.tensor(labels)).sum())
        probs_onnx.append(torch.softmax(logits, 1))
    assert measured["precision"] == "fp32" and measured["test_top1"] == pytest.approx(100.0 * hits / len(images.items), abs=1e-9)
    assert f"| exported file (fp32) | {card['source']['epoch']} |" in Path(f"{out}.card.md").read_text()
    # kdarena predict FILE defaults to fp32: its probabilities are onnxruntime's to 1e-5 (bf16 differed by 3.4e-3)
    safetensors = tmp_path / "net.safetensors"
    assert main(["export", str(run), "--out", str(safetensors), f"data.root={data}"]) == 0, _error(capsys)
    result = predict(str(safetensors), [str(data / "test")], top_k=len(CLASSES), progress=False)
    onnx = torch.cat(probs_onnx)
    order = {name: i for i, name in enumerate(images.names)}
    worst = max(abs(p - float(onnx[order[name], c])) for name, top in zip(result.names, result.top) for c, p in top)
    assert len(result.names) == len(images.items) and worst <= 1e-5, worst


def test_an_override_given_with_an_exported_file_is_refused(moved, tmp_path, capsys):
    run, data = moved
    out = tmp_path / "net.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert main(["predict", str(out), str(data / "test"), f"data.root={data}"]) == 2  # not silently ignored
    assert f"data.root={data}: key=value overrides change a run folder's config; {out} is a file" in _error(capsys)
