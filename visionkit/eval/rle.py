"""COCO run-length encoding (RLE): the one place where binary masks become COCO RLE and back.

COCO RLE (pycocotools ``maskApi``) stores a binary mask of size ``(H, W)`` as alternating run lengths of 0s and 1s
in **column-major** (Fortran) order, starting with a run of 0s. Two forms exist:

* compressed: ``{"size": [H, W], "counts": str | bytes}`` — the LEB128-like string form used in result files;
* uncompressed: ``{"size": [H, W], "counts": list[int]}`` — the plain run lengths that COCO uses for crowd GT.

pycocotools' ``mask.encode`` needs a Fortran-ordered ``uint8`` array of shape ``(H, W, N)`` and returns ``bytes``
counts, which JSON cannot hold; every function here takes care of both so callers never do. Encoding uses pycocotools;
decoding, area and box use faster-coco-eval's identical C++ mask API, because pycocotools' ``decode`` warns under
numpy 2 and its batch ``area`` overflows past 255 masks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from faster_coco_eval.core import mask as engine_mask
from pycocotools import mask as mask_utils

from visionkit.utils.coco_format import rle_problem

__all__ = ["decode_rle", "encode_mask", "encode_masks", "rle_area", "rle_to_bbox", "to_compressed_rle"]


def _as_binary_numpy(masks: np.ndarray | torch.Tensor, expected_ndim: int) -> np.ndarray:
    """Return ``masks`` as a ``uint8`` numpy array of 0/1 after checking rank and dtype."""
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    if not isinstance(masks, np.ndarray):
        raise TypeError(f"expected a numpy array or torch tensor, got {type(masks).__name__}")
    if masks.ndim != expected_ndim:
        shape_name = "(H, W)" if expected_ndim == 2 else "(N, H, W)"
        raise ValueError(f"expected a mask of shape {shape_name}, got shape {tuple(masks.shape)}")
    if masks.dtype == np.bool_:
        return masks.view(np.uint8)
    if np.issubdtype(masks.dtype, np.integer):
        if masks.size and (masks.min() < 0 or masks.max() > 1):
            raise ValueError("integer masks must hold only 0 and 1; threshold probabilities before encoding")
        return masks.astype(np.uint8, copy=False)
    raise ValueError(
        f"masks must be bool (or integer 0/1), got dtype {masks.dtype}; threshold probabilities before encoding"
    )


def _decode_counts(rle: dict[str, Any]) -> dict[str, Any]:
    """Turn pycocotools' ``bytes`` counts into ``str`` so the record is JSON-serialisable."""
    counts = rle["counts"]
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts.decode("utf-8")}


def encode_mask(mask: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """Encode one binary mask as compressed COCO RLE.

    Args:
        mask: ``(H, W)`` bool (or integer 0/1) array or tensor, on any device.

    Returns:
        ``{"size": [H, W], "counts": str}`` — compressed RLE with ``counts`` decoded to ``str`` (JSON-ready).

    Raises:
        ValueError: If the mask is not 2-D or not binary.
    """
    binary = _as_binary_numpy(mask, expected_ndim=2)
    return _decode_counts(mask_utils.encode(np.asfortranarray(binary[:, :, None]))[0])


def encode_masks(masks: np.ndarray | torch.Tensor) -> list[dict[str, Any]]:
    """Encode a batch of binary masks as compressed COCO RLE with one pycocotools call.

    Args:
        masks: ``(N, H, W)`` bool (or integer 0/1) array or tensor, on any device. ``N`` may be 0.

    Returns:
        ``N`` dicts ``{"size": [H, W], "counts": str}``, in the order of the input.

    Raises:
        ValueError: If ``masks`` is not 3-D or not binary.
    """
    binary = _as_binary_numpy(masks, expected_ndim=3)
    if binary.shape[0] == 0:
        return []
    # (N, H, W) -> Fortran-ordered (H, W, N): the memory layout pycocotools' encoder walks column by column.
    fortran = np.asfortranarray(binary.transpose(1, 2, 0))
    return [_decode_counts(rle) for rle in mask_utils.encode(fortran)]


def to_compressed_rle(rle: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``rle`` in compressed form with ``bytes`` counts, the form pycocotools' C functions take.

    Args:
        rle: COCO RLE with ``size`` ``[H, W]`` and ``counts`` as ``str``, ``bytes`` or a list of run lengths.

    Returns:
        ``{"size": [H, W], "counts": bytes}``.

    Raises:
        ValueError: If ``rle`` is not a valid RLE (``visionkit.utils.coco_format.rle_problem``): no ``size`` or
            ``counts``, an unsupported ``counts`` type, a compressed string that does not decode, or runs that are
            negative or do not add up to ``H * W``.
    """
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"an RLE must be a dict with 'size' and 'counts', got {_short_repr(rle)}")
    problem = rle_problem(rle)  # the engine's C code does not check: a string cut short reads past its runs
    if problem is not None:
        raise ValueError(problem)
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, str):
        return {"size": [height, width], "counts": counts.encode("utf-8")}
    if isinstance(counts, bytes):
        return {"size": [height, width], "counts": counts}
    return engine_mask.frPyObjects({"size": [height, width], "counts": [int(c) for c in counts]}, height, width)


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode a COCO RLE (compressed ``str``/``bytes`` counts or uncompressed list counts) to a binary mask.

    Args:
        rle: ``{"size": [H, W], "counts": str | bytes | list[int]}``.

    Returns:
        ``(H, W)`` bool numpy array.
    """
    return engine_mask.decode(to_compressed_rle(rle)).astype(bool)


def rle_area(rle: Mapping[str, Any]) -> int:
    """Number of foreground pixels of an RLE (any form), as pycocotools' ``mask.area`` counts them.

    Args:
        rle: COCO RLE.

    Returns:
        Foreground pixel count.
    """
    return int(engine_mask.area(to_compressed_rle(rle)))


def rle_to_bbox(rle: Mapping[str, Any]) -> list[float]:
    """Tight bounding box of an RLE (any form), as pycocotools' ``mask.toBbox`` computes it.

    Args:
        rle: COCO RLE.

    Returns:
        ``[x, y, w, h]`` in pixels (floats); ``[0, 0, 0, 0]`` for an empty mask.
    """
    return [float(v) for v in engine_mask.toBbox(to_compressed_rle(rle))]


def _short_repr(value: object, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
