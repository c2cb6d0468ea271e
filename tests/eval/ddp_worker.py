"""One rank of a two-process gloo run of the evaluators; ``test_distributed.py`` starts one process per rank.

Usage: ``python ddp_worker.py WORKDIR RANK``. ``WORKDIR/inputs.pt`` holds the ground truth and, per rank, the batches
to feed; the rank writes ``WORKDIR/rank<RANK>.json`` with what its evaluators' ``compute()`` returned.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from visionkit.eval import ClassificationEvaluator, COCOEvaluator, SegmentationEvaluator

WORLD_SIZE = 2


def run(rank: int, workdir: str) -> None:
    root = Path(workdir)
    dist.init_process_group("gloo", init_method=f"file://{root / 'store'}", rank=rank, world_size=WORLD_SIZE)
    try:
        inputs = torch.load(root / "inputs.pt", weights_only=True)
        coco = COCOEvaluator(inputs["gt"], contiguous_to_category_id=inputs["label_map"])
        for predictions, image_ids in inputs["coco"][rank]:
            coco.update(predictions, image_ids)
        segmentation = SegmentationEvaluator(num_classes=inputs["num_classes"])
        for pred, target in inputs["segmentation"][rank]:
            segmentation.update(pred, target)
        classification = ClassificationEvaluator(ks=(1, 3))
        for logits, target in inputs["classification"][rank]:
            classification.update(logits, target)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            coco_metrics = coco.compute()
        outputs = {
            "coco": coco_metrics,
            "coco_warnings": [str(w.message) for w in caught],
            "segmentation": segmentation.compute(),
            "classification": classification.compute(),
            "segmentation_again": segmentation.compute(),
            "classification_again": classification.compute(),
            "local_records": len(coco.records),
        }
        (root / f"rank{rank}.json").write_text(json.dumps(outputs))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run(int(sys.argv[2]), sys.argv[1])
