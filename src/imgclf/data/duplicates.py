"""Duplicates: identical files (same sha256) and near-duplicates (the same picture saved again: re-encoded, resized,
slightly cropped, brightened), found across a whole dataset, kept together by the split, and reported when they sit
in two splits already (a leak: the test score partly measures memory) or under two labels (a conflict): those pairs
are `data.leaks`' `duplicates.csv`.

Near-duplicates, in four steps:
1. Features, once per image (cached under the decoded-image cache's folder, keyed by the same fingerprint of the
   files): a 64-bit perceptual hash (imagehash's pHash) and a 32x32 grayscale thumbnail.
2. Candidates: each image's `NEIGHBOURS` nearest images by the correlation of 8x8 thumbnails (cheap, and tolerant
   of small crops), and those within `PHASH_DISTANCE` bits of its pHash (multi-index hashing: linear in images).
3. Similarity: the correlation of the two 32x32 thumbnails (each made zero-mean and unit-norm, so brightness and
   contrast changes drop out); for images of `ALIGN_MIN_SIDE` px and more, also after aligning one thumbnail onto the
   other over `CROP_BOXES` (crops of up to 8 % of a side, from either end or both), the better of the two.
4. Decision: a pair is a near-duplicate when its similarity reaches `SAME`, or reaches `FLOOR` and the pair is at
   least 1 / `DENSITY_RATIO` times closer than either image is to its `DENSITY_RANK`-th nearest candidate (for
   images with some detail: `DENSITY_MIN_SIDE` px and `DETAIL_MIN` DCT coefficients, see `structure`). The
   second rule adapts to the data: in Fashion-MNIST, where most T-shirts correlate 0.97+ with some other T-shirt,
   only a pair far closer than its neighbours counts; among photos, whose neighbours correlate ~0.5, an aligned
   crop at 0.92 does.

Measured (benchmarks/near_duplicates.py, docs/benchmarks.md): the thresholds come from Fashion-MNIST's official
train/test split (few true copies) and from real photos with copies made on purpose. Images of 28 px carry too little
to tell a 90 % resize or a cropped copy from another garment of the same kind; re-encoded and brightened copies are
found there.

Clusters are the connected components of exact and near pairs (scipy's `connected_components`): `data.split` keeps a
cluster (with any `data.groups` group it touches) in one split. User files are only read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imgclf.data.images import load_image
from imgclf.data.parallel import map_indices
from imgclf.errors import ImageError
from imgclf.progress import NO_PROGRESS, Progress

if TYPE_CHECKING:
    pass

__all__ = [
    "ImageFeatures",
    "NearDuplicates",
    "NearPair",
    "aligned_similarity",
    "clusters",
    "find_near_duplicates",
    "image_features",
    "near_pairs",
    "structure",
    "units",
]

log = logging.getLogger(__name__)

FEATURES_VERSION = 2  # part of the cache key: a change of the features or the rules below builds a new entry
THUMB = 32  # px, the thumbnail side that similarities are measured on
COARSE = 8  # px, the candidate thumbnails (block means of the 32 px ones)
NEIGHBOURS = 8  # candidates per image by coarse correlation
PHASH_DISTANCE = 10  # pHash candidates differ in at most this many of 64 bits
ALIGN_MIN_SIDE = 48  # px: smaller images are compared as they are (a few pixels of crop is most of them)
ALIGN_CANDIDATES = 4  # an image's nearest coarse candidates (its other copies may come first) compared aligned...
ALIGN_COARSE = 0.5  # ... when their coarse correlation reaches this (a 3 % crop of a texture falls to ~0.83)
SAME = 0.995  # a correlation that makes two thumbnails copies whatever else is near
FLOOR = 0.90  # the least similarity of a near-duplicate
DENSITY_RATIO = 0.1  # its distance (1 - similarity) at most this fraction of ...
DENSITY_RANK = 5  # ... either image's distance to its 5th nearest candidate below SAME (4 copies still pass)
DENSITY_MIN_SIDE = 16  # px: two 8x8 digits correlating 0.98 are two writers' 1s, not a copy (SAME alone decides)
DETAIL_MIN = 5  # DCT coefficients: a thumbnail with 90 % of its energy in fewer (one edge, a gradient) is like every
# other such patch, and only SAME decides (lfw_subset's non-face patches: two step edges correlate 0.98; faces hold 29+)
# Crop boxes per axis as (start, end) fractions: none, 3 % and 6 % off both ends, 3 % and 6 % off either end.
AXIS_BOXES = ((0.0, 1.0), (0.03, 0.97), (0.06, 0.94), (0.03, 1.0), (0.0, 0.97), (0.06, 1.0), (0.0, 0.94))
CROP_BOXES = len(AXIS_BOXES) ** 2  # every x box with every y box, each way round


@dataclass(frozen=True)
class ImageFeatures:
    """Per-image features of `image_features`: rows in the order of the paths given."""

    phash: np.ndarray  # uint64 [N]
    thumbs: np.ndarray  # uint8 [N, THUMB, THUMB], grayscale
    readable: np.ndarray  # bool [N]: False for a file that could not be decoded any more


@dataclass(frozen=True)
class NearPair:
    """Two images (rows of the features) that are near-duplicates, how similar, and what found them."""

    a: int
    b: int
    similarity: float
    method: str  # phash | thumbnail | aligned (the thumbnails matched only once one was aligned onto the other)


METHODS = ("phash", "thumbnail", "aligned")


@dataclass(frozen=True)
class NearDuplicates:
    """What `find_near_duplicates` found: the pairs, by path, and whether the features were computed now."""

    pairs: tuple[tuple[Path, Path, float, str], ...]  # (path, path, similarity, method)
    built: bool = False


def find_near_duplicates(
    paths: Sequence[Path],
    sha256: Sequence[str],
    sides: Sequence[int],
    *,
    max_pixels: int,
    cache_dir: Path | None = None,
    progress: Progress = NO_PROGRESS,
) -> NearDuplicates:
    """Near-duplicate pairs among these images (identical files are `find_duplicates`' business, not repeated here).

    The features and the pairs are cached by a fingerprint of the files (path, size, mtime, sha256) and of the rules,
    beside the decoded-image caches: a second call on the same files reads them back.

    Args:
        paths: the images.
        sha256: their content hashes (from the scan).
        sides: their shorter sides in px (from the scan): small images are compared unaligned.
        max_pixels: the decoder's pixel limit.
        cache_dir: the cache folder; default `data.cache.default_cache_dir()`.
        progress: reporter for the feature pass.

    Returns:
        The pairs as (path, path, similarity, method).

    Example:
        >>> import hashlib
        >>> from PIL import Image
        >>> Image.open("photo.jpg").resize((120, 120)).save("photo copy.jpg", quality=70)
        >>> paths = [Path("photo.jpg"), Path("photo copy.jpg"), Path("cat.jpg")]
        >>> hashes = [hashlib.sha256(path.read_bytes()).hexdigest() for path in paths]
        >>> find_near_duplicates(paths, hashes, [128, 120, 100], max_pixels=50_000_000).pairs
        ((PosixPath('photo.jpg'), PosixPath('photo copy.jpg'), 0.9..., '...'),)
    """
    from imgclf.data.cache import _common_folder, cached_arrays, content_key

    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        return NearDuplicates(())
    settings = ["near-duplicates", FEATURES_VERSION, THUMB, SAME, FLOOR, DENSITY_RATIO, DENSITY_RANK, list(sides)]
    key = content_key(paths, sha256, settings)

    def build() -> dict[str, np.ndarray]:
        features = image_features(paths, max_pixels=max_pixels, progress=progress)
        pairs = near_pairs(features, np.asarray(sides))
        return {
            "phash": features.phash,
            "thumbs": features.thumbs,
            "pair_a": np.array([p.a for p in pairs], dtype=np.int64),
            "pair_b": np.array([p.b for p in pairs], dtype=np.int64),
            "similarity": np.array([p.similarity for p in pairs], dtype=np.float64),
            "method": np.array([METHODS.index(p.method) for p in pairs], dtype=np.int8),
        }

    arrays, built = cached_arrays(
        "near-duplicate features", key, build, cache_dir=cache_dir, source=_common_folder(paths)
    )
    found = tuple(
        (paths[a], paths[b], float(similarity), METHODS[method])
        for a, b, similarity, method in zip(arrays["pair_a"], arrays["pair_b"], arrays["similarity"], arrays["method"])
    )
    return NearDuplicates(found, built)


def image_features(paths: Sequence[Path], *, max_pixels: int, progress: Progress = NO_PROGRESS) -> ImageFeatures:
    """Decode each image (the safe decoder, grayscale) once into its pHash and its 32x32 thumbnail, on every core."""
    compute = partial(_features_of, paths, max_pixels=max_pixels)
    phash = np.zeros(len(paths), dtype=np.uint64)
    thumbs = np.zeros((len(paths), THUMB, THUMB), dtype=np.uint8)
    readable = np.zeros(len(paths), dtype=bool)
    with progress.task("Looking for near-duplicates", total=len(paths)) as task:
        for index, outcome in enumerate(map_indices(compute, len(paths))):
            task.advance()
            if outcome is not None:
                phash[index], thumbs[index] = outcome
                readable[index] = True
    return ImageFeatures(phash, thumbs, readable)


def _features_of(paths: Sequence[Path], index: int, *, max_pixels: int) -> tuple[int, np.ndarray] | None:
    import imagehash
    from PIL import Image

    try:
        image = load_image(paths[index], color="gray", max_pixels=max_pixels)
    except (ImageError, OSError):  # changed since the scan: no features, no pairs
        return None
    # Area-averaging down (Pillow's bilinear is antialiased), pixel replication up: upscaling an 8x8 digit must not
    # smooth it into looking like its neighbours.
    width, height = image.size
    resample = Image.BILINEAR if min(width, height) >= THUMB else Image.BOX
    thumb = np.asarray(image.resize((THUMB, THUMB), resample), dtype=np.uint8)
    return int(str(imagehash.phash(image)), 16), thumb


def near_pairs(features: ImageFeatures, sides: np.ndarray) -> list[NearPair]:
    """The near-duplicate pairs (a < b) among the features' rows: candidates, similarity, decision (module docstring).

    Args:
        features: from `image_features`.
        sides: each image's shorter side in px.
    """
    readable = np.flatnonzero(features.readable)
    if len(readable) < 2:
        return []
    thumbs = features.thumbs[readable].astype(np.float32)
    fine = _unit_rows(thumbs.reshape(len(readable), -1))
    block = THUMB // COARSE
    coarse = _unit_rows(
        thumbs.reshape(len(readable), COARSE, block, COARSE, block).mean(axis=(2, 4)).reshape(len(readable), -1)
    )
    # 2. candidates: nearest by coarse correlation, and by pHash
    n = len(readable)
    near_idx, near_sim = _nearest(coarse, NEIGHBOURS)
    hash_a, hash_b = _hash_pairs(features.phash[readable])
    pairs, method = _unique_pairs(
        np.concatenate([hash_a, np.repeat(np.arange(n), near_idx.shape[1])]),
        np.concatenate([hash_b, near_idx.ravel()]),
        np.concatenate(
            [np.full(len(hash_a), METHODS.index("phash")), np.full(near_idx.size, METHODS.index("thumbnail"))]
        ),
        n,
    )
    if not len(pairs):
        return []
    # 3. similarity: plain, and aligned for large images whose coarse views already match
    similarity = np.einsum("pk,pk->p", fine[pairs[:, 0]], fine[pairs[:, 1]])
    sides = np.asarray(sides)[readable]
    large = sides >= ALIGN_MIN_SIDE
    closest = near_idx[:, :ALIGN_CANDIDATES]
    wanted = (near_sim[:, :ALIGN_CANDIDATES] >= ALIGN_COARSE) & large[:, None] & large[closest]
    rows = np.nonzero(wanted)[0]
    align_keys = np.minimum(rows, closest[wanted]) * n + np.maximum(rows, closest[wanted])
    todo = np.flatnonzero(np.isin(pairs[:, 0] * n + pairs[:, 1], align_keys) & (similarity < SAME))
    if len(todo):
        registered = aligned_similarity(thumbs[pairs[todo, 0]], thumbs[pairs[todo, 1]])
        better = todo[registered > similarity[todo]]
        similarity[better] = registered[registered > similarity[todo]]
        method[better] = METHODS.index("aligned")
    # 4. decision: near-certain copies, or pairs far closer than their neighbours
    scale = _neighbour_distance(n, pairs, similarity)
    local = np.minimum(scale[pairs[:, 0]], scale[pairs[:, 1]])
    detail = structure(thumbs)
    detailed = (np.minimum(sides[pairs[:, 0]], sides[pairs[:, 1]]) >= DENSITY_MIN_SIDE) & (
        np.minimum(detail[pairs[:, 0]], detail[pairs[:, 1]]) >= DETAIL_MIN
    )
    close = (similarity >= FLOOR) & (1.0 - similarity <= DENSITY_RATIO * local) & detailed
    keep = (similarity >= SAME) | close
    return [
        NearPair(int(readable[a]), int(readable[b]), round(float(s), 6), METHODS[m])
        for (a, b), s, m in zip(pairs[keep].tolist(), similarity[keep], method[keep])
    ]


def structure(thumbs: np.ndarray, energy: float = 0.9) -> np.ndarray:
    """How many 2-D DCT coefficients of each zero-mean thumbnail [N, 32, 32] hold `energy` of its variance: ~2-4
    for a single edge or a gradient, 30+ for a face or a textured photo."""
    from scipy.fft import dctn

    power = dctn(thumbs - thumbs.mean(axis=(1, 2), keepdims=True), axes=(1, 2), norm="ortho") ** 2
    power = -np.sort(-power.reshape(len(thumbs), -1), axis=1)
    share = np.cumsum(power, axis=1) / np.maximum(power.sum(axis=1, keepdims=True), 1e-9)
    return (share < energy).sum(axis=1) + 1


def _unique_pairs(first: np.ndarray, second: np.ndarray, method: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs as sorted (a < b) unique rows [P, 2], each with the method that proposed it first in
    METHODS' order (a pair both hashes and thumbnails propose is a pHash pair)."""
    low, high = np.minimum(first, second), np.maximum(first, second)
    key = low * n + high
    order = np.lexsort((method, key))
    keep = order[np.r_[True, key[order][1:] != key[order][:-1]]] if len(order) else order
    return np.stack([low[keep], high[keep]], axis=1), method[keep].copy()


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows made zero-mean and unit-norm (a flat image stays all zeros: it correlates with nothing)."""
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 1e-3 * x.shape[1] ** 0.5)


def _nearest(vectors: np.ndarray, k: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k most correlated other rows (indices, correlations), best first: exact, chunked matrix products
    and top-k in torch (numpy's argpartition took 10x as long on 70,000 rows)."""
    import torch

    n = len(vectors)
    k = min(k, n - 1)
    matrix = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    indices = np.empty((n, k), dtype=np.int64)
    values = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, chunk):
        scores = matrix[start : start + chunk] @ matrix.T
        rows = torch.arange(len(scores))
        scores[rows, start + rows] = -float("inf")  # not its own neighbour
        top = scores.topk(k, dim=1)
        indices[start : start + chunk] = top.indices.numpy()
        values[start : start + chunk] = top.values.numpy()
    return indices, values


