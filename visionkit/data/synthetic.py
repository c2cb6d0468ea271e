"""Deterministic writers of tiny "shapes" datasets in the real on-disk formats (COCO 2017, ADE20K, image folders).

Every writer draws from ``numpy.random.default_rng([seed, kind, split, index])``, so one image depends only on the
seed and its position: the same seed writes byte-identical files, and changing ``num_val`` leaves the train split as
it was. The files are read unchanged by :class:`~visionkit.data.coco.COCODataset`,
:class:`~visionkit.data.ade20k.ADE20KDataset` and :class:`~visionkit.data.image_folder.ImageFolderClassification`.

Scenes: a noisy background with 1–4 solid or striped shapes (circle, square, triangle; 20–60 px across) painted in
z-order, so a later shape occludes an earlier one and every stored mask is the *visible* part. The first four
images of every detection/segmentation split are special scenes, in this order:

0. two touching axis-aligned squares (same class, disjoint masks that share an edge);
1. two overlapping circles (same class; the later one occludes the earlier one);
2. a crowd region (a cluster of small circles, one ``iscrowd=1`` annotation) plus one or two ordinary shapes;
3. an empty image (background only, no annotation).

COCO specifics: category ids have gaps (circle 1, square 3, triangle 7); a fully visible square or triangle is stored
as a polygon, a circle or any occluded shape as compressed RLE, the crowd as uncompressed RLE; ``area`` is the visible
mask's pixel count and ``bbox`` its tight box. Image ids start at 1 (train) and 1_000_001 (val); annotation ids at 1.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

__all__ = [
    "DEMO_KINDS",
    "DEMO_SIZES",
    "MANIFEST_NAME",
    "SHAPE_CATEGORIES",
    "SHAPE_CLASS_NAMES",
    "write_demo_data",
    "write_shapes_ade20k",
    "write_shapes_classification",
    "write_shapes_coco",
]

SHAPE_CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle")
# Deliberate gaps, like COCO's 1..90 ids for 80 classes.
SHAPE_CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
)
DEMO_KINDS: tuple[str, ...] = ("coco", "ade20k", "classification", "pretraining")
# (train, val) images for coco/ade20k; (train, val) images *per class* for classification. The COCO set is sized for
# the quickstart (configs/quickstart.yaml): a Mask R-CNN trained from scratch for a few CPU minutes generalises far
# better from 384 distinct images seen a few times than from 96 seen many times (segm AP50 ~0.5 vs ~0.35 on val).
# "pretraining" (visionkit.data.synthetic_corpus): (images per dataset, number of datasets).
DEMO_SIZES: dict[str, tuple[int, int]] = {
    "coco": (384, 24), "ade20k": (64, 16), "classification": (120, 30), "pretraining": (96, 2)
}  # fmt: skip
MANIFEST_NAME = "visionkit_manifest.json"
_MANIFEST_VERSION = 1
_KIND_CODES = {"coco": 0, "ade20k": 1, "classification": 2}
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_SPECIAL_SCENES = ("touching", "overlap", "crowd", "empty")
_COCO_VAL_ID_OFFSET = 1_000_000
_CIRCLE, _SQUARE, _TRIANGLE = 0, 1, 2


@dataclass
class _Instance:
    class_index: int
    full_mask: np.ndarray  # bool (H, W): the whole shape, before occlusion
    polygon: list[float] | None  # the stored polygon (x1, y1, x2, y2, ...) for squares and triangles
    iscrowd: bool = False
    visible_mask: np.ndarray | None = None  # bool (H, W): what is left after later shapes are painted


# ----------------------------------------------------------------------------------------------------------------
# Shape geometry and rendering
# ----------------------------------------------------------------------------------------------------------------


def _polygon_mask(coords: list[float], height: int, width: int) -> np.ndarray:
    # Rasterise with pycocotools, the same rasteriser that reads the stored polygon back, so they agree exactly.
    rles = mask_util.frPyObjects([coords], height, width)
    with warnings.catch_warnings():
        # pycocotools' Cython decode trips NumPy 2's "__array__ ... copy keyword" DeprecationWarning; harmless.
        warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
        return mask_util.decode(rles)[:, :, 0].astype(bool)


def _disk_mask(cx: float, cy: float, radius: float, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= radius**2


def _regular_polygon(cx: float, cy: float, circumradius: float, sides: int, angle: float) -> list[float]:
    thetas = angle + 2.0 * np.pi * np.arange(sides) / sides
    points = np.stack([cx + circumradius * np.cos(thetas), cy + circumradius * np.sin(thetas)], axis=1)
    # Rounded so that the JSON holds exactly the coordinates the mask was rasterised from.
    return [round(float(v), 2) for v in points.reshape(-1)]


def _random_shape(rng: np.random.Generator, height: int, width: int, class_index: int, size: float) -> _Instance:
    """One shape of ``size`` px across, fully inside the image with a 2 px margin."""
    half = size / 2.0
    cx = rng.uniform(half + 2.0, width - half - 2.0)
    cy = rng.uniform(half + 2.0, height - half - 2.0)
    if class_index == _CIRCLE:
        return _Instance(_CIRCLE, _disk_mask(cx, cy, half, height, width), None)
    if class_index == _SQUARE:
        # A square of side `size` rotated by up to 45 degrees still fits in a circle of radius size/sqrt(2);
        # shrink it so that it stays inside the box the centre was drawn for.
        side = size / np.sqrt(2.0)
        coords = _regular_polygon(cx, cy, side / np.sqrt(2.0), 4, rng.uniform(0.0, np.pi / 2))
    else:
        coords = _regular_polygon(cx, cy, half, 3, rng.uniform(0.0, 2.0 * np.pi))
    return _Instance(class_index, _polygon_mask(coords, height, width), coords)


def _axis_aligned_square(x0: int, y0: int, side: int, height: int, width: int) -> _Instance:
    coords = [float(v) for v in (x0, y0, x0 + side, y0, x0 + side, y0 + side, x0, y0 + side)]
    return _Instance(_SQUARE, _polygon_mask(coords, height, width), coords)


def _resolve_visibility(instances: list[_Instance]) -> None:
    """Set each instance's visible mask: its full mask minus everything painted after it."""
    if not instances:
        return
    covered = np.zeros_like(instances[0].full_mask)
    for instance in reversed(instances):
        instance.visible_mask = instance.full_mask & ~covered
        covered |= instance.full_mask


