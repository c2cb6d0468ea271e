from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from visionkit.eval import COCO_STAT_NAMES, COCOEvaluator, COCOGroundTruth, decode_rle, evaluate_coco


def _assert_same_metrics(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert (math.isnan(value) and math.isnan(actual[key])) or actual[key] == value, key


def test_update_converts_to_coco_records() -> None:
    gt = {
        "images": [{"id": 7, "height": 6, "width": 8}],
        "annotations": [],
        "categories": [{"id": 3, "name": "a"}, {"id": 9, "name": "b"}],
    }
    masks = torch.zeros(2, 6, 8)
    masks[0, 1:3, 2:5] = 0.9
    masks[0, 0, 0] = 0.5  # exactly at the threshold: background (> 0.5 is foreground)
    masks[1, 4:, :] = 0.51
    evaluator = COCOEvaluator(gt, contiguous_to_category_id={0: 9, 1: 3})
    prediction = {
        "boxes": torch.tensor([[1.5, 2.0, 4.5, 6.0], [0.0, 0.0, 8.0, 6.0]]),
        "scores": torch.tensor([0.75, 0.25]),
        "labels": torch.tensor([1, 0]),
        "masks": masks,
    }
    evaluator.update([prediction], [torch.tensor(7)])
    records = evaluator.records
    assert [(r["image_id"], r["category_id"], r["bbox"], r["score"]) for r in records] == [
        (7, 3, [1.5, 2.0, 3.0, 4.0], 0.75),
        (7, 9, [0.0, 0.0, 8.0, 6.0], 0.25),
    ]
    np.testing.assert_array_equal(decode_rle(records[0]["segmentation"]), (masks[0] > 0.5).numpy())
    assert decode_rle(records[0]["segmentation"]).sum() == 6
    assert decode_rle(records[1]["segmentation"]).sum() == 16
    assert evaluator.image_ids == [7]


def test_default_label_map_is_sorted_category_ids(coco_set) -> None:
    gt, _ = coco_set(0, num_images=2)
    evaluator = COCOEvaluator(gt, iou_types="bbox")
    assert evaluator.iou_types == ("bbox",)
    assert evaluator.engine.startswith("faster-coco-eval ")
    assert evaluator.contiguous_to_category_id == dict(enumerate(sorted(c["id"] for c in gt["categories"])))


def test_compute_matches_pycocotools_on_its_records(coco_set, model_predictions, pycocotools_reference) -> None:
    gt, results = coco_set(20)
    predictions, image_ids, label_map = model_predictions(gt, results)
    evaluator = COCOEvaluator(gt, contiguous_to_category_id=label_map)
    for start in range(0, len(predictions), 4):
        evaluator.update(predictions[start : start + 4], image_ids[start : start + 4])
    metrics = evaluator.compute()
    records = evaluator.records
    assert len(records) == len(results)
    for iou_type in ("bbox", "segm"):
        typed = [
            {k: v for k, v in r.items() if k != ("segmentation" if iou_type == "bbox" else "bbox")} for r in records
        ]
        reference_stats, _ = pycocotools_reference(gt, typed, iou_type)
        vector = np.asarray([metrics[f"{iou_type}_{name}"] for name in COCO_STAT_NAMES])
        np.testing.assert_allclose(vector, reference_stats, rtol=0, atol=1e-12)
        expected = {f"{iou_type}_{k}": v for k, v in evaluate_coco(gt, records, iou_type).items()}
        _assert_same_metrics({k: v for k, v in metrics.items() if k.startswith(iou_type)}, expected)
    assert metrics["segm_AP"] > 0.05  # the predictions are mostly right, so AP is far from 0


def test_partial_run_is_evaluated_on_the_images_seen(coco_set, model_predictions, pycocotools_reference) -> None:
    gt, results = coco_set(21)
    predictions, image_ids, label_map = model_predictions(gt, results)
    evaluator = COCOEvaluator(gt, iou_types=("segm",), contiguous_to_category_id=label_map)
    evaluator.update(predictions[:5], image_ids[:5])  # like limit_val_batches
    metrics = evaluator.compute()
    mask_records = [{k: v for k, v in r.items() if k != "bbox"} for r in evaluator.records]  # trap 2
    reference_stats, _ = pycocotools_reference(gt, mask_records, "segm", image_ids=image_ids[:5])
    vector = np.asarray([metrics[f"segm_{name}"] for name in COCO_STAT_NAMES])
    np.testing.assert_allclose(vector, reference_stats, rtol=0, atol=1e-12)
    full_reference, _ = pycocotools_reference(gt, mask_records, "segm")
    assert not np.allclose(full_reference, reference_stats)  # the full GT would count the unseen images as misses


def test_probability_masks_equal_their_thresholded_bool_masks(coco_set, model_predictions) -> None:
    gt, results = coco_set(22, num_images=5)
    predictions, image_ids, label_map = model_predictions(gt, results)
    as_probabilities = [dict(p, masks=p["masks"].float() * 0.6 + 0.2) for p in predictions]  # 0.2 / 0.8
    as_bool = COCOEvaluator(gt, contiguous_to_category_id=label_map)
    as_bool.update(predictions, image_ids)
    as_float = COCOEvaluator(gt, contiguous_to_category_id=label_map)
    as_float.update(as_probabilities, image_ids)
    assert as_float.records == as_bool.records


def test_repeated_images_are_evaluated_once_with_a_warning(coco_set, model_predictions) -> None:
    gt, results = coco_set(23, num_images=6)
    predictions, image_ids, label_map = model_predictions(gt, results, with_masks=False)
    once = COCOEvaluator(gt, iou_types=("bbox",), contiguous_to_category_id=label_map)
    once.update(predictions, image_ids)
    twice = COCOEvaluator(gt, iou_types=("bbox",), contiguous_to_category_id=label_map)
    twice.update(predictions, image_ids)
    twice.update(predictions[:2], image_ids[:2])
    with pytest.warns(UserWarning, match=r"COCOEvaluator: 2 repeated image\(s\)"):
        metrics = twice.compute()
    _assert_same_metrics(metrics, once.compute())


def test_reset_and_compute_without_updates(coco_set, model_predictions) -> None:
    gt, results = coco_set(24, num_images=4)
    predictions, image_ids, label_map = model_predictions(gt, results, with_masks=False)
    evaluator = COCOEvaluator(gt, iou_types=("bbox",), contiguous_to_category_id=label_map)
    evaluator.update(predictions, image_ids)
    evaluator.reset()
    assert evaluator.records == []
    with pytest.warns(UserWarning, match=r"compute\(\) called before any update\(\); all stats are 0\.0"):
        metrics = evaluator.compute()
    assert [metrics[f"bbox_{name}"] for name in COCO_STAT_NAMES] == [0.0] * 12


def test_write_results_is_atomic_json_of_the_records(coco_set, model_predictions, tmp_path) -> None:
    gt, results = coco_set(25, num_images=5)
    predictions, image_ids, label_map = model_predictions(gt, results)
    evaluator = COCOEvaluator(gt, contiguous_to_category_id=label_map)
    evaluator.update(predictions, image_ids)
    path = evaluator.write_results(tmp_path / "out" / "results.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temporary file left behind
    assert json.loads(path.read_text()) == evaluator.records
    for iou_type in ("bbox", "segm"):
        from_file = evaluate_coco(gt, path, iou_type)
        expected = {k[len(iou_type) + 1 :]: v for k, v in evaluator.compute().items() if k.startswith(iou_type)}
        _assert_same_metrics(from_file, expected)


def test_ground_truth_object_can_be_shared(coco_set, model_predictions) -> None:
    gt, results = coco_set(26, num_images=4)
    predictions, image_ids, label_map = model_predictions(gt, results, with_masks=False)
    ground_truth = COCOGroundTruth(gt)
    shared = COCOEvaluator(ground_truth, iou_types=("bbox",), contiguous_to_category_id=label_map)
    fresh = COCOEvaluator(gt, iou_types=("bbox",), contiguous_to_category_id=label_map)
    shared.update(predictions, image_ids)
    fresh.update(predictions, image_ids)
    _assert_same_metrics(shared.compute(), fresh.compute())


def test_bad_predictions_raise(coco_set) -> None:
    gt, _ = coco_set(0, num_images=2)
    image_id = gt["images"][0]["id"]
    height, width = gt["images"][0]["height"], gt["images"][0]["width"]
    good = {
        "boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]),
        "scores": torch.tensor([0.5]),
        "labels": torch.tensor([0]),
        "masks": torch.zeros(1, height, width, dtype=torch.bool),
    }
    evaluator = COCOEvaluator(gt)
    with pytest.raises(ValueError, match=r"got 1 predictions for 2 image ids"):
        evaluator.update([good], [image_id, image_id])
    with pytest.raises(ValueError, match=r"image id 999999 is not in the ground truth <dict>"):
        evaluator.update([good], [999999])
    with pytest.raises(ValueError, match=rf"prediction for image {image_id}: labels \[9, 42\] are not in"):
        unknown_labels = {"boxes": torch.zeros(3, 4), "scores": torch.ones(3), "labels": torch.tensor([42, 0, 9])}
        evaluator.update([dict(good, **unknown_labels, masks=torch.zeros(3, height, width))], [image_id])
    with pytest.raises(ValueError, match=r"expected boxes \(K, 4\), scores \(K,\), labels \(K,\), got \(1, 3\)"):
        evaluator.update([dict(good, boxes=torch.zeros(1, 3))], [image_id])
    with pytest.raises(ValueError, match=r"boxes must be finite xyxy with x2 >= x1, y2 >= y1"):
        evaluator.update([dict(good, boxes=torch.tensor([[5.0, 0.0, 1.0, 5.0]]))], [image_id])
    with pytest.raises(ValueError, match=r"lacks 'masks', needed for iou_type 'segm'"):
        evaluator.update([{k: v for k, v in good.items() if k != "masks"}], [image_id])
    with pytest.raises(ValueError, match=rf"masks must be \(K, H, W\) = \(1, {height}, {width}\) at the original"):
        evaluator.update([dict(good, masks=torch.zeros(1, 4, 4, dtype=torch.bool))], [image_id])
    assert evaluator.records == []
    with pytest.raises(ValueError, match=r"iou_types must be distinct values from \('bbox', 'segm'\)"):
        COCOEvaluator(gt, iou_types=("bbox", "keypoints"))
    with pytest.raises(ValueError, match=r"contiguous_to_category_id maps to category ids not in <dict>: \[4\]"):
        COCOEvaluator(gt, contiguous_to_category_id={0: 1, 1: 4})


def test_segm_area_box_matches_pycocotools_on_the_records_as_they_are(
    coco_set, model_predictions, pycocotools_reference
) -> None:
    gt, results = coco_set(23)
    predictions, image_ids, label_map = model_predictions(gt, results)
    by_box = COCOEvaluator(gt, contiguous_to_category_id=label_map, segm_area="box")
    by_mask = COCOEvaluator(gt, contiguous_to_category_id=label_map)
    for evaluator in (by_box, by_mask):
        evaluator.update(predictions, image_ids)
    box_metrics, mask_metrics = by_box.compute(), by_mask.compute()
    reference_stats, _ = pycocotools_reference(gt, by_box.records, "segm")  # bbox + segmentation: the box branch
    vector = np.asarray([box_metrics[f"segm_{name}"] for name in COCO_STAT_NAMES])
    np.testing.assert_allclose(vector, reference_stats, rtol=0, atol=1e-12)
    assert box_metrics["segm_APs"] != mask_metrics["segm_APs"]
    assert {k: v for k, v in box_metrics.items() if k.startswith("bbox_")} == {
        k: v for k, v in mask_metrics.items() if k.startswith("bbox_")
    }
    assert (by_box.segm_area, by_mask.segm_area) == ("box", "mask")
    assert [by_box.table_title(t) for t in by_box.iou_types] == ["bbox", "segm (box area)"]
    assert by_mask.table_title("segm") == "segm (mask area)"
    with pytest.raises(ValueError, match=r"segm_area must be one of"):
        COCOEvaluator(gt, segm_area="boxes")
