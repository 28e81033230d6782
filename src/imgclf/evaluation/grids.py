"""Figures that are grids of images: data in, matplotlib Figure out. Callers write the files.

Sample grids per class, augmentation previews, galleries of mistakes and Grad-CAM pairs are all laid out by one
function, `_grid`, in inches: tiles shrink until the figure fits MAX_WIDTH x MAX_HEIGHT, so 2 and 50 classes both
stay readable. Figures are `matplotlib.figure.Figure` objects, never pyplot's: no global state, no backend switch,
safe in a server and in a notebook. Every function accepts zero images and then returns a small figure that says so.
The charts (curves, bars, matrices) are in `plots.py`, which shares this module's small helpers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any, NamedTuple

import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

__all__ = [
    "CAM_ALPHA",
    "CAM_COLORMAP",
    "MAX_HEIGHT",
    "MAX_WIDTH",
    "augmentation_preview_figure",
    "gradcam_figure",
    "image_grid_figure",
    "mistakes_figure",
    "sample_grid_figure",
]

MAX_WIDTH = 16.0  # inches; 1,600 px at the report's 100 dpi
MAX_HEIGHT = 30.0  # inches
CAM_COLORMAP = "turbo"  # the same map as explain.overlay
CAM_ALPHA = 0.45


def image_grid_figure(
    images: Sequence[np.ndarray], captions: Sequence[str], *, ncols: int = 8, title: str | None = None
) -> Figure:
    """Images in a grid, each with a caption above it.

    Args:
        images: uint8 [H, W] (drawn in grey), [H, W, 3] or [H, W, 4]; floats in [0, 1] also work. Sizes may
            differ; each keeps its aspect ratio.
        captions: one per image; lines are separated by "\\n" and shortened to the tile's width.
        ncols: images per row.
        title: shown above the grid.

    Returns:
        The figure; tiles shrink so that it stays within 16 x 30 inches.
    """
    _check_lengths(images=images, captions=captions)
    if not images:
        return _empty_figure("no images", title)
    ncols = max(1, min(ncols, len(images)))
    tiles = [_Tile(image, caption) for image, caption in zip(images, captions)]
    return _grid([tiles[i : i + ncols] for i in range(0, len(tiles), ncols)], title=title)


def sample_grid_figure(
    samples: Mapping[str, Sequence[np.ndarray]], *, max_per_class: int = 8, title: str | None = None
) -> Figure:
    """A row of example images per class, the class name on the left.

    Args:
        samples: class name -> images (as for `image_grid_figure`); a class without images gets "(none)".
        max_per_class: images shown per class.
        title: shown above the grid.

    Returns:
        The figure; tiles shrink with the class count so that 50 classes fit in 30 inches.
    """
    if not any(len(images) for images in samples.values()):
        return _empty_figure("no images", title)
    rows = [[_Tile(image, "") for image in list(images)[:max_per_class]] for images in samples.values()]
    return _grid(rows, title=title, row_labels=[str(name) for name in samples])


def augmentation_preview_figure(
    originals: Sequence[np.ndarray], augmented: Sequence[Sequence[np.ndarray]], *, title: str | None = None
) -> Figure:
    """One row per image: the original, then augmented versions of it.

    Args:
        originals: the images as decoded (uint8, as for `image_grid_figure`).
        augmented: per original, its augmented versions: uint8, or floats in [0, 1] (clipped), [H, W, C] or
            [C, H, W] as torchvision returns them. Undo any mean/std normalisation first.
        title: shown above the grid.

    Returns:
        The figure.
    """
    _check_lengths(originals=originals, augmented=augmented)
    if not originals:
        return _empty_figure("no images", title)
    rows = [
        [_Tile(original, "original"), *(_Tile(image, f"augmented {j + 1}") for j, image in enumerate(versions))]
        for original, versions in zip(originals, augmented)
    ]
    return _grid(rows, title=title)


def mistakes_figure(
    images: Sequence[np.ndarray],
    true_labels: Sequence[str],
    predicted_labels: Sequence[str],
    probabilities: Sequence[float],
    paths: Sequence[str | PurePath],
    *,
    ncols: int = 6,
    title: str | None = None,
) -> Figure:
    """Gallery of misclassified images, in the order given (the caller puts the most confident first).

    Each tile is captioned with the true class, the predicted class and its probability, and the file's last two
    path parts (class folder and file name).

    Args:
        images: the images (as for `image_grid_figure`).
        true_labels: true class names.
        predicted_labels: predicted class names.
        probabilities: the probability the model gave its (wrong) prediction.
        paths: the image files.
        ncols: images per row.
        title: shown above the grid.

    Returns:
        The figure; one saying "no misclassified images" when there are none.
    """
    _check_lengths(
        images=images,
        true_labels=true_labels,
        predicted_labels=predicted_labels,
        probabilities=probabilities,
        paths=paths,
    )
    if not images:
        return _empty_figure("no misclassified images", title)
    captions = [
        f"true: {true}\npred: {predicted} ({float(probability):.2f})\n{_short_path(path)}"
        for true, predicted, probability, path in zip(true_labels, predicted_labels, probabilities, paths)
    ]
    return image_grid_figure(images, captions, ncols=ncols, title=title)


def gradcam_figure(
    images: Sequence[np.ndarray],
    heatmaps: Sequence[np.ndarray],
    captions: Sequence[str],
    *,
    pairs_per_row: int = 4,
    title: str | None = None,
    note: str | None = None,
) -> Figure:
    """Per example, the image and its Grad-CAM heat map over it, side by side under one caption.

    Under the grid, a colour bar gives the heat maps' scale (each map is scaled to its own maximum, so colours
    compare places within an image, not across images), and `note` under it.

    Args:
        images: the images as the model saw them (as for `image_grid_figure`).
        heatmaps: floats in [0, 1], [h, w] each (any size: stretched over its image), from `explain.grad_cam`.
        captions: one per example.
        pairs_per_row: examples per row.
        title: shown above the grid.
        note: lines under the colour bar, e.g. `explain.CamLayer.caption()`: the layer and how coarse its map is.

    Returns:
        The figure: axes[0] holds the tiles, axes[1] is the colour bar.

    Example:
        >>> import torch
        >>> from imgclf.evaluation.explain import cam_layer, grad_cam
        >>> from imgclf.models.small_cnn import SmallCNN
        >>> model, batch = SmallCNN(num_classes=3, in_chans=1), torch.rand(2, 1, 28, 28)
        >>> images = [np.uint8(255 * image[0]) for image in batch.numpy()]
        >>> figure = gradcam_figure(images, grad_cam(model, batch), ["a", "b"], note=cam_layer(model, 28).caption())
        >>> len(figure.axes)  # the tiles and the colour bar
        2
    """
    _check_lengths(images=images, heatmaps=heatmaps, captions=captions)
    if not images:
        return _empty_figure("no images", title)
    tiles = []
    for image, heatmap, caption in zip(images, heatmaps, captions):
        tiles += [_Tile(image, caption, span=2), _Tile(image, "", heatmap=np.asarray(heatmap))]
    per_row = 2 * max(1, min(pairs_per_row, len(images)))
    figure = _grid([tiles[i : i + per_row] for i in range(0, len(tiles), per_row)], title=title, group=2)
    _add_cam_colour_bar(figure, note)
    return figure


CAM_BAR_STRIP, NOTE_LINE = 0.62, 0.16  # inches: the strip under a Grad-CAM grid (bar, ticks, label); one note line


def _add_cam_colour_bar(figure: Figure, note: str | None) -> None:
    """Grow a `_grid` figure at the bottom by a strip with a horizontal colour bar of the heat maps and `note`."""
    width, height = figure.get_size_inches()
    lines = note.split("\n") if note else []
    strip = CAM_BAR_STRIP + NOTE_LINE * len(lines)
    total = height + strip
    figure.set_size_inches(width, total)
    figure.axes[0].set_ylim(total, 0)  # the tiles' canvas covers the figure in inches from the top: it stays so
    for text in figure.texts:  # the title keeps its distance from the top
        text.set_y(1 - (1 - text.get_position()[1]) * height / total)
    bar_width, bar_height, top = min(3.0, width - 2 * MARGIN), 0.11, height + 0.12
    bar = figure.add_axes(
        ((width - bar_width) / 2 / width, 1 - (top + bar_height) / total, bar_width / width, bar_height / total)
    )
    colours = ScalarMappable(Normalize(0, 1), cmap=CAM_COLORMAP)
    colour_bar = figure.colorbar(colours, cax=bar, orientation="horizontal", ticks=[0, 0.5, 1])
    colour_bar.ax.tick_params(labelsize=7, length=2, pad=1)
    colour_bar.set_label("evidence for the class (each map scaled to its own maximum)", fontsize=7, labelpad=2)
    if lines:
        font = _clamp((width - 2 * MARGIN) * 72 / (0.55 * max(map(len, lines))), 6, 9)  # ~0.55 em a character
        chars = round((width - 2 * MARGIN) * 72 / (0.55 * font))  # the longest line, unless the font is at 6
        text = "\n".join(_elide(line, chars) for line in lines)
        top = height + CAM_BAR_STRIP - 0.06
        figure.text(0.5, 1 - top / total, text, ha="center", va="top", fontsize=font, linespacing=1.2)


# --- the layout --------------------------------------------------------------------------------------------------


class _Tile(NamedTuple):
    image: np.ndarray
    caption: str
    heatmap: np.ndarray | None = None
    span: int = 1  # tiles the caption is centred over


class _Layout(NamedTuple):
    """Sizes in inches (fonts in points) of a grid of square tiles."""

    tile: float
    font: float  # captions
    caption: float  # height above each row
    label_font: float
    label: float  # width of the row labels
    width: float
    height: float


GAP, GROUP_GAP, BLOCK_GAP, MARGIN = 0.06, 0.25, 0.35, 0.1  # inches


def _layout(nrows: int, ncols: int, *, lines: int, label_chars: int, title: bool, group: int, blocks: int) -> _Layout:
    """The largest tile (1.6 inches at most) whose grid fits MAX_WIDTH x MAX_HEIGHT; 0.3 inches at least."""
    groups = (ncols - 1) // group if group else 0
    title_height = 0.45 if title else 0.0

    def fit(tile: float) -> _Layout:
        font = _clamp(tile * 4.6, 5, 8)
        caption = lines * font * 1.25 / 72 + (0.05 if lines else 0)
        label_font = _clamp(tile * 8, 6.5, 10)
        label = label_chars * label_font * 0.55 / 72 + (0.12 if label_chars else 0)
        block = label + ncols * tile + (ncols - 1) * GAP + groups * GROUP_GAP
        width = 2 * MARGIN + blocks * block + (blocks - 1) * BLOCK_GAP
        height = 2 * MARGIN + title_height + nrows * (tile + caption) + (nrows - 1) * GAP
        return _Layout(tile, font, caption, label_font, label, width, height)

    tile = 1.6
    while tile > 0.3 and (fit(tile).width > MAX_WIDTH or fit(tile).height > MAX_HEIGHT):
        tile *= 0.95
    return fit(tile)


def _grid(
    rows: list[list[_Tile]], *, title: str | None, row_labels: Sequence[str] | None = None, group: int = 0
) -> Figure:
    """Lay tiles out row by row, in inches, shrinking them until the figure fits MAX_WIDTH x MAX_HEIGHT.

    With `row_labels` (one per row), many short rows are set in up to 4 side-by-side blocks, read top to bottom
    then left to right, whichever gives the largest tiles. `group` > 0 adds a wider gap after every `group`
    columns (image + heat map pairs).
    """
    ncols = max(1, max(len(row) for row in rows))
    lines = max((tile.caption.count("\n") + 1 if tile.caption else 0 for row in rows for tile in row), default=0)
    label_chars = min(24, max(len(label) for label in row_labels)) if row_labels else 0
    options = {"lines": lines, "label_chars": label_chars, "title": bool(title), "group": group}
    choices = range(1, min(4, len(rows)) + 1) if row_labels else (1,)
    blocks, size = 1, _layout(len(rows), ncols, blocks=1, **options)
    for k in choices[1:]:  # more blocks only for clearly larger tiles
        candidate = _layout(math.ceil(len(rows) / k), ncols, blocks=k, **options)
        if candidate.tile > 1.1 * size.tile:
            blocks, size = k, candidate
    per_block = math.ceil(len(rows) / blocks)
    tile, font = size.tile, size.font
    fig_width = max(size.width, 4.5 if title else 2.0)
    figure = Figure(figsize=(fig_width, size.height))
    # One axes over the whole figure, in inches from the top left: hundreds of tiles as images on one axes draw
    # in a fraction of the time that as many axes take.
    canvas = figure.add_axes((0, 0, 1, 1))
    canvas.set_axis_off()
    block_width = (size.width - 2 * MARGIN - (blocks - 1) * BLOCK_GAP) / blocks
    chars = max(4, int(tile * 72 / (font * 0.58)))  # characters that fit over one tile
    title_height = 0.45 if title else 0.0
    for r, row in enumerate(rows):
        block, line = divmod(r, per_block)
        left0 = (fig_width - size.width) / 2 + MARGIN + block * (block_width + BLOCK_GAP) + size.label
        top = MARGIN + title_height + line * (tile + size.caption + GAP) + size.caption
        for c, item in enumerate(row):
            left = left0 + c * (tile + GAP) + (c // group if group else 0) * GROUP_GAP
            _draw_tile(canvas, item, left, top, tile, font, chars)
        if not row:  # a class without images
            canvas.text(
                left0 + tile / 2, top + tile / 2, "(none)", ha="center", va="center", fontsize=font, color="0.4"
            )
        if row_labels:
            label = _elide(row_labels[r], 24)
            canvas.text(left0 - 0.08, top + tile / 2, label, ha="right", va="center", fontsize=size.label_font)
    canvas.set_xlim(0, fig_width)
    canvas.set_ylim(size.height, 0)
    if title:
        figure.suptitle(title, y=1 - MARGIN / size.height, va="top", fontsize=12)
    return figure


def _draw_tile(canvas: Axes, item: _Tile, left: float, top: float, tile: float, font: float, chars: int) -> None:
    """The image fitted into the square at (left, top), keeping its aspect ratio; its caption above it."""
    array, options = _displayable(item.image)
    height, width = array.shape[:2]
    scale = tile / max(height, width)
    x0, y0 = left + (tile - width * scale) / 2, top + (tile - height * scale) / 2
    extent = (x0, x0 + width * scale, y0 + height * scale, y0)
    canvas.imshow(array, extent=extent, aspect="auto", **options)
    if item.heatmap is not None:  # stretched over the image, whatever its size
        canvas.imshow(item.heatmap, extent=extent, aspect="auto", cmap=CAM_COLORMAP, vmin=0, vmax=1, alpha=CAM_ALPHA)
    frame = Rectangle((x0, y0), width * scale, height * scale, fill=False, edgecolor="0.8", linewidth=0.5)
    canvas.add_patch(frame)
    if item.caption:
        caption = "\n".join(_elide(line, chars * item.span) for line in item.caption.split("\n"))
        centre = left + (item.span * tile + (item.span - 1) * GAP) / 2
        canvas.text(centre, top - 0.03, caption, ha="center", va="bottom", fontsize=font, linespacing=1.1)


def _displayable(image: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """An image array and the imshow options that draw it: grey for [H, W], floats clipped to [0, 1]."""
    array = np.asarray(image)
    shape = array.shape
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[2] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # [C, H, W], as torchvision returns
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or 0 in array.shape:
        raise ValueError(f"image: expected [H, W], [H, W, 1|3|4] or [C, H, W]; received shape {shape}")
    if array.dtype == np.uint8:
        top = 255
    elif np.issubdtype(array.dtype, np.integer):
        array, top = np.clip(array, 0, 255).astype(np.uint8), 255
    else:
        array, top = np.clip(np.nan_to_num(array.astype(np.float32)), 0.0, 1.0), 1
    options: dict[str, Any] = {"cmap": "gray", "vmin": 0, "vmax": top} if array.ndim == 2 else {}
    return array, options


# --- small helpers (plots.py uses them too) ----------------------------------------------------------------------


def _empty_figure(message: str, title: str | None = None) -> Figure:
    """A small figure that says there is nothing to draw."""
    figure = Figure(figsize=(5, 2 if title else 1.5))
    axes = figure.add_subplot()
    axes.set_axis_off()
    style = {"boxstyle": "round,pad=0.8", "facecolor": "0.93", "edgecolor": "0.6"}
    axes.text(0.5, 0.5, message, ha="center", va="center", fontsize=13, color="0.25", bbox=style)
    if title:
        figure.suptitle(title)
    return figure


def _check_lengths(**sequences: Sequence[Any]) -> None:
    lengths = {name: len(values) for name, values in sequences.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"expected one value per image in each of {', '.join(lengths)}; received lengths {lengths}")


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def _elide(text: str, chars: int) -> str:
    """`text` shortened to `chars` characters by an ellipsis in the middle (keeps a file name's end)."""
    if len(text) <= chars:
        return text
    head = (chars - 1) // 2
    return text[:head] + "…" + text[len(text) - (chars - 1 - head) :]


def _short_path(path: str | PurePath) -> str:
    """The last two parts of a path: class folder and file name."""
    return "/".join(PurePath(str(path)).parts[-2:])
