"""What a training run is built from, given its resolved configuration: the loaders (cached or streaming), the
model with its optimizer, loss and fine-tuning phases, and the LR finder. `workflow` calls these; each takes
the fields it needs from the config and changes nothing in it.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from imgclf.config import MIN_STEPS_PER_EPOCH, RunConfig, build_config
from imgclf.data.split import ManifestRow, SplitManifest
from imgclf.data.transforms import Preprocessing, recipe
from imgclf.device import Compute, compile_in_place
from imgclf.errors import ConfigError, DataError
from imgclf.files import write_atomic, write_csv_atomic
from imgclf.progress import NO_PROGRESS, Progress
from imgclf.training import distributed
from imgclf.training.distributed import SINGLE, Group

__all__ = [
    "Loaders",
    "epoch_steps",
    "find_learning_rate",
    "is_pretrained",
    "make_fit_state",
    "make_loaders",
    "mixing",
    "whitening_sample",
]

log = logging.getLogger(__name__)


@dataclass
class Loaders:
    """Training and validation batches, how many images this process goes through per epoch (its shard under
    torchrun), and how they are produced ("cached (disk)", "streaming", ...)."""

    train: Iterable
    val: Iterable
    train_images: int
    val_images: int
    path: str


def make_loaders(
    config: RunConfig,
    manifest: SplitManifest,
    pre: Preprocessing,
    compute: Compute,
    *,
    group: Group = SINGLE,
    progress: Progress = NO_PROGRESS,
) -> Loaders:
    """Loaders for the train split (augmented, shuffled, seeded) and the val split (eval preprocessing).

    With `data.cache` (auto: when the decoded images fit the memory budget) every image is decoded once into a
    uint8 array and whole batches are augmented on the device; otherwise each image is decoded and augmented in
    a DataLoader every epoch. Both give the same eval tensors for the same file.

    Under torchrun (`group`) each process gets its slice of every epoch (`train.batch_size` images per process
    and step); the processes of one node share one disk cache, built once and mapped read-only by each.
    """
    from imgclf.data.cache import choose_mode

    train_rows, val_rows = manifest.split("train"), manifest.split("val")
    if not val_rows:
        raise DataError(
            "no validation images: add a val folder or give data.split_ratios a val share > 0 "
            "(model selection and early stopping need a validation split)"
        )
    per_process = -(-len(train_rows) // group.world_size)
    batch_size = min(int(config.train.batch_size), per_process)
    steps, dropped = epoch_steps(per_process, batch_size)
    if steps < MIN_STEPS_PER_EPOCH:
        log.warning(
            "only %d optimizer step%s per epoch (%d training images, batch %d): the model changes a few times per "
            "epoch, and the learning curves show little; a smaller --batch-size gives more steps",
            steps,
            "" if steps == 1 else "s",
            len(train_rows),
            batch_size,
        )
    if dropped:
        log.info("%d training image(s) left out of each epoch (a last batch of one breaks BatchNorm)", dropped)
    mode = choose_mode(config.data.cache, len(train_rows) + len(val_rows), pre, config.data.cache_budget)
    if mode != "off" and config.data.num_workers:
        log.info(
            "data.num_workers = %d is not used: the decoded cache augments whole batches on the device, in this "
            "process (--cache off streams through that many DataLoader workers)",
            config.data.num_workers,
        )
    if mode == "off":
        return _streaming_loaders(config, manifest, pre, compute, batch_size, group)
    return _cached_loaders(config, manifest, pre, compute, batch_size, mode, group, progress)


WHITENING_IMAGES = 5000  # training images that fit small_cnn's whitening layer (airbench's count)


def whitening_sample(config: RunConfig, train: Iterable, pre: Preprocessing, weights) -> torch.Tensor | None:
    """The training images that fit small_cnn's whitening layer, when the model has one that its weights do not
    bring (None otherwise: another network, `model.whiten` off, or weights with a layer for these channels)."""
    from imgclf.models.registry import SMALL_CNN
    from imgclf.models.weights import whitening_fits

    whitened = config.model.name == SMALL_CNN and config.model.whiten is True
    wanted = whitened and not whitening_fits(weights, pre.in_chans)
    return _training_sample(train, pre) if wanted else None


def _training_sample(train: Iterable, pre: Preprocessing, count: int = WHITENING_IMAGES) -> torch.Tensor:
    """Up to `count` training images spread evenly over the split, normalized as for evaluation (no augmentation):
    the statistics a data-dependent initialisation reads. Cached images are read directly; streamed ones are
    decoded again with the evaluation transform (no random draw, so a seed gives the same layer), a tenth of
    `count` of them since decoding costs, and any that fail to load are left to the training loop to report."""
    from imgclf.data.batch_transforms import eval_batch
    from imgclf.data.loaders import BadSample
    from imgclf.data.transforms import eval_transform

    images = getattr(train, "images", None)
    if images is not None:
        picks = torch.linspace(0, len(images) - 1, min(count, len(images))).long()
        return eval_batch(images.index_select(0, picks.to(images.device)), pre)
    decoder = copy.copy(train.loader.dataset)  # the training set, read with the evaluation transform
    decoder.transform = eval_transform(pre)
    picks = torch.linspace(0, len(decoder) - 1, min(count // 10, len(decoder))).long().tolist()
    good = [sample[0] for sample in map(decoder.__getitem__, picks) if not isinstance(sample, BadSample)]
    if not good:
        raise DataError(
            f"none of the {len(picks)} training images sampled to fit small_cnn's whitening layer could be "
            f"loaded (the first: {decoder.paths[picks[0]]}); check the folder, or set model.whiten=false"
        )
    return torch.stack(good)


def epoch_steps(train_images: int, batch_size: int) -> tuple[int, int]:
    """(optimizer steps per epoch, training images left out per epoch). The last, partial batch is kept unless it
    would hold a single image (BatchNorm cannot normalise a batch of one): at most one image is left out."""
    full, rest = divmod(train_images, batch_size)
    if rest == 1 and full > 0:
        return full, 1
    return full + (rest > 0), 0


def _cached_loaders(config, manifest, pre, compute, batch_size, mode, group, progress) -> Loaders:
    from imgclf.data.batch_transforms import BatchAugment, eval_batch
    from imgclf.data.cache import decoded_images
    from imgclf.data.loaders import CachedLoader

    class_index = {label: i for i, label in enumerate(manifest.classes)}
    loaders = []
    for split in ("train", "val"):
        rows = manifest.split(split)
        decoded = decoded_images(
            [r.path for r in rows],
            [r.sha256 for r in rows],
            pre,
            mode=mode,
            cache_dir=config.data.cache_dir,
            max_pixels=config.data.max_pixels,
            progress=progress,
        )
        if decoded.location and not group.enabled:
            images = torch.from_numpy(decoded.array.copy())  # a private copy of the map: gathers run from RAM
        else:  # in memory already, or shared read-only by the node's processes through the page cache
            images = _as_tensor(decoded.array)
        labels = torch.tensor([class_index[r.label] for r in rows])
        if decoded.failed:
            _check_bad_images(decoded.failed, config.data.max_bad_images)
            keep = torch.ones(len(rows), dtype=torch.bool)
            keep[[index for index, _ in decoded.failed]] = False
            images, labels = images[keep], labels[keep]
        if compute.device.type == "cuda" and _fits_on_gpu(images):
            images = images.to(compute.device)  # resident on the GPU: no host-to-device copy per batch
        train = split == "train"
        augment = config.augment
        transform = (
            BatchAugment(pre, augment.preset, hflip=augment.hflip, vflip=augment.vflip)
            if train
            else lambda batch: eval_batch(batch, pre)
        )
        loaders.append(
            CachedLoader(
                images,
                labels,
                batch_size=batch_size if train else 2 * batch_size,
                shuffle=train,
                transform=transform,
                device=compute.device,
                drop_last=train and epoch_steps(-(-len(labels) // group.world_size), batch_size)[1] > 0,
                seed=config.train.seed,
                shard=(group.rank, group.world_size),
            )
        )
    where = "disk cache" if mode == "disk" else "memory"
    return Loaders(loaders[0], loaders[1], loaders[0].num_images, loaders[1].num_images, f"decoded once ({where})")


def _streaming_loaders(config, manifest, pre, compute, batch_size, group) -> Loaders:
    from imgclf.data.loaders import ImageDataset, auto_num_workers, make_loader
    from imgclf.data.transforms import eval_transform, train_transform

    class_index = {label: i for i, label in enumerate(manifest.classes)}

    def dataset(rows: list[ManifestRow], transform) -> ImageDataset:
        labels = [class_index[row.label] for row in rows]
        return ImageDataset(
            [r.path for r in rows], labels, transform, color=pre.color, max_pixels=config.data.max_pixels
        )

    augment = config.augment
    train_set = dataset(
        manifest.split("train"), train_transform(pre, augment.preset, hflip=augment.hflip, vflip=augment.vflip)
    )
    val_set = dataset(manifest.split("val"), eval_transform(pre))
    workers = (
        config.data.num_workers
        if config.data.num_workers is not None
        else auto_num_workers(processes=group.local_world_size)
    )
    pin = compute.device.type == "cuda"
    shard = (group.rank, group.world_size)
    train_loader = make_loader(
        train_set,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        seed=config.train.seed,
        pin_memory=pin,
        drop_last=epoch_steps(-(-len(train_set) // group.world_size), batch_size)[1] > 0,
        max_bad_images=config.data.max_bad_images,
        shard=shard,
    )
    val_loader = make_loader(
        val_set,
        batch_size=2 * batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin,
        max_bad_images=config.data.max_bad_images,
        shard=shard,
    )
    where = f"streaming ({workers} workers per process)"
    return Loaders(train_loader, val_loader, train_loader.num_images, val_loader.num_images, where)


def _as_tensor(array) -> torch.Tensor:
    """A tensor over `array` without a copy (a read-only memory map stays read-only: nothing writes to it)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable": we only read it
        return torch.from_numpy(array)


