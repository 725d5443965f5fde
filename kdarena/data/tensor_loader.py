"""A data loader for data sets that fit on the training device (airbench style).

The whole :class:`~kdarena.data.datasets.ArrayDataset` is copied to the device once, as a single
``uint8`` tensor.  Each batch is a ``uint8`` gather, then batched random crop (zero padding) and
horizontal flip done as one more gather with per-sample offsets, then normalisation -- all on the
device, no per-image Python loop.  An epoch of CIFAR-10 (50k 3x32x32) costs a fraction of a
second even on a CPU.

Determinism and distribution
----------------------------
The sample order and every augmentation parameter are a pure function of ``(seed, epoch)``: at
the start of an epoch a CPU :class:`torch.Generator` seeded from ``(seed, epoch)`` draws ONE
permutation of all N samples, then per-position crop offsets and flip bits for all N.  The
epoch order is cut into *global* batches of ``batch_size * world_size``; rank ``r`` takes positions
``[r*B, (r+1)*B)`` of every global batch.  Hence ranks ``0..W-1`` with batch ``B`` together see
exactly what one process with batch ``W*B`` sees, with identical augmentation, and
``iterate(epoch, start_batch)`` resumes mid-epoch exactly.

A final incomplete global batch (kept when ``drop_last`` is false, always for eval loaders) is
split into ``world_size`` contiguous pieces whose sizes differ by at most one; ranks whose piece is
empty (when fewer samples than ranks remain) skip it, so on such ranks ``len()`` is one less.

Eval loaders (``train=False``) never shuffle, augment or drop samples: across the ranks every
sample is seen exactly once (no padding, no duplicates).  Reduce per-rank sums after the loop,
not per batch, since batch counts may differ by one across ranks.
"""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..rng import keyed_seed, view_seed
from .datasets import ArrayDataset
from .sampling import epoch_order, grouped_length, groups_batches, starved_classes

__all__ = ["Batch", "TensorLoader", "epoch_generator", "epoch_seed", "view_seed"]


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed that depends only on ``(seed, epoch)``."""
    return keyed_seed(seed, epoch)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(epoch_seed(seed, epoch))
    return g


class Batch(NamedTuple):
    """One training batch: ``index`` (int64) holds the samples' positions in the loader's data set;
    ``views`` holds ``views - 1`` extra, independently augmented copies of the same images."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    views: list


def batch_spans(
    n: int, batch_size: int, world_size: int, rank: int, drop_last: bool
) -> list[tuple[int, int]]:
    """``(start, stop)`` positions in the epoch order of every batch of ``rank`` (see module doc)."""
    g = batch_size * world_size
    full = n // g
    spans = [(i * g + rank * batch_size, i * g + (rank + 1) * batch_size) for i in range(full)]
    rem = n - full * g
    if rem > 0 and not drop_last:
        base, extra = divmod(rem, world_size)
        size = base + (1 if rank < extra else 0)
        start = full * g + rank * base + min(rank, extra)
        if size > 0:
            spans.append((start, start + size))
    return spans


def _check_common(batch_size: int, rank: int, world_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank!r}")


