"""Class-grouped training batches (data.samples_per_class, MCL's sampler): whole groups of one class in
every batch, each sample at most once an epoch, the default order untouched, resume and ranks exact."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from kdarena import config as cfg
from kdarena.data import ArrayDataset, TensorLoader
from kdarena.data.build import build_data
from kdarena.data.sampling import epoch_order, grouped_length
from kdarena.data.tensor_loader import epoch_generator
from kdarena.errors import ConfigError

#: class c has 7 - c samples (7, 6, 5, 4, 3, 2, 1): uneven, with odd counts and a class too small to group
LABELS = torch.tensor([c for c in range(7) for _ in range(7 - c)])


def test_the_default_order_is_the_plain_permutation_bit_for_bit():
    a = epoch_order(len(LABELS), epoch_generator(3, 5), LABELS, per_class=0)
    assert torch.equal(a, torch.randperm(len(LABELS), generator=epoch_generator(3, 5)))


def test_groups_are_whole_classes_and_no_sample_comes_twice():
    order = epoch_order(len(LABELS), epoch_generator(0, 0), LABELS, per_class=2)
    assert len(order) == grouped_length(LABELS, 2) == 6 + 6 + 4 + 4 + 2 + 2 + 0
    assert len(set(order.tolist())) == len(order)
    pairs = LABELS[order].view(-1, 2)
    assert torch.equal(pairs[:, 0], pairs[:, 1])  # every group is one class
    assert 6 not in LABELS[order].tolist()  # a class with fewer samples than a group sits out
    triples = LABELS[epoch_order(len(LABELS), epoch_generator(0, 0), LABELS, per_class=3)].view(-1, 3)
    assert (triples == triples[:, :1]).all() and len(triples) == 2 + 2 + 1 + 1 + 1


def test_the_samples_left_over_change_from_epoch_to_epoch():
    """Class 0 has 7 samples and groups of 2: one sits out each epoch, not always the same one."""
    seen = Counter()
    for epoch in range(20):
        order = epoch_order(len(LABELS), epoch_generator(0, epoch), LABELS, per_class=2)
        seen.update(i for i in order.tolist() if LABELS[i] == 0)
    assert set(seen) == set(range(7)) and max(seen.values()) <= 20
    orders = {tuple(epoch_order(len(LABELS), epoch_generator(0, e), LABELS, per_class=2).tolist()) for e in range(5)}
    assert len(orders) == 5


def _dataset(n: int = 96, classes: int = 10) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    return ArrayDataset(images=torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g),
                        labels=torch.randint(0, classes, (n,), generator=g), num_classes=classes,
                        mean=(0.5,), std=(0.25,), name="toy")


def _indices(loader: TensorLoader, epoch: int, start: int = 0) -> list[list[int]]:
    return [b.index.tolist() for b in loader.iterate_batches(epoch, start)]


def test_every_training_batch_gives_each_sample_one_of_its_class():
    ds = _dataset()
    loader = TensorLoader(ds, 8, train=True, seed=1, per_class=2)
    assert len(loader) == grouped_length(ds.labels, 2) // 8
    for batch in loader.iterate_batches(0):
        counts = Counter(batch.y.tolist())
        assert all(count >= 2 for count in counts.values()), counts
    plain = TensorLoader(ds, 8, train=True, seed=1)
    lonely = sum(any(c == 1 for c in Counter(b.y.tolist()).values()) for b in plain.iterate_batches(0))
    assert lonely > 0  # random batches of 8 from 10 classes do leave samples alone: the option changes something


def test_resume_and_ranks_see_what_one_process_sees():
    ds = _dataset()
    one = TensorLoader(ds, 8, train=True, seed=4, per_class=2)
    full = _indices(one, 2)
    assert _indices(one, 2, start=3) == full[3:]
    ranks = [TensorLoader(ds, 4, train=True, seed=4, per_class=2, rank=r, world_size=2) for r in range(2)]
    merged = [a + b for a, b in zip(_indices(ranks[0], 2), _indices(ranks[1], 2))]
    assert merged == full
    for rank in ranks:  # each rank's half is whole groups too
        for batch in rank.iterate_batches(2):
            assert all(count >= 2 for count in Counter(batch.y.tolist()).values())


def test_eval_loaders_ignore_it_and_bad_values_are_refused():
    ds = _dataset()
    assert _indices(TensorLoader(ds, 8, train=False, per_class=2), 0) == [list(range(i, i + 8)) for i in range(0, 96, 8)]
    for bad in (1, 3, -2):
        with pytest.raises(ValueError, match="per_class must be 0 or >= 2 and divide batch_size 8"):
            TensorLoader(ds, 8, train=True, per_class=bad)


BASE = ["data.name=digits", "data.val_size=200", "models=[convnet]", "method.name=independent", "perturb.enabled=false"]


def test_the_config_option_is_checked_and_reaches_the_training_loader():
    with pytest.raises(ConfigError, match=r"^bad value for 'data.samples_per_class' \(got 3\): must be 0 \(random batches\) "
                                          r"or >= 2 and divide data.batch_size=32; e.g. data.samples_per_class=2$"):
        cfg.load(None, BASE + ["data.batch_size=32", "data.samples_per_class=3"])
    data = build_data(cfg.load(None, BASE + ["data.batch_size=32", "data.samples_per_class=2"]), torch.device("cpu"))
    assert data.train.per_class == 2 and data.test.per_class == 0
    for batch in data.train.iterate_batches(0):
        assert all(count >= 2 for count in Counter(batch.y.tolist()).values())
    small = BASE + ["data.train_subset=240", "data.batch_size=32", "data.samples_per_class=16"]  # 40 images, ~4 a class
    with pytest.raises(ConfigError, match=r"data.samples_per_class=16 leaves \d+ training samples in whole groups, fewer "
                                          "than one batch of 32; use a smaller data.batch_size"):
        build_data(cfg.load(None, small), torch.device("cpu"))


def test_samples_per_class_is_one_rule_for_the_config_and_the_loader():
    from kdarena.data.sampling import groups_batches

    ds = _dataset(n=400)  # every class fills a group of 9 (a smaller class is refused, see test_grouped_batches_cover_every_class)
    assert int(torch.bincount(ds.labels).min()) >= 9
    for batch in (8, 9, 12):
        for m in range(-1, 10):
            accepted = groups_batches(m, batch)
            assert accepted == (m == 0 or (m >= 2 and batch % m == 0)), (m, batch)
            if m >= 0:
                try:
                    cfg.load(None, [f"data.batch_size={batch}", f"data.samples_per_class={m}"])
                    config_ok = True
                except ConfigError as error:
                    config_ok = False
                    assert "data.samples_per_class" in str(error) and f"divide data.batch_size={batch}" in str(error)
                assert config_ok == accepted, (m, batch)
            try:
                TensorLoader(ds, batch, train=True, seed=0, per_class=m)
                loader_ok = True
            except ValueError:
                loader_ok = False
            assert loader_ok == accepted, (m, batch)
