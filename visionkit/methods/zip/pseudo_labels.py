"""Pseudo-labels for self-training: COCO results (Zip's, or a trained model's predictions) → a COCO training set.

Self-training follows CutLER's recipe (``docs/methods/zip.md`` §12; Wang et al., CVPR 2023, §3.3): train the
instance-segmentation task on the pseudo-labels of round 0 with DropLoss, then predict on the training images with the
trained model, keep predictions above a score threshold (CutLER: 0.7 in round 1, 0.65 in round 2) and train again.
:func:`results_to_training_set` does the "keep and convert" step: it reads a results JSON (or records), keeps the
masks with ``score >= score_thresh`` (at most ``max_per_image`` per image, highest scores first), and writes an
instances JSON over the images of an existing annotation file (its ``images`` and ``categories``; its annotations are
ignored), ready for :class:`~visionkit.data.COCODataset` / ``COCODataModule(train_ann=...)``.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from visionkit.eval.rle import rle_area, rle_to_bbox, to_compressed_rle
from visionkit.utils import write_json_atomic

__all__ = ["AGNOSTIC_CATEGORY", "results_to_training_set"]

#: The single category of a class-agnostic training set.
AGNOSTIC_CATEGORY: dict[str, Any] = {"id": 1, "name": "object", "supercategory": "object"}


def _load_records(results: str | os.PathLike[str] | Sequence[Mapping[str, Any]]) -> tuple[list[Mapping], str]:
    if isinstance(results, (str, os.PathLike)):
        path = Path(results)
        try:
            records = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"results file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: a COCO results file is a JSON list of records, got {type(records).__name__}")
        return records, str(path)
    return list(results), "results"


def results_to_training_set(
    results: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    images_from: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    score_thresh: float = 0.0,
    max_per_image: int = 100,
    class_agnostic: bool = False,
) -> dict[str, Any]:
    """Turn COCO result records into a COCO instances JSON for training.

    Args:
        results: A results JSON path or the records (``image_id``, ``category_id``, ``score``, ``segmentation`` as
            RLE; ``bbox`` is recomputed from the mask).
        images_from: An instances JSON whose ``images`` (and, unless ``class_agnostic``, ``categories``) the new
            file reuses, e.g. ``annotations/instances_train2017.json`` (its annotations are not used).
        output: Where to write the new instances JSON (atomically).
        score_thresh: Keep records with ``score >= score_thresh``.
        max_per_image: Keep at most this many records per image, highest scores first (CutLER: 100).
        class_agnostic: Map every record to one category, :data:`AGNOSTIC_CATEGORY`.

    Returns:
        The written JSON content (``images``, ``annotations``, ``categories``).

    Raises:
        ValueError: A record without an RLE ``segmentation``, or an ``image_id`` / ``category_id`` that the
            annotation file does not have; the message names the results source and the record index.
    """
    if max_per_image < 1:
        raise ValueError(f"max_per_image must be >= 1, got {max_per_image}")
    records, source = _load_records(results)
    base_path = Path(images_from)
    base = json.loads(base_path.read_text())
    images = base.get("images")
    if not isinstance(images, list):
        raise ValueError(f"{base_path}: no 'images' list")
    image_ids = {int(image["id"]) for image in images}
    categories = [dict(AGNOSTIC_CATEGORY)] if class_agnostic else base.get("categories", [])
    category_ids = {int(c["id"]) for c in categories}

    per_image: dict[int, list[tuple[float, int, Mapping[str, Any]]]] = defaultdict(list)
    for index, record in enumerate(records):
        score = float(record.get("score", 0.0))
        if score < score_thresh:
            continue
        image_id = int(record["image_id"])
        if image_id not in image_ids:
            raise ValueError(f"{source}[{index}]: image_id {image_id} is not an image of {base_path}")
        category_id = AGNOSTIC_CATEGORY["id"] if class_agnostic else int(record["category_id"])
        if category_id not in category_ids:
            raise ValueError(f"{source}[{index}]: category_id {category_id} is not a category of {base_path}")
        if not isinstance(record.get("segmentation"), Mapping):
            raise ValueError(f"{source}[{index}]: pseudo-labels need an RLE 'segmentation' (a mask), got none")
        per_image[image_id].append((score, category_id, record))

    annotations = []
    for image_id in sorted(per_image):
        kept = sorted(per_image[image_id], key=lambda item: -item[0])[:max_per_image]
        for score, category_id, record in kept:
            compressed = to_compressed_rle(record["segmentation"])
            rle = {"size": compressed["size"], "counts": compressed["counts"].decode("ascii")}  # JSON needs str
            area = rle_area(rle)
            if area == 0:
                continue  # an empty mask cannot be a training instance
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": rle,
                    "area": float(area),
                    "bbox": rle_to_bbox(rle),
                    "iscrowd": 0,
                    "score": score,
                }
            )
    content = {"images": images, "annotations": annotations, "categories": categories}
    write_json_atomic(content, output)
    return content