def _hash_pairs(hashes: np.ndarray, max_bucket: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Pairs whose 64-bit hashes differ in at most PHASH_DISTANCE bits, found by multi-index hashing (Norouzi et
    al.): two hashes that close agree on at least one of their four 16-bit quarters whenever they differ in at most
    3 bits, and mostly beyond. Quarters shared by more than `max_bucket` images (plain images all hash alike) are
    skipped: their pairs are the thumbnail candidates' business."""
    firsts, seconds = [], []
    for quarter in range(4):
        part = (hashes >> np.uint64(16 * quarter)) & np.uint64(0xFFFF)
        order = np.argsort(part, kind="stable")
        _, starts, counts = np.unique(part[order], return_index=True, return_counts=True)
        for start, count in zip(starts, counts):
            if 2 <= count <= max_bucket:
                members = order[start : start + count]
                a, b = np.triu_indices(count, 1)
                firsts.append(members[a])
                seconds.append(members[b])
    if not firsts:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    first, second = np.concatenate(firsts), np.concatenate(seconds)
    close = np.bitwise_count(hashes[first] ^ hashes[second]) <= PHASH_DISTANCE
    return first[close], second[close]


def _neighbour_distance(n: int, pairs: np.ndarray, similarity: np.ndarray) -> np.ndarray:
    """Each image's distance (1 - similarity) to its DENSITY_RANK-th nearest candidate that is not a near-certain
    copy (similarity below SAME: its copies do not make a crowd); 1 when it has fewer."""
    below = similarity < SAME
    image = np.concatenate([pairs[below, 0], pairs[below, 1]])
    values = np.concatenate([similarity[below], similarity[below]])
    order = np.lexsort((-values, image))
    image, values = image[order], values[order]
    starts = np.searchsorted(image, np.arange(n))
    counts = np.bincount(image, minlength=n)
    scale = np.ones(n)
    enough = counts >= DENSITY_RANK
    scale[enough] = 1.0 - values[starts[enough] + DENSITY_RANK - 1]
    return scale


def _axis_matrices(n: int = THUMB) -> np.ndarray:
    """[boxes, n, n] bilinear resampling matrices that stretch each AXIS_BOXES interval of a signal over n samples."""
    matrices = np.zeros((len(AXIS_BOXES), n, n), dtype=np.float32)
    for box, (start, end) in enumerate(AXIS_BOXES):
        for i in range(n):
            x = (start + (i + 0.5) / n * (end - start)) * n - 0.5
            low = int(np.floor(x))
            weight = x - low
            for j, w in ((low, 1.0 - weight), (low + 1, weight)):
                matrices[box, i, min(max(j, 0), n - 1)] += w
    return matrices


_AXIS = _axis_matrices()


def aligned_similarity(a: np.ndarray, b: np.ndarray, chunk: int = 512) -> np.ndarray:
    """The best correlation of each pair of thumbnails [P, 32, 32] when either is cropped by one of the CROP_BOXES
    and stretched back over the other: a copy cropped by a few pixels lines up again. Two large matrix products per
    direction (columns, then rows, for every box at once)."""
    out = np.empty(len(a), dtype=np.float32)
    boxes = len(AXIS_BOXES)
    columns = np.concatenate(list(_AXIS.transpose(0, 2, 1)), axis=1)  # [32, boxes*32]
    rows = np.concatenate(list(_AXIS), axis=0)  # [boxes*32, 32]
    for start in range(0, len(a), chunk):
        pair_a, pair_b = a[start : start + chunk], b[start : start + chunk]
        count = len(pair_a)
        best = np.full(count, -1.0, dtype=np.float32)
        for source, reference in ((pair_a, pair_b), (pair_b, pair_a)):
            cropped = (source.reshape(count * THUMB, THUMB) @ columns).reshape(count, THUMB, boxes, THUMB)
            cropped = np.einsum("yi,pixk->pyxk", rows, cropped)  # [P, boxes*32 (y), boxes (x), 32]
            cropped = cropped.reshape(count, boxes, THUMB, boxes, THUMB).transpose(0, 1, 3, 2, 4)
            warped = cropped.reshape(count, boxes * boxes, THUMB * THUMB)
            ref = _unit_rows(reference.reshape(count, -1))
            numerator = np.einsum("pwk,pk->pw", warped, ref)
            mean = warped.mean(axis=2)
            spread = np.sqrt(np.maximum((warped * warped).sum(axis=2) - THUMB * THUMB * mean * mean, 1e-12))
            best = np.maximum(best, (numerator / spread).max(axis=1))
        out[start : start + chunk] = best
    return out


def clusters(count: int, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """Component labels [count] of the graph whose edges are `pairs` (union-find by scipy)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not pairs:
        return np.arange(count)
    edges = np.asarray(pairs, dtype=np.int64)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(count, count))
    return connected_components(graph, directed=False)[1]


def units(
    paths: Sequence[Path],
    sha256: Sequence[str],
    near: Sequence[tuple[Path, Path, float, str]] = (),
    groups: Mapping[Path, str] | None = None,
) -> np.ndarray:
    """The split units of these images [N]: identical files, near-duplicates and images of one group (`data.groups`)
    are joined, transitively, into one unit that a split keeps together."""
    index = {Path(p): i for i, p in enumerate(paths)}
    edges: list[tuple[int, int]] = []
    for key_of in (lambda i: ("sha", sha256[i]), lambda i: ("group", (groups or {}).get(Path(paths[i])))):
        first: dict[object, int] = {}
        for i in range(len(paths)):
            key = key_of(i)
            if key[1] is None:
                continue
            edges.append((first.setdefault(key, i), i))
    edges += [(index[Path(a)], index[Path(b)]) for a, b, _, _ in near if Path(a) in index and Path(b) in index]
    return clusters(len(paths), [(a, b) for a, b in edges if a != b])
