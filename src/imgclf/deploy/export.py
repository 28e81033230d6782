"""Export a trained model to ONNX, TorchScript or TFLite, and keep the file only once it proves itself.

Every export follows the same recipe (timm's `onnx_export.py --check-forward`, Ultralytics' post-export check):
1. rebuild a fresh eager fp32 model from the bundle (`load_bundle`: the trained one may have been compiled);
2. preprocess up to 256 of the run's own validation images (test when validation is empty) exactly as
   prediction does (`Predictor.prepare`);
3. write the file to a temporary name beside its destination, load it in its own runtime (ONNX Runtime,
   TorchScript, LiteRT's interpreter) and run the images at batch 1 and at batch 7 (a TFLite file has one fixed
   batch size: at that one);
4. compare with the eager model: every image's top-1 class must agree and every logit must lie within
   `tolerance(...)` of the eager one; otherwise the file is deleted and `ExportCheckFailed` names the figures;
5. only then rename the file into place and record the check in `model.json` under `exports`.
The formats themselves (writer, runtime, where the description goes) are in `deploy.formats`. The bundle's
weights are only read. `--int8` quantizes the checked ONNX file with ONNX Runtime into
`model.int8.onnx`, whose test accuracy must stay within `max_accuracy_drop` of the fp32 file's.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgclf.data.split import SplitManifest
from imgclf.deploy.bundle import ModelBundle, bundle_folder, record_export
from imgclf.deploy.formats import Exporter, annotate_onnx, exporters, quiet
from imgclf.deploy.predict import prepare
from imgclf.deploy.runtimes import ONNX_INPUT, OnnxRuntime, Runtime
from imgclf.errors import ConfigError, DataError, ExportCheckFailed
from imgclf.files import write_atomic
from imgclf.progress import NO_PROGRESS, Progress
from imgclf.tracking.runs import find_run, package_versions

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "CHECK_BATCH_SIZES",
    "INT8_SUFFIX",
    "MAX_CHECK_IMAGES",
    "RELATIVE_TOLERANCE",
    "SUFFIXES",
    "ExportCheck",
    "ExportResult",
    "check_images",
    "compare",
    "export_model",
    "quantize_int8",
    "tolerance",
]

log = logging.getLogger(__name__)

SUFFIXES = {"onnx": ".onnx", "torchscript": ".ts", "tflite": ".tflite"}
INT8_SUFFIX = ".int8.onnx"
CHECK_BATCH_SIZES = (1, 7)
MAX_CHECK_IMAGES = 256
RELATIVE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ExportCheck:
    """How an exported file compares with the eager model on the run's own images."""

    split: str  # where the images came from: val, or test when the run has no val images
    images: int
    batch_sizes: tuple[int, ...]
    max_abs_logit_diff: float
    tolerance: float | None  # the largest |Δlogit| accepted; None for int8, which is judged by accuracy
    top1_agreement: float  # fraction of images whose top-1 class is the eager model's
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "batch_sizes": list(self.batch_sizes)}


@dataclass(frozen=True)
class ExportResult:
    """What `export_model` wrote and how it checked."""

    path: Path
    format: str  # onnx | torchscript | tflite | onnx-int8
    size_bytes: int
    check: ExportCheck
    seconds: float
    quantization: dict[str, Any] | None = None  # int8 only: method, sizes, accuracy before and after


def tolerance(reference: np.ndarray) -> float:
    """The largest |Δlogit| an fp32 export may show: a thousandth of the largest eager logit (at least 1e-3).

    Reordered float32 arithmetic moves logits by ~1e-6 of their size; a wrong operator, layout or constant
    moves them by whole units.
    """
    return RELATIVE_TOLERANCE * max(1.0, float(np.abs(reference).max()))


