"""Shared fixtures for the eval tests: a randomised synthetic COCO set and the pycocotools reference evaluation."""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as pycoco_mask
from pycocotools.coco import COCO as PyCOCO
from pycocotools.cocoeval import COCOeval as PyCOCOeval

# Category ids with gaps; id 20 never has GT (its per-class AP must be nan), 13 has GT only in crowd regions sometimes.
CATEGORY_IDS = (1, 2, 3, 5, 7, 8, 11, 13, 20)
IMAGE_SIZES = ((160, 200), (200, 160), (180, 240), (240, 180))  # (H, W): large objects (> 96²) fit


def _star_polygon(rng: np.random.Generator, x0: float, y0: float, w: float, h: float) -> list[float]:
    n = int(rng.integers(5, 12))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(0.7, 1.0, n)
    xs = x0 + w / 2 + np.cos(angles) * radii * w / 2
    ys = y0 + h / 2 + np.sin(angles) * radii * h / 2
    return np.stack([xs, ys], axis=1).round(2).reshape(-1).tolist()


def _random_box(rng: np.random.Generator, height: int, width: int) -> tuple[float, float, float, float]:
    if rng.random() < 0.2:  # large (> 96² once drawn as a polygon)
        side = float(rng.uniform(0.8, 0.97) * min(height, width))
    else:
        side = float(np.exp(rng.uniform(np.log(3), np.log(min(height, width) * 0.95))))
    aspect = float(np.exp(rng.uniform(-0.5, 0.5)))
    w, h = min(side * aspect, width - 1.0), min(side / aspect, height - 1.0)
    return float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), w, h


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """Column-major run lengths starting with a 0-run (COCO's crowd format), computed independently of pycocotools."""
    flat = mask.reshape(-1, order="F").astype(np.uint8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def make_coco_set(
    seed: int, num_images: int = 16, gt_per_image: float = 5.0, dets_per_image: float = 9.0
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A random COCO instances set and result records carrying both ``bbox`` and ``segmentation``.

    Covers: category-id gaps and a category without GT, crowd GT (uncompressed RLE), compressed-RLE and multi-part
    polygon GT, small / medium / large areas, images without GT, detections on images without GT, false-class
    detections, tied scores, and one image with more than 100 detections (the maxDets cut).
    """
    rng = np.random.default_rng(seed)
    images, annotations, results = [], [], []
    for image_id in range(1, num_images + 1):
        height, width = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
        images.append({"id": image_id * 3, "file_name": f"{image_id}.jpg", "height": height, "width": width})
        objects = []
        num_gt = 0 if image_id % 5 == 0 else int(rng.poisson(gt_per_image))
        for _ in range(num_gt):
            box = _random_box(rng, height, width)
            category_id = int(rng.choice(CATEGORY_IDS[:-1]))
            polygons = [_star_polygon(rng, *box)]
            if rng.random() < 0.15:  # a second part inside the same box
                polygons.append(_star_polygon(rng, box[0], box[1], box[2] / 3, box[3] / 3))
            rle = pycoco_mask.merge(pycoco_mask.frPyObjects(polygons, height, width))
            crowd = rng.random() < 0.08
            if crowd:
                with warnings.catch_warnings():  # pycocotools' decode warns under numpy 2
                    warnings.simplefilter("ignore", DeprecationWarning)
                    segmentation: Any = uncompressed_rle(pycoco_mask.decode(rle))
            elif rng.random() < 0.2:
                segmentation = {"size": [height, width], "counts": rle["counts"].decode("utf-8")}
            else:
                segmentation = polygons
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id * 3,
                    "category_id": category_id,
                    "segmentation": segmentation,
                    "area": float(pycoco_mask.area(rle)),
                    "bbox": [round(v, 2) for v in box],
                    "iscrowd": int(crowd),
                }
            )
            objects.append((box, category_id, polygons[0]))
        num_dets = 110 if image_id == 2 else int(rng.poisson(dets_per_image))
        for det_index in range(num_dets):
            if det_index < len(objects) and rng.random() < 0.8:
                (gx, gy, gw, gh), category_id, polygon = objects[det_index]
                jitter = rng.normal(0, 0.1, 4) * np.array([gw, gh, gw, gh])
                x0, y0 = float(np.clip(gx + jitter[0], 0, width - 2)), float(np.clip(gy + jitter[1], 0, height - 2))
                w, h = float(np.clip(gw + jitter[2], 1, width - x0)), float(np.clip(gh + jitter[3], 1, height - y0))
                points = (np.asarray(polygon).reshape(-1, 2) - [gx, gy]) * [w / gw, h / gh] + [x0, y0]
                polygon = points.round(2).reshape(-1).tolist()
                if rng.random() < 0.1:
                    category_id = int(rng.choice(CATEGORY_IDS))
                score = float(rng.beta(4, 2))
            else:
                x0, y0, w, h = _random_box(rng, height, width)
                category_id = int(rng.choice(CATEGORY_IDS))
                polygon = _star_polygon(rng, x0, y0, w, h)
                score = float(rng.beta(2, 4))
            score = round(score, 1) if rng.random() < 0.3 else round(score, 4)  # many exact ties
            rle = pycoco_mask.frPyObjects([polygon], height, width)[0]
            results.append(
                {
                    "image_id": image_id * 3,
                    "category_id": category_id,
                    "bbox": [round(x0, 2), round(y0, 2), round(w, 2), round(h, 2)],
                    "score": score,
                    "segmentation": {"size": [height, width], "counts": rle["counts"].decode("utf-8")},
                }
            )
    categories = [{"id": cid, "name": f"cat{cid}", "supercategory": "thing"} for cid in CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def results_for(results: list[dict[str, Any]], iou_type: str) -> list[dict[str, Any]]:
    """The records as a pycocotools user passes them: ``bbox`` only for bbox, ``segmentation`` only for segm."""
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    return [{key: value for key, value in record.items() if key != drop} for record in results]


RESULT_KINDS = ("box+mask", "mask-only", "box-only")


def records_of_kind(results: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The records with ``bbox`` and ``segmentation`` (``"box+mask"``, as detectron2 / mmdet write them), without
    ``bbox`` (``"mask-only"``) or without ``segmentation`` (``"box-only"``)."""
    drop = {"box+mask": (), "mask-only": ("bbox",), "box-only": ("segmentation",)}[kind]
    return [{key: value for key, value in record.items() if key not in drop} for record in results]


def with_user_area(gt: dict[str, Any], seed: int) -> dict[str, Any]:
    """A copy of ``gt`` whose annotation ``area`` values are the user's own (box area times 0.3..3, not the mask
    area): evaluation must take the size bucket from them as given, never recompute them (trap 6)."""
    rng = np.random.default_rng(seed)
    changed = copy.deepcopy(gt)
    for annotation in changed["annotations"]:
        _, _, w, h = annotation["bbox"]
        annotation["area"] = round(float(w * h * rng.uniform(0.3, 3.0)), 3)
    return changed


def run_pycocotools(
    gt: dict[str, Any],
    results: list[dict[str, Any]],
    iou_type: str,
    image_ids: list[int] | None = None,
    max_dets: list[int] | None = None,
) -> tuple[np.ndarray, dict[int, float]]:
    """pycocotools' 12 stats and detectron2-style per-class AP (category id → AP, nan without GT), on deep copies."""
    gt, results = copy.deepcopy(gt), copy.deepcopy(results)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = PyCOCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        coco_eval = PyCOCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(image_ids)
        if max_dets is not None:
            coco_eval.params.maxDets = max_dets
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for k, category_id in enumerate(coco_eval.params.catIds):
        valid = precision[:, :, k][precision[:, :, k] > -1]
        per_class[category_id] = float(valid.mean()) if valid.size else float("nan")
    return np.asarray(coco_eval.stats, dtype=np.float64), per_class


@pytest.fixture
def coco_set() -> Callable[..., tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Factory ``coco_set(seed, num_images=16, ...) -> (gt, results)``; see ``make_coco_set``."""
    return make_coco_set


@pytest.fixture
def pycocotools_reference() -> Callable[..., tuple[np.ndarray, dict[int, float]]]:
    """Factory ``pycocotools_reference(gt, results, iou_type, image_ids=None, max_dets=None)``."""
    return run_pycocotools


@pytest.fixture
def results_by_type() -> Callable[[list[dict[str, Any]], str], list[dict[str, Any]]]:
    """Factory ``results_by_type(results, iou_type)``; see ``results_for``."""
    return results_for


@pytest.fixture
def result_kind() -> Callable[[list[dict[str, Any]], str], list[dict[str, Any]]]:
    """Factory ``result_kind(results, kind)`` with ``kind`` in ``RESULT_KINDS``; see ``records_of_kind``."""
    return records_of_kind


@pytest.fixture
def user_area_gt() -> Callable[[dict[str, Any], int], dict[str, Any]]:
    """Factory ``user_area_gt(gt, seed)``; see ``with_user_area``."""
    return with_user_area


@pytest.fixture
def runs_rle() -> Callable[[np.ndarray], dict[str, Any]]:
    """Factory ``runs_rle(mask) -> uncompressed RLE``; see ``uncompressed_rle``."""
    return uncompressed_rle


def predictions_from_records(
    gt: dict[str, Any], results: list[dict[str, Any]], with_masks: bool = True
) -> tuple[list[dict[str, Any]], list[int], dict[int, int]]:
    """Per-image model-style predictions (float64 xyxy boxes, contiguous labels, bool masks) built from records.

    Returns:
        ``(predictions, image_ids, contiguous_to_category_id)``, one prediction per GT image (possibly empty), with
        labels following the sorted GT category ids.
    """
    import torch

    contiguous_to_category_id = dict(enumerate(sorted(c["id"] for c in gt["categories"])))
    category_to_label = {cid: label for label, cid in contiguous_to_category_id.items()}
    by_image: dict[int, list[dict[str, Any]]] = {image["id"]: [] for image in gt["images"]}
    for record in results:
        by_image[record["image_id"]].append(record)
    sizes = {image["id"]: (image["height"], image["width"]) for image in gt["images"]}
    predictions, image_ids = [], []
    for image_id, records in by_image.items():
        boxes = torch.tensor([r["bbox"] for r in records], dtype=torch.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        prediction = {
            "boxes": boxes,
            "scores": torch.tensor([r["score"] for r in records], dtype=torch.float64),
            "labels": torch.tensor([category_to_label[r["category_id"]] for r in records], dtype=torch.int64),
        }
        if with_masks:
            with warnings.catch_warnings():  # pycocotools' decode warns under numpy 2
                warnings.simplefilter("ignore", DeprecationWarning)
                masks = [pycoco_mask.decode(r["segmentation"]).astype(bool) for r in records]
            prediction["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, *sizes[image_id])
            prediction["masks"] = prediction["masks"].bool()
        predictions.append(prediction)
        image_ids.append(image_id)
    return predictions, image_ids, contiguous_to_category_id


@pytest.fixture
def model_predictions() -> Callable[..., tuple[list[dict[str, Any]], list[int], dict[int, int]]]:
    """Factory ``model_predictions(gt, results, with_masks=True)``; see ``predictions_from_records``."""
    return predictions_from_records
