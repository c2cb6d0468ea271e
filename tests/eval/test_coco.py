from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from pycocotools import mask as pycoco_mask

from visionkit.eval import COCO_STAT_NAMES, COCOGroundTruth, evaluate_coco, format_coco_table
from visionkit.eval.rle import encode_mask

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools decode


def _stats_vector(metrics: dict[str, float], names=COCO_STAT_NAMES) -> np.ndarray:
    return np.asarray([metrics[name] for name in names], dtype=np.float64)


def _assert_matches_reference(metrics, reference_stats, reference_per_class, gt) -> None:
    assert list(metrics)[:12] == list(COCO_STAT_NAMES)
    np.testing.assert_allclose(_stats_vector(metrics), reference_stats, rtol=0, atol=1e-12)
    names = {category["id"]: category["name"] for category in gt["categories"]}
    for category_id, ap in reference_per_class.items():
        value = metrics[f"AP/{names[category_id]}"]
        if math.isnan(ap):
            assert math.isnan(value)
        else:
            assert value == pytest.approx(ap, abs=1e-12)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_matches_pycocotools_on_random_sets(
    coco_set, pycocotools_reference, results_by_type, iou_type: str, seed: int
) -> None:
    gt, results = coco_set(seed, num_images=12 + 3 * seed)
    records = results_by_type(results, iou_type)
    reference_stats, reference_per_class = pycocotools_reference(gt, records, iou_type)
    metrics = evaluate_coco(gt, records, iou_type=iou_type)
    _assert_matches_reference(metrics, reference_stats, reference_per_class, gt)
    # The synthetic set must exercise the size buckets and per-class nan, or the comparison proves little.
    assert (reference_stats[3:6] > 0).all()
    assert math.isnan(metrics["AP/cat20"])  # category 20 has detections but no GT


def test_inputs_are_not_modified_and_nothing_is_printed(coco_set, capsys) -> None:
    gt, results = coco_set(7)
    gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)
    evaluate_coco(gt, results, iou_type="segm")
    evaluate_coco(gt, results, iou_type="bbox")
    assert gt == gt_before
    assert results == results_before
    assert capsys.readouterr().out == ""


def test_paths_give_the_same_numbers_as_dicts(coco_set, tmp_path) -> None:
    gt, results = coco_set(8)
    gt_path, results_path = tmp_path / "gt.json", tmp_path / "results.json"
    gt_path.write_text(json.dumps(gt))
    results_path.write_text(json.dumps(results))
    for iou_type in ("bbox", "segm"):
        assert evaluate_coco(gt_path, results_path, iou_type) == evaluate_coco(gt, results, iou_type)
        assert evaluate_coco(str(gt_path), str(results_path), iou_type) == evaluate_coco(gt, results, iou_type)


def test_annotation_id_zero_is_counted_as_a_match(coco_set, pycocotools_reference, results_by_type) -> None:
    gt, results = coco_set(9)
    for annotation in gt["annotations"]:
        annotation["id"] -= 1  # ids 0..N-1
    shifted = copy.deepcopy(gt)
    for annotation in shifted["annotations"]:
        annotation["id"] += 1  # the same data with ids 1..N
    records = results_by_type(results, "bbox")
    reference_stats, reference_per_class = pycocotools_reference(shifted, records, "bbox")
    broken_stats, _ = pycocotools_reference(gt, records, "bbox")
    assert not np.allclose(broken_stats, reference_stats)  # the trap is real on this data
    _assert_matches_reference(evaluate_coco(gt, records, "bbox"), reference_stats, reference_per_class, gt)


def test_segm_results_with_a_bbox_use_the_mask_area(coco_set, pycocotools_reference, results_by_type) -> None:
    gt, results = coco_set(10)
    records = results_by_type(results, "segm")
    reference_stats, reference_per_class = pycocotools_reference(gt, records, "segm")
    with_boxes = [dict(record, bbox=[0.0, 0.0, 99.0, 99.0]) for record in records]  # large boxes, any mask size
    trapped_stats, _ = pycocotools_reference(gt, with_boxes, "segm")
    assert not np.allclose(trapped_stats, reference_stats)  # pycocotools would take the box area
    _assert_matches_reference(evaluate_coco(gt, with_boxes, "segm"), reference_stats, reference_per_class, gt)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_empty_results_give_zero_stats(coco_set, iou_type: str) -> None:
    gt, _ = coco_set(11)
    metrics = evaluate_coco(gt, [], iou_type=iou_type)
    assert _stats_vector(metrics).tolist() == [0.0] * 12
    classes_with_gt = {a["category_id"] for a in gt["annotations"] if not a["iscrowd"]}
    for category in gt["categories"]:
        value = metrics[f"AP/{category['name']}"]
        if category["id"] in classes_with_gt:
            assert value == 0.0
        else:
            assert math.isnan(value)


