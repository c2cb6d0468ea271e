"""`tools/eval.py coco`: score a results JSON offline, print the table, write the metrics JSON."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pycocotools import mask as mask_utils

from tests.tools.tool_module import load_tool
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
    assert "bbox, class-aware" in printed and "segm (mask area), class-aware" in printed
    written = json.loads((tmp_path / "results_metrics.json").read_text())
    assert written["bbox"]["AP"] == metrics["bbox"]["AP"] and written["mode"] == "class-aware"
    assert written["segm_area"] == "mask" and written["engine"].startswith("faster-coco-eval")


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


def test_segm_area_box_is_used_named_and_recorded(coco_files, capsys):
    gt_path, gt, tmp_path = coco_files
    perfect = [dict(r, score=0.9) for r in _results_from_ground_truth(gt)]
    # Confident false positives (the same masks, another class) with large boxes: with the box area the small-object
    # range ignores them, with the mask area it counts them.
    category_ids = sorted(c["id"] for c in gt["categories"])
    wrong_class = [
        dict(r, category_id=category_ids[(category_ids.index(r["category_id"]) + 1) % len(category_ids)])
        for r in perfect
    ]
    results = perfect + [dict(r, bbox=[0.0, 0.0, 150.0, 150.0], score=1.0) for r in wrong_class]
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(results))
    argv = ["--gt", str(gt_path), "--results", str(results_path), "--iou-type", "segm"]
    by_box = coco_main([*argv, "--segm-area", "box", "--output", str(tmp_path / "box.json")])
    assert by_box["segm"] == evaluate_coco(gt_path, results, iou_type="segm", segm_area="box")
    assert by_box["segm"] != evaluate_coco(gt_path, results, iou_type="segm", segm_area="mask")
    assert "segm (box area), class-aware" in capsys.readouterr().out
    assert json.loads((tmp_path / "box.json").read_text())["segm_area"] == "box"


def _truncated_rle_results(gt: dict, tmp_path: Path | None = None) -> list[dict]:
    results = _results_from_ground_truth(gt)
    counts = results[1]["segmentation"]["counts"]
    results[1]["segmentation"] = {**results[1]["segmentation"], "counts": counts[: len(counts) // 2]}
    return results


USER_ERRORS = {
    "missing results file": (lambda gt, tmp: tmp / "none.json", r"COCO results file not found: .*none\.json"),
    "results not JSON": (lambda gt, tmp: "{oops", r"bad\.json: cannot read COCO results as JSON"),
    "results not a list": (lambda gt, tmp: {"image_id": 1}, r"bad\.json: COCO results must be a JSON list, got dict"),
    "truncated RLE": (_truncated_rle_results, r"bad\.json: result 1: 'segmentation' compressed RLE runs sum to"),
    "RLE size not ints": (
        lambda gt, tmp: [
            dict(r, segmentation={**r["segmentation"], "size": ["a", "b"]}) for r in _results_from_ground_truth(gt)
        ],
        r"bad\.json: result 0: 'segmentation' RLE 'size' must be \[height, width\] integers",
    ),
    "unknown category": (
        lambda gt, tmp: [dict(r, category_id=999) for r in _results_from_ground_truth(gt)[:2]],
        r"bad\.json: results refer to category ids not in the ground truth \[999\]",
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_errors_print_one_line_and_exit_2(coco_files, capsys, case):
    gt_path, gt, tmp_path = coco_files
    make, message = USER_ERRORS[case]
    content = make(gt, tmp_path)
    results_path = content if isinstance(content, Path) else tmp_path / "bad.json"
    if not isinstance(content, Path):
        results_path.write_text(content if isinstance(content, str) else json.dumps(content))
    tool = load_tool("eval")
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["coco", "--gt", str(gt_path), "--results", str(results_path), "--iou-type", "bbox", "segm"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err), err


def test_bad_ground_truth_is_a_user_error(coco_files, capsys):
    _, gt, tmp_path = coco_files
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(_results_from_ground_truth(gt)))
    gt["annotations"][0]["bbox"][2] = -1.0
    bad_gt = tmp_path / "gt.json"
    bad_gt.write_text(json.dumps(gt))
    with pytest.raises(SystemExit) as exit_info:
        load_tool("eval").main(["coco", "--gt", str(bad_gt), "--results", str(results_path)])
    assert exit_info.value.code == 2
    assert re.fullmatch(
        r"error: .*gt\.json: annotations\[0\] \(id \d+\): 'bbox' has a negative width.*\n", capsys.readouterr().err
    )


@pytest.mark.timeout(300)
def test_script_reports_a_truncated_rle_in_one_line(coco_files):
    gt_path, gt, tmp_path = coco_files
    results_path = tmp_path / "bad.json"
    results_path.write_text(json.dumps(_truncated_rle_results(gt)))
    command = [sys.executable, str(REPO / "tools" / "eval.py"), "coco", "--gt", str(gt_path)]
    out = subprocess.run(
        [*command, "--results", str(results_path), "--iou-type", "segm"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert f"{results_path}: result 1: 'segmentation' compressed RLE runs sum to" in out.stderr


def test_eval_tool_without_subcommand_prints_usage():
    out = subprocess.run([sys.executable, str(REPO / "tools" / "eval.py")], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "usage: python tools/eval.py" in out.stderr