def export_model(
    run: Path | str,
    *,
    format: str = "onnx",
    out: Path | str | None = None,
    int8: bool = False,
    tflite_batch: int = 1,
    max_accuracy_drop: float = 0.01,
    progress: Progress = NO_PROGRESS,
) -> list[ExportResult]:
    """Export the run's model, check it on the run's images, and keep it only if it agrees.

    Args:
        run: the run folder (or its `model/` folder); its manifest supplies the check images.
        format: onnx | torchscript | tflite.
        out: the file to write (default `model/model.<onnx|ts|tflite>` in the run).
        int8: also quantize the ONNX file to `model.int8.onnx` (ONNX format only).
        tflite_batch: the fixed batch size of a TFLite model (LiteRT's converter cannot lower a dynamic batch
            for these networks).
        max_accuracy_drop: with `int8`, the most test accuracy the quantized model may lose against fp32.
        progress: progress reporter.

    Returns:
        The fp32 export's result, then the int8 one's when asked for.

    Raises:
        ExportCheckFailed: the exported file disagrees with the eager model (nothing is left behind).
        ConfigError: an unknown format, a missing optional dependency, or an output that would overwrite fp32.

    Example:
        >>> export_model("runs/small_cnn-20261128-120000")[0].check.top1_agreement
        1.0
    """
    _check_arguments(format, int8, tflite_batch)
    paths = find_run(Path(run))
    folder = bundle_folder(paths.root)
    target, int8_target = _targets(folder, format, out, int8)
    exporter = exporters(tflite_batch, CHECK_BATCH_SIZES)[format]
    exporter.require()

    from imgclf.deploy.bundle import load_bundle

    bundle, model = load_bundle(folder, "cpu")
    manifest = SplitManifest.load(paths.manifest)
    split, images = check_images(manifest, bundle, progress=progress)
    reference = _eager_logits(model, images)
    # the tracing batch: TFLite's fixed one; 2 elsewhere (a batch of 1 would be specialised into the graph)
    sample_size = tflite_batch if format == "tflite" else 2
    sample = images[np.arange(sample_size) % len(images)]
    info = {**bundle.to_dict(), "source_run": paths.root.name}

    started = time.perf_counter()
    log.info("exporting %s to %s; checking on %d %s images", bundle.spec.name, target, len(images), split)
    check = _write_checked(exporter, model, sample, target, images, reference, split=split, format=format, info=info)
    result = ExportResult(target, format, target.stat().st_size, check, time.perf_counter() - started)
    record_export(folder, format, _record(result, folder, exporter.details(target)))
    results = [result]
    if int8_target is not None:
        results.append(
            quantize_int8(
                target,
                int8_target,
                images=images,
                reference=reference,
                split=split,
                manifest=manifest,
                bundle=bundle,
                info=info,
                max_accuracy_drop=max_accuracy_drop,
                progress=progress,
            )
        )
        record_export(folder, "onnx-int8", _record(results[-1], folder, {}))
    return results


def _check_arguments(format: str, int8: bool, tflite_batch: int) -> None:
    if format not in SUFFIXES:
        raise ConfigError(f"--format must be one of {', '.join(SUFFIXES)}; received '{format}'")
    if int8 and format != "onnx":
        raise ConfigError(f"--int8 quantizes ONNX models; received --format {format}")
    if tflite_batch < 1:
        raise ConfigError(f"--tflite-batch must be at least 1; received {tflite_batch}")


def _targets(folder: Path, format: str, out: Path | str | None, int8: bool) -> tuple[Path, Path | None]:
    """The export's file (`out`, default `model.<suffix>` in the bundle folder) and, with `int8`, the quantized
    file's beside it."""
    target = Path(out) if out is not None else folder / f"model{SUFFIXES[format]}"
    int8_target = target.with_name(target.name.removesuffix(".onnx") + INT8_SUFFIX) if int8 else None
    if int8_target is not None and (int8_target == target or target.name.endswith(INT8_SUFFIX)):
        raise ConfigError(f"--int8 writes beside the fp32 model and never over it; choose --out other than {target}")
    return target, int8_target


def _write_checked(
    exporter: Exporter,
    model: nn.Module,
    sample: np.ndarray,
    target: Path,
    images: np.ndarray,
    reference: np.ndarray,
    *,
    split: str,
    format: str,
    info: dict[str, Any],
) -> ExportCheck:
    """Steps 3-5 of the recipe: write to a temporary file, load it in its runtime, compare, annotate, and rename it
    into place only when the check passed (`ExportCheckFailed` otherwise, and nothing is left behind)."""
    checked: dict[str, ExportCheck] = {}

    def write(tmp: Path) -> None:
        exporter.write(model, sample, tmp)
        runtime = exporter.runtime(tmp)
        check = compare(runtime, images, reference, split=split, batch_sizes=exporter.batch_sizes)
        if not check.passed:
            raise ExportCheckFailed(_failure(format, check, target))
        exporter.annotate(tmp, {**info, "check": check.to_dict()})
        checked["check"] = check

    write_atomic(target, write)
    return checked["check"]


