"""Near-duplicates, groups and exclusions on real images (scikit-image photos, scikit-learn digits, Fashion-MNIST,
lfw_subset): copies are found and reported across splits, a split made by imgclf keeps them (and groups) together,
distinct images are left alone, and excluded files stay out of a run."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import copies_of, photo_tiles, run_cli, write_digits, write_fashion_mnist
from imgclf.data.duplicates import find_near_duplicates, units
from imgclf.data.scan import scan_folder
from imgclf.data.split import SplitManifest, scan_and_split
from imgclf.files import read_csv


def save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def near_pairs_of(folder: Path) -> list[tuple[Path, Path, float, str]]:
    index = scan_folder(folder, labelled_only=True)
    return list(
        find_near_duplicates(
            [r.path for r in index.records],
            [r.sha256 for r in index.records],
            [min(r.width, r.height) for r in index.records],
            max_pixels=10**8,
        ).pairs
    )


@pytest.fixture(scope="module")
def tiles() -> list[Image.Image]:
    return photo_tiles(40)


def test_copies_in_the_test_split_are_reported_as_near_duplicate_leaks(tmp_path, tiles):
    root = tmp_path / "data"
    originals = {}
    for index, tile in enumerate(tiles[:24]):
        label = "ab"[index % 2]
        originals[index] = save(tile, root / "train" / label / f"photo{index:02d}.png")
    for index, tile in enumerate(tiles[24:32]):
        save(tile, root / "val" / "ab"[index % 2] / f"other{index:02d}.png")
    planted = {}  # copy path -> its original
    for index in range(0, 12):
        for kind, copy in copies_of(tiles[index]).items():
            path = save(copy, root / "test" / "ab"[index % 2] / f"photo{index:02d}-{kind}.jpg")
            planted[str(path)] = str(originals[index])
    for index, tile in enumerate(tiles[32:40]):
        save(tile, root / "test" / "ab"[index % 2] / f"distinct{index:02d}.png")

    result = run_cli("inspect", root, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "out" / "duplicates.csv")
    found = {}
    for row in rows:
        assert row["kind"] == "near" and row["issue"] == "leak across splits", row
        assert float(row["distance"]) < 0.1 and row["method"] in ("phash", "thumbnail", "aligned")
        pair = {row["path_a"], row["path_b"]}
        copy = next(path for path in pair if path in planted)  # no pair joins two different photos
        assert pair == {copy, planted[copy]}, row
        found[copy] = row
    assert set(found) == set(planted), f"missed: {sorted(set(planted) - set(found))}"
    assert any(
        row["method"] == "aligned"
        for row in found.values()
        if row["path_a"].endswith("cropped.jpg") or row["path_b"].endswith("cropped.jpg")
    )
    summary = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert summary["duplicates"]["near_leaks_across_splits"] == 36
    assert summary["duplicates"]["leaks_across_splits"] == 0
    assert "36 near-duplicates" in " ".join(result.output.split())
    warnings = [row["reason"] for row in read_csv(tmp_path / "out" / "problems.csv") if row["severity"] == "warning"]
    assert any("36 near-duplicate pair(s)" in reason for reason in warnings)


def test_a_split_made_by_imgclf_keeps_every_copy_with_its_original(tmp_path, tiles):
    source = tmp_path / "photos"
    for index, tile in enumerate(tiles[:30]):
        label = "abc"[index % 3]
        save(tile, source / label / f"photo{index:02d}.png")
        if index < 15:
            for kind, copy in copies_of(tile).items():
                save(copy, source / label / f"photo{index:02d}-{kind}.jpg")
    result = run_cli("split", source, tmp_path / "split", "--ratios", "0.6", "0.2", "0.2", "--copy")
    assert result.exit_code == 0, result.output
    assert "90 near-duplicate pair(s) kept in one split each" in result.output  # 15 photos x 4 images: 6 pairs each
    where = {path.name: path.parts[-3] for path in (tmp_path / "split").rglob("*.*")}
    for index in range(15):
        splits = {
            where[f"photo{index:02d}{suffix}"] for suffix in (".png", "-resized.jpg", "-jpeg.jpg", "-cropped.jpg")
        }
        assert len(splits) == 1, (index, splits)
    assert set(where.values()) == {"train", "val", "test"}
    # train's automatic split is the same function: its manifest keeps them together too
    manifest = scan_and_split(source, ratios=(0.6, 0.2, 0.2), seed=0, max_pixels=10**8).manifest
    by_name = {row.path.name: row.split for row in manifest.rows}
    assert all(by_name[f"photo00{suffix}"] == by_name["photo00.png"] for suffix in ("-jpeg.jpg", "-cropped.jpg"))
    alone = scan_and_split(source, ratios=(0.6, 0.2, 0.2), seed=0, max_pixels=10**8, near_duplicates=False)
    assert alone.near == ()  # data.near_duplicates: false splits by identical files only


def test_distinct_digits_and_faces_are_not_near_duplicates_but_their_re_encoded_copies_are(tmp_path):
    from skimage.data import lfw_subset
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for index, image in enumerate(pixels):
        save(Image.fromarray(image), tmp_path / "digits" / str(digits.target[index]) / f"{index:04d}.png")
    assert near_pairs_of(tmp_path / "digits") == []  # 1,797 8x8 digits: distinct writers' 1s are not copies

    faces = np.rint(lfw_subset()[:100] * 255).astype(np.uint8)  # the subset's first 100 images are faces
    for index, face in enumerate(faces):
        save(Image.fromarray(face), tmp_path / "faces" / "face" / f"{index:03d}.png")
    assert near_pairs_of(tmp_path / "faces") == []
    for index in range(10):
        buffer = io.BytesIO()
        Image.fromarray(faces[index]).save(buffer, "JPEG", quality=70)
        (tmp_path / "faces" / "face" / f"{index:03d}-copy.jpg").write_bytes(buffer.getvalue())
    found = {frozenset((a.name, b.name)) for a, b, _, _ in near_pairs_of(tmp_path / "faces")}
    assert found == {frozenset((f"{i:03d}.png", f"{i:03d}-copy.jpg")) for i in range(10)}


def test_fashion_mnist_near_duplicates_are_rare_and_re_encoded_copies_are_found(tmp_path):
    root = write_fashion_mnist(tmp_path / "fm", train=100, val=0, test=30)
    natural = [pair for pair in near_pairs_of(root) if pair[0].parts[-3] != pair[1].parts[-3]]
    assert len(natural) <= 2  # 0.5 % of test images have one in the whole set (benchmarks/near_duplicates.py)
    tests = sorted((root / "test").rglob("*.png"))[::15]  # 20 test images, re-encoded into train under their class
    for path in tests:
        buffer = io.BytesIO()
        Image.open(path).save(buffer, "JPEG", quality=70)
        (root / "train" / path.parent.name / f"copy-{path.stem}.jpg").write_bytes(buffer.getvalue())
    found = {frozenset((a.name, b.name)) for a, b, _, _ in near_pairs_of(root)}
    missed = [path.name for path in tests if frozenset((path.name, f"copy-{path.stem}.jpg")) not in found]
    assert len(missed) <= 1, missed


def test_near_duplicate_features_are_cached_by_the_files_fingerprint(tmp_path, tiles):
    for index, tile in enumerate(tiles[:6]):
        save(tile, tmp_path / "d" / "a" / f"{index}.png")
    save(copies_of(tiles[0])["jpeg"], tmp_path / "d" / "a" / "0-copy.jpg")
    index = scan_folder(tmp_path / "d", labelled_only=True)
    arguments = ([r.path for r in index.records], [r.sha256 for r in index.records], [128] * len(index.records))
    first = find_near_duplicates(*arguments, max_pixels=10**8, cache_dir=tmp_path / "cache")
    again = find_near_duplicates(*arguments, max_pixels=10**8, cache_dir=tmp_path / "cache")
    assert first.built and not again.built and first.pairs == again.pairs and len(first.pairs) == 1
    listed = run_cli("cache", "list", "--cache-dir", tmp_path / "cache")
    assert "near-duplicate features" in listed.output


def test_groups_keep_each_patient_in_one_split_even_across_classes(tmp_path):
    digits = write_digits(tmp_path / "digits", classes=(0, 1, 2), per_class=30)
    source = tmp_path / "scans"
    for rank, path in enumerate(sorted(digits.rglob("*.png"))):
        patient = rank // 3 if rank % 9 else (rank + 30) // 3  # most patients in one class, some in two
        target = source / path.parent.name / f"patient{patient:02d}_{rank}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    result = run_cli("split", source, tmp_path / "split", "--groups", r"(?P<group>patient\d+)", "--copy")
    assert result.exit_code == 0, result.output
    splits: dict[str, set[str]] = {}
    for path in (tmp_path / "split").rglob("*.png"):
        splits.setdefault(path.name.split("_")[0], set()).add(path.parts[-3])
    assert all(len(found) == 1 for found in splits.values()), splits
    assert {split for found in splits.values() for split in found} == {"train", "val", "test"}

    csv_file = tmp_path / "groups.csv"
    lines = ["path,group"] + [
        f"{p.relative_to(source).as_posix()},{p.name.split('_')[0]}" for p in source.rglob("*.png")
    ]
    csv_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    by_csv = scan_and_split(source, ratios=(0.8, 0.1, 0.1), seed=0, max_pixels=10**8, groups_csv=csv_file)
    by_regex = scan_and_split(source, ratios=(0.8, 0.1, 0.1), seed=0, max_pixels=10**8, groups=r"patient\d+")
    assert by_csv.manifest == by_regex.manifest and len(set(by_csv.groups.values())) == 33

    bad = run_cli("split", source, tmp_path / "other", "--groups", "(?P<group>patient")
    assert bad.exit_code == 2 and "data.groups: must be a regular expression" in " ".join(bad.output.split())


def test_inspect_lists_groups_that_span_splits_made_by_hand(tmp_path):
    root = write_digits(tmp_path / "data", layout="split")
    for path in list((root / "test" / "digit1").glob("*.png"))[:2]:
        path.rename(path.with_name(f"patient07_{path.name}"))
    (root / "train" / "digit1" / sorted(p.name for p in (root / "train" / "digit1").iterdir())[0]).rename(
        root / "train" / "digit1" / "patient07_first.png"
    )
    result = run_cli("inspect", root, "--out", tmp_path / "out", "--groups", r"patient\d+")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert summary["groups"]["spanning_splits"] == [{"group": "patient07", "splits": {"train": 1, "test": 2}}]
    assert "spanning splits: 1" in result.output
    warnings = [row["reason"] for row in read_csv(tmp_path / "out" / "problems.csv") if row["severity"] == "warning"]
    assert any("patient07 (train 1, test 2)" in reason for reason in warnings)


def test_units_join_identical_near_and_grouped_images():
    paths = [Path(f"/d/{name}.png") for name in "abcdef"]
    labels = units(
        paths,
        ["x", "x", "y", "z", "w", "v"],
        near=[(paths[2], paths[3], 0.99, "thumbnail")],
        groups={paths[3]: "p1", paths[4]: "p1"},
    )
    assert labels[0] == labels[1] and labels[2] == labels[3] == labels[4] and len(set(labels.tolist())) == 3


@pytest.mark.slow
def test_train_leaves_out_the_excluded_images_and_records_them(tmp_path, digits_flat):
    dropped = sorted((digits_flat / "digit1").glob("*.png"))[:2]
    listed = tmp_path / "drop.csv"
    listed.write_text("rank,path,given\n" + "".join(f"{i},{p},digit1\n" for i, p in enumerate(dropped)), "utf-8")
    plain = tmp_path / "drop.txt"
    plain.write_text(f"# drop these\n{dropped[0].relative_to(digits_flat)}\n", encoding="utf-8")
    flags = ["--set", "data.img_size=16", "--set", "model.width=8", "--epochs", "1", "--out", tmp_path]
    result = run_cli("train", digits_flat, *flags, "--name", "r", "--exclude", listed, "--no-report")
    assert result.exit_code == 0, result.output
    manifest = SplitManifest.load(tmp_path / "r" / "manifest.csv")
    assert len(manifest.rows) == 88 and not {row.path for row in manifest.rows} & set(dropped)
    problems = {row["path"]: row["reason"] for row in read_csv(tmp_path / "r" / "problems.csv")}
    assert all(problems[str(path)] == f"excluded: listed in {listed}" for path in dropped)
    assert f"exclude: {listed}" in (tmp_path / "r" / "config.yaml").read_text()
    from imgclf.data.split import scan_and_split as split_again

    by_text = split_again(digits_flat, ratios=(0.8, 0.1, 0.1), seed=0, max_pixels=10**8, exclude=plain)
    assert len(by_text.manifest.rows) == 89
    missing = run_cli("train", digits_flat, *flags, "--name", "m", "--exclude", tmp_path / "nope.csv")
    assert missing.exit_code == 1 and "exclude list not found" in missing.output
