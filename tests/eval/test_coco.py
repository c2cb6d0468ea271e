from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
from pycocotools import mask as pycoco_mask

from visionkit.eval import COCO_STAT_NAMES, COCOGroundTruth, evaluate_coco, format_coco_table
from visionkit.eval.coco import iou_type_label
from visionkit.eval.rle import encode_mask
from visionkit.utils.coco_format import COCOFormatError

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


def test_segm_results_with_a_bbox_use_the_mask_area_by_default(
    coco_set, pycocotools_reference, results_by_type
) -> None:
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


def _truncate_counts(record: dict) -> None:
    counts = record["segmentation"]["counts"]
    record["segmentation"] = {**record["segmentation"], "counts": counts[: len(counts) // 2]}


@pytest.mark.parametrize(
    ("iou_type", "mutate", "message"),
    [
        ("bbox", lambda r: r.pop("score"), r"result 3: lacks 'score'"),
        ("bbox", lambda r: r.update(bbox=[1.0, 2.0, 3.0]), r"result 3: 'bbox' must be \[x, y, w, h\] \(4 numbers\)"),
        ("bbox", lambda r: r.update(bbox=[1.0, 2.0, -3.0, 4.0]), r"result 3: 'bbox' must be finite with w, h >= 0"),
        ("bbox", lambda r: r.update(bbox=[1.0, float("nan"), 3.0, 4.0]), r"result 3: 'bbox' must be finite"),
        ("bbox", lambda r: r.update(bbox=None), r"result 3: 'bbox' must be \[x, y, w, h\] \(4 numbers\) or absent"),
        ("bbox", lambda r: r.update(score=float("nan")), r"result 3: 'score' must be a finite number"),
        ("bbox", lambda r: r.update(score="0.5"), r"result 3: 'score' must be a finite number, got '0.5'"),
        ("bbox", lambda r: r.update(image_id=[1]), r"result 3: 'image_id' must be an integer, got \[1\]"),
        ("bbox", lambda r: r.update(category_id=2.0), r"result 3: 'category_id' must be an integer, got 2.0"),
        ("bbox", lambda r: (r.pop("bbox"), r.pop("segmentation")), r"result 3: has neither a non-empty 'bbox' nor"),
        (
            "bbox",
            lambda r: r.clear() or r.update(image_id=3, caption="a cat"),
            r"result 3: lacks 'category_id' \(caption",
        ),
        ("segm", lambda r: r.pop("segmentation"), r"result 3: lacks 'segmentation' \(1 of \d+ results have none\)"),
        (
            "segm",
            lambda r: r.update(segmentation=[[1, 1, 5, 1, 5, 5]]),
            r"result 3: 'segmentation' must be an RLE dict",
        ),
        (
            "segm",
            lambda r: r.update(segmentation=encode_mask(np.ones((7, 9), bool))),
            r"result 3: 'segmentation' mask size \[7, 9\] differs from image",
        ),
        (
            "segm",
            _truncate_counts,
            r"result 3: 'segmentation' compressed RLE runs sum to \d+, expected height \* width",
        ),
        (
            "segm",
            lambda r: r["segmentation"].update(size=["a", "b"]),
            r"result 3: 'segmentation' RLE 'size' must be \[height, width\] integers, got \['a', 'b'\]",
        ),
        (
            "segm",
            lambda r: r["segmentation"].update(counts="zz!!"),
            r"result 3: 'segmentation' compressed RLE 'counts' is not a valid RLE string \(a character outside",
        ),
        (
            "segm",
            lambda r: r["segmentation"].update(counts=r["segmentation"]["counts"][:-1] + "P"),
            r"result 3: 'segmentation' compressed RLE 'counts' is not a valid RLE string \(the last value is cut",
        ),
        ("segm", lambda r: r["segmentation"].update(counts=[5, -1]), r"result 3: 'segmentation' uncompressed RLE"),
        ("segm", lambda r: r["segmentation"].update(counts=3), r"result 3: 'segmentation' RLE 'counts' must be a list"),
    ],
)
def test_malformed_results_raise(coco_set, iou_type, mutate, message) -> None:
    gt, results = coco_set(0, num_images=4)
    results = copy.deepcopy(results)
    mutate(results[3])
    with pytest.raises(COCOFormatError, match=r"^<results>: " + message):
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
    with pytest.raises(ValueError, match=r"wrong\.json: top level: missing key 'annotations'"):
        evaluate_coco(wrong, [])
    gt, _ = coco_set(0, num_images=3)
    del gt["annotations"][1]["area"]
    with pytest.raises(ValueError, match=r"<dict>: annotations\[1\] \(id 2\): no 'area'"):
        COCOGroundTruth(gt)
    gt, _ = coco_set(0, num_images=3)
    gt["annotations"][0]["image_id"] = 5555
    with pytest.raises(ValueError, match=r"annotations\[0\] \(id 1\): 'image_id' 5555 is not an image id listed"):
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


# ------------------------------------------------------------------------------------------ segm area conventions
# (segm_area, result kind): "mask" = detectron2 (pycocotools fed the records without bbox), "box" = pycocotools'
# loadRes as is (mmdet). "mask" with box-only records is an error (test below).
SEGM_CASES = [
    ("mask", "box+mask"),
    ("mask", "mask-only"),
    ("box", "box+mask"),
    ("box", "mask-only"),
    ("box", "box-only"),
]


@pytest.mark.parametrize("gt_variant", ["crowd", "area-given"])
@pytest.mark.parametrize(("segm_area", "kind"), SEGM_CASES)
def test_segm_area_conventions_match_pycocotools(
    coco_set, pycocotools_reference, result_kind, user_area_gt, segm_area, kind, gt_variant
) -> None:
    gt, results = coco_set(30, num_images=18)
    assert any(a["iscrowd"] for a in gt["annotations"])  # crowd GT (uncompressed RLE) is in every variant
    if gt_variant == "area-given":
        gt = user_area_gt(gt, 31)
        results = [dict(r, area=1e6 if i % 2 else 1.0) for i, r in enumerate(results)]  # loadRes overwrites it
    records = result_kind(results, kind)
    reference_records = result_kind(records, "mask-only") if segm_area == "mask" else records
    reference_stats, reference_per_class = pycocotools_reference(gt, reference_records, "segm")
    metrics = evaluate_coco(gt, records, "segm", segm_area=segm_area)
    _assert_matches_reference(metrics, reference_stats, reference_per_class, gt)
    assert (reference_stats[3:6] > -1).all() and reference_stats[0] > 0  # GT in every size range, some matches


@pytest.mark.parametrize("kind", ["box+mask", "mask-only", "box-only"])
@pytest.mark.parametrize("segm_area", ["mask", "box"])
def test_bbox_results_of_every_kind_match_pycocotools(
    coco_set, pycocotools_reference, result_kind, user_area_gt, kind, segm_area
) -> None:
    gt, results = coco_set(32, num_images=15)
    gt = user_area_gt(gt, 33)
    records = result_kind(results, kind)  # mask-only: loadRes takes the box from the mask and the mask area
    reference_stats, reference_per_class = pycocotools_reference(gt, records, "bbox")
    metrics = evaluate_coco(gt, records, "bbox", segm_area=segm_area)  # segm_area has no effect on bbox
    _assert_matches_reference(metrics, reference_stats, reference_per_class, gt)


def test_the_two_conventions_differ_on_box_and_mask_records(coco_set) -> None:
    gt, results = coco_set(34)
    by_mask = evaluate_coco(gt, results, "segm", segm_area="mask")
    by_box = evaluate_coco(gt, results, "segm", segm_area="box")
    assert by_mask["AP"] == by_box["AP"]  # the "all" range does not depend on the detection area
    assert [by_mask[k] for k in ("APs", "APm", "APl")] != [by_box[k] for k in ("APs", "APm", "APl")]


def test_box_only_results_need_segm_area_box(coco_set, tmp_path, result_kind) -> None:
    gt, results = coco_set(35, num_images=4)
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(result_kind(results, "box-only")))
    message = re.escape(f"{path}: result 0: lacks 'segmentation' ({len(results)} of {len(results)} results have none)")
    with pytest.raises(COCOFormatError, match=message + r".*segm_area='box'"):
        evaluate_coco(gt, path, "segm")
    assert evaluate_coco(gt, path, "segm", segm_area="box")["AP"] >= 0


def test_empty_bbox_lists_count_as_no_box(coco_set, pycocotools_reference, result_kind) -> None:
    gt, results = coco_set(36)
    records = [dict(r, bbox=[]) for r in results]  # loadRes: `bbox == []` takes the mask branch
    reference_stats, reference_per_class = pycocotools_reference(gt, records, "segm")
    for segm_area in ("mask", "box"):
        _assert_matches_reference(
            evaluate_coco(gt, records, "segm", segm_area=segm_area), reference_stats, reference_per_class, gt
        )
    # bbox: loadRes keeps the `[]` (it only adds a box where the key is absent) and COCOeval fails on it; visionkit
    # takes the box from the mask, as loadRes does for records without the key.
    with pytest.raises(Exception, match=r"bounding box \(Nx4\) or RLEs"):
        pycocotools_reference(gt, records, "bbox")
    reference_stats, reference_per_class = pycocotools_reference(gt, result_kind(results, "mask-only"), "bbox")
    _assert_matches_reference(evaluate_coco(gt, records, "bbox"), reference_stats, reference_per_class, gt)


def test_mixed_records_are_decided_per_record(coco_set, pycocotools_reference, result_kind) -> None:
    """pycocotools decides the loadRes branch on the first record; visionkit decides per record."""
    gt, results = coco_set(37)
    mixed = [dict(r) for r in results]
    for record in mixed[1::3]:
        del record["bbox"]
    with pytest.raises(KeyError):  # first record has a box: the box branch for all, KeyError on a box-less one
        pycocotools_reference(gt, mixed, "segm")
    # Per record: a box gives w * h, no box gives the mask area. pycocotools gives the same when each box-less record
    # gets a stand-in box [0, 0, mask area, 1] (segm IoU never reads the box).
    stand_in = [r if "bbox" in r else dict(r, bbox=[0, 0, int(pycoco_mask.area(r["segmentation"])), 1]) for r in mixed]
    reference_stats, reference_per_class = pycocotools_reference(gt, stand_in, "segm")
    _assert_matches_reference(
        evaluate_coco(gt, mixed, "segm", segm_area="box"), reference_stats, reference_per_class, gt
    )
    # First record without a box: pycocotools takes the mask area for every record, i.e. segm_area="mask".
    reordered = [mixed[1], mixed[0], *mixed[2:]]
    reference_stats, reference_per_class = pycocotools_reference(gt, reordered, "segm")
    _assert_matches_reference(evaluate_coco(gt, reordered, "segm"), reference_stats, reference_per_class, gt)


def test_segm_area_is_checked(coco_set) -> None:
    gt, results = coco_set(0, num_images=2)
    with pytest.raises(ValueError, match=r"segm_area must be one of \('mask', 'box'\), got 'area'"):
        evaluate_coco(gt, results, "segm", segm_area="area")


def test_iou_type_label() -> None:
    assert iou_type_label("bbox", "box") == "bbox"
    assert iou_type_label("segm") == "segm (mask area)"
    assert iou_type_label("segm", "box") == "segm (box area)"


# ------------------------------------------------------------------------------------------ red-team findings
@pytest.mark.timeout(30)
def test_truncated_rle_string_is_an_error_not_a_hang(coco_set, tmp_path) -> None:
    gt, results = coco_set(0, num_images=4)
    _truncate_counts(results[5])
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(results))
    with pytest.raises(COCOFormatError, match=re.escape(f"{path}: result 5: 'segmentation' compressed RLE runs sum")):
        evaluate_coco(gt, path, "segm")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: a["bbox"].__setitem__(2, float("nan")), r"'bbox' must be \[x, y, width, height\] of finite numbers"),
        (lambda a: a["bbox"].__setitem__(2, -3.0), r"'bbox' has a negative width or height"),
        (lambda a: a.update(segmentation=[[1.0, 2.0, 5.0, 6.0]]), r"polygon 0 has 4 coordinates"),
        (lambda a: a.update(segmentation={"size": ["a", "b"], "counts": "0"}), r"RLE 'size' must be \[height, width\]"),
        (lambda a: a.update(segmentation={"size": [4, 4], "counts": "0"}), r"RLE 'size' \[4, 4\] differs"),
    ],
)
def test_malformed_ground_truth_is_named_not_scored(coco_set, tmp_path, mutate, message) -> None:
    """Each of these used to give AP < 1 for perfect predictions (exit 0); COCODataset rejected the same file."""
    gt, _ = coco_set(0, num_images=4)
    position = next(i for i, a in enumerate(gt["annotations"]) if not a["iscrowd"])
    mutate(gt["annotations"][position])
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    annotation_id = gt["annotations"][position]["id"]
    with pytest.raises(
        COCOFormatError, match=re.escape(f"{path}: annotations[{position}] (id {annotation_id}") + ".*" + message
    ):
        evaluate_coco(path, [], "bbox")


@pytest.mark.timeout(30)
def test_truncated_ground_truth_rle_is_named(coco_set) -> None:
    gt, _ = coco_set(3)
    position, annotation = next(
        (i, a) for i, a in enumerate(gt["annotations"]) if isinstance(a["segmentation"], dict) and not a["iscrowd"]
    )
    annotation["segmentation"]["counts"] = annotation["segmentation"]["counts"][:-3]
    with pytest.raises(COCOFormatError, match=re.escape(f"<dict>: annotations[{position}] (id {annotation['id']},")):
        COCOGroundTruth(gt)