def test_class_agnostic_merges_categories(coco_set, pycocotools_reference, results_by_type) -> None:
    gt, results = coco_set(12)
    merged_gt = copy.deepcopy(gt)
    merged_gt["categories"] = [{"id": 1, "name": "object"}]
    for annotation in merged_gt["annotations"]:
        annotation["category_id"] = 1
    records = results_by_type(results, "bbox")
    merged_records = [dict(record, category_id=1) for record in records]
    reference_stats, _ = pycocotools_reference(merged_gt, merged_records, "bbox")
    metrics = evaluate_coco(gt, records, "bbox", class_agnostic=True)
    np.testing.assert_allclose(_stats_vector(metrics), reference_stats, rtol=0, atol=1e-12)
    assert not any(key.startswith("AP/") for key in metrics)
    assert metrics["AP"] != evaluate_coco(gt, records, "bbox")["AP"]


def test_custom_max_dets_match_pycocotools(coco_set, pycocotools_reference, results_by_type) -> None:
    gt, results = coco_set(13)
    records = results_by_type(results, "bbox")
    reference_stats, _ = pycocotools_reference(gt, records, "bbox", max_dets=[3, 20, 100])
    metrics = evaluate_coco(gt, records, "bbox", max_dets=(3, 20, 100))
    names = (*COCO_STAT_NAMES[:6], "AR3", "AR20", "AR100", *COCO_STAT_NAMES[9:])
    np.testing.assert_allclose(_stats_vector(metrics, names), reference_stats, rtol=0, atol=1e-12)


@pytest.mark.parametrize("max_dets", [(1, 10, 50), (1, 10), (10, 1, 100), (0, 10, 100)])
def test_max_dets_must_keep_100(coco_set, max_dets) -> None:
    gt, results = coco_set(0, num_images=3)
    with pytest.raises(ValueError, match=r"max_dets must be 3 increasing positive ints ending in 100"):
        evaluate_coco(gt, results, "bbox", max_dets=max_dets)


def test_image_subset_matches_pycocotools_img_ids(coco_set, pycocotools_reference, results_by_type) -> None:
    gt, results = coco_set(14)
    subset = [image["id"] for image in gt["images"][::2]]
    records = results_by_type(results, "segm")
    reference_stats, _ = pycocotools_reference(gt, records, "segm", image_ids=subset)
    result = COCOGroundTruth(gt).evaluate(records, "segm", image_ids=subset)
    np.testing.assert_allclose(result.stats, reference_stats, rtol=0, atol=1e-12)
    assert result.num_results == len(records)


def test_rle_counts_as_bytes_or_runs_give_the_same_numbers(coco_set, results_by_type, runs_rle) -> None:
    gt, results = coco_set(15, num_images=6)
    records = results_by_type(results, "segm")
    expected = evaluate_coco(gt, records, "segm")
    as_bytes = [
        dict(r, segmentation={**r["segmentation"], "counts": r["segmentation"]["counts"].encode()}) for r in records
    ]
    as_runs = [dict(r, segmentation=runs_rle(pycoco_mask.decode(r["segmentation"]))) for r in records]
    assert evaluate_coco(gt, as_bytes, "segm") == expected
    assert evaluate_coco(gt, as_runs, "segm") == expected


def test_unknown_ids_in_results_are_named(coco_set, tmp_path) -> None:
    gt, results = coco_set(0, num_images=4)
    bad_category = [*results, dict(results[0], category_id=999)]
    with pytest.raises(ValueError, match=r"<results>: results refer to category ids not in the ground truth \[999\]"):
        evaluate_coco(gt, bad_category, "bbox")
    bad_image = [*results, dict(results[0], image_id=4242), dict(results[0], image_id=777)]
    results_path = tmp_path / "dets.json"
    results_path.write_text(json.dumps(bad_image))
    with pytest.raises(
        ValueError, match=r"dets\.json: results refer to image ids not in the ground truth \[777, 4242\]"
    ):
        evaluate_coco(gt, results_path, "segm")


