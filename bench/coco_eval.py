"""Benchmark: pycocotools vs ``visionkit.eval.evaluate_coco`` on a synthetic COCO-sized set.

Generates, in memory and outside every timed region, a COCO instances set (random image sizes, ~6 objects per
image with polygon, compressed-RLE and crowd uncompressed-RLE masks, the 80 COCO category ids with their gaps) and
~15 detections per image (jittered ground truth plus random boxes, each with an RLE mask and a score). Then, side by
side in one process, it times both evaluators end to end from the in-memory dicts (GT index build + result loading
and validation + evaluate + accumulate + summarize) and prints seconds, the speed-up and the largest absolute
difference over the 12 COCO stats, for these cases:

* ``bbox``: box-only records;
* ``segm``: mask-only records;
* ``segm-mask-area``: records with ``bbox`` and ``segmentation`` (as detectron2 / mmdet / visionkit write them),
  ``segm_area="mask"`` vs pycocotools fed the records without ``bbox`` (what detectron2 does);
* ``segm-box-area``: the same records, ``segm_area="box"`` vs pycocotools fed them as they are (what mmdet does).

``--rle-records N`` times instead the validation of ``N`` compressed-RLE strings (masks of 480x640 images, drawn
from 5,000 random star polygons): ``visionkit.utils.coco_format.check_compressed_rles`` (vectorised) against the
one-value-at-a-time reference decoder (timed on 20,000 strings and scaled) and faster-coco-eval's ``area`` on the same
RLEs (one C pass, for scale).

Usage::

    .venv/bin/python bench/coco_eval.py --images 5000 --seed 0 --repeats 3
    .venv/bin/python bench/coco_eval.py --rle-records 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import pickle
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from pycocotools import mask as pycoco_mask
from pycocotools.coco import COCO as PyCOCO
from pycocotools.cocoeval import COCOeval as PyCOCOeval

from visionkit.eval import COCO_STAT_NAMES, evaluate_coco

# The 80 COCO 2017 "thing" category ids (1..90 with 10 gaps), from instances_val2017.json.
COCO_CATEGORY_IDS = [
    *range(1, 12),
    *range(13, 26),
    27,
    28,
    *range(31, 45),
    *range(46, 66),
    67,
    70,
    *range(72, 83),
    *range(84, 91),
]
IMAGE_SIZES = ((480, 640), (640, 480), (427, 640), (640, 427), (375, 500), (512, 512))  # (H, W), COCO-typical


def _star_polygon(rng: np.random.Generator, x0: float, y0: float, w: float, h: float) -> list[float]:
    """A star-shaped polygon inside the box (flat [x1, y1, x2, y2, ...])."""
    n = int(rng.integers(6, 16))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(0.55, 1.0, n)
    cx, cy = x0 + w / 2, y0 + h / 2
    xs = cx + np.cos(angles) * radii * w / 2
    ys = cy + np.sin(angles) * radii * h / 2
    return np.stack([xs, ys], axis=1).round(2).reshape(-1).tolist()


def _random_box(rng: np.random.Generator, height: int, width: int) -> tuple[float, float, float, float]:
    """A box whose side follows a log-uniform law, so small, medium and large all occur."""
    side = float(np.exp(rng.uniform(np.log(6), np.log(min(height, width) * 0.9))))
    aspect = float(np.exp(rng.uniform(-0.7, 0.7)))
    w = min(side * aspect, width - 1.0)
    h = min(side / aspect, height - 1.0)
    x0 = float(rng.uniform(0, width - w))
    y0 = float(rng.uniform(0, height - h))
    return x0, y0, w, h


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """Uncompressed (list-counts) column-major RLE, the format COCO uses for crowd regions."""
    flat = mask.reshape(-1, order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def generate(
    num_images: int, seed: int, gt_per_image: int = 6, dets_per_image: int = 15
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Build the GT dict and the bbox / segm result lists.

    Returns:
        ``(gt, bbox_results, segm_results)``; result records follow the COCO results format.
    """
    rng = np.random.default_rng(seed)
    images, annotations, bbox_results, segm_results = [], [], [], []
    categories = [{"id": cid, "name": f"class_{cid}", "supercategory": "thing"} for cid in COCO_CATEGORY_IDS]
    ann_id = 1
    for image_id in range(1, num_images + 1):
        height, width = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": height, "width": width})
        num_gt = int(rng.poisson(gt_per_image)) if image_id % 50 else 0  # every 50th image has no GT
        gt_objects: list[tuple[tuple[float, float, float, float], int, list[float]]] = []
        for _ in range(num_gt):
            box = _random_box(rng, height, width)
            category_id = COCO_CATEGORY_IDS[int(rng.integers(len(COCO_CATEGORY_IDS)))]
            polygon = _star_polygon(rng, *box)
            crowd = rng.random() < 0.02
            rle = pycoco_mask.frPyObjects([polygon], height, width)[0]
            if crowd:
                segmentation: Any = _uncompressed_rle(pycoco_mask.decode(rle).astype(bool))
            elif rng.random() < 0.1:
                segmentation = {"size": [height, width], "counts": rle["counts"].decode("utf-8")}
            else:
                segmentation = [polygon]
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": segmentation,
                    "area": float(pycoco_mask.area(rle)),
                    "bbox": [round(v, 2) for v in box],
                    "iscrowd": int(crowd),
                }
            )
            ann_id += 1
            gt_objects.append((box, category_id, polygon))
        num_dets = int(rng.poisson(dets_per_image))
        for det_index in range(num_dets):
            if det_index < len(gt_objects) and rng.random() < 0.85:
                # A jittered copy of a GT object: the GT polygon mapped affinely onto the jittered box.
                (gx, gy, gw, gh), category_id, gt_polygon = gt_objects[det_index]
                jitter = rng.normal(0, 0.08, 4) * np.array([gw, gh, gw, gh])
                x0 = float(np.clip(gx + jitter[0], 0, width - 2))
                y0 = float(np.clip(gy + jitter[1], 0, height - 2))
                w = float(np.clip(gw + jitter[2], 1, width - x0))
                h = float(np.clip(gh + jitter[3], 1, height - y0))
                points = np.asarray(gt_polygon).reshape(-1, 2)
                points = (points - [gx, gy]) * [w / gw, h / gh] + [x0, y0]
                polygon = points.round(2).reshape(-1).tolist()
                if rng.random() < 0.1:
                    category_id = COCO_CATEGORY_IDS[int(rng.integers(len(COCO_CATEGORY_IDS)))]
                score = float(rng.beta(4, 2))
            else:
                x0, y0, w, h = _random_box(rng, height, width)
                category_id = COCO_CATEGORY_IDS[int(rng.integers(len(COCO_CATEGORY_IDS)))]
                polygon = _star_polygon(rng, x0, y0, w, h)
                score = float(rng.beta(2, 4))
            score = round(score, 5)
            rle = pycoco_mask.frPyObjects([polygon], height, width)[0]
            bbox = [round(x0, 2), round(y0, 2), round(w, 2), round(h, 2)]
            bbox_results.append({"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score})
            segm_results.append(
                {
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": {"size": [height, width], "counts": rle["counts"].decode("utf-8")},
                    "score": score,
                }
            )
    gt = {"images": images, "annotations": annotations, "categories": categories}
    return gt, bbox_results, segm_results


def run_pycocotools(gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str) -> np.ndarray:
    """The standard pycocotools flow on in-memory dicts (both are mutated in place, as pycocotools does)."""
    coco_gt = PyCOCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes(results)
    coco_eval = PyCOCOeval(coco_gt, coco_dt, iou_type)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return np.asarray(coco_eval.stats, dtype=np.float64)


def run_visionkit(
    gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str, segm_area: str = "mask"
) -> np.ndarray:
    """``visionkit.eval.evaluate_coco`` on the same in-memory dicts (validation of GT and results included)."""
    stats = evaluate_coco(gt, results, iou_type=iou_type, segm_area=segm_area)
    return np.asarray([stats[name] for name in COCO_STAT_NAMES], dtype=np.float64)


CASES = ("bbox", "segm", "segm-mask-area", "segm-box-area")


def bench_rle_check(num_records: int, seed: int) -> None:
    """Time the vectorised compressed-RLE check against the reference decoder and the engine's ``area``."""
    from faster_coco_eval.core import mask as engine_mask

    from visionkit.utils.coco_format import check_compressed_rles, decode_rle_string

    rng = np.random.default_rng(seed)
    height, width = 480, 640
    distinct = []
    for _ in range(5000):
        polygon = _star_polygon(rng, *_random_box(rng, height, width))
        distinct.append(pycoco_mask.frPyObjects([polygon], height, width)[0]["counts"].decode("ascii"))
    strings = [distinct[i % len(distinct)] for i in range(num_records)]
    megabytes = sum(map(len, strings)) / 1e6
    start = time.perf_counter()
    problems, _ = check_compressed_rles(strings, np.full(num_records, height * width))
    vectorised = time.perf_counter() - start
    assert not problems.any()
    sample = min(num_records, 20000)
    start = time.perf_counter()
    for text in strings[:sample]:
        decode_rle_string(text)
    reference = (time.perf_counter() - start) * num_records / sample
    rles = [{"size": [height, width], "counts": text} for text in strings]
    start = time.perf_counter()
    engine_mask.area(rles)
    engine = time.perf_counter() - start
    print(f"{num_records} RLE strings of {height}x{width} masks, {megabytes:.1f} MB of counts")
    print(f"{'reference decoder s':>20}{'vectorised s':>14}{'speed-up':>10}{'engine area() s':>17}")
    print(f"{reference:>20.2f}{vectorised:>14.2f}{reference / vectorised:>9.1f}x{engine:>17.2f}")


def time_runs(
    runner: Callable[[dict[str, Any], list[dict[str, Any]], str], np.ndarray],
    frozen_inputs: bytes,
    iou_type: str,
    repeats: int,
) -> tuple[list[float], np.ndarray]:
    """Time ``repeats`` runs, each on a fresh copy of the inputs (copying is outside the timed region)."""
    seconds = []
    stats = np.zeros(12)
    for _ in range(repeats):
        gt, results = pickle.loads(frozen_inputs)
        with contextlib.redirect_stdout(io.StringIO()):
            start = time.perf_counter()
            stats = runner(gt, results, iou_type)
            seconds.append(time.perf_counter() - start)
    return seconds, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="number of synthetic images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data generator")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per evaluator (best and mean reported)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, help="what to compare")
    parser.add_argument("--rle-records", type=int, default=0, help="time the RLE validation on this many strings")
    args = parser.parse_args()
    if args.rle_records:
        bench_rle_check(args.rle_records, args.seed)
        return

    start = time.perf_counter()
    gt, bbox_results, segm_results = generate(args.images, args.seed)
    box_and_mask = [dict(b, segmentation=m["segmentation"]) for b, m in zip(bbox_results, segm_results, strict=True)]
    print(
        f"generated {len(gt['images'])} images, {len(gt['annotations'])} GT annotations "
        f"({sum(a['iscrowd'] for a in gt['annotations'])} crowd), {len(bbox_results)} detections, "
        f"{len(gt['categories'])} categories in {time.perf_counter() - start:.1f} s (not timed)"
    )
    # case -> (iou type, records given to pycocotools, records given to visionkit, visionkit's segm_area)
    cases = {
        "bbox": ("bbox", bbox_results, bbox_results, "mask"),
        "segm": ("segm", segm_results, segm_results, "mask"),
        "segm-mask-area": ("segm", segm_results, box_and_mask, "mask"),  # detectron2 drops the box
        "segm-box-area": ("segm", box_and_mask, box_and_mask, "box"),  # mmdet: loadRes as is
    }
    header = (
        f"{'case':<16}{'pycocotools s':>15}{'visionkit s':>13}{'speed-up':>10}"
        f"{'best pycoco s':>15}{'best vk s':>11}{'best speed-up':>15}{'max |diff|':>12}"
    )
    rows = []
    for case in args.cases:
        iou_type, pycoco_records, vk_records, segm_area = cases[case]
        pycoco_frozen = pickle.dumps((gt, pycoco_records), protocol=pickle.HIGHEST_PROTOCOL)
        vk_frozen = pickle.dumps((gt, vk_records), protocol=pickle.HIGHEST_PROTOCOL)
        vk_runner = functools.partial(run_visionkit, segm_area=segm_area)
        # Interleave the two evaluators so background load on the shared machine hits both alike.
        pycoco_times, vk_times = [], []
        pycoco_stats = vk_stats = np.zeros(12)
        for _ in range(args.repeats):
            seconds, pycoco_stats = time_runs(run_pycocotools, pycoco_frozen, iou_type, 1)
            pycoco_times += seconds
            seconds, vk_stats = time_runs(vk_runner, vk_frozen, iou_type, 1)
            vk_times += seconds
        max_diff = float(np.max(np.abs(pycoco_stats - vk_stats)))
        mean_py, mean_vk = float(np.mean(pycoco_times)), float(np.mean(vk_times))
        best_py, best_vk = min(pycoco_times), min(vk_times)
        rows.append(
            f"{case:<16}{mean_py:>15.2f}{mean_vk:>13.2f}{mean_py / mean_vk:>9.2f}x"
            f"{best_py:>15.2f}{best_vk:>11.2f}{best_py / best_vk:>14.2f}x{max_diff:>12.1e}"
        )
        print(
            f"{case}: AP {vk_stats[0]:.4f} APs {vk_stats[3]:.4f} APm {vk_stats[4]:.4f} APl {vk_stats[5]:.4f} "
            f"AR100 {vk_stats[8]:.4f}",
            flush=True,
        )
    print(f"\n{args.images} images, seed {args.seed}, {args.repeats} timed run(s) per evaluator (mean and best)")
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
