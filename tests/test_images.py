"""The safe decoder: every Pillow mode ends as 8-bit RGB or L, and every bad file raises ImageError naming it."""

from __future__ import annotations

import io
import logging
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.data.images import is_single_channel, load_image, open_image, to_mode
from imgclf.errors import ImageError

ORIENTATION = 0x0112  # the EXIF Orientation tag


def random_rgb(seed: int, height: int = 8, width: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming `width` x `height` RGB pixels, with no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def truncated_jpeg(seed: int = 0) -> bytes:
    data = encode(Image.fromarray(random_rgb(seed, 32, 32)), "JPEG", quality=90)
    return data[: len(data) // 2]


# --- colour modes --------------------------------------------------------------------------------------------


def test_rgb_png_is_returned_unchanged(tmp_path):
    array = random_rgb(1)
    path = tmp_path / "a.png"
    Image.fromarray(array).save(path)
    image = load_image(path, color="rgb")
    assert image.mode == "RGB"
    np.testing.assert_array_equal(pixels(image), array)


def test_cmyk_becomes_rgb():
    # Lossless TIFF so the values are exact: no ink is white, full cyan is (0, 255, 255), full black is black.
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))
    cmyk.putpixel((1, 0), (255, 0, 0, 0))
    cmyk.putpixel((2, 0), (0, 0, 0, 255))
    image = load_image(encode(cmyk, "TIFF"), color="rgb")
    assert image.mode == "RGB"
    assert pixels(image)[0].tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]


def test_cmyk_jpeg_decodes_to_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))
    image = load_image(encode(cmyk, "JPEG", quality=95), color="rgb")
    assert image.mode == "RGB"
    assert image.size == (8, 8)
    assert pixels(image).min() >= 250  # white, up to JPEG rounding


@pytest.mark.parametrize("mode", ["LAB", "HSV", "YCbCr"])
@pytest.mark.parametrize("color", ["rgb", "gray"])
def test_other_colour_spaces_convert_to_both_targets(mode, color):
    # LAB to gray used to fail: Pillow converts LAB to RGB but not to L.
    source = Image.new("RGB", (4, 4), (200, 100, 50))
    image = to_mode(source.convert(mode), color)
    expected = source if color == "rgb" else source.convert("L")
    assert image.mode == expected.mode
    np.testing.assert_allclose(pixels(image).astype(int), pixels(expected).astype(int), atol=2)


@pytest.mark.parametrize("color", ["rgb", "gray"])
def test_lab_tiff_file_decodes(color):
    source = Image.new("RGB", (4, 4), (200, 100, 50))
    data = encode(source.convert("LAB"), "TIFF")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "LAB"
    expected = source if color == "rgb" else source.convert("L")
    np.testing.assert_allclose(pixels(load_image(data, color=color)).astype(int), pixels(expected), atol=2)


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((1, 0), (255, 0, 0, 255))  # opaque red
    rgba.putpixel((2, 0), (255, 0, 0, 128))  # half-transparent red
    image = load_image(encode(rgba, "PNG"), color="rgb")
    assert image.mode == "RGB"
    row = pixels(image)[0].tolist()
    assert row[0] == [255, 255, 255]
    assert row[1] == [255, 0, 0]
    assert row[2] == [255, 127, 127]


def test_transparent_pixel_is_white_not_black_in_gray():
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 255))
    image = load_image(encode(rgba, "PNG"), color="gray")
    assert image.mode == "L"
    assert pixels(image)[0].tolist() == [255, 0]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparent_index_is_composited_on_white(fmt):
    palette_image = Image.new("P", (3, 1))
    palette_image.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * (256 * 3 - 9))
    palette_image.putdata([0, 1, 2])
    data = encode(palette_image, fmt, transparency=0)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "P"
        assert check.info.get("transparency") == 0
    image = load_image(data, color="rgb")
    assert image.mode == "RGB"
    assert pixels(image)[0].tolist() == [[255, 255, 255], [0, 0, 255], [0, 255, 0]]


