"""Seeded stratified splits, the manifest CSV, the duplicate/leak report and writing a split to disk."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.data.leaks import find_duplicates, save_duplicates, warn_about_duplicates
from imgclf.data.scan import ImageRecord, scan_folder
from imgclf.data.split import (
    ManifestRow,
    SplitManifest,
    make_manifest,
    materialize_split,
    stratified_split,
)
from imgclf.errors import DataError
from imgclf.files import read_csv

_SEEDS = iter(range(10**6))  # every helper-made image gets fresh random content, so hashes differ
RATIOS = (0.7, 0.15, 0.15)


def image_bytes(seed: int | None = None) -> bytes:
    rng = np.random.default_rng(next(_SEEDS) if seed is None else seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_folder(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """`layout` is {split folder: {class: n images}}; the split folder "" makes a flat layout."""
    for split, classes in layout.items():
        for label, count in classes.items():
            for i in range(count):
                write(root / split / label / f"{label}{i:03d}.png", image_bytes())
    return root


def fake_records(sizes: dict[str, int]) -> list[ImageRecord]:
    """Records without files, for split arithmetic: unique hashes, flat layout."""
    return [
        ImageRecord(Path(f"/data/{label}/{i}.png"), label, None, f"{label}-{i}", 8, 8, False)
        for label, n in sizes.items()
        for i in range(n)
    ]


def split_counts(assigned: dict[Path, str], records: list[ImageRecord]) -> dict[str, dict[str, int]]:
    result: dict[str, dict[str, int]] = {}
    for record in records:
        per_class = result.setdefault(record.label, {"train": 0, "val": 0, "test": 0})
        per_class[assigned[record.path]] += 1
    return result


def manifest_counts(manifest: SplitManifest) -> dict[str, dict[str, int]]:
    return {split: dict(counter) for split, counter in manifest.counts().items()}


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def row(path: str, label: str, split: str, sha: str) -> ManifestRow:
    return ManifestRow(Path(path), label, split, sha)


# --- stratified split of a flat folder -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("split") / "flat", {"": {"ant": 10, "bee": 13, "cow": 20}})


def test_flat_folder_split_is_stratified_within_one_image(flat_folder):
    index = scan_folder(flat_folder)
    manifest = make_manifest(index, ratios=RATIOS, seed=0)
    assert len(manifest.rows) == 43
    assert {r.path for r in manifest.rows} == {r.path for r in index.records}
    assert manifest.classes == ("ant", "bee", "cow")
    counts = manifest.counts()
    sizes = {"ant": 10, "bee": 13, "cow": 20}
    for label, size in sizes.items():
        assert sum(counts[split][label] for split in counts) == size
        for split, ratio in zip(("train", "val", "test"), RATIOS):
            assert abs(counts[split][label] - size * ratio) <= 1, (label, split, counts[split][label])
    # Exact values for these sizes: val = test = round(n * 0.15) (1.5 -> 2, 1.95 -> 2, 3.0 -> 3), train the rest.
    assert manifest_counts(manifest) == {
        "train": {"ant": 6, "bee": 9, "cow": 14},
        "val": {"ant": 2, "bee": 2, "cow": 3},
        "test": {"ant": 2, "bee": 2, "cow": 3},
    }


def test_manifest_rows_are_sorted_by_split_class_and_path(flat_folder):
    manifest = make_manifest(scan_folder(flat_folder), ratios=RATIOS, seed=0)
    order = {"train": 0, "val": 1, "test": 2}
    keys = [(order[r.split], r.label, str(r.path)) for r in manifest.rows]
    assert keys == sorted(keys)
    assert [r.split for r in manifest.split("val")] == ["val"] * 7


def test_same_seed_same_split_other_seed_other_split(flat_folder):
    index = scan_folder(flat_folder)
    first = make_manifest(index, ratios=RATIOS, seed=7)
    again = make_manifest(scan_folder(flat_folder), ratios=RATIOS, seed=7)
    other = make_manifest(index, ratios=RATIOS, seed=8)
    assert first == again
    assert first != other
    assert manifest_counts(first) == manifest_counts(other), "a new seed changes which images, not how many"


def test_split_does_not_depend_on_record_order():
    records = fake_records({"a": 12, "b": 9})
    forward = stratified_split(records, RATIOS, seed=3)
    backward = stratified_split(list(reversed(records)), RATIOS, seed=3)
    assert forward == backward


@pytest.mark.parametrize("ratios", [(0.8, 0.1, 0.1), (0.7, 0.15, 0.15), (0.6, 0.2, 0.2), (0.5, 0.25, 0.25)])
def test_every_split_is_within_one_image_of_its_share(ratios):
    sizes = {f"c{n}": n for n in range(10, 61, 7)}
    records = fake_records(sizes)
    counts = split_counts(stratified_split(records, ratios, seed=1), records)
    for label, n in sizes.items():
        for split, ratio in zip(("train", "val", "test"), ratios):
            assert abs(counts[label][split] - n * ratio) <= 1, (label, split, counts[label])


@pytest.mark.parametrize("n", range(3, 16))
def test_every_class_with_three_images_appears_in_every_split(n):
    records = fake_records({"a": n, "b": n + 1})
    counts = split_counts(stratified_split(records, (0.8, 0.1, 0.1), seed=0), records)
    for label in ("a", "b"):
        assert min(counts[label].values()) >= 1, counts[label]
        assert sum(counts[label].values()) == (n if label == "a" else n + 1)


@pytest.mark.parametrize(
    ("n", "ratios", "expected"),
    [
        (1, (0.8, 0.1, 0.1), {"train": 1, "val": 0, "test": 0}),
        (2, (0.8, 0.1, 0.1), {"train": 1, "val": 1, "test": 0}),
        (2, (0.5, 0.0, 0.5), {"train": 1, "val": 0, "test": 1}),
        (2, (1.0, 0.0, 0.0), {"train": 2, "val": 0, "test": 0}),
        (3, (0.8, 0.1, 0.1), {"train": 1, "val": 1, "test": 1}),
        (3, (0.2, 0.4, 0.4), {"train": 1, "val": 1, "test": 1}),
        (4, (0.0, 0.5, 0.5), {"train": 1, "val": 1, "test": 2}),  # val gives up the image first
    ],
)
def test_small_classes_keep_a_training_image(n, ratios, expected):
    records = fake_records({"tiny": n})
    assert split_counts(stratified_split(records, ratios, seed=0), records)["tiny"] == expected


def test_zero_ratio_splits_stay_empty():
    records = fake_records({"a": 20, "b": 7})
    assigned = stratified_split(records, (0.9, 0.1, 0.0), seed=0)
    assert "test" not in set(assigned.values())
    assert split_counts(assigned, records) == {
        "a": {"train": 18, "val": 2, "test": 0},
        "b": {"train": 6, "val": 1, "test": 0},
    }


def test_tiny_classes_in_a_flat_folder(tmp_path):
    root = make_folder(tmp_path / "data", {"": {"one": 1, "two": 2, "many": 10}})
    manifest = make_manifest(scan_folder(root), ratios=(0.8, 0.1, 0.1), seed=0)
    counts = manifest.counts()
    assert counts["train"]["one"] == 1
    assert counts["train"]["two"] == 1
    assert counts["val"]["two"] + counts["test"]["two"] == 1
    assert manifest.classes == ("many", "one", "two")


# --- folders that are already split --------------------------------------------------------------------------


def test_split_folder_keeps_its_split(tmp_path):
    root = make_folder(
        tmp_path / "data",
        {"train": {"a": 4, "b": 4}, "valid": {"a": 1, "b": 2}, "test": {"a": 2, "b": 1}},
    )
    index = scan_folder(root)
    for seed in (0, 1):
        manifest = make_manifest(index, ratios=RATIOS, seed=seed)
        assert {r.path: r.split for r in manifest.rows} == {r.path: r.split for r in index.records}


def test_split_folder_without_val_gets_val_carved_from_train(tmp_path, caplog):
    root = make_folder(tmp_path / "data", {"train": {"a": 10, "b": 19}, "test": {"a": 2, "b": 3}})
    index = scan_folder(root)
    with caplog.at_level(logging.INFO, logger="imgclf.data.split"):
        manifest = make_manifest(index, ratios=(0.8, 0.1, 0.1), seed=0)
    # val share of train = 0.1 / (0.8 + 0.1) = 1/9: a: round(10/9) = 1, b: round(19/9) = 2.
    assert manifest_counts(manifest) == {"train": {"a": 9, "b": 17}, "val": {"a": 1, "b": 2}, "test": {"a": 2, "b": 3}}
    test_paths = {r.path for r in index.records if r.split == "test"}
    assert {r.path for r in manifest.split("test")} == test_paths
    assert all(r.path.parts[-3] == "train" for r in manifest.split("val"))
    assert "no val folder: 11% of each training class is held out" in caplog.text


# --- duplicates ----------------------------------------------------------------------------------------------


def test_identical_files_in_a_class_stay_in_one_split(tmp_path):
    root = make_folder(tmp_path / "data", {"": {"a": 10, "b": 10}})
    copy = image_bytes()
    copies = [write(root / "a" / f"copy{i}.png", copy) for i in range(5)]
    other = image_bytes()
    pairs = [write(root / "b" / f"twin{i}.png", other) for i in range(2)]
    index = scan_folder(root)
    splits_seen = set()
    for seed in range(12):
        manifest = make_manifest(index, ratios=(0.5, 0.25, 0.25), seed=seed)
        where = {r.path: r.split for r in manifest.rows}
        assert len({where[p] for p in copies}) == 1, f"seed {seed}: copies were split apart"
        assert len({where[p] for p in pairs}) == 1, f"seed {seed}: twins were split apart"
        splits_seen.add(where[copies[0]])
        assert find_duplicates(manifest) == []
    assert len(splits_seen) > 1, "the group itself is still shuffled like any other image"


def test_duplicate_group_counts_as_one_item_in_the_split_sizes():
    records = fake_records({"a": 7})
    records += [ImageRecord(Path(f"/data/a/dup{i}.png"), "a", None, "same", 8, 8, False) for i in range(3)]
    counts = split_counts(stratified_split(records, (0.5, 0.25, 0.25), seed=0), records)
    # 8 groups: val = test = round(8 * 0.25) = 2 groups; the duplicate group adds 2 images to one split.
    assert sum(counts["a"].values()) == 10
    assert sorted(counts["a"].values()) in ([2, 2, 6], [2, 4, 4])


def test_leak_across_hand_made_splits_is_reported(tmp_path):
    root = make_folder(tmp_path / "data", {"train": {"cat": 2, "dog": 2}, "test": {"cat": 1, "dog": 1}})
    leaked = image_bytes()
    in_train = write(root / "train" / "cat" / "leak.png", leaked)
    in_test = write(root / "test" / "cat" / "leak copy.png", leaked)
    manifest = make_manifest(scan_folder(root), ratios=RATIOS, seed=0)
    # Train has no val folder, so val is carved from train: the train copy may end in val; either way it leaks.
    duplicates = find_duplicates(manifest)
    assert len(duplicates) == 1
    duplicate = duplicates[0]
    assert (duplicate.kind, duplicate.issue) == ("exact", "leak across splits")
    assert duplicate.sha256 == hashlib.sha256(leaked).hexdigest()
    assert {duplicate.first.path, duplicate.second.path} == {in_train, in_test}
    assert duplicate.first.split != duplicate.second.split


def test_same_content_under_two_labels_is_a_label_conflict(tmp_path):
    root = make_folder(tmp_path / "data", {"train": {"cat": 2, "dog": 2}, "val": {"cat": 1, "dog": 1}})
    same = image_bytes()
    as_cat = write(root / "train" / "cat" / "ambiguous.png", same)
    as_dog = write(root / "train" / "dog" / "ambiguous.png", same)
    duplicates = find_duplicates(make_manifest(scan_folder(root), ratios=RATIOS, seed=0))
    assert [(d.issue, {d.first.path, d.second.path}) for d in duplicates] == [("label conflict", {as_cat, as_dog})]


def test_find_duplicates_reports_each_group_as_a_star_of_pairs():
    manifest = SplitManifest(
        (
            row("/d/train/a/1.png", "a", "train", "x"),
            row("/d/val/a/1.png", "a", "val", "x"),
            row("/d/test/a/1.png", "a", "test", "x"),
            row("/d/train/a/2.png", "a", "train", "y"),
            row("/d/train/a/3.png", "a", "train", "y"),  # same split and label: not reported
            row("/d/train/b/4.png", "b", "train", "z"),
            row("/d/test/a/4.png", "a", "test", "z"),  # different split and label: a conflict
            row("/d/train/b/5.png", "b", "train", "w"),
        )
    )
    found = [(d.sha256, d.first.path.as_posix(), d.second.path.as_posix(), d.issue) for d in find_duplicates(manifest)]
    assert found == [
        ("x", "/d/train/a/1.png", "/d/val/a/1.png", "leak across splits"),
        ("x", "/d/train/a/1.png", "/d/test/a/1.png", "leak across splits"),
        ("z", "/d/train/b/4.png", "/d/test/a/4.png", "label conflict"),
    ]


def test_duplicates_are_saved_and_warned_about(tmp_path, caplog):
    manifest = SplitManifest((row("/d/train/a/1.png", "a", "train", "x"), row("/d/test/a/2.png", "a", "test", "x")))
    duplicates = find_duplicates(manifest)
    path = tmp_path / "duplicates.csv"
    save_duplicates(duplicates, path)
    assert read_csv(path) == [
        {
            "kind": "exact",
            "issue": "leak across splits",
            "distance": "0.0000",
            "method": "sha256",
            "path_a": "/d/train/a/1.png",
            "split_a": "train",
            "label_a": "a",
            "path_b": "/d/test/a/2.png",
            "split_b": "test",
            "label_b": "a",
        }
    ]
    with caplog.at_level(logging.WARNING, logger="imgclf.data.leaks"):
        warn_about_duplicates(duplicates)
        warn_about_duplicates([])
    assert len(caplog.records) == 1
    assert "1 duplicate image pair(s) across splits or labels (1 identical, 0 near-duplicates" in caplog.text
    assert "/d/train/a/1.png (train/a) = /d/test/a/2.png (test/a)" in caplog.text


# --- manifest file -------------------------------------------------------------------------------------------


def test_manifest_round_trips_through_csv(tmp_path):
    root = tmp_path / "dätä set"
    names = ["plain.png", "with space.png", "façade ñ 写真.png", 'comma, and "quotes".png']
    for name in names:
        write(root / "chat noir" / name, image_bytes())
        write(root / "Hund" / name, image_bytes())
    manifest = make_manifest(scan_folder(root), ratios=(0.5, 0.25, 0.25), seed=0)
    path = tmp_path / "run" / "manifest.csv"
    manifest.save(path)
    loaded = SplitManifest.load(path)
    assert loaded == manifest
    assert {r.path.name for r in loaded.rows} == set(names)
    assert all(r.path.is_file() for r in loaded.rows)
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == "path,label,split,sha256"
    assert "写真" in text
    assert len(read_csv(path)) == 8


def test_loading_a_missing_manifest_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"manifest not found: .*missing\.csv"):
        SplitManifest.load(tmp_path / "missing.csv")


def test_loading_a_manifest_with_wrong_columns_is_a_data_error(tmp_path):
    path = write(tmp_path / "manifest.csv", b"file,class\na.png,cat\n")
    with pytest.raises(
        DataError, match=r"manifest\.csv: expected columns path, label, split, sha256; received file, class"
    ):
        SplitManifest.load(path)


def test_manifest_counts_and_classes():
    manifest = SplitManifest(
        (
            row("t/a/1.png", "a", "train", "1"),
            row("t/b/2.png", "b", "train", "2"),
            row("v/a/3.png", "a", "val", "3"),
            row("s/c/4.png", "c", "test", "4"),  # not a class: the class list comes from train rows
        )
    )
    assert manifest.classes == ("a", "b")
    assert manifest_counts(manifest) == {"train": {"a": 1, "b": 1}, "val": {"a": 1}, "test": {"c": 1}}
    assert [r.path.as_posix() for r in manifest.split("val")] == ["v/a/3.png"]


# --- materialize_split ---------------------------------------------------------------------------------------


@pytest.fixture
def source_and_manifest(tmp_path) -> tuple[Path, SplitManifest]:
    root = make_folder(tmp_path / "source", {"": {"cat": 6, "dog": 5}})
    return root, make_manifest(scan_folder(root), ratios=(0.6, 0.2, 0.2), seed=0)


def expected_target(manifest: SplitManifest, target: Path) -> dict[Path, Path]:
    return {target / r.split / r.label / r.path.name: r.path for r in manifest.rows}


def test_materialize_with_hardlinks(tmp_path, source_and_manifest):
    source, manifest = source_and_manifest
    before = digests(source)
    target = tmp_path / "out"
    written = materialize_split(manifest, target, mode="hardlink")
    assert written == {split: sum(counter.values()) for split, counter in manifest.counts().items()}
    assert written == {"train": 7, "val": 2, "test": 2}
    pairs = expected_target(manifest, target)
    assert {p for p in target.rglob("*") if p.is_file()} == set(pairs)
    for destination, original in pairs.items():
        assert not destination.is_symlink()
        assert os.stat(destination).st_ino == os.stat(original).st_ino
        assert os.stat(original).st_nlink == 2  # the source file and its one link in the split
    assert digests(source) == before


def test_materialize_with_copies(tmp_path, source_and_manifest):
    source, manifest = source_and_manifest
    before = digests(source)
    target = tmp_path / "out"
    assert materialize_split(manifest, target, mode="copy") == {"train": 7, "val": 2, "test": 2}
    for destination, original in expected_target(manifest, target).items():
        assert not destination.is_symlink()
        assert os.stat(destination).st_ino != os.stat(original).st_ino
        assert os.stat(destination).st_nlink == os.stat(original).st_nlink == 1
        assert destination.read_bytes() == original.read_bytes()
    assert digests(source) == before


def test_materialize_with_symlinks(tmp_path, source_and_manifest):
    source, manifest = source_and_manifest
    before = digests(source)
    target = tmp_path / "out"
    assert materialize_split(manifest, target, mode="symlink") == {"train": 7, "val": 2, "test": 2}
    for destination, original in expected_target(manifest, target).items():
        assert destination.is_symlink()
        assert Path(os.readlink(destination)).is_absolute()
        assert destination.resolve() == original.resolve()
    assert digests(source) == before


def test_materialized_split_scans_back_to_the_same_split(tmp_path, source_and_manifest):
    _, manifest = source_and_manifest
    target = tmp_path / "out"
    materialize_split(manifest, target, mode="copy")
    rescanned = scan_folder(target)
    assert rescanned.layout == "split"
    assert manifest_counts(make_manifest(rescanned, ratios=RATIOS, seed=99)) == manifest_counts(manifest)


def test_materialize_into_an_existing_empty_folder(tmp_path, source_and_manifest):
    _, manifest = source_and_manifest
    target = tmp_path / "out"
    target.mkdir()
    assert materialize_split(manifest, target, mode="copy") == {"train": 7, "val": 2, "test": 2}


def test_materialize_renames_files_that_share_a_name(tmp_path):
    source = tmp_path / "source"
    first = write(source / "cat" / "2019" / "img.png", image_bytes())
    second = write(source / "cat" / "2020" / "img.png", image_bytes())
    manifest = SplitManifest(
        (ManifestRow(first, "cat", "train", "1"), ManifestRow(second, "cat", "train", "2")),
    )
    target = tmp_path / "out"
    assert materialize_split(manifest, target, mode="copy") == {"train": 2}
    assert sorted(p.name for p in (target / "train" / "cat").iterdir()) == ["img-1.png", "img.png"]
    assert (target / "train" / "cat" / "img.png").read_bytes() == first.read_bytes()
    assert (target / "train" / "cat" / "img-1.png").read_bytes() == second.read_bytes()


@pytest.mark.parametrize("mode", ["hardlink", "copy", "symlink"])
def test_materialize_refuses_a_non_empty_target_and_writes_nothing(tmp_path, source_and_manifest, mode):
    source, manifest = source_and_manifest
    before = digests(source)
    target = tmp_path / "out"
    write(target / "keep.txt", b"mine")
    with pytest.raises(DataError, match=r"target .*out exists and is not empty; choose a new folder \(nothing was"):
        materialize_split(manifest, target, mode=mode)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert (target / "keep.txt").read_bytes() == b"mine"
    assert digests(source) == before


def test_materialize_refuses_a_file_as_target(tmp_path, source_and_manifest):
    _, manifest = source_and_manifest
    target = write(tmp_path / "out", b"a file")
    with pytest.raises(DataError, match=r"exists and is not empty"):
        materialize_split(manifest, target)
    assert target.read_bytes() == b"a file"


@pytest.mark.parametrize("mode", ["hardlink", "copy"])
def test_materialize_failure_leaves_no_half_written_target(tmp_path, source_and_manifest, mode):
    _, manifest = source_and_manifest
    missing = ManifestRow(tmp_path / "gone.png", manifest.rows[0].label, "train", "0" * 64)
    broken = SplitManifest((*manifest.rows, missing))
    target = tmp_path / "out"
    with pytest.raises(DataError, match="nothing was written"):
        materialize_split(broken, target, mode=mode)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