def check_images(
    manifest: SplitManifest, bundle: ModelBundle, *, limit: int = MAX_CHECK_IMAGES, progress: Progress = NO_PROGRESS
) -> tuple[str, np.ndarray]:
    """Up to `limit` of the run's validation images (test when validation is empty), spread evenly over the
    manifest's order, preprocessed as prediction does: (split, float32 [N, C, H, W]).

    Raises:
        DataError: the run lists no val or test images, or none of them can be read any more.
    """
    split = "val" if manifest.split("val") else "test"
    rows = manifest.split(split)
    if not rows:
        raise DataError("the export check needs the run's val or test images; its manifest lists none")
    picked = [rows[i] for i in np.linspace(0, len(rows) - 1, min(limit, len(rows))).round().astype(int)]
    arrays = []
    with progress.task("Reading check images", total=len(picked)) as task:
        for row in picked:
            outcome = prepare(row.path, bundle.preprocessing)
            task.advance()
            if isinstance(outcome, str):
                log.warning("export check skips %s", outcome)
            else:
                arrays.append(outcome)
    if not arrays:
        raise DataError(f"none of the {len(picked)} {split} images of the run can be read for the export check")
    return split, np.stack(arrays)


def compare(
    runtime: Runtime, images: np.ndarray, reference: np.ndarray, *, split: str, batch_sizes: Sequence[int]
) -> ExportCheck:
    """Run `images` through `runtime` at each batch size and compare with the eager `reference` logits."""
    worst, agreement = 0.0, 1.0
    for size in batch_sizes:
        logits = np.concatenate([runtime.logits(images[i : i + size]) for i in range(0, len(images), size)])
        worst = max(worst, float(np.abs(logits - reference).max()))
        agreement = min(agreement, float((logits.argmax(1) == reference.argmax(1)).mean()))
    limit = tolerance(reference)
    return ExportCheck(
        split=split,
        images=len(images),
        batch_sizes=tuple(batch_sizes),
        max_abs_logit_diff=worst,
        tolerance=limit,
        top1_agreement=agreement,
        passed=agreement == 1.0 and worst <= limit,
    )


def quantize_int8(
    fp32: Path,
    target: Path,
    *,
    images: np.ndarray,
    reference: np.ndarray,
    split: str,
    manifest: SplitManifest,
    bundle: ModelBundle,
    info: dict[str, Any],
    max_accuracy_drop: float,
    progress: Progress = NO_PROGRESS,
) -> ExportResult:
    """ONNX Runtime int8 quantization of a checked fp32 ONNX file.

    Static QDQ quantization (int8 weights per channel, uint8 activations whose ranges are calibrated on the
    check images, i.e. validation images, never test) quantizes convolutions too; dynamic quantization (weights
    only, activation ranges computed per batch) is the fallback when the static pass fails, and the reason is
    recorded. The int8 file is kept only when its test accuracy is within `max_accuracy_drop` of the fp32
    file's (validation accuracy when the run has no test split).
    """
    started = time.perf_counter()
    outcome: dict[str, Any] = {}
    checked: dict[str, ExportCheck] = {}

    def write(tmp: Path) -> None:
        method = _quantize(fp32, tmp, images, split=split)
        check = compare(OnnxRuntime(tmp), images, reference, split=split, batch_sizes=CHECK_BATCH_SIZES)
        accuracy_split, fp32_accuracy, int8_accuracy = _accuracies(fp32, tmp, manifest, bundle, progress=progress)
        drop = fp32_accuracy - int8_accuracy
        outcome.update(
            method=method,
            fp32_bytes=fp32.stat().st_size,
            accuracy_split=accuracy_split,
            fp32_accuracy=fp32_accuracy,
            int8_accuracy=int8_accuracy,
            max_accuracy_drop=max_accuracy_drop,
        )
        # int8 logits move by design: the file is judged by its accuracy, its agreement is reported
        checked["check"] = replace(check, tolerance=None, passed=drop <= max_accuracy_drop)
        if drop > max_accuracy_drop:
            raise ExportCheckFailed(
                f"int8 model loses {drop:.4f} {accuracy_split} accuracy ({fp32_accuracy:.4f} -> {int8_accuracy:.4f}), "
                f"more than --int8-max-drop {max_accuracy_drop}; {target} was not written (the fp32 {fp32.name} "
                "is kept)"
            )
        annotate_onnx(tmp, {**info, "check": checked["check"].to_dict(), "quantization": outcome})

    write_atomic(target, write)
    outcome["int8_bytes"] = target.stat().st_size
    return ExportResult(
        target, "onnx-int8", target.stat().st_size, checked["check"], time.perf_counter() - started, outcome
    )