def test_palette_without_transparency_becomes_rgb():
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    palette_image.putdata([0, 1])
    image = load_image(encode(palette_image, "PNG"), color="rgb")
    assert pixels(image)[0].tolist() == [[10, 20, 30], [200, 100, 50]]


def test_gray_with_alpha_is_composited_on_white():
    gray = Image.fromarray(np.array([[0, 0, 100]], dtype=np.uint8))
    alpha = Image.fromarray(np.array([[0, 255, 128]], dtype=np.uint8))
    la = Image.merge("LA", (gray, alpha))
    data = encode(la, "PNG")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "LA"
    # 100 * 128/255 + 255 * 127/255 = 177.2
    assert pixels(load_image(data, color="gray"))[0].tolist() == [255, 0, 177]
    assert pixels(load_image(data, color="rgb"))[0].tolist() == [[255] * 3, [0] * 3, [177] * 3]


def test_one_bit_image_becomes_0_and_255():
    bits = Image.new("1", (4, 1))
    bits.putdata([0, 1, 1, 0])
    data = encode(bits, "PNG")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "1"
    image = load_image(data, color="gray")
    assert image.mode == "L"
    assert pixels(image)[0].tolist() == [0, 255, 255, 0]


def test_16_bit_gray_gradient_is_rescaled_not_clipped(tmp_path):
    gradient = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (4, 1))
    path = tmp_path / "depth.png"
    Image.fromarray(gradient).save(path)
    with Image.open(path) as check:
        assert check.mode in ("I;16", "I")  # Pillow >= 10 opens 16-bit PNGs as I;16
    image = load_image(path, color="gray")
    assert image.mode == "L"
    row = pixels(image)[0].astype(int)
    assert row[0] == 0
    assert row[-1] == 255
    assert np.all(np.diff(row) >= 0), "the gradient must stay monotonic"
    assert len(np.unique(row)) >= 60, "clipping at 255 would collapse most of the gradient"
    np.testing.assert_array_equal(row, np.rint(gradient[0] / 257.0).astype(int))
    assert is_single_channel(Image.open(path))


def test_16_bit_gray_as_rgb_repeats_the_channel(tmp_path):
    path = tmp_path / "depth.png"
    Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16)).save(path)
    image = load_image(path, color="rgb")
    assert image.mode == "RGB"
    assert pixels(image)[0].tolist() == [[0, 0, 0], [128, 128, 128], [255, 255, 255]]


def test_float_images_in_unit_range_are_scaled_by_255():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit.mode == "F"
    assert pixels(to_mode(unit, "gray"))[0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-5.0, 100.0, 300.0]], dtype=np.float32))
    assert pixels(to_mode(wide, "gray"))[0].tolist() == [0, 100, 255]


# --- EXIF orientation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_exif_orientation_6_is_rotated_upright(tmp_path, fmt):
    # Orientation 6: the camera was turned 90 degrees; the stored pixels must be rotated 90 degrees clockwise.
    stored = random_rgb(2, height=6, width=10)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    path = tmp_path / f"portrait.{fmt.lower()}"
    params = {"lossless": True} if fmt == "WEBP" else {}
    Image.fromarray(stored).save(path, fmt, exif=exif, **params)
    with Image.open(path) as check:
        assert check.getexif().get(ORIENTATION) == 6
    image = load_image(path, color="rgb")
    assert image.size == (6, 10)
    np.testing.assert_array_equal(pixels(image), np.rot90(stored, k=-1))


def test_exif_orientation_6_on_jpeg_swaps_width_and_height(tmp_path):
    stored = np.zeros((16, 32, 3), dtype=np.uint8)
    stored[:, :16] = 255  # left half white, right half black
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    path = tmp_path / "portrait.jpg"
    Image.fromarray(stored).save(path, "JPEG", exif=exif, quality=95)
    image = load_image(path, color="gray")
    assert image.size == (16, 32)
    upright = pixels(image).astype(int)
    # Rotated clockwise, the left (white) half ends on top.
    assert upright[:12].mean() > 240
    assert upright[20:].mean() < 15