def mixing(config: RunConfig, num_classes: int):
    """MixUp/CutMix for the training batches when the augmentation preset asks for it, else None."""
    from imgclf.data.batch_transforms import mix_transform

    return mix_transform(num_classes) if recipe(config.augment.preset).mix else None


def make_fit_state(
    config: RunConfig,
    manifest: SplitManifest,
    pre: Preprocessing,
    steps_per_epoch: int,
    mode: str,
    compute: Compute,
    weights=None,
    *,
    extend_from: int | None = None,
    group: Group = SINGLE,
    train_sample: torch.Tensor | None = None,
):
    """A freshly initialised (seeded) model with pretrained weights if given, its optimizer, the training loss,
    and the phase plan whose `enter` sets trainable layers, learning rates and the LR schedule. `extend_from`:
    the epochs a finished run had; the plan gets an extension phase up to `train.epochs` (`extend_phases`).
    Under torchrun (`group`) the phases wrap the model in DDP, `train.lr_scaling: linear` multiplies the learning
    rates by the number of processes, and `train.sync_batchnorm` makes BatchNorm layers synchronised.
    `train_sample`: normalized training images that fit small_cnn's whitening layer (`whitening_sample`; without
    them the layer comes from the weights or the checkpoint).

    Returns:
        (FitState, ModelSpec, loss, Phases callback).
    """
    from imgclf.models.registry import model_spec
    from imgclf.training.callbacks import Phases
    from imgclf.training.ema import WeightAverage
    from imgclf.training.optim import LRSchedule, build_optimizer
    from imgclf.training.state import FitState

    train = config.train
    if train.lr == "auto":
        raise ConfigError("internal: train.lr must be resolved before the fit state is built")
    # 1. the model: seeded, pretrained weights under a new head, on the device
    spec = model_spec(config.model, num_classes=len(manifest.classes), in_chans=pre.in_chans)
    model = _placed_model(
        spec, weights, seed=train.seed, sync_batchnorm=train.sync_batchnorm, compute=compute, group=group
    )
    if getattr(model, "whiten", None) is not None and train_sample is not None:
        model.whiten.fit(train_sample.to(compute.device))
    average = WeightAverage(model, train.ema_decay) if train.ema else None  # before compile: a plain copy
    if train.compile:
        compile_in_place(model, compute.device)
    # 2. what trains it: the optimizer, the loss, the phases and each phase's schedule
    scale = group.world_size if train.lr_scaling == "linear" else 1
    optimizer = build_optimizer(
        train.optimizer,
        model,
        lr=train.lr * scale,
        weight_decay=train.weight_decay,
        momentum=train.momentum,
        nesterov=train.nesterov,
        layer_decay=train.layer_decay,
    )
    loss_fn = _training_loss(train, manifest).to(compute.device)
    plan = _phase_plan(config, scale=scale, extend_from=extend_from)
    make_schedule = partial(
        _phase_schedule, train=train, last=plan[-1], optimizer=optimizer, steps_per_epoch=steps_per_epoch, mode=mode
    )
    scaler = torch.amp.GradScaler("cuda") if compute.needs_grad_scaler() else None
    state = FitState(
        model=model,
        optimizer=optimizer,
        schedule=LRSchedule(None, "epoch"),
        epochs=train.epochs,
        scaler=scaler,
        ema=average,
    )
    wrap = partial(distributed.wrap, group, device=compute.device) if group.enabled else None
    return state, spec, loss_fn, Phases(plan, make_schedule, wrap)


