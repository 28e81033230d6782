"""Datasets and DataLoaders. Streaming path: each sample is decoded by the shared decoder in the loader."""

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
