"""`build_model(name, ...)`: the from-scratch `small_cnn` or any timm architecture, with a head for our classes."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from imgclf.errors import ConfigError

if TYPE_CHECKING:  # torch stays unimported until a model is built: ModelSpec travels in ONNX metadata too
    from torch import nn

    from imgclf.config import ModelConfig

__all__ = [
    "SMALL_CNN",
    "ModelInfo",
    "ModelSpec",
    "build_model",
    "check_model_name",
    "describe_model",
    "model_names",
    "model_spec",
]

SMALL_CNN = "small_cnn"


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild the network; stored in the model bundle."""

    name: str
    num_classes: int
    in_chans: int
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(data["name"], int(data["num_classes"]), int(data["in_chans"]), dict(data.get("options", {})))


def model_spec(model: ModelConfig, *, num_classes: int, in_chans: int) -> ModelSpec:
    """The spec for the `model` section of a config; only `small_cnn` uses depth, width, pool and early_pool.

    Example:
        >>> from imgclf.config import ModelConfig
        >>> model_spec(ModelConfig(name="resnet18"), num_classes=5, in_chans=3).options
        {'dropout': 0.0}
    """
    check_model_name(model.name)
    options: dict[str, Any] = {"dropout": model.dropout}
    if model.name == SMALL_CNN:
        if model.early_pool == "auto":
            raise ConfigError(
                "internal: model.early_pool must be resolved (device.resolve_auto_settings) before the model is built"
            )
        if model.whiten == "auto":
            raise ConfigError(
                "internal: model.whiten must be resolved (data.settings.resolve_data_settings) before the model is "
                "built"
            )
        if model.width == "auto":
            raise ConfigError(
                "internal: model.width must be resolved (workflow.run._resolve_width) before the model is built"
            )
        options.update(
            depth=model.depth, width=model.width, pool=model.pool, early_pool=model.early_pool, whiten=model.whiten
        )
    return ModelSpec(name=model.name, num_classes=num_classes, in_chans=in_chans, options=options)


def build_model(spec: ModelSpec) -> nn.Module:
    """Create the network with randomly initialised weights and a `spec.num_classes` head.

    Example:
        >>> model = build_model(ModelSpec("resnet18", num_classes=5, in_chans=3))
        >>> type(model).__name__, model.get_classifier().out_features
        ('ResNet', 5)
    """
    check_model_name(spec.name)
    if spec.name == SMALL_CNN:
        from imgclf.models.small_cnn import SmallCNN

        return SmallCNN(spec.num_classes, in_chans=spec.in_chans, **spec.options)
    import timm

    return timm.create_model(
        spec.name,
        pretrained=False,
        num_classes=spec.num_classes,
        in_chans=spec.in_chans,
        drop_rate=spec.options.get("dropout", 0.0),
    )


def check_model_name(name: str) -> None:
    """Raise a ConfigError with close matches when `name` is neither small_cnn nor a timm model."""
    if name == SMALL_CNN:
        return
    import timm

    if timm.is_model(name):
        return
    known = [SMALL_CNN, *timm.list_models()]
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"model.name: unknown model '{name}'; expected 'small_cnn' or a timm model name "
        f"(`imgclf models 'resnet*'` lists them).{hint}"
    )


@dataclass(frozen=True)
class ModelInfo:
    """One row of `imgclf models`."""

    name: str
    parameters: int
    input_size: str
    offline: tuple[str, ...]


def model_names(pattern: str = "*", *, pretrained: bool = False) -> list[str]:
    """small_cnn and timm's model names matching a shell-style pattern, those with pretrained weights available
    offline first (an installed weights package, the local Hugging Face cache), then in timm's order.

    The pattern matches a whole name, as in `timm.list_models`, or the part of a name after an underscore, so
    `efficientnet*` also finds timm's ports such as `tf_efficientnet_lite0` and `resnet*` finds `nf_resnet50`
    (a leading `*` matches anywhere). With `pretrained`, only names with published weights are listed, and timm
    adds the weight tag (`resnet18.a1_in1k`).

    Example:
        >>> model_names("efficientnet_lite*", pretrained=True)[0]
        'tf_efficientnet_lite0.in1k'
    """
    import fnmatch

    import timm

    # lazy, as every import of models.weights here: it imports torch, and this module stays torch-free at import
    # (ModelSpec travels in ONNX metadata). weights never imports this module, so the arrow points one way.
    from imgclf.models.weights import offline_sources

    names = [SMALL_CNN] if not pretrained and fnmatch.fnmatch(SMALL_CNN, pattern) else []
    names += timm.list_models([pattern, f"*_{pattern}"], pretrained=pretrained)
    offline = {name for name in names if name != SMALL_CNN and offline_sources(name)}  # ~0.1 ms a name
    return [name for name in names if name in offline] + [name for name in names if name not in offline]


def describe_model(name: str) -> ModelInfo:
    """Parameter count (for a 1000-class head; small_cnn: 10 classes), input size, offline weight sources."""
    import torch

    from imgclf.config import ModelConfig
    from imgclf.models.weights import offline_sources, pretrained_config  # lazy: see model_names

    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        if name == SMALL_CNN:
            model = build_model(
                model_spec(ModelConfig(width=32, early_pool=False, whiten=False), num_classes=10, in_chans=3)
            )
        else:
            import timm

            model = timm.create_model(name, pretrained=False)
    cfg = pretrained_config(name) or {}
    size = cfg.get("input_size")
    return ModelInfo(
        name=name,
        parameters=sum(p.numel() for p in model.parameters()),
        input_size=f"{size[-2]}x{size[-1]}" if size else "any",
        offline=tuple(offline_sources(name)),
    )
