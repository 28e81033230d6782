"""Loaders for both data paths: streaming (`ImageDataset` + DataLoader: each sample decoded and augmented in
the loader) and cached (`CachedLoader`: decoded once, gathered and augmented as whole batches on the device)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from imgclf.data.images import Color, load_image


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

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_image(self.paths[index], color=self.color, max_pixels=self.max_pixels)
        return self.transform(image), self.labels[index]


def auto_num_workers() -> int:
    """Loader processes for this machine. On <= 2 cores, workers compete with the compute threads for the
    same cores and make training slower, so decoding stays in the main process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
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
) -> DataLoader:
    """A DataLoader whose order and worker seeds come from its own generator.

    Training code re-seeds `loader.generator` at the start of every epoch, so the data order of epoch N is
    the same whether the run went straight through or was resumed.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=False,  # fresh workers per epoch take their seeds from the re-seeded generator
    )


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

    @property
    def num_images(self) -> int:
        return len(self.images)

    def __len__(self) -> int:
        full, rest = divmod(len(self.images), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self):
        count = len(self.images)
        order = torch.randperm(count, generator=self.generator) if self.shuffle else torch.arange(count)
        order = order.to(self.images.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            batch, targets = self.images.index_select(0, index), self.labels.index_select(0, index)
            if batch.device != self.device:
                pinned = self.device.type == "cuda"
                batch = (batch.pin_memory() if pinned else batch).to(self.device, non_blocking=pinned)
                targets = targets.to(self.device, non_blocking=pinned)
            yield self.transform(batch), targets
