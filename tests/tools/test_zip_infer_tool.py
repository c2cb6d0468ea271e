"""tools/zip_infer.py: argument handling and the missing-checkpoint message (no weights exist on CI)."""

import pytest

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