@pytest.mark.parametrize(
    ("iou_type", "mutate", "message"),
    [
        ("bbox", lambda r: r.pop("score"), r"result 3 lacks \['score'\]"),
        ("bbox", lambda r: r.update(bbox=[1.0, 2.0, 3.0]), r"result 3 'bbox' must be \[x, y, w, h\] \(4 numbers\)"),
        ("bbox", lambda r: r.update(bbox=[1.0, 2.0, -3.0, 4.0]), r"result 3 'bbox' must be finite with w, h >= 0"),
        ("bbox", lambda r: r.update(score=float("nan")), r"every result 'score' must be a finite number"),
        ("bbox", lambda r: r.update(image_id=[1]), r"result 'image_id' and 'category_id' must be integers"),
        ("segm", lambda r: r.pop("segmentation"), r"result 3 lacks \['segmentation'\]"),
        ("segm", lambda r: r.update(segmentation=[[1, 1, 5, 1, 5, 5]]), r"polygons are not accepted as results"),
        ("segm", lambda r: r.update(segmentation=encode_mask(np.ones((7, 9), bool))), r"result 3 mask size \[7, 9\]"),
    ],
)
def test_malformed_results_raise(coco_set, iou_type, mutate, message) -> None:
    gt, results = coco_set(0, num_images=4)
    results = copy.deepcopy(results)
    mutate(results[3])
    with pytest.raises(ValueError, match=message):
        evaluate_coco(gt, results, iou_type)


def test_results_file_must_hold_a_list(coco_set, tmp_path) -> None:
    gt, _ = coco_set(0, num_images=2)
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"image_id": 1}))
    with pytest.raises(ValueError, match=r"results\.json: COCO results must be a JSON list, got dict"):
        evaluate_coco(gt, path)


def test_bad_ground_truth_files_are_named(tmp_path, coco_set) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError, match=r"COCO ground-truth file not found: .*missing\.json"):
        evaluate_coco(missing, [])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json: cannot read COCO ground-truth as JSON"):
        evaluate_coco(broken, [])
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"images": []}))
    with pytest.raises(
        ValueError, match=r"wrong\.json: COCO ground truth needs list\(s\) \['annotations', 'categories'\]"
    ):
        evaluate_coco(wrong, [])
    gt, _ = coco_set(0, num_images=3)
    del gt["annotations"][1]["area"]
    with pytest.raises(ValueError, match=r"<dict>: annotations\[1\] \(id 2\) lacks \['area'\]"):
        COCOGroundTruth(gt)
    gt, _ = coco_set(0, num_images=3)
    gt["annotations"][0]["image_id"] = 5555
    with pytest.raises(ValueError, match=r"annotations refer to image ids not in 'images': \[5555\]"):
        COCOGroundTruth(gt)


def test_segm_needs_gt_segmentation(coco_set, results_by_type) -> None:
    gt, results = coco_set(0, num_images=3)
    del gt["annotations"][0]["segmentation"]
    assert evaluate_coco(gt, results_by_type(results, "bbox"), "bbox")["AP"] >= 0
    with pytest.raises(ValueError, match=r"1 GT annotation\(s\) have no 'segmentation' \(first: annotations\[0\]\)"):
        evaluate_coco(gt, results_by_type(results, "segm"), "segm")


def test_ground_truth_object_is_reusable(coco_set, results_by_type) -> None:
    gt, results = coco_set(16)
    ground_truth = COCOGroundTruth(gt)
    for iou_type in ("segm", "bbox", "segm"):
        records = results_by_type(results, iou_type)
        assert ground_truth.evaluate(records, iou_type).as_dict() == evaluate_coco(gt, records, iou_type)


def test_format_coco_table() -> None:
    stats = dict(zip(COCO_STAT_NAMES, [0.5, 0.75, 0.25, -1.0, 0.1, 0.2, 0.3, 0.4, 0.6, -1.0, 0.7, 0.8], strict=True))
    stats.update({"AP/person": 0.41234, "AP/traffic light": float("nan"), "AP/dog": 0.3, "AP/cat": 0.25})
    table = format_coco_table({f"bbox_{k}": v for k, v in stats.items()}, title="bbox @ val2017", prefix="bbox_")
    expected = [
        "bbox @ val2017",
        "---------------",
        "AP       0.5000",
        "AP50     0.7500",
        "AP75     0.2500",
        "APs         n/a",
        "APm      0.1000",
        "APl      0.2000",
        "AR1      0.3000",
        "AR10     0.4000",
        "AR100    0.6000",
        "ARs         n/a",
        "ARm      0.7000",
        "ARl      0.8000",
        "",
        "per-class AP",
        "person           0.4123   traffic light       n/a   dog              0.3000",
        "cat              0.2500",
    ]
    assert table.splitlines() == expected