def _quantize(fp32: Path, target: Path, images: np.ndarray, *, split: str) -> str:
    """Write the int8 model of `fp32` to `target`: static QDQ calibrated on `images`, dynamic when the static pass
    fails. Returns the method used, in words (with the static pass's error when it fell back)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(images[i : i + 16] for i in range(0, len(images), 16))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {ONNX_INPUT: batch}

    with tempfile.TemporaryDirectory(prefix="imgclf-int8-") as work:
        prepared = Path(work) / "prepared.onnx"
        with quiet():
            quant_pre_process(str(fp32), str(prepared))
            try:
                quantize_static(
                    str(prepared),
                    str(target),
                    Batches(),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                )
                calibrated = f"{len(images)} {split} images"
                return f"static QDQ: int8 weights per channel, uint8 activations calibrated on {calibrated}"
            except Exception as exc:  # ORT raises many types for unsupported graphs
                log.warning("static int8 quantization failed (%s); falling back to dynamic", exc)
                quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)
                return f"dynamic: int8 weights, activations quantized per batch (static failed: {exc})"


# --- helpers -------------------------------------------------------------------------------------------------


def _accuracies(
    fp32: Path, int8: Path, manifest: SplitManifest, bundle: ModelBundle, *, progress: Progress
) -> tuple[str, float, float]:
    """(split, fp32 accuracy, int8 accuracy) of two ONNX files on the run's test images (val without a test
    split), each read and preprocessed once."""
    split = "test" if manifest.split("test") else "val"
    rows = manifest.split(split)
    arrays, labels = [], []
    with progress.task(f"int8 vs fp32 on {split}", total=len(rows)) as task:
        for row in rows:
            outcome = prepare(row.path, bundle.preprocessing)
            task.advance()
            if not isinstance(outcome, str):
                arrays.append(outcome)
                labels.append(bundle.classes.index(row.label))
    images, truth = np.stack(arrays), np.array(labels)

    def accuracy(path: Path) -> float:
        runtime = OnnxRuntime(path)
        logits = np.concatenate([runtime.logits(images[i : i + 64]) for i in range(0, len(images), 64)])
        return float((logits.argmax(1) == truth).mean())

    return split, accuracy(fp32), accuracy(int8)


def _record(result: ExportResult, folder: Path, details: dict[str, Any]) -> dict[str, Any]:
    try:
        file = str(result.path.resolve().relative_to(folder.resolve()))
    except ValueError:
        file = str(result.path.resolve())
    entry = {
        "file": file,
        "bytes": result.size_bytes,
        "sha256": hashlib.sha256(result.path.read_bytes()).hexdigest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": package_versions(("imgclf", "torch", "onnx", "onnxruntime", "litert-torch")),
        **details,
        "check": result.check.to_dict(),
    }
    if result.quantization is not None:
        entry["quantization"] = result.quantization
    return entry


def _failure(format: str, check: ExportCheck, target: Path) -> str:
    return (
        f"the {format} export disagrees with the trained model on the run's {check.split} images: top-1 agreement "
        f"{check.top1_agreement:.4f} (must be 1), max |Δlogit| {check.max_abs_logit_diff:.3g} (tolerance "
        f"{check.tolerance:.3g}) at batch sizes {list(check.batch_sizes)}; {target} was not written"
    )


def _eager_logits(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """The reference: the fresh fp32 model on the CPU, in batches of 64."""
    import torch

    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(images[i : i + 64])).numpy() for i in range(0, len(images), 64)])