def _placement_ok(instances: list[_Instance], min_visible_fraction: float = 0.55, min_pixels: int = 80) -> bool:
    _resolve_visibility(instances)
    for instance in instances:
        visible = int(instance.visible_mask.sum())
        if visible < min_pixels or visible < min_visible_fraction * int(instance.full_mask.sum()):
            return False
    return True


def _add_random_shapes(
    rng: np.random.Generator, instances: list[_Instance], count: int, height: int, width: int, avoid: np.ndarray | None
) -> None:
    max_size = min(60.0, 0.45 * min(height, width))
    for _ in range(count):
        class_index = int(rng.integers(0, len(SHAPE_CLASS_NAMES)))
        size = rng.uniform(20.0, max_size)
        for _attempt in range(30):
            candidate = _random_shape(rng, height, width, class_index, size)
            if avoid is not None and (candidate.full_mask & avoid).any():
                continue
            if _placement_ok([*instances, candidate]):
                instances.append(candidate)
                break
    _resolve_visibility(instances)


def _scene_instances(rng: np.random.Generator, scene: str, height: int, width: int) -> list[_Instance]:
    instances: list[_Instance] = []
    if scene == "touching":
        side = int(rng.integers(18, min(32, (width - 8) // 2) + 1))
        x0 = int(rng.integers(4, width - 2 * side - 3))
        y0 = int(rng.integers(4, height - side - side // 2 - 3))
        y1 = y0 + int(rng.integers(0, side // 2 + 1))
        instances += [_axis_aligned_square(x0, y0, side, height, width)]
        instances += [_axis_aligned_square(x0 + side, y1, side, height, width)]
        _resolve_visibility(instances)
    elif scene == "overlap":
        for _attempt in range(50):
            r1, r2 = rng.uniform(12.0, 20.0, size=2)
            cx = rng.uniform(r1 + 2.0, width - r1 - 2.0)
            cy = rng.uniform(r1 + 2.0, height - r1 - 2.0)
            theta = rng.uniform(0.0, 2.0 * np.pi)
            distance = 0.75 * (r1 + r2)
            cx2, cy2 = cx + distance * np.cos(theta), cy + distance * np.sin(theta)
            if r2 + 2.0 <= cx2 <= width - r2 - 2.0 and r2 + 2.0 <= cy2 <= height - r2 - 2.0:
                break
        instances += [_Instance(_CIRCLE, _disk_mask(cx, cy, r1, height, width), None)]
        instances += [_Instance(_CIRCLE, _disk_mask(cx2, cy2, r2, height, width), None)]
        _resolve_visibility(instances)
    elif scene == "crowd":
        window = 36
        wx, wy = int(rng.integers(2, width - window - 2)), int(rng.integers(2, height - window - 2))
        crowd = np.zeros((height, width), dtype=bool)
        for _ in range(int(rng.integers(8, 13))):
            radius = rng.uniform(2.5, 4.0)
            cx, cy = rng.uniform(wx + 4.0, wx + window - 4.0), rng.uniform(wy + 4.0, wy + window - 4.0)
            crowd |= _disk_mask(cx, cy, radius, height, width)
        instances.append(_Instance(_CIRCLE, crowd, None, iscrowd=True))
        avoid = np.zeros_like(crowd)
        avoid[max(wy - 2, 0) : wy + window + 2, max(wx - 2, 0) : wx + window + 2] = True
        _add_random_shapes(rng, instances, int(rng.integers(1, 3)), height, width, avoid)
    elif scene == "random":
        _add_random_shapes(rng, instances, int(rng.integers(1, 5)), height, width, None)
    elif scene != "empty":
        raise ValueError(f"unknown scene {scene!r}")
    return instances


def _random_color(rng: np.random.Generator, avoid: list[np.ndarray], min_distance: float = 90.0) -> np.ndarray:
    """A colour at least ``min_distance`` (RGB Euclidean) from every colour in ``avoid``, when one is found."""
    color = rng.uniform(0.0, 255.0, size=3)
    for _ in range(200):
        if all(np.linalg.norm(color - other) >= min_distance for other in avoid):
            break
        color = rng.uniform(0.0, 255.0, size=3)
    return color


def _render(rng: np.random.Generator, instances: list[_Instance], height: int, width: int) -> np.ndarray:
    """Paint a noisy gradient background and the shapes in z-order; returns uint8 (H, W, 3).

    Every shape's colour differs clearly from the background and from every other shape in the image, so that
    touching and overlapping instances of one class stay separable.
    """
    base = rng.uniform(70.0, 185.0) + rng.uniform(-20.0, 20.0, size=3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient = (rng.uniform(-0.3, 0.3) * (xx - width / 2) + rng.uniform(-0.3, 0.3) * (yy - height / 2))[..., None]
    image = base + gradient + rng.normal(0.0, 10.0, size=(height, width, 3))
    used_colors = [base]
    for instance in instances:
        color = _random_color(rng, used_colors)
        used_colors.append(color)
        if rng.random() < 0.3:  # striped texture
            period = int(rng.integers(3, 7))
            stripes = (((xx + yy) // period) % 2)[..., None]
            paint = color * (0.85 + 0.15 * stripes)
        else:
            paint = np.broadcast_to(color, (height, width, 3))
        noise = rng.normal(0.0, 4.0, size=(int(instance.full_mask.sum()), 3))
        image[instance.full_mask] = paint[instance.full_mask] + noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _make_scene(
    rng: np.random.Generator, index: int, image_size: tuple[int, int]
) -> tuple[np.ndarray, list[_Instance]]:
    low, high = image_size
    height, width = int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1))
    scene = _SPECIAL_SCENES[index] if index < len(_SPECIAL_SCENES) else "random"
    instances = _scene_instances(rng, scene, height, width)
    return _render(rng, instances, height, width), instances


def _rng(seed: int, kind: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _KIND_CODES[kind], _SPLIT_CODES[split], index])


# ----------------------------------------------------------------------------------------------------------------
# Encoders and writers
# ----------------------------------------------------------------------------------------------------------------


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE: run lengths over the column-major pixels, starting with a (possibly empty) 0 run."""
    flat = mask.reshape(-1, order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    boundaries = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(boundaries).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")}


def _coco_annotation(instance: _Instance, annotation_id: int, image_id: int) -> dict[str, Any]:
    visible = instance.visible_mask
    if instance.iscrowd:
        segmentation: Any = _uncompressed_rle(visible)
    elif instance.polygon is not None and np.array_equal(visible, instance.full_mask):
        segmentation = [instance.polygon]
    else:
        segmentation = _compressed_rle(visible)
    encoded = mask_util.encode(np.asfortranarray(visible.astype(np.uint8)))
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": SHAPE_CATEGORIES[instance.class_index]["id"],
        "segmentation": segmentation,
        "area": int(mask_util.area(encoded)),
        "bbox": [float(v) for v in mask_util.toBbox(encoded)],
        "iscrowd": int(instance.iscrowd),
    }


def _prepare_dirs(dirs: Iterable[Path], overwrite: bool) -> None:
    for directory in dirs:
        if directory.exists() and any(directory.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{directory} exists and is not empty; pass overwrite=True to replace it")
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)


def _check_arguments(image_size: tuple[int, int] | None = None, **counts: int) -> None:
    for name, value in counts.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if image_size is not None and not 64 <= image_size[0] <= image_size[1] <= 1024:
        raise ValueError(f"image_size must be (min, max) with 64 <= min <= max <= 1024, got {image_size}")


def _coco_paths(root: Path) -> dict[str, Path]:
    return {
        "root": root,
        "train_images": root / "train2017",
        "val_images": root / "val2017",
        "train_annotations": root / "annotations" / "instances_train2017.json",
        "val_annotations": root / "annotations" / "instances_val2017.json",
    }


def _ade20k_paths(root: Path) -> dict[str, Path]:
    base = root / "ADEChallengeData2016"
    return {
        "root": base,
        "train_images": base / "images" / "training",
        "train_annotations": base / "annotations" / "training",
        "val_images": base / "images" / "validation",
        "val_annotations": base / "annotations" / "validation",
    }


def _classification_paths(root: Path) -> dict[str, Path]:
    return {"root": root, "train": root / "train", "val": root / "val"}


_PATHS = {"coco": _coco_paths, "ade20k": _ade20k_paths, "classification": _classification_paths}


def write_shapes_coco(
    root: str | Path,
    num_train: int = 96,
    num_val: int = 24,
    image_size: tuple[int, int] = (96, 160),
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write a shapes dataset in the COCO 2017 instances layout.

    Layout: ``root/{train2017,val2017}/<image id, 12 digits>.jpg`` and
    ``root/annotations/instances_{train2017,val2017}.json``. A split with at least 4 images holds all four special
    scenes (touching pair, overlapping pair, crowd, empty); see the module docstring.

    Args:
        root: Output directory (created if missing).
        num_train: Number of train images.
        num_val: Number of val images.
        image_size: ``(min, max)`` side length in pixels; each image's height and width are drawn from this range.
        seed: Seed of every random draw.
        overwrite: Replace existing non-empty ``train2017``/``val2017`` folders instead of raising.

    Returns:
        Paths: ``root``, ``train_images``, ``val_images``, ``train_annotations``, ``val_annotations``.

    Raises:
        FileExistsError: An image folder already holds files and ``overwrite`` is False.
        ValueError: A count is negative or ``image_size`` is outside 64..1024.
    """
    _check_arguments(image_size, num_train=num_train, num_val=num_val)
    paths = _coco_paths(Path(root))
    _prepare_dirs([paths["train_images"], paths["val_images"]], overwrite)
    paths["train_annotations"].parent.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("val", num_val)):
        images, annotations = [], []
        id_offset = _COCO_VAL_ID_OFFSET if split == "val" else 0
        for index in range(count):
            image, instances = _make_scene(_rng(seed, "coco", split, index), index, image_size)
            image_id = id_offset + index + 1
            file_name = f"{image_id:012d}.jpg"
            # Quality 95 without chroma subsampling keeps the colour edges of touching shapes crisp.
            Image.fromarray(image).save(paths[f"{split}_images"] / file_name, quality=95, subsampling=0)
            images.append({"id": image_id, "file_name": file_name, "height": image.shape[0], "width": image.shape[1]})
            for instance in instances:
                annotations.append(_coco_annotation(instance, len(annotations) + 1, image_id))
        content = {
            "info": {"description": f"visionkit synthetic shapes ({split}, seed {seed})", "version": "1.0"},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": [dict(category) for category in SHAPE_CATEGORIES],
        }
        paths[f"{split}_annotations"].write_text(json.dumps(content, separators=(",", ":")))
    return paths


def write_shapes_ade20k(
    root: str | Path,
    num_train: int = 64,
    num_val: int = 16,
    image_size: tuple[int, int] = (96, 160),
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write a shapes dataset in the ADE20K ``ADEChallengeData2016`` layout.

    Layout: ``root/ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_<8 digits>.jpg`` and
    ``root/ADEChallengeData2016/annotations/{training,validation}/<same stem>.png`` (8-bit grey label maps).
    Label values: 0 = background, 1 = circle, 2 = square, 3 = triangle (crowd pixels carry their class). These reuse
    the first ADE20K indices, so with ``reduce_zero_label`` the shapes appear as ADE classes 0..2 (``wall``,
    ``building``, ``sky``) and background becomes 255 (ignored).

    Args:
        root: Output directory; the dataset goes to ``root/ADEChallengeData2016``.
        num_train: Number of training images.
        num_val: Number of validation images.
        image_size: ``(min, max)`` side length in pixels.
        seed: Seed of every random draw.
        overwrite: Replace existing non-empty image/annotation folders instead of raising.

    Returns:
        Paths: ``root`` (the ``ADEChallengeData2016`` folder), ``train_images``, ``train_annotations``,
        ``val_images``, ``val_annotations`` (folders).

    Raises:
        FileExistsError: An output folder already holds files and ``overwrite`` is False.
        ValueError: A count is negative or ``image_size`` is outside 64..1024.
    """
    _check_arguments(image_size, num_train=num_train, num_val=num_val)
    paths = _ade20k_paths(Path(root))
    for split, prefix, count in (("train", "ADE_train", num_train), ("val", "ADE_val", num_val)):
        image_dir, label_dir = paths[f"{split}_images"], paths[f"{split}_annotations"]
        _prepare_dirs([image_dir, label_dir], overwrite)
        for index in range(count):
            image, instances = _make_scene(_rng(seed, "ade20k", split, index), index, image_size)
            label_map = np.zeros(image.shape[:2], dtype=np.uint8)
            for instance in instances:
                label_map[instance.visible_mask] = instance.class_index + 1
            stem = f"{prefix}_{index + 1:08d}"
            Image.fromarray(image).save(image_dir / f"{stem}.jpg", quality=95, subsampling=0)
            Image.fromarray(label_map, mode="L").save(label_dir / f"{stem}.png")
    return paths


def write_shapes_classification(
    root: str | Path,
    num_per_class_train: int = 24,
    num_per_class_val: int = 8,
    image_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    num_per_class_test: int = 0,
) -> dict[str, Path]:
    """Write a one-shape-per-image classification set in the image-folder layout.

    Layout: ``root/{train,val}/{circle,square,triangle}/<class>_<4 digits>.png`` (and ``root/test/...`` when
    ``num_per_class_test > 0``); each image is ``image_size`` × ``image_size`` RGB with one shape 20–44 px across on a
    noisy background. Train and val do not depend on ``num_per_class_test``.

    Args:
        root: Output directory.
        num_per_class_train: Train images per class.
        num_per_class_val: Val images per class.
        image_size: Side length in pixels (48..512).
        seed: Seed of every random draw.
        overwrite: Replace existing non-empty split folders instead of raising.
        num_per_class_test: Test images per class (0: no test split is written).

    Returns:
        Paths: ``root``, ``train``, ``val`` and, if written, ``test`` (the split folders).

    Raises:
        FileExistsError: A split folder already holds files and ``overwrite`` is False.
        ValueError: A count is negative or ``image_size`` is outside 48..512.
    """
    counts = {"train": num_per_class_train, "val": num_per_class_val, "test": num_per_class_test}
    _check_arguments(**{f"num_per_class_{split}": count for split, count in counts.items()})
    if not 48 <= image_size <= 512:
        raise ValueError(f"image_size must be within 48..512, got {image_size}")
    paths = _classification_paths(Path(root))
    if num_per_class_test > 0:
        paths["test"] = Path(root) / "test"
    for split in [name for name in counts if name in paths]:
        count = counts[split]
        _prepare_dirs([paths[split]], overwrite)
        for class_index, class_name in enumerate(SHAPE_CLASS_NAMES):
            (paths[split] / class_name).mkdir()
            for index in range(count):
                rng = _rng(seed, "classification", split, class_index * 1_000_000 + index)
                size = rng.uniform(20.0, min(44.0, 0.7 * image_size))
                instance = _random_shape(rng, image_size, image_size, class_index, size)
                image = _render(rng, [instance], image_size, image_size)
                Image.fromarray(image).save(paths[split] / class_name / f"{class_name}_{index:04d}.png")
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Demo data with an idempotence manifest
# ----------------------------------------------------------------------------------------------------------------


def _manifest_settings(kind: str, seed: int, sizes: tuple[int, int]) -> dict[str, Any]:
    return {"generator": "visionkit.data.synthetic", "version": _MANIFEST_VERSION, "kind": kind, "seed": seed,
            "sizes": list(sizes)}  # fmt: skip


def _read_manifest(kind_root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((kind_root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(kind_root: Path, settings: dict[str, Any]) -> bool:
    manifest = _read_manifest(kind_root)
    if manifest is None or not manifest.get("complete") or manifest.get("settings") != settings:
        return False
    files = manifest.get("files", {})
    for relative, size in files.items():
        path = kind_root / relative
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def write_demo_data(
    root: str | Path,
    seed: int = 0,
    kinds: Iterable[str] = DEMO_KINDS,
    sizes: Mapping[str, tuple[int, int]] | None = None,
    force: bool = False,
) -> dict[str, dict[str, Path]]:
    """Write demo datasets under ``root/<kind>`` (coco, ade20k, classification, pretraining), skipping complete ones.

    Completeness: each kind folder holds ``visionkit_manifest.json`` with the generator settings (seed, sizes,
    version), ``"complete": true`` and every written file with its size in bytes. A kind is skipped when that
    manifest matches the requested settings and every listed file exists with its recorded size; otherwise it is
    regenerated. The manifest is written first (``"complete": false``) and rewritten at the end, so an interrupted
    run is detected. A kind folder that is non-empty but has no manifest is not ours: it raises instead of being
    overwritten.

    Args:
        root: Output directory.
        seed: Seed of every random draw.
        kinds: Which of :data:`DEMO_KINDS` to write.
        sizes: Per-kind ``(train, val)`` counts overriding :data:`DEMO_SIZES` (per class for classification; for
            ``"pretraining"`` images per dataset and datasets, :mod:`~visionkit.data.synthetic_corpus`).
        force: Regenerate even when a complete set exists.

    Returns:
        For each kind, the paths returned by its writer plus ``manifest``.

    Raises:
        ValueError: An unknown kind.
        FileExistsError: A kind folder holds files that this function did not write.
    """
    from visionkit.data import synthetic_corpus  # not at the top: that module builds on this one

    root = Path(root)
    sizes = {**DEMO_SIZES, **(sizes or {})}
    result: dict[str, dict[str, Path]] = {}
    for kind in kinds:
        if kind not in DEMO_KINDS:
            raise ValueError(f"unknown demo kind {kind!r}; expected one of {list(DEMO_KINDS)}")
        kind_root = root / kind
        names = synthetic_corpus.corpus_dataset_names(sizes[kind][1]) if kind == "pretraining" else ()
        settings = _manifest_settings(kind, seed, tuple(sizes[kind]))
        if force or not _is_complete(kind_root, settings):
            if kind_root.exists() and any(kind_root.iterdir()):
                if _read_manifest(kind_root) is None:
                    raise FileExistsError(
                        f"{kind_root} holds files but no {MANIFEST_NAME}: refusing to overwrite data that "
                        "write_demo_data did not write; choose another root"
                    )
                shutil.rmtree(kind_root)
            kind_root.mkdir(parents=True, exist_ok=True)
            manifest = {"settings": settings, "complete": False, "files": {}}
            (kind_root / MANIFEST_NAME).write_text(json.dumps(manifest))
            num_train, num_val = sizes[kind]
            if kind == "coco":
                write_shapes_coco(kind_root, num_train, num_val, seed=seed)
            elif kind == "ade20k":
                write_shapes_ade20k(kind_root, num_train, num_val, seed=seed)
            elif kind == "pretraining":
                synthetic_corpus.write_unlabeled_corpus(kind_root, names, num_train, seed=seed)
            else:
                write_shapes_classification(kind_root, num_train, num_val, seed=seed)
            files = sorted(p for p in kind_root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
            manifest["files"] = {p.relative_to(kind_root).as_posix(): p.stat().st_size for p in files}
            manifest["complete"] = True
            (kind_root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
        paths = synthetic_corpus.corpus_paths(kind_root, names) if names else _PATHS[kind](kind_root)
        result[kind] = {**paths, "manifest": kind_root / MANIFEST_NAME}
    return result
