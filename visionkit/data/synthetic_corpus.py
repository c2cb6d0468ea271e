"""Deterministic writer of a tiny unlabelled pretraining collection in the OpenUS layout, ``root/<dataset>/images/*``.

The OpenUS corpus gathers 42 public ultrasound datasets under one root, one folder per dataset with its images in an
``images`` sub-folder (data/README.md, "Pretraining collections"). :func:`write_unlabeled_corpus` writes the same
layout with the shapes scenes of :mod:`visionkit.data.synthetic` (1–4 circles, squares and triangles on a noisy
background), so that a backbone pretrained on it has learnt something a probe on the synthetic shapes
classification or ADE20K sets can use. The files exercise the decoding paths real collections need: every dataset
cycles through RGB PNG, 8-bit greyscale PNG, 16-bit greyscale PNG and 16-bit greyscale TIFF (full 16-bit range,
``value = grey * 257``, so :func:`~visionkit.data.image_io.read_image` gives back the 8-bit grey exactly).

Datasets alternate between two looks: even positions are the colour scenes as rendered, odd positions an
ultrasound-like version (grey, multiplicative speckle, black outside a fan-shaped field of view whose apex sits above
the top edge). Each image draws from ``numpy.random.default_rng([seed, 3, dataset position, index])``: the same seed
writes byte-identical files, and adding images or datasets leaves the existing ones unchanged.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from visionkit.data.synthetic import _SPECIAL_SCENES, _check_arguments, _make_scene, _prepare_dirs

__all__ = ["CORPUS_FORMATS", "corpus_dataset_names", "corpus_paths", "write_unlabeled_corpus"]

#: File formats cycled through by image index: (suffix, Pillow mode written).
CORPUS_FORMATS: tuple[tuple[str, str], ...] = (("png", "RGB"), ("png", "L"), ("png", "I;16"), ("tif", "I;16"))
_CORPUS_KIND_CODE = 3  # after synthetic.py's coco 0, ade20k 1, classification 2: independent random streams
_RANDOM_SCENE = len(_SPECIAL_SCENES)  # a scene index past the special scenes: 1-4 random shapes


def corpus_dataset_names(count: int) -> tuple[str, ...]:
    """The demo collection's dataset folder names: ``us_a``, ``us_b``, ... (at most 26).

    Args:
        count: Number of datasets, 1..26.

    Raises:
        ValueError: ``count`` outside 1..26.
    """
    if not 1 <= count <= len(string.ascii_lowercase):
        raise ValueError(f"the demo corpus has 1..26 datasets, got {count}")
    return tuple(f"us_{letter}" for letter in string.ascii_lowercase[:count])


def corpus_paths(root: str | Path, datasets: Sequence[str], image_subdir: str = "images") -> dict[str, Path]:
    """``{"root": root, <dataset>: root/<dataset>/<image_subdir>, ...}``."""
    root = Path(root)
    return {"root": root, **{name: root / name / image_subdir for name in datasets}}


def _check_names(datasets: Sequence[str]) -> None:
    if not datasets:
        raise ValueError("datasets must name at least one dataset folder")
    for name in datasets:
        if not name or name.startswith(".") or "/" in name or "\\" in name or name == "root":
            raise ValueError(f"dataset names must be plain, visible folder names other than 'root', got {name!r}")
    if len(set(datasets)) != len(datasets):
        raise ValueError(f"dataset names must be unique, got {list(datasets)}")


def _ultrasound_look(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Grey, speckled, fan-masked version of an RGB uint8 ``(H, W, 3)`` scene; returns uint8 ``(H, W)``.

    Speckle is multiplicative with mean 1 (Rayleigh-distributed amplitude, as in fully developed speckle); the fan
    spans ±(35..45)° around the vertical from an apex 10–30 % of the height above the image, so the shapes inside
    stay visible.
    """
    height, width = image.shape[:2]
    grey = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    speckle = rng.rayleigh(1.0, size=(height, width)).astype(np.float32) / np.sqrt(np.pi / 2.0)
    grey = grey * (0.6 + 0.4 * speckle)
    apex_y = -rng.uniform(0.1, 0.3) * height
    half_angle = np.deg2rad(rng.uniform(35.0, 45.0))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = np.arctan2(xx + 0.5 - width / 2.0, yy + 0.5 - apex_y)
    depth = np.hypot(xx + 0.5 - width / 2.0, yy + 0.5 - apex_y)
    inside = (np.abs(angle) <= half_angle) & (depth <= height - apex_y)
    return np.clip(np.rint(np.where(inside, grey, 0.0)), 0, 255).astype(np.uint8)


