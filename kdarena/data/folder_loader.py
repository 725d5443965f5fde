"""A worker-based loader for image folders, with the same interface as :class:`TensorLoader`.

Decoding (Pillow: resize shorter side + centre crop to a fixed size) runs in
:class:`torch.utils.data.DataLoader` workers; the uint8 batches are pinned (CUDA), copied with
``non_blocking=True``, and random-resized-crop + horizontal flip are then applied batch-wise on
the device with one ``affine_grid``/``grid_sample`` call, followed by normalisation.

Order and augmentation follow the same contract as :class:`~kdarena.data.tensor_loader.TensorLoader`:
one permutation of all N samples and per-position augmentation parameters are drawn per epoch
from a CPU generator seeded with ``(seed, epoch)``; rank ``r`` takes positions ``[r*B, (r+1)*B)``
of each global batch of ``B * world_size``; ``iterate(epoch, start_batch)`` resumes exactly.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from .imagefolder import IMAGENET_MEAN, IMAGENET_STD
from .tensor_loader import Batch, EpochLoader, _check_common, batch_spans, epoch_generator, normalisation


class _EpochBatches(Sampler):
    """A batch sampler whose batches are replaced before each pass (read by the DataLoader at iter time)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


class FolderLoader(EpochLoader):
    """Iterates normalised ``(x, y)`` batches of an image Dataset on ``device``.

    ``dataset[i]`` must return ``(uint8 tensor (C, H, W), label)`` with the same (C, H, W) for all
    samples (e.g. :class:`~kdarena.data.imagefolder.ImageFolder`).  With ``train=True``:
    seeded shuffle, ``random_resized_crop`` (area fraction in ``scale``, aspect ratio in ``ratio``,
    output the input size) and ``flip``; ``drop_last`` defaults to True.  Eval loaders keep the
    natural order, never augment and never drop.  ``mean``/``std`` default to the dataset's
    attributes when it has them, else the ImageNet constants.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        device: torch.device | str = "cpu",
        train: bool = True,
        seed: int = 0,
        num_workers: int = 4,
        flip: bool = True,
        random_resized_crop: bool = True,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        drop_last: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        prefetch_factor: int = 2,
    ) -> None:
        _check_common(batch_size, rank, world_size)
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating type, got {dtype}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.train = bool(train)
        self.seed = int(seed)
        self.flip = bool(flip) and self.train
        self.random_resized_crop = bool(random_resized_crop) and self.train
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.drop_last = (self.train if drop_last is None else bool(drop_last)) and self.train
        self.rank = rank
        self.world_size = world_size
        self.channels_last = bool(channels_last)
        self.dtype = dtype
        self.epoch = 0
        n = len(dataset)  # type: ignore[arg-type]
        self._n = n
        self._spans = batch_spans(n, batch_size, world_size, rank, self.drop_last)
        if self.train and self.drop_last and 0 < n < batch_size * world_size:
            raise ValueError(
                f"global batch size {batch_size * world_size} exceeds the {n} training samples; "
                "every batch would be dropped"
            )
        mean = mean if mean is not None else getattr(dataset, "mean", IMAGENET_MEAN)
        std = std if std is not None else getattr(dataset, "std", IMAGENET_STD)
        self.mean, self.std = tuple(mean), tuple(std)
        self._scale, self._bias = normalisation(self.mean, self.std, self.device)
        self._cuda = self.device.type == "cuda"
        self._batches = _EpochBatches()
        workers = max(0, int(num_workers))
        kwargs: dict = {}
        if workers > 0:
            kwargs["prefetch_factor"] = prefetch_factor
            kwargs["persistent_workers"] = True if persistent_workers is None else bool(persistent_workers)
        self._loader = DataLoader(
            dataset,
            batch_sampler=self._batches,
            num_workers=workers,
            pin_memory=self._cuda if pin_memory is None else bool(pin_memory),
            **kwargs,
        )

    # ------------------------------------------------------------------ interface
    @property
    def num_classes(self) -> int:
        return int(getattr(self.dataset, "num_classes"))

    # ------------------------------------------------------------------ internals
    def epoch_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(order, RRC parameters (N, 4) uniform in [0,1): area, log-ratio, x, y; flip mask (N,))."""
        n = self._n
        rrc = flips = None
        if self.train:
            g = epoch_generator(self.seed, epoch)
            order = torch.randperm(n, generator=g)
            if self.random_resized_crop:
                rrc = torch.rand(n, 4, generator=g)
            if self.flip:
                flips = torch.randint(0, 2, (n,), generator=g).bool()
        else:
            order = torch.arange(n)
        return order, rrc, flips

    def _generate_batches(self, epoch: int, start_batch: int, views: int) -> Iterator[Batch]:
        if views > 1:
            raise ValueError(f"views={views}: streamed image folders give one view per image; decode the set into "
                             "memory (data.cache_max_gb) for several views")
        order = self.epoch_plan(epoch)[0]
        for (a, b), (x, y) in zip(self._spans[start_batch:], self._generate(epoch, start_batch)):
            yield Batch(x, y, order[a:b].to(x.device), [])

    def _generate(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        spans = self._spans[start_batch:]
        if not spans:
            return
        order, rrc, flips = self.epoch_plan(epoch)
        self._batches.batches = [order[a:b].tolist() for a, b in spans]
        for (a, b), (x, y) in zip(spans, self._loader):
            x = x.to(self.device, non_blocking=self._cuda)
            y = torch.as_tensor(y, dtype=torch.int64).to(self.device, non_blocking=self._cuda)
            fl = flips[a:b].to(self.device) if flips is not None else None
            if rrc is not None:
                x = self._rrc(x, rrc[a:b].to(self.device), fl)
            else:
                x = x.float()
                if fl is not None:
                    x = torch.where(fl.view(-1, 1, 1, 1), x.flip(3), x)
            x = x.mul_(self._scale).add_(self._bias)
            if self.dtype != torch.float32:
                x = x.to(self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def _rrc(self, x: torch.Tensor, u: torch.Tensor, flips: torch.Tensor | None) -> torch.Tensor:
        """Batched random-resized-crop (+ flip) to the input size with bilinear ``grid_sample``."""
        bsz, c, h, w = x.shape
        lo, hi = self.scale
        area = lo + (hi - lo) * u[:, 0]
        log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * u[:, 1]
        r = torch.exp(log_r)
        # box size as a fraction of the image side (clamped instead of torchvision's rejection loop)
        bw = (torch.sqrt(area * r) * math.sqrt(h * w) / w).clamp(max=1.0)
        bh = (torch.sqrt(area / r) * math.sqrt(h * w) / h).clamp(max=1.0)
        cx = (2.0 * u[:, 2] * (1.0 - bw) + bw) - 1.0
        cy = (2.0 * u[:, 3] * (1.0 - bh) + bh) - 1.0
        sx = bw if flips is None else torch.where(flips, -bw, bw)
        theta = torch.zeros(bsz, 2, 3, device=x.device, dtype=torch.float32)
        theta[:, 0, 0] = sx
        theta[:, 0, 2] = cx
        theta[:, 1, 1] = bh
        theta[:, 1, 2] = cy
        grid = F.affine_grid(theta, [bsz, c, h, w], align_corners=False)
        return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
