"""The one image decoder used by scanning, training, evaluation and prediction.

Policy (the same everywhere, so a file gives the same pixels in training and in production):
- the format is detected from the content, never from the extension;
- images with more than `max_pixels` pixels are rejected before their pixels are decoded;
- multi-frame files (animated GIF/WebP, multi-page TIFF) use their first frame;
- EXIF orientation is applied; unreadable EXIF is ignored with a warning;
- transparency (RGBA, LA, palette with a transparent colour) is composited on white;
- CMYK, YCbCr, LAB, HSV and palette images are converted to RGB; 1-bit images to L;
- 16- and 32-bit integer images are rescaled from 0..65535 to 0..255 (not clipped); float images in 0..1 are
  scaled by 255, other float images are clipped to 0..255;
- the result is an 8-bit "RGB" or "L" image, as the caller asks.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgclf.errors import ImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "Color",
    "ImageSource",
    "is_single_channel",
    "load_image",
    "load_thumbnail",
    "open_image",
    "to_mode",
]

log = logging.getLogger(__name__)

Color = Literal["rgb", "gray"]

DEFAULT_MAX_PIXELS = 50_000_000
# Modes whose pixels carry one intensity channel (alpha aside); a dataset of only these trains as grayscale.
SINGLE_CHANNEL_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})

ImageSource = Path | str | bytes | BinaryIO


def open_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Open an image lazily and check its size before any pixel is decoded.

    Args:
        source: a path, the file's bytes, or a binary file object.
        max_pixels: the largest width * height accepted.
        name: how errors name the source (default: its path).

    Returns:
        The opened (not yet decoded) PIL image, positioned at its first frame.

    Raises:
        ImageError: not an image, or larger than `max_pixels`; names the file.
    """
    name = name or _name(source)
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            # Our own limit below is the one that applies; silence PIL's generic warning about it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (content is not a format Pillow can read)", "not_image") from None
    except Image.DecompressionBombError as exc:
        # Pillow's own guard (at twice its MAX_IMAGE_PIXELS) fires before ours could: the image is larger still.
        raise ImageError(
            f"{name}: declares more pixels than Pillow allows ({exc}); it exceeds the limit of {max_pixels:,} "
            "(data.max_pixels) and was rejected before decoding",
            "too_large",
        ) from None
    except OSError as exc:
        raise ImageError(f"{name}: cannot open ({exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageError(
            f"{name}: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} "
            "(data.max_pixels); resize the image or raise the limit",
            "too_large",
        )
    return image


def load_image(
    source: ImageSource, *, color: Color, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Decode an image fully and convert it to 8-bit RGB or L by the policy in this module's docstring.

    Args:
        source: a path, the file's bytes, or a binary file object.
        color: "rgb" or "gray".
        max_pixels: the largest width * height accepted.
        name: how errors name the source (default: its path).

    Returns:
        A decoded PIL image of mode "RGB" or "L".

    Raises:
        ImageError: the file cannot be decoded (truncated, corrupt, too large); names the file.

    Example:
        >>> load_image("cat.jpg", color="rgb").mode
        'RGB'
    """
    name = name or _name(source)
    # Pillow reports a corrupt EXIF block with a warning (while opening or loading) and carries on: so do we.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with open_image(source, max_pixels=max_pixels, name=name) as image:
            try:
                image.load()
                upright = _apply_exif_orientation(image, name)
                converted = to_mode(upright, color)
            except (OSError, ValueError, SyntaxError) as exc:
                # Truncated JPEGs pass Image.verify(); only a full decode finds them.
                raise ImageError(f"{name}: cannot decode ({exc})") from None
    exif_warnings = [str(w.message).strip() for w in caught if "EXIF" in str(w.message)]
    if exif_warnings:
        log.warning("%s: unreadable EXIF ignored (%s)", name, exif_warnings[0])
    return converted


def load_thumbnail(path: Path, *, color: Color, size: int) -> np.ndarray:
    """An image decoded as `load_image` does, shrunk to at most `size` px, as a uint8 array for a figure; a grey
    tile (with a logged warning naming the file) when it cannot be read, so one lost file does not stop a gallery.
    """
    try:
        image = load_image(path, color=color)
    except (ImageError, OSError) as exc:
        log.warning("cannot show %s: %s", path, exc)
        return np.full((size, size), 128, dtype=np.uint8)
    image.thumbnail((size, size))
    return np.asarray(image)


def is_single_channel(image: Image.Image) -> bool:
    """True for grayscale-like modes (L, 1, 16-bit, float, gray with alpha)."""
    return image.mode in SINGLE_CHANNEL_MODES


def to_mode(image: Image.Image, color: Color) -> Image.Image:
    """Convert a decoded image of any Pillow mode to 8-bit "RGB" or "L" (see the module policy)."""
    target = "RGB" if color == "rgb" else "L"
    mode = image.mode
    if mode in _HIGH_BIT_MODES or mode == "F":
        image = Image.fromarray(_to_uint8(np.asarray(image), mode))
    elif mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    elif mode == "1":
        image = image.convert("L")
    elif mode == "LAB":
        image = image.convert("RGB")  # Pillow cannot convert LAB to L directly
    elif mode in ("La", "RGBa"):
        image = image.convert("LA" if mode == "La" else "RGBA")
    if image.mode == "RGBA":
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    elif image.mode == "LA":
        image = _composite_la(image)
    if image.mode != target:
        image = image.convert(target)
    return image


def _composite_la(image: Image.Image) -> Image.Image:
    gray, alpha = (np.asarray(band, dtype=np.float32) for band in image.split())
    blended = gray * (alpha / 255.0) + 255.0 * (1.0 - alpha / 255.0)
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


def _to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    if mode == "F":
        values = pixels.astype(np.float64)
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        return np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)
    # 16-bit data (and Pillow's 32-bit "I" mode, which is how it opens 16-bit PNGs) spans 0..65535.
    values = np.clip(pixels.astype(np.float64), 0, 65535)
    return np.rint(values / 257.0).astype(np.uint8)


def _apply_exif_orientation(image: Image.Image, name: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # Pillow raises many types on malformed EXIF blocks
        log.warning("%s: unreadable EXIF ignored (%s)", name, exc)
        return image


def _name(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, bytes):
        return "<bytes>"
    return str(getattr(source, "name", "<stream>"))
