import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from visionkit.data.synthetic import DEMO_SIZES

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_data.py"
CLS_TRAIN, CLS_VAL = DEMO_SIZES["classification"]
COCO_TRAIN, COCO_VAL = DEMO_SIZES["coco"]
CLS_WRITTEN = f"(written: {CLS_TRAIN} train / {CLS_VAL} val images per class"


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_data_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # a fresh interpreter importing visionkit takes ~10 s on a busy 2-core machine
def test_make_data_cli_writes_and_reports(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    command = [sys.executable, str(TOOL), "--root", str(root), "--kinds", "classification", "coco", "--seed", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert f"classification: {root / 'classification'} {CLS_WRITTEN}; seed 1)" in result.stdout
    assert f"coco: {root / 'coco'} (written: {COCO_TRAIN} train / {COCO_VAL} val images; seed 1)" in result.stdout
    content = json.loads((root / "coco" / "annotations" / "instances_val2017.json").read_text())
    crowd = sum(a["iscrowd"] for a in content["annotations"])
    assert f"({len(content['images'])} images, {len(content['annotations'])} annotations of which {crowd} crowd" in (
        result.stdout
    )
    assert f"{root / 'classification' / 'train'}  ({3 * CLS_TRAIN} files)" in result.stdout
    assert len(list((root / "coco" / "train2017").glob("*.jpg"))) == COCO_TRAIN
    assert not (root / "ade20k").exists()


def test_make_data_skips_complete_sets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tool = _load_tool()
    assert tool.main(["--root", str(tmp_path), "--kinds", "classification"]) == 0
    assert f"{CLS_WRITTEN}; seed 0)" in capsys.readouterr().out
    assert tool.main(["--root", str(tmp_path), "--kinds", "classification"]) == 0
    assert "(already complete, skipped; seed 0)" in capsys.readouterr().out
    assert tool.main(["--root", str(tmp_path), "--kinds", "classification", "--force"]) == 0
    assert f"{CLS_WRITTEN}; seed 0)" in capsys.readouterr().out


def test_make_data_refuses_foreign_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ade20k").mkdir()
    (tmp_path / "ade20k" / "mine.txt").write_text("keep me")
    assert _load_tool().main(["--root", str(tmp_path), "--kinds", "ade20k"]) == 1
    assert "holds files but no visionkit_manifest.json" in capsys.readouterr().err
    assert (tmp_path / "ade20k" / "mine.txt").read_text() == "keep me"


def test_make_data_rejects_unknown_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _load_tool().main(["--root", str(tmp_path), "--kinds", "voc"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'voc'" in capsys.readouterr().err
