"""Choosing the compute device and how to compute on it: precision, memory format."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from imgclf.cpus import usable_cpus
from imgclf.errors import ConfigError

__all__ = [
    "AutoSettings",
    "Compute",
    "auto_early_pool",
    "compile_in_place",
    "describe_device",
    "isa_capped_below_avx512",
    "native_cpu_bf16",
    "preserved_torch_state",
    "resolve_auto_settings",
    "resolve_compute",
    "select_device",
]


def select_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then CPU; an explicit device that is not available is an error.

    Example:
        >>> select_device("cpu")
        device(type='cpu')
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device must be auto, cpu, cuda, cuda:N or mps; received '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is '{name}' but no CUDA GPU is available here; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device is '{name}' but Apple MPS is not available here; use --device cpu or auto")
    return device


def describe_device(device: torch.device) -> str:
    """The device a run computes on, as its records name it: `cpu`, `mps`, or `cuda:0 (NVIDIA H200)`.

    A CUDA device without an index (what `select_device("auto")` returns) is the current one, named with its index.

    Example:
        >>> describe_device(select_device("cpu"))
        'cpu'
        >>> describe_device(select_device("cuda"))  # needs a GPU  # doctest: +SKIP
        'cuda:0 (NVIDIA H200)'
    """
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class Compute:
    """Where and how the model computes: device, autocast dtype (None = fp32), memory format."""

    device: torch.device
    dtype: torch.dtype | None = None
    channels_last: bool = False

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def needs_grad_scaler(self) -> bool:
        return self.dtype == torch.float16 and self.device.type == "cuda"


def resolve_compute(
    device: str = "auto",
    precision: Precision = "auto",
    channels_last: bool = True,
    deterministic: bool = False,
    processes_per_node: int = 1,
) -> Compute:
    """The compute settings for a run.

    Args:
        device: auto | cpu | cuda | cuda:N | mps.
        precision: auto picks bf16 autocast on CPUs with native bf16 (AVX512-BF16/AMX: about 3x the fp32 matmul
            rate; CPUs that only emulate it, AVX2 or AVX-512 without BF16, stay in fp32) and on CUDA GPUs that
            support it, fp16 on older GPUs (with a GradScaler), fp32 elsewhere.
        channels_last: NHWC memory layout for convolutions (faster with oneDNN and cuDNN); ignored on MPS.
        deterministic: deterministic algorithms only (a process-wide PyTorch setting), for bit-identical GPU runs.
        processes_per_node: training processes sharing this machine (torchrun's local world size): each takes its
            share of the usable cores for its CPU threads.

    Example:
        >>> resolve_compute("cpu", "fp32").precision
        'fp32'
    """
    torch_device = select_device(device)
    if precision == "auto":
        precision = _auto_precision(torch_device)
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ConfigError(f"train.precision must be auto, fp32, bf16 or fp16; received '{precision}'")
    if precision == "fp16" and torch_device.type == "cpu":
        raise ConfigError("train.precision fp16 is for GPUs; on a CPU use bf16 or fp32")
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch_device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels once
    if torch_device.type == "cpu" and not _threads_set_by_user():
        # OpenMP's default counts the host's cores, not a container's CPU quota; never raise a lower setting
        share = max(1, usable_cpus() // max(processes_per_node, 1))
        torch.set_num_threads(min(torch.get_num_threads(), share) if processes_per_node == 1 else share)
    return Compute(torch_device, dtypes[precision], channels_last and torch_device.type != "mps")


@dataclass(frozen=True)
class AutoSettings:
    """What the settings whose `auto` the hardware decides resolve to on one `Compute` (None: the setting was given,
    or does not apply to the model)."""

    precision: str | None = None  # train.precision: auto -> the precision the run computes in
    early_pool: bool | None = None  # model.early_pool: auto (small_cnn) -> on where fp32 on a CPU
    early_pool_reason: str = ""  # why early pooling is on or off, for the log

    def overrides(self) -> dict[str, Any]:
        """The resolved settings as dotted config keys (what config.yaml records)."""
        values = {"train.precision": self.precision, "model.early_pool": self.early_pool}
        return {key: value for key, value in values.items() if value is not None}


def resolve_auto_settings(
    compute: Compute, *, precision: str, early_pool: bool | str, has_early_pool: bool
) -> AutoSettings:
    """The settings whose `auto` depends on the hardware, decided once for the compute a run uses: the precision it
    computes in, and small_cnn's early pooling (`auto_early_pool`).

    Args:
        compute: where and how the run computes (`resolve_compute`).
        precision: `train.precision` as configured (auto | fp32 | bf16 | fp16).
        early_pool: `model.early_pool` as configured (auto | true | false).
        has_early_pool: whether the model has early pooling (small_cnn); for other models it stays as given.

    Returns:
        The resolved values, None for those that were not `auto`.
    """
    resolved_precision = compute.precision if precision == "auto" else None
    if early_pool != "auto" or not has_early_pool:
        return AutoSettings(precision=resolved_precision)
    on = auto_early_pool(compute)
    reason = "fp32 on a CPU, half the FLOPs" if on else f"{compute.precision} on {compute.device.type}"
    return AutoSettings(precision=resolved_precision, early_pool=on, early_pool_reason=reason)


def auto_early_pool(compute: Compute) -> bool:
    """`model.early_pool: auto`: on where the model's FLOPs bound the run, a CPU computing in fp32 (no native bf16:
    AVX2 laptops and servers), where half the FLOPs buy twice the epochs in the same time (Fashion-MNIST, 10
    minutes on 2 AVX2 cores: 0.9362 against 0.9316, README "Accuracy per minute"); off on GPUs and CPUs with
    native bf16, where the classic layout's extra ~0.3 points come cheap."""
    return compute.device.type == "cpu" and compute.precision == "fp32"


