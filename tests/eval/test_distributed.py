"""Evaluators under torch.distributed: 2 gloo processes on CPU, each fed half the data, must agree with one process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visionkit.eval import ClassificationEvaluator, COCOEvaluator, SegmentationEvaluator

WORKER = Path(__file__).with_name("ddp_worker.py")


def _assert_same(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert (math.isnan(value) and math.isnan(actual[key])) or actual[key] == value, key


@pytest.mark.slow  # two fresh interpreters import torch; ~10-30 s on 2 busy cores
def test_two_gloo_ranks_match_a_single_process(coco_set, model_predictions, tmp_path) -> None:
    gt, results = coco_set(30, num_images=14)
    predictions, image_ids, label_map = model_predictions(gt, results)
    generator = torch.Generator().manual_seed(0)
    num_classes = 5
    seg_batches = [
        (
            torch.randint(0, num_classes, (2, 6, 7), generator=generator),
            torch.randint(0, 6, (2, 6, 7), generator=generator),
        )
        for _ in range(4)
    ]
    seg_batches = [(pred, torch.where(target == 5, 255, target)) for pred, target in seg_batches]
    cls_batches = [
        (torch.randn(b, 6, generator=generator), torch.randint(0, 6, (b,), generator=generator)) for b in (3, 5, 2, 4)
    ]

    # Rank r takes every other image; rank 1 also repeats rank 0's first image, as DistributedSampler padding does.
    per_rank = [list(range(0, len(image_ids), 2)), [*range(1, len(image_ids), 2), 0]]
    coco_feed = [[([predictions[i]], [image_ids[i]]) for i in indices] for indices in per_rank]
    inputs = {
        "gt": gt,
        "label_map": label_map,
        "num_classes": num_classes,
        "coco": coco_feed,
        "segmentation": [seg_batches[0::2], seg_batches[1::2]],
        "classification": [cls_batches[0::2], cls_batches[1::2]],
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path), str(rank)],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    logs = [process.communicate(timeout=300)[0] for process in ranks]
    assert [process.returncode for process in ranks] == [0, 0], "\n".join(log[-3000:] for log in logs)
    outputs = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]

    single_coco = COCOEvaluator(gt, contiguous_to_category_id=label_map)
    single_coco.update(predictions, image_ids)
    single_seg = SegmentationEvaluator(num_classes=num_classes)
    for pred, target in seg_batches:
        single_seg.update(pred, target)
    single_cls = ClassificationEvaluator(ks=(1, 3))
    for logits, target in cls_batches:
        single_cls.update(logits, target)
    expected_coco, expected_seg, expected_cls = single_coco.compute(), single_seg.compute(), single_cls.compute()

    assert [output["local_records"] for output in outputs] != [0, 0]  # each rank really held only its share
    assert sum(output["local_records"] for output in outputs) > len(single_coco.records)  # incl. the repeat
    for output in outputs:
        _assert_same(output["coco"], expected_coco)
        _assert_same(output["segmentation"], expected_seg)
        _assert_same(output["classification"], expected_cls)
        # A second compute() reduces a fresh copy again, so the all-reduced counts are not doubled.
        _assert_same(output["segmentation_again"], expected_seg)
        _assert_same(output["classification_again"], expected_cls)
    assert expected_coco["segm_AP"] > 0.05
    assert any("1 repeated image(s)" in message for message in outputs[0]["coco_warnings"])
