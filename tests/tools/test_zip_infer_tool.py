"""tools/zip_infer.py: arguments, bad input (checkpoints, annotation file, progress file) and its exit status."""

import json
import shutil
import time

import pytest

from tests.models.foundation.tiny_models import TINY_ZIP_SETTINGS
from tests.tools.tool_module import load_tool


def test_missing_checkpoint_names_the_file_and_its_source(demo_paths, tmp_path, capsys):
    tool = load_tool("zip_infer")
    argv = [
        "--coco", str(demo_paths["coco"]["root"]), "--split", "val2017",
        "--clip-checkpoint", str(tmp_path / "ViT-B-16.pt"), "--boundary-checkpoint", str(tmp_path / "RN50x64.pt"),
        "--sam-checkpoint", str(tmp_path / "sam.pth"), "--output", str(tmp_path / "r.json"),
    ]  # fmt: skip
    assert tool.main(argv) == 2
    err = capsys.readouterr().err
    assert "ViT-B-16.pt" in err and "openaipublic" in err
    assert not (tmp_path / "r.json").exists()


def test_argument_errors(demo_paths, tmp_path):
    tool = load_tool("zip_infer")
    common = ["--clip-checkpoint", "a", "--sam-checkpoint", "b", "--output", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit, match="--images needs --classes"):
        tool.main(["--images", str(demo_paths["coco"]["val_images"]), *common])
    with pytest.raises(SystemExit, match=r"\['zebra'\] are not categories"):
        tool.main(["--coco", str(demo_paths["coco"]["root"]), "--classes", "circle,zebra", *common])
    with pytest.raises(SystemExit, match="unknown ZipConfig key 'kk'"):
        tool.main(["--coco", str(demo_paths["coco"]["root"]), "--set", "kk=3", *common])
    config = tool._config(["k=8", "nms_iou=0.5", "kmeans_init=random", "classification_first=false"], True)
    assert (config.k, config.nms_iou, config.kmeans_init, config.classification_first) == (8, 0.5, "random", False)
    assert config.class_agnostic


def _coco_copy(demo_paths, tmp_path):
    """A writable copy of the demo COCO val split: ``(root, annotation file)``."""
    root = tmp_path / "coco"
    shutil.copytree(demo_paths["coco"]["val_images"], root / "val2017")
    (root / "annotations").mkdir()
    ann = root / "annotations" / "instances_val2017.json"
    shutil.copy(demo_paths["coco"]["val_annotations"], ann)
    return root, ann


def _tiny_argv(tiny, root, output, *extra):
    return [
        "--coco", str(root), "--output", str(output),
        "--clip-checkpoint", tiny["clip_checkpoint"], "--clip-arch", json.dumps(tiny["clip_arch"]),
        "--boundary-checkpoint", tiny["boundary_checkpoint"], "--boundary-arch", json.dumps(tiny["boundary_arch"]),
        "--sam-checkpoint", tiny["sam_checkpoint"], "--sam-variant", tiny["sam_variant"],
        "--set", *(f"{key}={value}" for key, value in TINY_ZIP_SETTINGS.items()),
        *extra,
    ]  # fmt: skip


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    ("content", "problem"),
    [('{"images": [{"id": 1, "file_na', "JSON"), ('{"annotations": [], "categories": []}', "'images'")],
    ids=["truncated", "no-images"],
)
def test_bad_annotation_file_is_one_line_naming_it(demo_paths, tmp_path, capsys, content, problem):
    root, ann = _coco_copy(demo_paths, tmp_path)
    ann.write_text(content)
    tool = load_tool("zip_infer")
    started = time.perf_counter()
    argv = ["--coco", str(root), "--clip-checkpoint", "a", "--sam-checkpoint", "b", "--output", str(tmp_path / "o")]
    assert tool.main(argv) == 2
    assert time.perf_counter() - started < 5
    line = _one_line_error(capsys)
    assert line.startswith("error: ") and str(ann) in line and problem in line


def test_partial_line_without_image_id_names_file_and_line(demo_paths, tiny_zip_checkpoints, tmp_path, capsys):
    root, _ = _coco_copy(demo_paths, tmp_path)
    output = tmp_path / "r.json"
    partial = tmp_path / "r.json.partial.jsonl"
    partial.write_text('{"image_id": 1000001, "records": []}\n{"records": []}\n{"image_id": 1000002, "records": []}\n')
    assert load_tool("zip_infer").main(_tiny_argv(tiny_zip_checkpoints, root, output)) == 2
    line = _one_line_error(capsys)
    assert f"{partial}: line 2 " in line and "'image_id'" in line
    assert not output.exists()


def test_cut_last_line_is_redone_and_failures_exit_1_with_count(demo_paths, tiny_zip_checkpoints, tmp_path, capsys):
    root, _ = _coco_copy(demo_paths, tmp_path)
    (root / "val2017" / "000001000003.jpg").write_bytes(b"not an image")  # one image cannot be read
    output = tmp_path / "r.json"
    partial = tmp_path / "r.json.partial.jsonl"
    partial.write_text('{"image_id": 1000001, "records": []}\n{"image_id": 1000002, "rec')  # interrupted mid-line
    assert load_tool("zip_infer").main(_tiny_argv(tiny_zip_checkpoints, root, output)) == 1
    out, err = capsys.readouterr()
    assert "1 already done" in out and "2 images segmented" in out  # 1000002 (cut) and 1000004 done now
    assert err.strip().splitlines()[-1].startswith("error: 1 of 4 images failed")
    assert "000001000003.jpg" in err
    entries = [json.loads(line) for line in partial.read_text().splitlines()]  # every line whole again
    assert sorted(e["image_id"] for e in entries) == [1000001, 1000002, 1000003, 1000004]
    assert json.loads(output.read_text()) is not None