def _threads_set_by_user() -> bool:
    """Whether OMP_NUM_THREADS was chosen by the user. torchrun sets it to 1 for every process when it starts
    several per node and the user did not; that default is not a choice, so the cores are shared out instead."""
    value = os.environ.get("OMP_NUM_THREADS")
    if value is None:
        return False
    torchrun_default = value == "1" and "TORCHELASTIC_RUN_ID" in os.environ
    return not (torchrun_default and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1)


def _auto_precision(device: torch.device) -> str:
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and native_cpu_bf16():
        return "bf16"
    return "fp32"


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware: AVX512-BF16 or AMX on x86 (oneDNN's own check,
    `_is_mkldnn_bf16_supported`, also says yes for plain AVX-512, where bf16 is emulated and slower than fp32),
    or oneDNN's bf16 kernels on Arm. No when the ISA was capped below AVX-512 (ATEN_CPU_CAPABILITY=avx2 or
    ONEDNN_MAX_CPU_ISA=AVX2, e.g. to reproduce an older CPU): bf16 then runs emulated, ~10x slower than fp32."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        if isa_capped_below_avx512():
            return False
        checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(check is not None and check() for check in checks)
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def isa_capped_below_avx512() -> bool:
    """Whether ATen's or oneDNN's CPU kernels run below AVX-512 with bf16: the CPU lacks it, or ATEN_CPU_CAPABILITY /
    ONEDNN_MAX_CPU_ISA capped them."""
    aten = torch.backends.cpu.get_cpu_capability().upper()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    onednn_bf16 = onednn == "ALL" or onednn.startswith(
        ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10")
    )
    return not aten.startswith("AVX512") or not onednn_bf16


def compile_in_place(model: nn.Module, device: torch.device) -> None:
    """`torch.compile` the model in place (its state_dict keys stay the same for checkpoints and the bundle).

    On a CPU, inductor builds C++ kernels at the first step; without a compiler that step would fail deep inside
    torch, so the missing compiler is reported up front.
    """
    if device.type == "cpu" and not (os.environ.get("CXX") or any(map(shutil.which, ("g++", "clang++", "c++")))):
        raise ConfigError(
            "train.compile on a CPU needs a C++ compiler (g++ or clang++ on PATH, or $CXX); install one "
            "(e.g. apt-get install g++) or train without --compile"
        )
    model.compile()


@contextlib.contextmanager
def preserved_torch_state() -> Iterator[None]:
    """Put back what a run changes process-wide when the block ends: deterministic mode, cuDNN's settings, the CPU
    thread count and the random generators (torch, NumPy, Python). Several runs in one process (tuning trials)
    then each start from the same state, whatever the one before set.

    Example:
        >>> with preserved_torch_state():  # around imgclf.train("data/", {"train": {"deterministic": True}})
        ...     torch.use_deterministic_algorithms(True)  # what that run sets
        >>> torch.are_deterministic_algorithms_enabled()
        False
    """
    import random

    import numpy as np

    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.get_num_threads(),
        torch.get_rng_state(),
        np.random.get_state(),
        random.getstate(),
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    try:
        yield
    finally:
        deterministic, warn_only, benchmark, cudnn_deterministic, threads, torch_rng, numpy_rng, python_rng, cublas = (
            saved
        )
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cudnn.deterministic = cudnn_deterministic
        torch.set_num_threads(threads)
        torch.set_rng_state(torch_rng)
        np.random.set_state(numpy_rng)
        random.setstate(python_rng)
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
