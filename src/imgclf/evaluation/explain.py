"""Grad-CAM: which part of an image pushed the model towards a class (Selvaraju et al., 2017).

Written on a forward hook rather than the `grad-cam` package (1.5.7): that package brings OpenCV (~150 MB) and
ttach, its import takes about 4 s (it loads cv2, scipy, scikit-learn and pyplot), it leaves the model in eval mode,
and on a model whose parameters are all frozen it fails ("element 0 of tensors does not require grad"). Here the
target layer's output is cut from the graph and made a leaf that requires grad, so only the layers above it are
differentiated: frozen weights or not, no parameter's gradient is computed or touched.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image
from torch import nn

from imgclf.errors import ConfigError, ImgclfError

DEFAULT_SIZE = 128  # px: dummy input side for finding the target layer when the model declares none (stride 64 -> 2x2)


def target_layer(model: nn.Module) -> nn.Module:
    """The last layer or block whose output is a spatial feature map: Grad-CAM's usual choice.

    Found by running one dummy batch (eval mode, no grad) and keeping the last module to finish with an
    output of shape [n, C, H, W], H * W > 1, that holds a convolution or keeps such a map's shape. That is
    the last stage for ResNets (`layer4`), the final BatchNorm + activation for EfficientNets (`bn2`), the last
    block for MobileNetV3 (its `conv_head` runs after the global pooling) and `features` for small_cnn. A vision
    transformer gets its patch embedding, which says little: Grad-CAM is meant for CNNs.

    Args:
        model: a classifier with at least one `nn.Conv2d`.

    Returns:
        The module whose output Grad-CAM weighs.

    Raises:
        ImgclfError: the model has no convolution, or no module with a spatial output.

    Example:
        >>> target_layer(timm.create_model("resnet18"))  # model.layer4
    """
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ImgclfError(
            f"Grad-CAM needs a convolutional model; {type(model).__name__} has no Conv2d layer "
            "(transformers and MLPs are not supported)"
        )
    config = getattr(model, "pretrained_cfg", None)
    size = tuple(config.get("input_size", (0, DEFAULT_SIZE, DEFAULT_SIZE)))[-2:] if isinstance(config, dict) else None
    size = size or (DEFAULT_SIZE, DEFAULT_SIZE)
    parameter = convs[0].weight
    dummy = torch.zeros(1, convs[0].in_channels, *size, device=parameter.device, dtype=parameter.dtype)
    holders = _conv_holders(model)
    chosen: list[tuple[nn.Module, torch.Size]] = []

    def record(module: nn.Module, inputs: tuple, output: object) -> None:
        if not isinstance(output, torch.Tensor) or output.dim() != 4 or output.shape[-2] * output.shape[-1] <= 1:
            return
        # A module without a convolution (BatchNorm, activation, identity) counts only when it maps the latest conv
        # feature map to one of the same shape: a transformer's [n, heads, tokens, dim] tensors are not feature maps.
        first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        same_shape = bool(chosen) and first is not None and first.shape == output.shape == chosen[-1][1]
        if module in holders or same_shape:
            chosen.append((module, output.shape))

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
    if not chosen:
        raise ImgclfError(f"Grad-CAM found no layer of {type(model).__name__} with a spatial output at {size}")
    return chosen[-1][0]


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
        layer: the module whose output is weighed; default `target_layer(model)`.

    Returns:
        float32 [n, H, W] in [0, 1] at the input size (bilinear), each map scaled to its own maximum; all zeros
        where no location raises the class score.

    Example:
        >>> heatmaps = grad_cam(model, batch)  # then overlay(image, heatmaps[0])
    """
    if inputs.dim() != 4:
        raise ConfigError(f"inputs: expected a batch [n, C, H, W]; received shape {tuple(inputs.shape)}")
    layer = target_layer(model) if layer is None else layer
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
        >>> Image.fromarray(overlay(np.asarray(photo), grad_cam(model, batch)[0])).save("cam.png")
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