def _placed_model(spec, weights, *, seed: int, sync_batchnorm: bool, compute: Compute, group: Group):
    """The network of `spec`, initialised from `seed` (epoch 0), with the pretrained `weights` if given, BatchNorm
    synchronised over `group` if asked, on the compute device in its memory format."""
    from imgclf.models.registry import build_model
    from imgclf.models.weights import load_pretrained
    from imgclf.training.engine import seed_epoch

    seed_epoch(seed, 0)  # weight initialisation
    model = build_model(spec)
    if weights is not None:
        new = load_pretrained(model, weights, name=spec.name)
        log.info("pretrained weights from %s; new head: %s", weights.source, ", ".join(new))
    if sync_batchnorm:
        model = distributed.sync_batchnorm(group, model, compute.device)
    return model.to(compute.device, memory_format=compute.memory_format)


def _training_loss(train, manifest: SplitManifest):
    """Cross-entropy with the label smoothing, and with `class_weights: auto` the training split's class counts."""
    from imgclf.training.optim import build_loss

    counts = Counter(row.label for row in manifest.split("train"))
    return build_loss(
        label_smoothing=train.label_smoothing,
        class_counts=[counts[c] for c in manifest.classes] if train.class_weights == "auto" else None,
    )


def _phase_plan(config: RunConfig, *, scale: int, extend_from: int | None):
    """The fine-tuning phases (frozen, then fine-tune), with an extension phase up to `train.epochs` for a finished
    run that had `extend_from` epochs."""
    from imgclf.models.finetune import extend_phases, plan_phases

    train = config.train
    plan = plan_phases(
        epochs=extend_from or train.epochs,
        freeze_epochs=train.freeze_epochs,
        lr=train.lr * scale,
        finetune_lr=train.finetune_lr * scale if train.finetune_lr is not None else None,
        unfreeze=train.unfreeze,
        keep_pretrained_norms=is_pretrained(config) and train.pretrained_bn == "frozen",
    )
    if extend_from is not None:
        plan = extend_phases(plan, done=extend_from, epochs=train.epochs)
    return plan