def _encode(pixels: np.ndarray, mode: str) -> Image.Image:
    """A Pillow image in ``mode`` from RGB ``(H, W, 3)`` or grey ``(H, W)`` uint8 pixels."""
    if mode == "RGB":
        return Image.fromarray(pixels if pixels.ndim == 3 else np.repeat(pixels[:, :, None], 3, axis=2))
    grey = pixels if pixels.ndim == 2 else np.asarray(Image.fromarray(pixels).convert("L"))
    if mode == "L":
        return Image.fromarray(grey)
    # Full 16-bit range (g * 257 maps 255 to 65535): what a 16-bit export of 8-bit data holds.
    return Image.fromarray(grey.astype(np.uint16) * 257)


def write_unlabeled_corpus(
    root: str | Path,
    datasets: Sequence[str] = ("us_a", "us_b"),
    images_per_dataset: int | Sequence[int] = 48,
    image_size: tuple[int, int] = (96, 160),
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write a shapes corpus in the OpenUS collection layout, ``root/<dataset>/images/<dataset>_<5 digits>.<ext>``.

    Image ``k`` of a dataset is written as :data:`CORPUS_FORMATS` ``[k % 4]`` (RGB PNG, 8-bit grey PNG, 16-bit grey
    PNG, 16-bit grey TIFF); see the module docstring for the content. Read it with
    ``UnlabeledImageFolder(root, image_subdir="images")``.

    Args:
        root: Collection root (created if missing).
        datasets: Dataset folder names, in the order that fixes their look and random stream.
        images_per_dataset: Images in every dataset, or one count per dataset.
        image_size: ``(min, max)`` side length in pixels; each image's height and width are drawn from it.
        seed: Seed of every random draw.
        overwrite: Replace a non-empty ``images`` folder instead of raising.

    Returns:
        ``{"root": root, <dataset>: <its images folder>, ...}``.

    Raises:
        FileExistsError: An ``images`` folder already holds files and ``overwrite`` is False.
        ValueError: Bad names, a negative count, counts that do not match ``datasets``, or ``image_size`` outside
            64..1024.
    """
    datasets = tuple(datasets)
    _check_names(datasets)
    counts = [images_per_dataset] * len(datasets) if isinstance(images_per_dataset, int) else list(images_per_dataset)
    if len(counts) != len(datasets):
        raise ValueError(f"got {len(counts)} image counts for {len(datasets)} datasets")
    _check_arguments(image_size, **{f"images_per_dataset[{name}]": n for name, n in zip(datasets, counts, strict=True)})
    paths = corpus_paths(root, datasets)
    _prepare_dirs([paths[name] for name in datasets], overwrite)
    for position, (name, count) in enumerate(zip(datasets, counts, strict=True)):
        for index in range(count):
            rng = np.random.default_rng([seed, _CORPUS_KIND_CODE, position, index])
            pixels, _ = _make_scene(rng, _RANDOM_SCENE, image_size)
            if position % 2 == 1:
                pixels = _ultrasound_look(rng, pixels)
            suffix, mode = CORPUS_FORMATS[index % len(CORPUS_FORMATS)]
            _encode(pixels, mode).save(paths[name] / f"{name}_{index:05d}.{suffix}")
    return paths
