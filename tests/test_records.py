"""A run's records round-trip: what the writer writes, every reader reads back, through the one model of each
(kdarena.records): the epoch record, the summary, the model card, the sweep index; and the selection-split rule."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from kdarena.config import load
from kdarena.deploy.card import read_card
from kdarena.deploy.export import export_run
from kdarena.deploy.load import load_model
from kdarena.experiments.report import find_runs
from kdarena.experiments.sweep import plan_sweep, run_sweep
from kdarena.records import read
from kdarena.records.card import ModelCard
from kdarena.records.epoch import EpochRecord, selection_split
from kdarena.records.folder import MetricsLog, metrics_path, summary_path, sweep_index_path
from kdarena.records.summary import Summary
from kdarena.records.sweep_index import SweepIndex
from kdarena.trainer import train

REPO = Path(__file__).resolve().parent.parent
TINY = ["models=[convnet,convnet]", "data.name=digits", "data.train_subset=128", "data.val_size=64", "data.batch_size=32",
        "optim.epochs=2", "optim.lr=0.05", "train.device=cpu", "train.progress=false", "train.tensorboard=false",
        "train.threads=1", "train.precision=fp32", "method.name=dml"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("records") / "dml-seed0"
    return run_dir, train(load(None, TINY), run_dir=run_dir)


# ----------------------------------------------------------------------------- epoch records
def test_epoch_records_read_back_as_written(run):
    run_dir, _ = run
    lines = [json.loads(line) for line in metrics_path(run_dir).read_text().splitlines()]
    assert read.read_records(run_dir) == lines
    assert [r["epoch"] for r in lines] == [0, 1] and all("net1/val_top1" in r for r in lines)
    assert list(lines[0])[:3] == ["epoch", "step", "lr"]  # written in the trainer's order


def test_an_epoch_record_out_of_range_is_refused_by_the_writer_as_by_the_readers(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    with pytest.raises(ValidationError, match="net0/test_top1 is 101.0"):
        log.write({"epoch": 0, "net0/test_top1": 101.0})
    log.write({"epoch": 0, "net0/test_top1": 100.0, "perturb/noise/count": 2, "perturb/noise/won": 1})
    assert read.read_records(tmp_path) == [{"epoch": 0, "net0/test_top1": 100.0, "perturb/noise/count": 2, "perturb/noise/won": 1}]


def test_the_selection_split_is_validation_when_the_run_has_one():
    assert selection_split({"epoch": 0, "net0/val_top1": 50.0, "net0/test_top1": 40.0}) == "val"
    assert selection_split({"epoch": 0, "net0/test_top1": 40.0}) == "test"


# ----------------------------------------------------------------------------- summary
def test_the_summary_reads_back_as_written_and_as_train_returned_it(run):
    run_dir, returned = run
    text = summary_path(run_dir).read_text()
    summary = read.read_summary(run_dir)
    assert json.dumps(summary.as_written(), indent=2) + "\n" == text  # every key, in the file's order
    assert json.loads(text) == returned
    assert summary.selection_split == "val" and len(summary.networks) == 2
    net = summary.networks[1]
    last = read.read_records(run_dir)[-1]
    assert net.last_test_top1 == last["net1/test_top1"]
    best = max(read.read_records(run_dir), key=lambda r: r["net1/val_top1"])
    assert net.test_at_best_val_top1 == net.test_top1("best") == best["net1/test_top1"]
    assert summary.precision == "fp32" and summary.device == "cpu" and summary.data.classes == 10


def test_report_reads_the_summary_the_trainer_wrote(run):
    run_dir, returned = run
    (found,) = find_runs([run_dir.parent])
    assert (found.label, found.seed) == ("dml", 0)
    assert found.summary.as_written() == returned


@pytest.mark.parametrize("path", ["benchmarks/results/arena2/byot-seed2.json",
                                  "benchmarks/results/map3/c10-5k/phase1/cd-code-seed0.json"])
def test_a_summary_written_by_0_2_reads_unchanged(path):
    text = (REPO / path).read_text()
    data = json.loads(text)
    assert data["version"] == "0.2.0"
    assert json.dumps(Summary.model_validate(data).as_written(), indent=2) == json.dumps(data, indent=2)


def test_a_summary_written_by_a_newer_kdarena_is_one_line_naming_its_version(run, tmp_path):
    run_dir, returned = run
    newer = tmp_path / "newer-seed0"
    newer.mkdir()
    summary_path(newer).write_text(json.dumps({**returned, "version": "7.1.0"}))
    with pytest.raises(read.DamagedFile) as error:
        read.read_summary(newer)
    assert str(error.value) == (f"{summary_path(newer)}: version: written by kdarena 7.1.0, newer than this kdarena 0.2.0; "
                                "read it with that release or a later one")


# ----------------------------------------------------------------------------- model card
def test_every_card_passes_the_card_reader(run, tmp_path):
    run_dir, _ = run
    exported = tmp_path / "net.safetensors"
    written = export_run(run_dir, exported)
    assert read_card(exported) == written == json.loads(Path(f"{exported}.card.json").read_text())
    _, card = load_model(run_dir)  # a network taken from the run folder: a card without a file
    assert card["format"] == "run" and card["sha256"] is None
    assert ModelCard.model_validate(card).as_written() == card
    module, loaded = load_model(exported)
    assert loaded == written


def test_a_file_card_without_its_sha256_is_refused(run, tmp_path):
    _, card = load_model(run[0])
    with pytest.raises(ValidationError, match="a safetensors card needs the sha256 of its file"):
        ModelCard.model_validate({**card, "format": "safetensors"})


# ----------------------------------------------------------------------------- sweep index
def test_the_sweep_index_reads_back_as_written(tmp_path):
    exp = tmp_path / "exp"
    config = tmp_path / "tiny.yaml"
    config.write_text("name: tiny\n")
    overrides = [o for o in TINY if not o.startswith("method.")] + ["optim.epochs=1"]
    records = run_sweep(config, overrides, methods="independent", seeds="0", out=exp)
    text = sweep_index_path(exp).read_text()
    index = SweepIndex.model_validate(json.loads(text))
    assert json.dumps(index.as_written(), indent=2) + "\n" == text
    assert [r.model_dump(exclude_none=True) for r in index.runs] == records
    assert index.runs[0].status == "trained" and index.methods[0].label == "independent"
    run_sweep(config, overrides, methods="independent", seeds="0", out=exp)  # again: skipped, where and how long kept
    again = SweepIndex.model_validate(json.loads(sweep_index_path(exp).read_text()))
    assert again.runs[0].status == "skipped" and again.runs[0].seconds == index.runs[0].seconds
    assert plan_sweep(config, overrides, "independent", "0", exp)[1][0].run_dir == Path(index.runs[0].run_dir)