def test_unreadable_exif_is_ignored_with_a_warning(caplog):
    array = random_rgb(3)
    data = encode(Image.fromarray(array), "PNG", exif=b"Exif\x00\x00garbage")
    with caplog.at_level(logging.WARNING, logger="imgclf.data.images"):
        image = load_image(data, color="rgb", name="odd-exif.png")
    np.testing.assert_array_equal(pixels(image), array)
    assert any("odd-exif.png" in r.message and "EXIF" in r.message for r in caplog.records)


# --- limits and broken files ---------------------------------------------------------------------------------


def test_pixel_limit_raises_and_names_the_file(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (100, 50)).save(path)
    with pytest.raises(ImageError, match=r"big\.png: 100x50 = 5,000 pixels exceeds the limit of 4,999"):
        load_image(path, color="rgb", max_pixels=4_999)
    with pytest.raises(ImageError, match=r"big\.png.*exceeds the limit"):
        open_image(path, max_pixels=4_999)
    assert load_image(path, color="rgb", max_pixels=5_000).size == (100, 50)


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    # The file has a header but no pixel data: a decode would fail with "cannot decode", so seeing the limit
    # error proves the size was checked from the header alone.
    path = tmp_path / "header-only.png"
    path.write_bytes(png_header_only(400, 300))
    with pytest.raises(ImageError, match=r"header-only\.png: 400x300 = 120,000 pixels exceeds the limit"):
        load_image(path, color="rgb", max_pixels=1_000)
    with pytest.raises(ImageError, match=r"header-only\.png: cannot decode"):
        load_image(path, color="rgb", max_pixels=1_000_000)


def test_default_limit_rejects_a_huge_header_without_allocating(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(8_000, 8_000))  # 64 MP > the 50 MP default
    with pytest.raises(ImageError, match=r"bomb\.png: 8000x8000 = 64,000,000 pixels exceeds the limit of 50,000,000"):
        load_image(path, color="rgb")


def test_decompression_bomb_header_raises_image_error(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(60_000, 60_000))  # beyond Pillow's own hard limit
    with pytest.raises(ImageError, match=r"bomb\.png: "):
        load_image(path, color="rgb", max_pixels=10**12)


