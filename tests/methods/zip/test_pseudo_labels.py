"""results_to_training_set: COCO results -> a COCO training set the datasets read (self-training rounds)."""

import json

import numpy as np
import pytest

from visionkit.data import COCODataset
from visionkit.eval.rle import decode_rle, encode_mask
from visionkit.methods.zip.pseudo_labels import AGNOSTIC_CATEGORY, results_to_training_set


def _results_from_ground_truth(ann_path, scores):
    """One result record per ground-truth mask (non-crowd), with the given scores in turn."""
    gt = json.loads(ann_path.read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    records = []
    for i, ann in enumerate(a for a in gt["annotations"] if not a.get("iscrowd")):
        from pycocotools import mask as mask_utils

        h, w = sizes[ann["image_id"]]
        seg = ann["segmentation"]
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else seg
        mask = decode_rle(rle) if isinstance(rle.get("counts"), (str, bytes)) else mask_utils.decode(rle)
        records.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "score": scores[i % len(scores)],
                "segmentation": encode_mask(mask.astype(bool)),
            }
        )
    return records


def test_round_trip_into_coco_dataset(demo_paths, tmp_path):
    paths = demo_paths["coco"]
    ann_path = paths["train_annotations"]
    records = _results_from_ground_truth(ann_path, scores=[0.9, 0.5])
    out = tmp_path / "pseudo.json"
    content = results_to_training_set(records, ann_path, out, score_thresh=0.7)
    kept = [r for r in records if r["score"] >= 0.7]
    assert len(content["annotations"]) == len(kept) > 0
    written = json.loads(out.read_text())
    assert written["categories"] == json.loads(ann_path.read_text())["categories"]
    expected = sorted(kept, key=lambda r: (r["image_id"], -r["score"]))
    for ann, record in zip(written["annotations"], expected, strict=True):
        assert np.array_equal(decode_rle(ann["segmentation"]), decode_rle(record["segmentation"]))
        assert ann["area"] == decode_rle(record["segmentation"]).sum()
    dataset = COCODataset(paths["train_images"], out)
    n_targets = sum(len(dataset[i][1]["labels"]) for i in range(len(dataset)))
    assert n_targets == len(kept)


def test_class_agnostic_and_per_image_cap(demo_paths, tmp_path):
    ann_path = demo_paths["coco"]["train_annotations"]
    records = _results_from_ground_truth(ann_path, scores=[0.9, 0.8, 0.7])
    content = results_to_training_set(records, ann_path, tmp_path / "a.json", class_agnostic=True, max_per_image=1)
    assert content["categories"] == [AGNOSTIC_CATEGORY]
    per_image = {}
    for ann in content["annotations"]:
        assert ann["category_id"] == 1
        per_image[ann["image_id"]] = per_image.get(ann["image_id"], 0) + 1
    assert set(per_image.values()) == {1}
    best = {}
    for r in records:
        best[r["image_id"]] = max(best.get(r["image_id"], 0.0), r["score"])
    assert {a["image_id"]: a["score"] for a in content["annotations"]} == best


def test_bad_records_name_the_source(demo_paths, tmp_path):
    ann_path = demo_paths["coco"]["train_annotations"]
    good = _results_from_ground_truth(ann_path, scores=[0.9])[0]
    with pytest.raises(ValueError, match=r"results\[0\]: image_id 999999 is not an image"):
        results_to_training_set([{**good, "image_id": 999999}], ann_path, tmp_path / "x.json")
    with pytest.raises(ValueError, match=r"results\[0\]: category_id 55 is not a category"):
        results_to_training_set([{**good, "category_id": 55}], ann_path, tmp_path / "x.json")
    with pytest.raises(ValueError, match="need an RLE 'segmentation'"):
        results_to_training_set([{k: v for k, v in good.items() if k != "segmentation"}], ann_path, tmp_path / "x.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        results_to_training_set(broken, ann_path, tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="results file not found"):
        results_to_training_set(tmp_path / "missing.json", ann_path, tmp_path / "x.json")
