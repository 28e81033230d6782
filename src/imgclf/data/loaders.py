"""Loaders for both data paths: streaming (`ImageDataset` + DataLoader: each sample decoded and augmented in
the loader) and cached (`CachedLoader`: decoded once, gathered and augmented as whole batches on the device)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

from imgclf.cpus import usable_cpus
from imgclf.data.images import Color, load_image
from imgclf.errors import ImageError

__all__ = [
    "BadSample",
    "CachedLoader",
    "EpochSampler",
    "ImageDataset",
    "ShardedSampler",
    "StreamingLoader",
    "auto_num_workers",
    "collate_skipping",
    "make_loader",
]

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Images from paths, decoded with `imgclf.data.images.load_image` and passed through `transform`."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        transform: Callable,
        *,
        color: Color,
        max_pixels: int,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"paths and labels differ in length: {len(paths)} != {len(labels)}")
        self.paths = [Path(p) for p in paths]
        self.labels = [int(label) for label in labels]
        self.transform = transform
        self.color = color
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | BadSample:
        try:
            image = load_image(self.paths[index], color=self.color, max_pixels=self.max_pixels)
        except (ImageError, OSError) as exc:  # changed or removed since the scan: skipped, not fatal
            return BadSample(str(self.paths[index]), str(exc))
        return self.transform(image), self.labels[index]


class BadSample(NamedTuple):
    """An image that could not be loaded during training (it passes from worker processes to the loader)."""

    path: str
    reason: str


def collate_skipping(items: list) -> tuple[torch.Tensor | None, torch.Tensor | None, list[BadSample]]:
    """Default collation of the good samples, and the bad ones set aside."""
    good = [item for item in items if not isinstance(item, BadSample)]
    bad = [item for item in items if isinstance(item, BadSample)]
    if not good:
        return None, None, bad
    images, targets = default_collate(good)
    return images, targets, bad


def auto_num_workers(processes: int = 1) -> int:
    """Loader processes for each of `processes` training processes on this machine. On <= 2 cores each, workers
    compete with the compute threads for the same cores and make training slower, so decoding stays in the
    training process."""
    cores = usable_cpus() // max(processes, 1)
    return 0 if cores <= 2 else min(8, cores - 1)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
    max_bad_images: int = 10,
    shard: tuple[int, int] | None = None,
) -> StreamingLoader:
    """A DataLoader whose order and worker seeds come from its own generator, and which can start an epoch at
    any batch (to resume after a graceful stop).

    Training code re-seeds `loader.generator` at the start of every epoch, so the data order of epoch N is
    the same whether the run went straight through or was resumed.

    `shard=(rank, processes)` (torchrun): training (`shuffle`) takes this process's slice of each epoch's order
    with torch's `DistributedSampler` (padded to equal lengths, `set_epoch` per epoch); evaluation takes every
    `processes`-th image from `rank` on, without padding, so that no image counts twice in the summed metrics.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler: EpochSampler | ShardedSampler
    if shard is not None and shard[1] > 1:
        sampler = ShardedSampler(dataset, shard=shard, shuffle=shuffle, seed=seed)
    else:
        sampler = EpochSampler(len(dataset), shuffle=shuffle, generator=generator)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_skipping,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=False,  # fresh workers per epoch take their seeds from the re-seeded generator
    )
    return StreamingLoader(loader, sampler, max_bad_images=max_bad_images)


class EpochSampler(Sampler[int]):
    """`torch.randperm` order (as DataLoader's shuffle) or the stored order, optionally from position `start`."""

    def __init__(self, count: int, *, shuffle: bool, generator: torch.Generator) -> None:
        self.count = count
        self.shuffle = shuffle
        self.generator = generator
        self.start = 0

    def __iter__(self):
        order = torch.randperm(self.count, generator=self.generator) if self.shuffle else torch.arange(self.count)
        return iter(order[self.start :].tolist())

    def __len__(self) -> int:
        return self.count - self.start