def normalisation(
    mean: Sequence[float], std: Sequence[float], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, bias)`` of shape (1, C, 1, 1) so that ``x_uint8 * scale + bias`` is normalised."""
    m = torch.tensor([float(v) for v in mean], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor([float(v) for v in std], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return 1.0 / (255.0 * s), -m / s


class EpochLoader:
    """The iteration interface shared by :class:`TensorLoader` and ``FolderLoader``.

    Subclasses set ``_spans`` (this rank's batch boundaries in the epoch order), ``epoch`` and
    ``_generate(epoch, start_batch)``; the order is a pure function of (seed, epoch).
    """

    _spans: list[tuple[int, int]]
    epoch: int

    def __len__(self) -> int:
        return len(self._spans)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        return sum(b - a for a, b in self._spans)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(self.epoch, 0)

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start_batch, start_batch+1, ...`` of ``epoch`` (exact mid-epoch resume)."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        return self._generate(int(epoch), int(start_batch))

    def _generate(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def iterate_batches(self, epoch: int, start_batch: int = 0, views: int = 1) -> Iterator[Batch]:
        """Like :meth:`iterate`, as :class:`Batch` es with sample indices and ``views - 1`` extra views.

        ``Batch.x``/``y`` are exactly what :meth:`iterate` yields (the extra views draw from their own
        generators, see :func:`view_seed`).
        """
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ValueError(f"views must be an int >= 1, got {views!r}")
        return self._generate_batches(int(epoch), int(start_batch), views)

    def _generate_batches(self, epoch: int, start_batch: int, views: int) -> Iterator[Batch]:
        raise NotImplementedError


class TensorLoader(EpochLoader):
    """Iterates ``(x, y)`` batches of an :class:`ArrayDataset` held on ``device``.

    ``x`` is normalised (dataset mean/std), ``dtype``, shape ``(b, C, H, W)``; ``y`` is int64.
    ``train=True`` shuffles and augments (``crop_padding``: random crop after zero padding, 4 for
    CIFAR; ``flip``: random horizontal flip; ``rotation``: random rotation by up to that many
    degrees, nearest pixel, zero fill, after crop and flip) and drops the last incomplete global batch unless
    ``drop_last=False``; ``per_class`` >= 2 makes every training batch of groups of that many samples of one
    class (:mod:`kdarena.data.sampling`; ``batch_size`` must be a multiple of it).  ``train=False`` keeps the natural order, never augments and never drops
    (``drop_last`` is ignored).  See the module docstring for the distributed contract.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        device: torch.device | str = "cpu",
        train: bool = True,
        seed: int = 0,
        crop_padding: int = 0,
        flip: bool = False,
        drop_last: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
        rotation: float = 0.0,
        per_class: int = 0,
    ) -> None:
        _check_common(batch_size, rank, world_size)
        if not groups_batches(per_class, batch_size):
            raise ValueError(f"per_class must be 0 or >= 2 and divide batch_size {batch_size}, got {per_class}")
        if not 0 <= rotation <= 180:
            raise ValueError(f"rotation must lie in [0, 180] degrees, got {rotation}")
        if not isinstance(dataset, ArrayDataset):
            raise TypeError(f"TensorLoader needs an ArrayDataset, got {type(dataset).__name__}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating type, got {dtype}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.train = bool(train)
        self.seed = int(seed)
        self.crop_padding = int(crop_padding) if self.train else 0
        self.flip = bool(flip) and self.train
        self.rotation = float(rotation) if self.train else 0.0
        self.drop_last = (self.train if drop_last is None else bool(drop_last)) and self.train
        self.rank = rank
        self.world_size = world_size
        self.channels_last = bool(channels_last)
        self.dtype = dtype
        self.epoch = 0
        self.per_class = int(per_class) if self.train else 0
        starved = starved_classes(dataset.labels, self.per_class) if self.per_class else {}
        if starved:  # silently never trained before (classes of 1, 3 and 40 images in groups of 4 trained one)
            named = ", ".join(f"{dataset.classes[c] if c < len(dataset.classes) else c} ({n} images)"
                              for c, n in list(starved.items())[:5])
            raise ConfigError(f"data.samples_per_class={self.per_class}: {len(starved)} class(es) of {dataset.name} have "
                              f"fewer training images than one group and would never be trained: {named}; set "
                              f"data.samples_per_class to at most {max(2, min(starved.values()))}, or to 0 for random batches")
        n = grouped_length(dataset.labels, self.per_class) if self.per_class else len(dataset)  # samples an epoch visits
        self._spans = batch_spans(n, batch_size, world_size, rank, self.drop_last)
        if self.train and self.drop_last and n < batch_size * world_size and n > 0:
            raise ValueError(
                f"{dataset.name}: global batch size {batch_size * world_size} (batch_size {batch_size} x "
                f"world_size {world_size}) exceeds the {n} training samples; every batch would be dropped"
            )
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        self._scale, self._bias = normalisation(dataset.mean, dataset.std, self.device)
        self._plan_cache: tuple[int, tuple[torch.Tensor, ...]] | None = None
        self._view_cache: dict[int, tuple[int, tuple]] = {}

    # ------------------------------------------------------------------ interface
    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    # ------------------------------------------------------------------ internals
    def epoch_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(order, crop offsets (N, 2) as (dy, dx), flip mask (N,)) for ``epoch``, on the device.

        Augmentation parameters are indexed by *position* in the epoch order.
        """
        return self._plan(epoch)[:3]  # type: ignore[return-value]

    def _plan(self, epoch: int) -> tuple:
        """``epoch_plan`` plus rotation angles (N,) in degrees, drawn last so they change nothing before."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        n = len(self.dataset)
        if self.train:
            g = epoch_generator(self.seed, epoch)
            order = epoch_order(n, g, self.dataset.labels, self.per_class)
            plan = (order,) + self._draw_augment(g, n)
        else:
            plan = (torch.arange(n), None, None, None)
        plan = tuple(t.to(self.device) if t is not None else None for t in plan)
        self._plan_cache = (epoch, plan)  # type: ignore[assignment]
        return plan

    def _draw_augment(self, g: torch.Generator, n: int) -> tuple:
        offsets = flips = angles = None
        if self.crop_padding > 0:
            offsets = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=g)
        if self.flip:
            flips = torch.randint(0, 2, (n,), generator=g).bool()
        if self.rotation > 0:
            angles = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * self.rotation
        return offsets, flips, angles

    def _view_plan(self, epoch: int, view: int) -> tuple:
        """Augmentation of extra view ``view`` (same order as view 0, own generator)."""
        hit = self._view_cache.get(view)
        if hit is not None and hit[0] == epoch:
            return hit[1]
        g = epoch_generator(view_seed(self.seed, view), epoch)
        plan = tuple(t.to(self.device) if t is not None else None for t in self._draw_augment(g, len(self.dataset)))
        self._view_cache[view] = (epoch, plan)
        return plan

    def _augment(self, idx: torch.Tensor, a: int, b: int, offsets, flips, angles) -> torch.Tensor:
        x = self.images.index_select(0, idx)
        if offsets is not None or flips is not None:
            x = augment_crop_flip(
                x,
                self.crop_padding,
                offsets[a:b] if offsets is not None else None,
                flips[a:b] if flips is not None else None,
            )
        if angles is not None:
            x = rotate_nearest(x, angles[a:b])
        return self._normalise(x)

    def _generate(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self._generate_batches(epoch, start_batch, 1):
            yield batch.x, batch.y

    def _generate_batches(self, epoch: int, start_batch: int, views: int) -> Iterator[Batch]:
        if start_batch >= len(self._spans):
            return
        order, offsets, flips, angles = self._plan(epoch)
        extra = [self._view_plan(epoch, v) for v in range(1, views)] if self.train else []
        for a, b in self._spans[start_batch:]:
            idx = order[a:b]
            x = self._augment(idx, a, b, offsets, flips, angles)
            more = [self._augment(idx, a, b, *p) for p in extra] if self.train else [x] * (views - 1)
            yield Batch(x, self.labels.index_select(0, idx), idx, more)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().mul_(self._scale).add_(self._bias)
        if self.dtype != torch.float32:
            x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def augment_crop_flip(
    x: torch.Tensor, padding: int, offsets: torch.Tensor | None, flips: torch.Tensor | None
) -> torch.Tensor:
    """Batched random crop with zero ``padding`` and horizontal flip, as a single gather.

    ``x``: (B, C, H, W) any dtype; ``offsets``: (B, 2) integer (dy, dx) in ``[0, 2*padding]``
    (None: centre, i.e. no shift); ``flips``: (B,) bool (None: no flip).  Output has x's shape:
    ``out[b, :, i, j] = padded[b, :, dy+i, dx+j']`` with ``j' = W-1-j`` where flipped
    (crop then flip).
    """
    bsz, c, h, w = x.shape
    p = padding if offsets is not None else 0
    if p > 0:
        x = F.pad(x, (p, p, p, p))
    hp, wp = h + 2 * p, w + 2 * p
    dev = x.device
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    if flips is not None:
        cols = torch.where(flips.view(-1, 1, 1), (w - 1) - cols, cols)
    if offsets is not None:
        rows = rows + offsets[:, 0].view(-1, 1, 1)
        cols = cols + offsets[:, 1].view(-1, 1, 1)
    index = (rows * wp + cols).expand(bsz, h, w).reshape(bsz, 1, h * w).expand(bsz, c, h * w)
    return x.reshape(bsz, c, hp * wp).gather(2, index).view(bsz, c, h, w)


def rotate_nearest(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image of ``x`` (B, C, H, W) about its centre by ``degrees`` (B,), as one gather.

    Nearest pixel, zero fill (like torchvision's ``RandomRotation`` defaults); exact on any dtype.
    """
    bsz, c, h, w = x.shape
    dev = x.device
    rad = degrees.to(device=dev, dtype=torch.float64) * (math.pi / 180.0)
    cos, sin = torch.cos(rad).view(-1, 1, 1), torch.sin(rad).view(-1, 1, 1)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    ys = torch.arange(h, device=dev, dtype=torch.float64).view(1, h, 1) - cy
    xs = torch.arange(w, device=dev, dtype=torch.float64).view(1, 1, w) - cx
    # inverse map: the source pixel each output pixel shows
    src_x = torch.round(cos * xs + sin * ys + cx).long()
    src_y = torch.round(-sin * xs + cos * ys + cy).long()
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    index = (src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)).reshape(bsz, 1, h * w).expand(bsz, c, h * w)
    out = x.reshape(bsz, c, h * w).gather(2, index).view(bsz, c, h, w)
    return out * inside.view(bsz, 1, h, w).to(out.dtype)
