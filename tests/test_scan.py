"""scan_folder: layouts, content detection, skipped files and their reasons, and the errors for unusable folders."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.data.scan import ImageIndex, scan_folder
from imgclf.errors import DataError
from imgclf.progress import Progress

_SEEDS = iter(range(10**6))  # every helper-made image gets fresh random content, so hashes differ


def image_bytes(
    fmt: str = "PNG", *, seed: int | None = None, size: tuple[int, int] = (8, 8), mode: str = "RGB"
) -> bytes:
    rng = np.random.default_rng(next(_SEEDS) if seed is None else seed)
    width, height = size
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    array = rng.integers(0, 256, shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def add_images(folder: Path, count: int, fmt: str = "PNG", suffix: str = ".png") -> list[Path]:
    return [write(folder / f"img{i:02d}{suffix}", image_bytes(fmt)) for i in range(count)]


def make_split(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """`layout` is {split folder: {class: n images}}; a split folder named "" makes a flat layout."""
    for split, classes in layout.items():
        for label, count in classes.items():
            folder = root / split / label if split else root / label
            folder.mkdir(parents=True, exist_ok=True)
            add_images(folder, count)
    return root


def truncated_jpeg() -> bytes:
    data = image_bytes("JPEG", size=(32, 32))
    return data[: len(data) // 2]


def digests(root: Path) -> dict[str, str]:
    """Every entry below root (not following links): file content hashes, link targets, folders."""
    found = {}
    for current, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(current) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = "link:" + os.readlink(path)
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def counts(index: ImageIndex) -> dict:
    return {split: dict(counter) for split, counter in index.counts().items()}


def reasons(index: ImageIndex, root: Path) -> dict[str, str]:
    return {str(p.path.relative_to(root)): p.reason for p in index.problems}


# --- layouts -------------------------------------------------------------------------------------------------


def test_split_layout(tmp_path):
    root = make_split(
        tmp_path / "data",
        {"train": {"cat": 3, "dog": 4}, "val": {"cat": 2, "dog": 1}, "test": {"cat": 1, "dog": 2}},
    )
    index = scan_folder(root)
    assert index.layout == "split"
    assert index.root == root
    assert index.classes == ("cat", "dog")
    assert counts(index) == {"train": {"cat": 3, "dog": 4}, "val": {"cat": 2, "dog": 1}, "test": {"cat": 1, "dog": 2}}
    assert index.problems == ()
    assert index.warnings == ()
    assert index.ignored_files == 0
    assert index.hidden_files == 0
    for record in index.records:
        assert record.path.parent == root / record.split / record.label
        assert record.sha256 == hashlib.sha256(record.path.read_bytes()).hexdigest()
        assert (record.width, record.height) == (8, 8)
        assert record.single_channel is False


@pytest.mark.parametrize("val_name", ["val", "valid", "validation", "Validation", "VALID"])
def test_val_folder_aliases(tmp_path, val_name):
    root = make_split(tmp_path / "data", {"train": {"a": 2, "b": 2}, val_name: {"a": 1, "b": 1}})
    index = scan_folder(root)
    assert index.layout == "split"
    assert counts(index) == {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}}


def test_train_only_split_layout(tmp_path):
    root = make_split(tmp_path / "data", {"train": {"a": 2, "b": 3}})
    index = scan_folder(root)
    assert index.layout == "split"
    assert counts(index) == {"train": {"a": 2, "b": 3}}
    assert index.warnings == ()


def test_flat_layout(tmp_path):
    root = make_split(tmp_path / "data", {"": {"cat": 3, "dog": 2, "eel": 1}})
    index = scan_folder(root)
    assert index.layout == "flat"
    assert index.classes == ("cat", "dog", "eel")
    assert counts(index) == {None: {"cat": 3, "dog": 2, "eel": 1}}
    assert {r.split for r in index.records} == {None}
    assert index.problems == ()


def test_images_in_nested_subfolders_belong_to_their_class(tmp_path):
    root = tmp_path / "data"
    add_images(root / "cat", 1)
    add_images(root / "cat" / "2019" / "summer", 2)
    add_images(root / "cat" / "2020", 1)
    add_images(root / "dog", 1)
    index = scan_folder(root)
    assert counts(index) == {None: {"cat": 4, "dog": 1}}
    nested = [r for r in index.records if "summer" in r.path.parts]
    assert len(nested) == 2
    assert {r.label for r in nested} == {"cat"}


def test_nested_subfolders_in_split_layout(tmp_path):
    root = tmp_path / "data"
    add_images(root / "train" / "cat" / "batch1", 2)
    add_images(root / "train" / "dog", 1)
    add_images(root / "val" / "dog" / "deep" / "er", 1)
    index = scan_folder(root)
    assert counts(index) == {"train": {"cat": 2, "dog": 1}, "val": {"dog": 1}}


def test_class_names_with_spaces_and_non_ascii(tmp_path):
    root = make_split(tmp_path / "data", {"": {"chat noir": 1, "Hund ü": 1}})
    assert scan_folder(root).classes == ("Hund ü", "chat noir")


def test_other_folders_beside_split_folders_are_ignored_with_a_warning(tmp_path, caplog):
    root = make_split(tmp_path / "data", {"train": {"a": 1, "b": 1}, "extras": {"c": 1}})
    with caplog.at_level(logging.WARNING, logger="imgclf.data.scan"):
        index = scan_folder(root)
    assert index.classes == ("a", "b")
    assert counts(index) == {"train": {"a": 1, "b": 1}}
    assert "extras" in caplog.text


# --- skipped, ignored and detected files ---------------------------------------------------------------------


def test_hidden_files_and_folders_are_skipped_silently(tmp_path):
    root = make_split(tmp_path / "data", {"train": {"cat": 2, "dog": 2}})
    cat = root / "train" / "cat"
    write(cat / ".DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(200))
    write(cat / "._img00.png", b"\x00\x05\x16\x07AppleDouble junk")
    write(cat / ".ipynb_checkpoints" / "img00-checkpoint.png", truncated_jpeg())
    write(root / ".DS_Store", b"junk")
    write(root / "train" / ".DS_Store", b"junk")
    write(root / "__MACOSX" / "train" / "cat" / "._img00.png", b"junk")
    index = scan_folder(root)
    assert index.problems == ()
    assert counts(index) == {"train": {"cat": 2, "dog": 2}}
    assert not any(part.startswith(".") for r in index.records for part in r.path.relative_to(root).parts)
    # three inside the class folder, plus the root's .DS_Store and __MACOSX and train/.DS_Store
    assert index.hidden_files == 6
    assert index.ignored_files == 0


def test_non_image_files_are_ignored_and_counted(tmp_path):
    root = make_split(tmp_path / "data", {"": {"cat": 2, "dog": 2}})
    write(root / "cat" / "notes.txt", b"taken in 2019\n")
    write(root / "dog" / "labels.csv", b"a,b\n")
    write(root / "README.md", b"# my data\n")
    index = scan_folder(root)
    assert index.problems == ()
    assert index.ignored_files == 3
    assert counts(index) == {None: {"cat": 2, "dog": 2}}


def test_content_decides_png_named_jpg_and_file_without_extension(tmp_path):
    root = make_split(tmp_path / "data", {"": {"cat": 1, "dog": 1}})
    png_as_jpg = write(root / "cat" / "photo.jpg", image_bytes("PNG", size=(12, 9)))
    no_suffix = write(root / "dog" / "IMG_0001", image_bytes("JPEG", size=(10, 16)))
    index = scan_folder(root)
    assert index.problems == ()
    assert index.ignored_files == 0
    by_path = {r.path: r for r in index.records}
    assert (by_path[png_as_jpg].width, by_path[png_as_jpg].height) == (12, 9)
    assert by_path[png_as_jpg].label == "cat"
    assert (by_path[no_suffix].width, by_path[no_suffix].height) == (10, 16)
    assert by_path[no_suffix].label == "dog"


def test_acceptance_messy_dataset_scans_and_lists_exactly_the_bad_files(tmp_path):
    root = make_split(tmp_path / "data", {"train": {"cat": 3, "dog": 3}, "val": {"cat": 1, "dog": 1}})
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    write(cat / "truncated.jpg", truncated_jpeg())
    write(cat / "zero.jpg", b"")
    write(dog / "text.png", b"I am a text file with an image name\n")
    write(dog / ".DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(64))
    write(root / ".DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(64))
    write(cat / ".ipynb_checkpoints" / "truncated-checkpoint.jpg", truncated_jpeg())
    write(root / "val" / ".ipynb_checkpoints" / "x.png", b"")
    png_as_jpg = write(dog / "png-named.jpg", image_bytes("PNG"))
    before = digests(root)

    index = scan_folder(root)

    assert digests(root) == before, "scanning must not modify, add or remove any file"
    found = reasons(index, root)
    assert set(found) == {"train/cat/truncated.jpg", "train/cat/zero.jpg", "train/dog/text.png"}
    assert found["train/cat/truncated.jpg"].startswith("cannot decode (image file is truncated")
    assert found["train/cat/zero.jpg"] == "empty file (0 bytes)"
    assert found["train/dog/text.png"].startswith("not an image")
    assert [p.path for p in index.problems] == sorted((p.path for p in index.problems), key=str)
    assert png_as_jpg in {r.path for r in index.records}
    assert counts(index) == {"train": {"cat": 3, "dog": 4}, "val": {"cat": 1, "dog": 1}}
    assert index.classes == ("cat", "dog")
    # .DS_Store at the root and in train/dog, .ipynb_checkpoints in train/cat and val
    assert index.hidden_files == 4
    assert index.ignored_files == 0


def test_problems_are_logged_as_a_count(tmp_path, caplog):
    root = make_split(tmp_path / "data", {"": {"cat": 1, "dog": 1}})
    write(root / "cat" / "zero.jpg", b"")
    with caplog.at_level(logging.WARNING, logger="imgclf.data.scan"):
        scan_folder(root)
    assert "1 file(s) skipped" in caplog.text


def test_image_over_the_pixel_limit_is_a_problem(tmp_path):
    root = make_split(tmp_path / "data", {"": {"cat": 1, "dog": 1}})
    big = write(root / "cat" / "big.png", image_bytes(size=(16, 16)))
    index = scan_folder(root, max_pixels=100)
    assert [p.path for p in index.problems] == [big]
    assert index.problems[0].reason.startswith("16x16 = 256 pixels exceeds the limit of 100")
    assert counts(index) == {None: {"cat": 1, "dog": 1}}


def test_image_file_outside_class_folders_is_a_problem(tmp_path):
    root = make_split(tmp_path / "data", {"train": {"a": 1, "b": 1}})
    loose_root = write(root / "stray.png", image_bytes())
    loose_train = write(root / "train" / "stray.jpg", image_bytes("JPEG"))
    write(root / "train" / "info.txt", b"x")
    index = scan_folder(root)
    assert {p.path: p.reason for p in index.problems} == {
        loose_root: "not inside a class folder",
        loose_train: "not inside a class folder",
    }
    assert index.ignored_files == 1


def test_single_channel_flag(tmp_path):
    root = tmp_path / "data"
    gray = write(root / "a" / "gray.png", image_bytes(mode="L"))
    rgb = write(root / "b" / "rgb.png", image_bytes(mode="RGB"))
    by_path = {r.path: r for r in scan_folder(root).records}
    assert by_path[gray].single_channel is True
    assert by_path[rgb].single_channel is False


def test_identical_files_get_the_same_hash(tmp_path):
    root = tmp_path / "data"
    data = image_bytes()
    first = write(root / "a" / "one.png", data)
    second = write(root / "b" / "two.png", data)
    other = write(root / "b" / "three.png", image_bytes())
    by_path = {r.path: r.sha256 for r in scan_folder(root).records}
    assert by_path[first] == by_path[second] == hashlib.sha256(data).hexdigest()
    assert by_path[other] != by_path[first]


def test_result_does_not_depend_on_the_number_of_workers(tmp_path):
    root = make_split(tmp_path / "data", {"": {"a": 5, "b": 5}})
    write(root / "a" / "zero.jpg", b"")
    one, many = scan_folder(root, workers=1), scan_folder(root, workers=8)
    assert sorted(one.records, key=lambda r: r.path) == sorted(many.records, key=lambda r: r.path)
    assert one.problems == many.problems


def test_progress_sees_every_candidate_file(tmp_path):
    root = make_split(tmp_path / "data", {"": {"a": 2, "b": 3}})
    write(root / "a" / "notes.txt", b"x")
    seen: list[tuple[str, int | None, int]] = []

    class Recorder(Progress):
        @contextmanager
        def task(self, description, total):
            entry = [description, total, 0]

            class Task:
                def advance(self, amount=1, **fields):
                    entry[2] += amount

            yield Task()
            seen.append(tuple(entry))

    scan_folder(root, progress=Recorder())
    assert len(seen) == 1
    assert seen[0][1:] == (6, 6)
    assert str(root) in seen[0][0]


# --- classes and errors --------------------------------------------------------------------------------------


def test_class_list_is_sorted_and_comes_from_train(tmp_path):
    root = make_split(
        tmp_path / "data",
        {"train": {"zebra": 1, "ant": 1, "mole": 1}, "val": {"mole": 1}, "test": {"ant": 1}},
    )
    index = scan_folder(root)
    assert index.classes == ("ant", "mole", "zebra")


def test_train_class_with_images_only_in_train_is_still_a_class(tmp_path):
    root = make_split(tmp_path / "data", {"train": {"a": 1, "b": 1, "c": 1}, "val": {"a": 1, "b": 1, "c": 1}})
    (root / "test").mkdir()
    add_images(root / "test" / "a", 1)
    index = scan_folder(root)
    assert index.classes == ("a", "b", "c")
    assert "test split has no images of class(es): b, c" in index.warnings


@pytest.mark.parametrize("split", ["val", "test"])
def test_val_or_test_class_missing_from_train_is_an_error(tmp_path, split):
    root = make_split(tmp_path / "data", {"train": {"cat": 1, "dog": 1}, split: {"cat": 1, "dog": 1, "bird": 1}})
    with pytest.raises(
        DataError, match=rf"{split} split has class\(es\) not in train: bird; .*train classes: cat, dog"
    ):
        scan_folder(root)


def test_class_missing_from_val_is_a_warning(tmp_path, caplog):
    root = make_split(tmp_path / "data", {"train": {"cat": 2, "dog": 2, "eel": 2}, "val": {"cat": 1}})
    with caplog.at_level(logging.WARNING, logger="imgclf.data.scan"):
        index = scan_folder(root)
    assert index.warnings == ("val split has no images of class(es): dog, eel",)
    assert "val split has no images of class(es): dog, eel" in caplog.text
    assert index.classes == ("cat", "dog", "eel")


def test_fewer_than_two_classes_is_an_error(tmp_path):
    root = make_split(tmp_path / "data", {"": {"only": 3}})
    with pytest.raises(DataError, match=r"found 1 class \(only\); a classifier needs at least 2"):
        scan_folder(root)


def test_one_train_class_with_more_in_val_is_an_error(tmp_path):
    root = make_split(tmp_path / "data", {"train": {"only": 3}})
    with pytest.raises(DataError, match=r"found 1 class \(only\); a classifier needs at least 2"):
        scan_folder(root)


@pytest.mark.parametrize(
    ("content", "extra"),
    [
        (None, ""),  # an empty folder
        (b"", "dog/zero.jpg: empty file"),  # only a broken image
        (b"just text", ""),  # only a non-image file
    ],
)
def test_class_folder_without_a_readable_image_is_an_error(tmp_path, content, extra):
    root = make_split(tmp_path / "data", {"": {"cat": 2}})
    (root / "dog").mkdir()
    if content is not None:
        write(root / "dog" / ("zero.jpg" if content == b"" else "notes.txt"), content)
    with pytest.raises(DataError, match=r"class folder\(s\) with no readable image: dog in ") as error:
        scan_folder(root)
    assert extra in str(error.value)


def test_train_class_folder_without_a_readable_image_is_an_error(tmp_path):
    root = make_split(tmp_path / "data", {"train": {"cat": 2, "dog": 2}})
    write(root / "train" / "eel" / "cut.jpg", truncated_jpeg())
    with pytest.raises(DataError, match=r"no readable image: eel .*cut\.jpg: cannot decode"):
        scan_folder(root)


def test_no_training_images_is_an_error(tmp_path):
    root = tmp_path / "data"
    write(root / "train" / "cat" / "zero.jpg", b"")
    write(root / "train" / "dog" / "text.png", b"text")
    add_images(root / "val" / "cat", 1)
    with pytest.raises(DataError, match=r"no training images in .*train .*2 file\(s\) skipped.*zero\.jpg"):
        scan_folder(root)


def test_empty_folder_is_an_error(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(DataError, match=r"no training images in .*data \(expected <class>/<image> folders"):
        scan_folder(root)


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"dataset folder not found: .*nowhere"):
        scan_folder(tmp_path / "nowhere")


def test_file_instead_of_folder_is_an_error(tmp_path):
    path = write(tmp_path / "data.zip", b"PK")
    with pytest.raises(DataError, match=r"dataset folder not found: .*data\.zip"):
        scan_folder(path)


def test_val_and_valid_together_is_an_error(tmp_path):
    root = make_split(tmp_path / "data", {"train": {"a": 1, "b": 1}, "val": {"a": 1}, "valid": {"b": 1}})
    with pytest.raises(DataError, match=r"both 'val' and 'valid' name the val split; keep one"):
        scan_folder(root)


def test_split_folders_without_train_is_an_error(tmp_path):
    root = make_split(tmp_path / "data", {"val": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}})
    with pytest.raises(DataError, match=r"found split folder\(s\) test, val but no 'train' folder"):
        scan_folder(root)


# --- symlinks ------------------------------------------------------------------------------------------------


def test_symlinked_image_is_used(tmp_path):
    root = make_split(tmp_path / "data", {"": {"cat": 1, "dog": 1}})
    elsewhere = write(tmp_path / "elsewhere" / "real.png", image_bytes())
    link = root / "cat" / "link.png"
    link.symlink_to(elsewhere)
    index = scan_folder(root)
    assert counts(index) == {None: {"cat": 2, "dog": 1}}
    assert link in {r.path for r in index.records}


def test_dangling_symlink_is_a_problem(tmp_path):
    root = make_split(tmp_path / "data", {"": {"cat": 2, "dog": 2}})
    link = root / "cat" / "gone.jpg"
    link.symlink_to(tmp_path / "does-not-exist.jpg")
    before = digests(root)
    index = scan_folder(root)
    assert [(p.path, p.reason) for p in index.problems] == [(link, "dangling symlink (its target does not exist)")]
    assert counts(index) == {None: {"cat": 2, "dog": 2}}
    assert digests(root) == before


def test_symlink_loop_terminates_and_is_reported(tmp_path):
    root = make_split(tmp_path / "data", {"train": {"cat": 2, "dog": 2}})
    cat = root / "train" / "cat"
    add_images(cat / "sub", 1)
    (cat / "sub" / "back").symlink_to(cat, target_is_directory=True)  # cat/sub/back -> cat
    (cat / "self").symlink_to(".", target_is_directory=True)  # cat/self -> cat
    index = scan_folder(root)
    assert counts(index) == {"train": {"cat": 3, "dog": 2}}, "images below the loop are counted once"
    loops = {p.path.relative_to(root).as_posix(): p.reason for p in index.problems}
    assert loops == {
        "train/cat/self": LOOP,
        "train/cat/sub/back": LOOP,
    }


LOOP = "link to a folder already in the dataset (a loop or a second link); not followed"


def test_link_into_another_class_folder_is_not_followed(tmp_path):
    root = make_split(tmp_path / "data", {"train": {"cat": 2, "dog": 3}})
    (root / "train" / "cat" / "dogs").symlink_to(root / "train" / "dog", target_is_directory=True)
    (root / "train" / "cat" / "up").symlink_to(root / "train", target_is_directory=True)
    index = scan_folder(root)
    assert counts(index) == {"train": {"cat": 2, "dog": 3}}, "no dog image may be counted as a cat"
    assert {p.path.name: p.reason for p in index.problems} == {"dogs": LOOP, "up": LOOP}


def test_symlinked_class_folder_is_followed(tmp_path):
    root = make_split(tmp_path / "data", {"": {"cat": 2}})
    add_images(tmp_path / "shared" / "dogs", 3)
    (root / "dog").symlink_to(tmp_path / "shared" / "dogs", target_is_directory=True)
    assert counts(scan_folder(root)) == {None: {"cat": 2, "dog": 3}}


def test_images_smaller_than_8_px_are_problems(tmp_path):
    root = make_split(tmp_path / "data", {"": {"cat": 2, "dog": 2}})
    tiny = write(root / "cat" / "pixel.png", image_bytes("PNG", size=(7, 20)))
    index = scan_folder(root)
    assert [(p.path, p.reason) for p in index.problems] == [(tiny, "too small: 7x20 px, the minimum side is 8 px")]


def test_a_decompression_bomb_is_rejected_before_decoding(tmp_path):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # A 200-megapixel grayscale PNG header with almost no data: decoding it would allocate 200 MB.
    header = struct.pack(">IIBBBBB", 20000, 10000, 8, 0, 0, 0, 0)
    bomb = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )
    root = make_split(tmp_path / "data", {"": {"cat": 2, "dog": 2}})
    path = write(root / "cat" / "bomb.png", bomb)
    index = scan_folder(root)
    (problem,) = index.problems
    assert problem.path == path and "exceeds the limit of 50,000,000" in problem.reason


@pytest.mark.parametrize(
    ("train_name", "val_name", "why"),
    [
        ("Cat", "cat", "case"),
        ("cat", "cat ", "surrounding spaces"),
        ("caf\u00e9", "cafe\u0301", "Unicode normal form"),
    ],
)
def test_class_names_that_differ_only_cosmetically_are_reported(tmp_path, train_name, val_name, why):
    root = make_split(tmp_path / "data", {"train": {train_name: 2, "dog": 2}, "val": {val_name: 1, "dog": 1}})
    with pytest.raises(DataError, match=f"only by {why}"):
        scan_folder(root)