def _phase_schedule(phase, *, train, last, optimizer, steps_per_epoch: int, mode: str):
    """A phase's LR schedule, made as the phase begins: the configured one, or with a time budget, for the last
    phase, a cosine over the steps the budget plans (re-planned as it runs)."""
    from imgclf.training.optim import build_schedule, planned_schedule

    if train.time_budget is not None and phase == last:  # the budgeted phase: re-planned as it runs
        total = phase.epochs * steps_per_epoch
        warmup = min(round(train.warmup_epochs * steps_per_epoch), total // 5)
        return planned_schedule(optimizer, total_steps=total, warmup_steps=warmup)
    return build_schedule(
        train.scheduler,
        optimizer,
        epochs=phase.epochs,
        steps_per_epoch=steps_per_epoch,
        warmup_epochs=train.warmup_epochs,
        step_size=train.step_size,
        gamma=train.gamma,
        plateau_patience=train.plateau_patience,
        mode=mode,
    )


def find_learning_rate(
    config: RunConfig,
    manifest: SplitManifest,
    pre: Preprocessing,
    compute: Compute,
    train_loader: Iterable,
    steps_per_epoch: int,
    weights,
    out: Path,
    *,
    num_steps: int = 100,
    progress: Progress = NO_PROGRESS,
):
    """LR range test in the state of the first epoch; writes lr_find.png and lr_find.csv into `out`."""
    from imgclf.evaluation.plots import lr_finder_figure
    from imgclf.training.optim import find_lr

    probe = build_config(config, {"train.lr": 1.0})  # the finder sets the LR itself
    sample = whitening_sample(config, train_loader, pre, weights)
    state, _, loss_fn, phases = make_fit_state(
        probe, manifest, pre, steps_per_epoch, "min", compute, weights, train_sample=sample
    )
    phases.enter(state, 1)
    log.info("LR finder: up to %d steps from 1e-7 to 10", num_steps)
    result = find_lr(
        state.model,
        train_loader,
        state.optimizer,
        loss_fn,
        compute,
        num_steps=num_steps,
        frozen_norms=state.frozen_norms,
        progress=progress,
    )
    out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(
        out / "lr_find.csv", ["lr", "loss", "smoothed_loss"], zip(result.lrs, result.losses, result.smoothed)
    )
    figure = lr_finder_figure(result.lrs, result.losses, result.smoothed, result.suggestion, result.method)
    write_atomic(out / "lr_find.png", lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    log.info(
        "LR finder suggests %.2e (%s; %s); plot in %s",
        result.suggestion,
        result.method,
        result.stopped,
        out / "lr_find.png",
    )
    return result


def is_pretrained(config: RunConfig) -> bool:
    return config.model.pretrained or config.model.weights is not None


def _check_bad_images(failed: list[tuple[int, str]], limit: int) -> None:
    """The cached path decodes every image before the first epoch: up to `limit` broken ones are skipped (each
    warned); more stop the run there, before any training, so no checkpoint is written or changed."""
    for _, reason in failed:
        log.warning("skipped %s", reason)
    if len(failed) > limit:
        raise DataError(
            f"{len(failed)} images failed to load while decoding them before training (more than "
            f"data.max_bad_images = {limit}); nothing was trained and no checkpoint was changed. Fix or remove them "
            "and run again (--resume for a run that had started): "
            + "; ".join(reason for _, reason in failed[:3])
            + (f" and {len(failed) - 3} more" if len(failed) > 3 else "")
        )


def _fits_on_gpu(images: torch.Tensor, fraction: float = 0.25) -> bool:
    free, _ = torch.cuda.mem_get_info()
    return images.numel() * images.element_size() <= fraction * free
