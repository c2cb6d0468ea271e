"""`tools/eval.py coco`: score a results JSON offline, print the table, write the metrics JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pycocotools import mask as mask_utils

from visionkit.cli import coco_main
from visionkit.eval import decode_rle, encode_mask, evaluate_coco

REPO = Path(__file__).resolve().parents[2]


def _results_from_ground_truth(gt: dict, drop_every: int = 0) -> list[dict]:
    """Perfect detections (boxes and RLE masks of the non-crowd GT), optionally dropping every n-th one."""
    images = {img["id"]: img for img in gt["images"]}
    results = []
    for i, ann in enumerate(a for a in gt["annotations"] if not a["iscrowd"]):
        if drop_every and i % drop_every == 0:
            continue
        img = images[ann["image_id"]]
        seg = ann["segmentation"]
        if isinstance(seg, list):  # polygons -> RLE
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, img["height"], img["width"]))
            seg = encode_mask(decode_rle(rle))
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": ann["bbox"],
                "score": 1.0,
                "segmentation": seg,
            }
        )
    return results


@pytest.fixture()
def coco_files(demo_paths, tmp_path):
    gt_path = demo_paths["coco"]["val_annotations"]
    gt = json.loads(Path(gt_path).read_text())
    return gt_path, gt, tmp_path


def test_perfect_results_score_one_and_metrics_json_is_written(coco_files, capsys):
    gt_path, gt, tmp_path = coco_files
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(_results_from_ground_truth(gt)))
    metrics = coco_main(["--gt", str(gt_path), "--results", str(results_path), "--iou-type", "bbox", "segm"])
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)
    printed = capsys.readouterr().out
    assert "bbox (class-aware)" in printed and "segm (class-aware)" in printed
    written = json.loads((tmp_path / "results_metrics.json").read_text())
    assert written["bbox"]["AP"] == metrics["bbox"]["AP"] and written["mode"] == "class-aware"


def test_tool_matches_evaluate_coco_and_class_agnostic_mode(coco_files):
    gt_path, gt, tmp_path = coco_files
    results = _results_from_ground_truth(gt, drop_every=3)
    for r in results[::2]:  # relabel some detections: wrong class for class-aware, still right for agnostic
        r["category_id"] = 1 if r["category_id"] != 1 else 3
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(results))
    aware = coco_main(["--gt", str(gt_path), "--results", str(results_path)])
    agnostic = coco_main(["--gt", str(gt_path), "--results", str(results_path), "--class-agnostic"])
    assert aware["bbox"] == evaluate_coco(gt_path, results, iou_type="bbox")
    assert agnostic["bbox"] == evaluate_coco(gt_path, results, iou_type="bbox", class_agnostic=True)
    assert agnostic["bbox"]["AP"] > aware["bbox"]["AP"]
    assert (tmp_path / "results_metrics_agnostic.json").is_file()


def test_script_reports_unknown_category_clearly(coco_files):
    gt_path, gt, tmp_path = coco_files
    results = _results_from_ground_truth(gt)[:2]
    results[0]["category_id"] = 999
    results_path = tmp_path / "bad.json"
    results_path.write_text(json.dumps(results))
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "eval.py"), "coco", "--gt", str(gt_path), "--results", str(results_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert "999" in out.stderr


def test_eval_tool_without_subcommand_prints_usage():
    out = subprocess.run([sys.executable, str(REPO / "tools" / "eval.py")], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "usage: python tools/eval.py" in out.stderr