def test_truncated_jpeg_raises_although_verify_passes(tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes(truncated_jpeg())
    with Image.open(path) as check:
        check.verify()  # the reason a full decode is needed
    with open_image(path) as image:  # opening is lazy and still succeeds
        assert image.size == (32, 32)
    with pytest.raises(ImageError, match=r"cut\.jpg: cannot decode \(image file is truncated"):
        load_image(path, color="rgb")


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n", encoding="utf-8")
    with pytest.raises(ImageError, match=r"notes\.png: not an image"):
        load_image(path, color="rgb")
    with pytest.raises(ImageError, match=r"notes\.png: not an image"):
        open_image(str(path))


def test_empty_file_is_not_an_image(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg: not an image"):
        load_image(path, color="rgb")


def test_missing_file_raises_naming_it(tmp_path):
    path = tmp_path / "gone.png"
    with pytest.raises(ImageError, match=r"gone\.png: cannot open"):
        load_image(path, color="rgb")


# --- sources -------------------------------------------------------------------------------------------------


def test_bytes_source_decodes_and_errors_name_bytes():
    array = random_rgb(4)
    image = load_image(encode(Image.fromarray(array), "PNG"), color="rgb")
    np.testing.assert_array_equal(pixels(image), array)
    with pytest.raises(ImageError, match=r"^<bytes>: not an image"):
        load_image(b"plain text", color="rgb")
    with pytest.raises(ImageError, match=r"^<bytes>: cannot decode"):
        load_image(truncated_jpeg(), color="rgb")


def test_bytes_source_uses_the_given_name():
    with pytest.raises(ImageError, match=r"^upload\.jpg: not an image"):
        load_image(b"plain text", color="rgb", name="upload.jpg")
    with pytest.raises(ImageError, match=r"^upload\.jpg: 8x8 = 64 pixels exceeds the limit of 10"):
        load_image(encode(Image.fromarray(random_rgb(5)), "PNG"), color="rgb", max_pixels=10, name="upload.jpg")


def test_file_object_source(tmp_path):
    array = random_rgb(6)
    path = tmp_path / "a.png"
    Image.fromarray(array).save(path)
    with open(path, "rb") as handle:
        np.testing.assert_array_equal(pixels(load_image(handle, color="rgb")), array)
    with pytest.raises(ImageError, match=r"^<stream>: not an image"):
        load_image(io.BytesIO(b"plain text"), color="rgb")
    path.write_bytes(b"plain text")
    with open(path, "rb") as handle, pytest.raises(ImageError, match=rf"^{re.escape(str(path))}: not an image"):
        load_image(handle, color="rgb")


def test_str_path_source(tmp_path):
    path = tmp_path / "ünïcode name.png"
    array = random_rgb(7)
    Image.fromarray(array).save(path)
    np.testing.assert_array_equal(pixels(load_image(str(path), color="rgb")), array)


def test_content_decides_the_format_not_the_extension(tmp_path):
    array = random_rgb(8)
    path = tmp_path / "really-a-png.jpg"
    Image.fromarray(array).save(path, "PNG")
    np.testing.assert_array_equal(pixels(load_image(path, color="rgb")), array)  # exact: decoded as PNG


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), color) for color in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == 3
    image = load_image(data, color="rgb")
    assert image.size == (8, 8)
    assert np.all(pixels(image) == [255, 0, 0])


def test_load_image_leaves_a_usable_image_after_closing_the_file(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(random_rgb(9)).save(path)
    image = load_image(path, color="rgb")
    path.unlink()
    assert image.copy().size == (8, 8)
    assert pixels(image).shape == (8, 8, 3)


# --- colour targets ------------------------------------------------------------------------------------------


def test_rgb_to_gray_uses_luma_weights():
    rgb = Image.fromarray(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [90, 90, 90]]], dtype=np.uint8))
    gray = load_image(encode(rgb, "PNG"), color="gray")
    assert gray.mode == "L"
    # ITU-R 601-2 luma: L = R * 299/1000 + G * 587/1000 + B * 114/1000
    assert pixels(gray)[0].tolist() == [76, 150, 29, 90]


def test_gray_to_rgb_repeats_the_channel():
    values = np.array([[0, 17, 128, 255]], dtype=np.uint8)
    rgb = load_image(encode(Image.fromarray(values), "PNG"), color="rgb")
    assert rgb.mode == "RGB"
    np.testing.assert_array_equal(pixels(rgb), np.repeat(values[..., None], 3, axis=2))


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [("RGB", "rgb", "RGB"), ("RGB", "gray", "L"), ("L", "gray", "L"), ("L", "rgb", "RGB"), ("I", "gray", "L")],
)
def test_to_mode_returns_the_asked_mode(mode, color, expected):
    image = Image.new(mode, (4, 4))
    assert to_mode(image, color).mode == expected


def test_is_single_channel():
    assert is_single_channel(Image.new("L", (1, 1)))
    assert is_single_channel(Image.new("LA", (1, 1)))
    assert is_single_channel(Image.new("I;16", (1, 1)))
    assert not is_single_channel(Image.new("RGB", (1, 1)))
    assert not is_single_channel(Image.new("P", (1, 1)))


def test_path_object_in_error_message(tmp_path):
    path = Path(tmp_path) / "sub dir" / "bad.gif"
    path.parent.mkdir()
    path.write_bytes(b"GIF89a broken")
    with pytest.raises(ImageError, match=r"sub dir/bad\.gif: "):
        load_image(path, color="rgb")
