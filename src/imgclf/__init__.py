"""imgclf: from a folder of labelled images to a trained, evaluated image classifier.

Example:
    >>> import imgclf
    >>> result = imgclf.train("data/", {"train": {"epochs": 2}})  # data/<class>/*.png: 3 digits, 30 images each
    >>> imgclf.evaluate(result.run_dir).metrics["accuracy"] > 0.5  # on the test split; chance is 1/3
    True
    >>> imgclf.predict(result.run_dir, ["photo.jpg"], top_k=3)
    [Prediction(source='photo.jpg', classes=('digit...', 'digit...', 'digit...'), probabilities=(...), ...)]
    >>> imgclf.export(result.run_dir)[0].path  # checked against the trained model
    PosixPath('runs/small_cnn-.../model/model.onnx')

Importing imgclf is cheap: the API below is loaded on first use (torch is imported only then). In a Jupyter
kernel, imgclf's log lines and progress bars show in the cell output with no setup (`imgclf.notebook`).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from imgclf import notebook as _notebook
from imgclf._version import __version__

_EXPORTS = {
    "train": "imgclf.workflow",
    "evaluate": "imgclf.workflow",
    "predict": "imgclf.workflow",
    "load_model": "imgclf.workflow",
    "split": "imgclf.workflow",
    "export": "imgclf.workflow",
    "report": "imgclf.workflow",
    "reproduce": "imgclf.workflow",
    "lr_find": "imgclf.workflow",
    "tune": "imgclf.tuning",
    "list_runs": "imgclf.tracking.runs",
    "compare_runs": "imgclf.tracking.compare",
    "Callback": "imgclf.training.state",
    "RunInfo": "imgclf.training.state",
    "inspect_data": "imgclf.explore",
    "preview_augmentation": "imgclf.explore",
    "TrainResult": "imgclf.workflow",
    "EvalResult": "imgclf.workflow",
    "ExportResult": "imgclf.deploy.export",
    "ExportCheck": "imgclf.deploy.export",
    "ExportCheckFailed": "imgclf.errors",
    "Predictor": "imgclf.deploy.predict",
    "Prediction": "imgclf.deploy.predict",
    "RunConfig": "imgclf.config",
    "DataConfig": "imgclf.config",
    "AugmentConfig": "imgclf.config",
    "ModelConfig": "imgclf.config",
    "TrainConfig": "imgclf.config",
    "EarlyStoppingConfig": "imgclf.config",
    "TrackingConfig": "imgclf.config",
    "ImgclfError": "imgclf.errors",
    "DataError": "imgclf.errors",
    "ConfigError": "imgclf.errors",
    "ImageError": "imgclf.errors",
    "CheckpointError": "imgclf.errors",
}

__all__ = [*sorted(_EXPORTS), "__version__"]

# In a Jupyter kernel only (and unless logging is configured): imgclf's log lines, the per-epoch ones among them, in
# the cell output. Cheap: it looks at sys.modules, imports nothing heavy. See imgclf.notebook.
_notebook.show_logs()

if TYPE_CHECKING:
    from imgclf.config import (
        AugmentConfig,
        DataConfig,
        EarlyStoppingConfig,
        ModelConfig,
        RunConfig,
        TrackingConfig,
        TrainConfig,
    )
    from imgclf.deploy.export import ExportCheck, ExportResult
    from imgclf.deploy.predict import Prediction, Predictor
    from imgclf.errors import CheckpointError, ConfigError, DataError, ExportCheckFailed, ImageError, ImgclfError
    from imgclf.explore import inspect_data, preview_augmentation
    from imgclf.tracking.compare import compare_runs
    from imgclf.tracking.runs import list_runs
    from imgclf.training.state import Callback, RunInfo
    from imgclf.tuning import tune
    from imgclf.workflow import (
        EvalResult,
        TrainResult,
        evaluate,
        export,
        load_model,
        lr_find,
        predict,
        report,
        reproduce,
        split,
        train,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'imgclf' has no attribute '{name}'")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
