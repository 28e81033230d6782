"""Grad-CAM: which part of an image pushed the model towards a class (Selvaraju et al., 2017).

Written on a forward hook rather than the `grad-cam` package (1.5.7): that package brings OpenCV (~150 MB) and
ttach, its import takes about 4 s (it loads cv2, scipy, scikit-learn and pyplot), it leaves the model in eval mode,
and on a model whose parameters are all frozen it fails ("element 0 of tensors does not require grad"). Here the
target layer's output is cut from the graph and made a leaf that requires grad, so only the layers above it are
differentiated: frozen weights or not, no parameter's gradient is computed or touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image
from torch import nn

from imgclf.errors import ConfigError, ImgclfError

__all__ = ["CamLayer", "cam_layer", "grad_cam", "overlay", "target_layer"]

MIN_MAP_SIDE = 7  # px: the shortest map side that still says where; 3x3 or 2x2 maps only draw bands or quadrants
DEFAULT_SIZE = 128  # px: input side when neither the caller nor the model (timm's pretrained_cfg) gives one


class CamLayer(NamedTuple):
    """The layer Grad-CAM weighs and the map it gives at the input size it was chosen for."""

    name: str  # as in `model.named_modules()`, e.g. "features.1" or "layer2"
    module: nn.Module
    map_size: tuple[int, int]  # (height, width) of its output
    input_size: tuple[int, int]  # (height, width) of the model's input

    @property
    def cell(self) -> int:
        """Input pixels per map cell along the coarser axis (rounded): the area one value of the map stands for."""
        return round(max(side / cells for side, cells in zip(self.input_size, self.map_size)))

    @property
    def coarse(self) -> bool:
        """The map's shorter side is under MIN_MAP_SIDE and one cell covers more than a pixel."""
        return min(self.map_size) < MIN_MAP_SIDE and self.cell > 1

    def caption(self) -> str:
        """The layer and its map size, and on a second line a warning when the map is coarse.

        Example:
            >>> from imgclf.models.small_cnn import SmallCNN
            >>> cam_layer(SmallCNN(num_classes=3, in_chans=1), 28).caption()  # a default small_cnn
            'Grad-CAM of features.1 (7x7 map, upsampled to 28 px)'
        """
        cells = "x".join(map(str, self.map_size))
        height, width = self.input_size
        side = str(height) if height == width else f"{height}x{width}"
        lines = [f"Grad-CAM of {self.name} ({cells} map, upsampled to {side} px)"]
        if self.coarse:
            lines.append(f"coarse: a {cells} map, each cell covers ~{self.cell} px")
        return "\n".join(lines)


def cam_layer(model: nn.Module, input_size: int | Sequence[int] | None = None) -> CamLayer:
    """The layer Grad-CAM should weigh at this input size: the deepest one whose map is 7 px a side or more.

    The rule: among the candidate layers, in the order the forward pass finishes them, take the last one whose
    output's shorter side is at least MIN_MAP_SIDE at `input_size`; when none reaches it, the one with the largest
    map (the deepest of equals). Deeper layers are more specific to the class, but a 3x3 or 2x2 map can only point
    at bands or quadrants, so depth is given up until the map has that resolution.

    The candidates are stages (see `_stages`): for a timm model, those its `feature_info` lists (stem, then one
    per reduction) plus its last spatial layer (EfficientNet's `bn2` after the head conv); for other models the
    blocks that contain a convolution (small_cnn's `features.0`, `features.1`, ...); failing both, every layer
    with a spatial output. Map sizes are measured with one dummy batch (eval mode, no grad), not computed from
    nominal strides. At 28 px a default small_cnn gets `features.1` (7x7), not its last map (3x3); resnet18 at
    64 px gets `layer2` (8x8), not `layer4` (2x2); at 224 px ResNets keep `layer4` (7x7). A vision transformer
    gets its patch embedding, which says little: Grad-CAM is meant for CNNs.

    Args:
        model: a classifier with at least one `nn.Conv2d`.
        input_size: the side, or (height, width), of the images the model is used at (the bundle's
            preprocessing img_size); default the model's pretrained input size, else DEFAULT_SIZE.

    Returns:
        The layer, its name in the model and its map size.

    Raises:
        ImgclfError: the model has no convolution, or no module with a spatial output.

    Example:
        >>> import timm
        >>> cam_layer(timm.create_model("resnet18"), 64).name
        'layer2'
    """
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ImgclfError(
            f"Grad-CAM needs a convolutional model; {type(model).__name__} has no Conv2d layer "
            "(transformers and MLPs are not supported)"
        )
    size = _input_size(model, input_size)
    parameter = convs[0].weight
    channels = getattr(model, "in_chans", None) or convs[0].in_channels  # small_cnn's whitening layer comes first
    dummy = torch.zeros(1, channels, *size, device=parameter.device, dtype=parameter.dtype)
    holders = _conv_holders(model)
    spatial: list[tuple[nn.Module, torch.Size]] = []  # every spatial layer, in the order its forward finished

    def record(module: nn.Module, inputs: tuple, output: object) -> None:
        if not isinstance(output, torch.Tensor) or output.dim() != 4 or output.shape[-2] * output.shape[-1] <= 1:
            return
        # A module without a convolution (BatchNorm, activation, identity) counts only when it maps the latest conv
        # feature map to one of the same shape: a transformer's [n, heads, tokens, dim] tensors are not feature maps.
        first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        same_shape = bool(spatial) and first is not None and first.shape == output.shape == spatial[-1][1]
        if module in holders or same_shape:
            spatial.append((module, output.shape))

    modes = {module: module.training for module in model.modules()}
    handles = [m.register_forward_hook(record) for m in model.modules() if m is not model]
    try:
        model.eval()  # a batch of one in training mode would update BatchNorm's running statistics
        with torch.no_grad():
            model(dummy)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    if not spatial:
        raise ImgclfError(f"Grad-CAM found no layer of {type(model).__name__} with a spatial output at {size}")
    names = {module: name for name, module in model.named_modules()}
    candidates = _stages(spatial, names, _stage_names(model), holders)
    reaching = [entry for entry in candidates if min(entry[1][-2:]) >= MIN_MAP_SIDE]
    if reaching:
        module, shape = reaching[-1]
    else:  # the largest map; max keeps the first of equals, so over the reversed list the deepest of them
        module, shape = max(reversed(candidates), key=lambda entry: entry[1][-2] * entry[1][-1])
    return CamLayer(names[module], module, (shape[-2], shape[-1]), size)


