"""tools/make_pseudo_labels.py: results JSON -> training instances JSON, exit codes and messages."""

import json

from tests.methods.zip.test_pseudo_labels import _results_from_ground_truth
from tests.tools.tool_module import load_tool


def test_tool_writes_the_training_set_and_reports_errors(demo_paths, tmp_path, capsys):
    ann = demo_paths["coco"]["train_annotations"]
    results = tmp_path / "results.json"
    records = _results_from_ground_truth(ann, scores=[0.9, 0.3])
    results.write_text(json.dumps(records))
    out = tmp_path / "pseudo.json"
    tool = load_tool("make_pseudo_labels")
    argv = [str(results), "--images-from", str(ann), "--output", str(out), "--score-thresh", "0.5"]
    assert tool.main(argv) == 0
    written = json.loads(out.read_text())
    assert len(written["annotations"]) == sum(r["score"] >= 0.5 for r in records)
    assert f"wrote {out}" in capsys.readouterr().out

    assert tool.main([str(tmp_path / "missing.json"), "--images-from", str(ann), "--output", str(out)]) == 1
    assert "results file not found" in capsys.readouterr().err