class ShardedSampler(DistributedSampler):
    """One process's slice of the data (torchrun). Training: torch's `DistributedSampler` (the same per-epoch
    permutation on every process, padded so each gets the same number of images; `set_epoch` reshuffles), which
    can start an epoch at position `start` to resume. Evaluation (`shuffle=False`): every `processes`-th image from
    `rank` on, unpadded."""

    def __init__(self, dataset: Dataset, *, shard: tuple[int, int], shuffle: bool, seed: int) -> None:
        rank, processes = shard
        super().__init__(dataset, num_replicas=processes, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0
        if not shuffle:
            self.num_samples = len(range(rank, len(dataset), processes))

    def __iter__(self):
        order = (
            list(super().__iter__()) if self.shuffle else list(range(self.rank, len(self.dataset), self.num_replicas))
        )
        return iter(order[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


class StreamingLoader:
    """A DataLoader plus `iter_from(step)`, which skips images that fail to load: each is logged with its path
    and kept in `bad_images`; past `max_bad_images`, `abort_reason` asks training to stop (with a checkpoint)."""

    def __init__(self, loader: DataLoader, sampler: EpochSampler, *, max_bad_images: int = 10) -> None:
        self.loader = loader
        self.sampler = sampler
        self.generator = loader.generator
        self.dataset = loader.dataset
        self.max_bad_images = max_bad_images
        self.bad_images: list[BadSample] = []

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle a sharded sampler for `epoch` (the single-process order comes from `generator`)."""
        if isinstance(self.sampler, ShardedSampler):
            self.sampler.set_epoch(epoch)

    @property
    def abort_reason(self) -> str | None:
        if len(self.bad_images) <= self.max_bad_images:
            return None
        shown = "; ".join(f"{b.path}: {b.reason}" for b in self.bad_images[:3])
        return (
            f"{len(self.bad_images)} images failed to load during training (more than data.max_bad_images = "
            f"{self.max_bad_images}); first: {shown}"
        )

    @property
    def num_images(self) -> int:
        """Images this process goes through per epoch (its shard under torchrun, padding included)."""
        return self.sampler.num_samples if isinstance(self.sampler, ShardedSampler) else self.sampler.count

    @property
    def shared_order(self) -> bool:
        """Whether `generator` draws the epoch's order, which every process must share; a sharded sampler draws it
        from (seed, epoch) itself, and the generator only seeds the workers' augmentation, which must differ
        between processes (`training.engine.seed_epoch`)."""
        return not isinstance(self.sampler, ShardedSampler)

    def __len__(self) -> int:
        full, rest = divmod(self.num_images, self.loader.batch_size)
        return full if self.loader.drop_last or rest == 0 else full + 1

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, step: int):
        """This epoch's batches from batch `step` on. Under torchrun every training process must take the same
        number of steps (DDP pairs their gradient all-reduces), so a batch whose images all failed is made up for
        by repeating the next good one (or, at the epoch's end, the last); a single process skips it."""
        self.sampler.start = step * self.loader.batch_size
        equal_steps = isinstance(self.sampler, ShardedSampler) and self.sampler.shuffle
        owed, last = 0, None
        try:
            for images, targets, bad in self.loader:
                for sample in bad:
                    log.warning("skipped %s: %s", sample.path, sample.reason)
                self.bad_images += bad
                if images is None:
                    if equal_steps:
                        owed += 1
                    continue
                last = images, targets
                for _ in range(1 + owed):
                    yield last
                owed = 0
            for _ in range(owed if last is not None else 0):
                yield last
        finally:
            self.sampler.start = 0


class CachedLoader:
    """Batches from decoded uint8 images held in memory (or on the GPU): each batch is gathered by index and
    transformed as a whole on the training device. Iterates like a DataLoader; `generator` orders the samples
    and, like `make_loader`'s, is re-seeded by training at the start of every epoch.

    Args:
        images: uint8 [N, C, S, S], on the CPU or already on `device`.
        labels: class indices [N].
        batch_size: images per batch.
        shuffle: a new random order every epoch (training) or the stored order (evaluation).
        transform: uint8 batch on `device` -> normalized float batch (augmentation or eval crop).
        device: where batches are produced.
        drop_last: skip a last, smaller batch (a batch of one breaks BatchNorm).
        seed: initial seed of `generator`.
        shard: (rank, processes) under torchrun: this process's slice of each epoch's order. Training (`shuffle`)
            pads the order by repeating its start, as `DistributedSampler` does, so every process has the same
            number of batches; evaluation takes every `processes`-th image, unpadded.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        shuffle: bool,
        transform: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        drop_last: bool = False,
        seed: int = 0,
        shard: tuple[int, int] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(
                f"expected uint8 images [N, C, S, S] and N labels; received {images.shape}, {labels.shape}"
            )
        self.images = images
        self.labels = labels.to(images.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.transform = transform
        self.device = device
        self.drop_last = drop_last
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.rank, self.processes = shard if shard is not None else (0, 1)

    @property
    def num_images(self) -> int:
        """Images this process goes through per epoch."""
        count = len(self.images)
        if self.shuffle:
            return -(-count // self.processes)
        return len(range(self.rank, count, self.processes))

    def __len__(self) -> int:
        full, rest = divmod(self.num_images, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, step: int):
        """The epoch's batches from batch `step` on (the order is drawn in full, so it matches a fresh epoch)."""
        count = len(self.images)
        order = torch.randperm(count, generator=self.generator) if self.shuffle else torch.arange(count)
        if self.processes > 1:
            if self.shuffle:  # padded to equal lengths, as DistributedSampler does
                padded = self.num_images * self.processes
                order = order.repeat(-(-padded // count))[:padded]
            order = order[self.rank :: self.processes]
        order = order.to(self.images.device)
        for start in range(step * self.batch_size, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            batch, targets = self.images.index_select(0, index), self.labels.index_select(0, index)
            if batch.device != self.device:
                pinned = self.device.type == "cuda"
                batch = (batch.pin_memory() if pinned else batch).to(self.device, non_blocking=pinned)
                targets = targets.to(self.device, non_blocking=pinned)
            yield self.transform(batch), targets