def target_layer(model: nn.Module, input_size: int | Sequence[int] | None = None) -> nn.Module:
    """The module Grad-CAM weighs: the deepest whose map is MIN_MAP_SIDE (7) px a side or more at `input_size`.

    Falls back to the largest map when none reaches it; `cam_layer` states the rule and also gives the layer's
    name and map size.

    Args:
        model: a classifier with at least one `nn.Conv2d`.
        input_size: the side, or (height, width), of the images the model is used at; default the model's
            pretrained input size, else DEFAULT_SIZE.

    Returns:
        The module whose output Grad-CAM weighs.

    Raises:
        ImgclfError: the model has no convolution, or no module with a spatial output.

    Example:
        >>> import timm
        >>> model = timm.create_model("resnet18")
        >>> target_layer(model, 224) is model.layer4  # 7x7 at 224 px
        True
    """
    return cam_layer(model, input_size).module


def _input_size(model: nn.Module, input_size: int | Sequence[int] | None) -> tuple[int, int]:
    """(height, width) from a side or a shape's last two entries; default the model's pretrained size."""
    if input_size is None:
        config = getattr(model, "pretrained_cfg", None)
        declared = config.get("input_size") if isinstance(config, dict) else None
        input_size = tuple(declared)[-2:] if declared else DEFAULT_SIZE
    sides = (
        (input_size, input_size)
        if isinstance(input_size, (int, np.integer))
        else tuple(int(side) for side in input_size)[-2:]
    )
    if len(sides) != 2 or min(sides) < 1:
        raise ConfigError(f"input_size: expected a side or (height, width) in pixels; received {input_size}")
    return sides


def _stages(
    spatial: list[tuple[nn.Module, torch.Size]], names: dict[nn.Module, str], listed: set[str], holders: set[nn.Module]
) -> list[tuple[nn.Module, torch.Size]]:
    """The spatial layers Grad-CAM chooses among, in forward order: stages, else blocks, else every layer.

    Stages are the modules a timm model lists in `feature_info`, plus its last spatial layer; blocks are modules
    that contain a convolution without being one (small_cnn's conv blocks). Whole stages give steadier maps than
    a layer inside one (on small_cnn, a block's output beat the ReLU before the next block's pooling, at the
    same 10x10 resolution, in the pointing game of test_plots_explain).
    """
    stages = [entry for entry in spatial[:-1] if names[entry[0]] in listed]
    if stages:
        return [*stages, spatial[-1]]
    blocks = [entry for entry in spatial if entry[0] in holders and not isinstance(entry[0], nn.Conv2d)]
    return blocks or spatial


