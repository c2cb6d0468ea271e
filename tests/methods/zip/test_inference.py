"""run_inference: COCO results over a split, resume by skipping finished images, per-image errors reported."""

import json
import shutil

import numpy as np
import pytest
import torch

from visionkit.eval.rle import decode_rle
from visionkit.methods.zip.inference import coco_items, folder_items, run_inference


class FakeSegmenter:
    """One centred-square instance per image, label 1; counts the images it saw."""

    def __init__(self):
        self.seen = 0

    def __call__(self, images):
        out = []
        for image in images:
            self.seen += 1
            h, w = image.shape[:2]
            mask = torch.zeros(1, h, w, dtype=torch.bool)
            mask[0, h // 4 : h // 2, w // 4 : w // 2] = True
            out.append({"masks": mask, "scores": torch.tensor([0.5]), "labels": torch.tensor([1])})
        return out


def test_coco_split_resume_and_errors(demo_paths, tmp_path):
    paths = demo_paths["coco"]
    images = tmp_path / "val2017"
    shutil.copytree(paths["val_images"], images)
    items, categories = coco_items(images, paths["val_annotations"])
    category_ids = [c["id"] for c in categories]
    broken = items[1][1]
    broken.write_bytes(b"not an image")
    output = tmp_path / "out" / "results.json"

    seg = FakeSegmenter()
    summary = run_inference(seg, items, category_ids, output, batch_size=2, show_progress=False)
    assert summary.done == len(items) - 1 and summary.skipped == 0
    assert list(summary.failed) == [items[1][0]] and str(broken) in summary.failed[items[1][0]]
    records = json.loads(output.read_text())
    assert len(records) == len(items) - 1 == summary.records
    assert {r["category_id"] for r in records} == {category_ids[1]}
    first = records[0]
    h, w = decode_rle(first["segmentation"]).shape
    assert decode_rle(first["segmentation"]).sum() == (h // 2 - h // 4) * (w // 2 - w // 4)

    # a second run skips everything already done (the failure too, unless asked to retry)
    seg2 = FakeSegmenter()
    summary2 = run_inference(seg2, items, category_ids, output, show_progress=False)
    assert seg2.seen == 0 and summary2.skipped == len(items) and summary2.records == len(records)
    assert json.loads(output.read_text()) == records
    shutil.copy(items[0][1], broken)  # repaired
    summary3 = run_inference(seg2, items, category_ids, output, retry_failed=True, show_progress=False)
    assert seg2.seen == 1 and not summary3.failed and summary3.records == len(items)


def test_interrupted_run_resumes(demo_paths, tmp_path):
    items = folder_items(demo_paths["coco"]["val_images"])
    assert [i for i, _ in items] == list(range(1, len(items) + 1))
    output = tmp_path / "r.json"

    class Crashing(FakeSegmenter):
        def __call__(self, images):
            if self.seen >= 2:
                raise KeyboardInterrupt  # the user stops the run after two images
            return super().__call__(images)

    with pytest.raises(KeyboardInterrupt):
        run_inference(Crashing(), items, [1, 2], output, show_progress=False)
    assert not output.exists()
    seg = FakeSegmenter()
    summary = run_inference(seg, items, [1, 2], output, show_progress=False)
    assert summary.skipped == 2 and seg.seen == len(items) - 2
    assert len(json.loads(output.read_text())) == len(items)


def test_segmenter_error_is_reported_not_fatal(demo_paths, tmp_path):
    items = folder_items(demo_paths["coco"]["val_images"])[:2]

    def failing(images):
        raise RuntimeError("CUDA out of memory")

    summary = run_inference(failing, items, [1], tmp_path / "r.json", show_progress=False)
    assert len(summary.failed) == 2 and all("RuntimeError: CUDA out of memory" in e for e in summary.failed.values())
    assert json.loads((tmp_path / "r.json").read_text()) == []
    assert np.all([isinstance(k, int) for k in summary.failed])