def _stage_names(model: nn.Module) -> set[str]:
    """The modules a timm model lists as its feature stages (`feature_info`); empty for other models."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list):
        return set()
    return {entry["module"] for entry in info if isinstance(entry, dict) and "module" in entry}


def _conv_holders(model: nn.Module) -> set[nn.Module]:
    """Every submodule that is or contains an `nn.Conv2d`."""
    holders = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parts = name.split(".")
            holders.update(model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts) + 1))
    return holders


def grad_cam(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: Sequence[int] | None = None,
    layer: nn.Module | None = None,
) -> np.ndarray:
    """Grad-CAM heat maps: the target layer's channels weighted by the mean gradient of the class score.

    The model runs in eval mode; every module's train/eval flag is put back afterwards (fine-tuning keeps some
    BatchNorm layers in eval mode inside a training model), and no parameter's `requires_grad` or `.grad`
    changes.

    Args:
        model: a CNN classifier returning logits [n, classes].
        inputs: preprocessed images [n, C, H, W] (moved to the model's device).
        targets: the class to explain per image; default the predicted class.
        layer: the module whose output is weighed; default `target_layer(model, <the inputs' size>)`.

    Returns:
        float32 [n, H, W] in [0, 1] at the input size (bilinear), each map scaled to its own maximum; all zeros
        where no location raises the class score.

    Example:
        >>> from imgclf.models.small_cnn import SmallCNN
        >>> heatmaps = grad_cam(SmallCNN(num_classes=3, in_chans=1), torch.rand(2, 1, 28, 28))
        >>> heatmaps.shape, heatmaps.dtype  # then overlay(image, heatmaps[0])
        ((2, 28, 28), dtype('float32'))
    """
    if inputs.dim() != 4:
        raise ConfigError(f"inputs: expected a batch [n, C, H, W]; received shape {tuple(inputs.shape)}")
    layer = target_layer(model, inputs.shape[-2:]) if layer is None else layer
    parameter = next(model.parameters(), None)
    if parameter is not None:
        inputs = inputs.to(parameter.device)
    captured: list[torch.Tensor] = []

    def cut(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        # A leaf that requires grad: the layers above it are differentiated whether or not their weights are
        # frozen, and nothing below it is (cheaper). The clone lets a following in-place op (ReLU) run.
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf.clone()

    modes = {module: module.training for module in model.modules()}
    handle = layer.register_forward_hook(cut)
    try:
        model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            batch = inputs.clone() if inputs.is_inference() else inputs
            logits = model(batch)
            if not captured:
                raise ImgclfError(f"Grad-CAM: layer {type(layer).__name__} did not run in the model's forward pass")
            chosen = _check_targets(targets, logits)
            score = logits.gather(1, chosen[:, None]).sum()  # samples are independent in eval mode
            (gradients,) = torch.autograd.grad(score, captured[-1], allow_unused=True)
            if gradients is None:
                raise ImgclfError(f"Grad-CAM: the output of {type(layer).__name__} does not reach the class scores")
    finally:
        handle.remove()
        for module, training in modes.items():
            module.training = training
    activations = captured[-1].detach().float()
    weights = gradients.float().mean(dim=(2, 3), keepdim=True)  # one weight per channel: pooled gradient
    cam = F.relu((weights * activations).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - low
    cam = torch.where(span > 0, (cam - low) / span.clamp_min(1e-12), torch.zeros_like(cam))
    return cam.cpu().numpy().astype(np.float32)


def _check_targets(targets: Sequence[int] | None, logits: torch.Tensor) -> torch.Tensor:
    n, classes = logits.shape
    if targets is None:
        return logits.argmax(dim=1)
    chosen = torch.as_tensor(list(targets), dtype=torch.long, device=logits.device)
    if chosen.shape != (n,) or (n and (chosen.min() < 0 or chosen.max() >= classes)):
        raise ConfigError(
            f"targets: expected {n} class indices in [0, {classes}); received {[int(t) for t in targets]}"
        )
    return chosen


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a heat map, coloured with the turbo colormap, onto an image.

    Args:
        image: uint8 [H, W] (grayscale), [H, W, 1] or [H, W, 3], of any size.
        heatmap: floats in [0, 1], [h, w]; resized (bilinear) to the image.
        alpha: weight of the colour map; 0 shows only the image.

    Returns:
        uint8 [H, W, 3].

    Example:
        >>> photo = Image.open("photo.jpg")  # 128 x 128
        >>> heatmap = np.linspace(0, 1, 28 * 28).reshape(28, 28)  # e.g. grad_cam(model, batch)[0]
        >>> blended = overlay(np.asarray(photo), heatmap)
        >>> blended.shape, blended.dtype
        ((128, 128, 3), dtype('uint8'))
        >>> Image.fromarray(blended).save("cam.png")
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ConfigError(f"image: expected [H, W] or [H, W, 3]; received shape {image.shape}")
    height, width = image.shape[:2]
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape != (height, width):
        heat = np.asarray(Image.fromarray(heat).resize((width, height), Image.Resampling.BILINEAR))
    colours = colormaps["turbo"](np.clip(heat, 0.0, 1.0))[:, :, :3] * 255.0
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
