"""Cut one task out of a multi-task Mod-Squad checkpoint as a small single-task model.

    python tools/extract_task_model.py --ckpt outputs/modsquad/multitask_demo/checkpoints/last.ckpt --task coco \
        --out outputs/modsquad/coco_small.safetensors [--thresh 3] [--keep-softmax-mass]
    python tools/eval.py validate --config configs/modsquad/extracted_coco_demo.yaml \
        --config outputs/modsquad/coco_small.yaml

Writes ``<out>`` (the ``state_dict`` of the task's generic visionkit task: the extracted backbone and the task's head)
and ``<out stem>.yaml``, the ``model:`` section of a single-task config that rebuilds it by name
(``modsquad_vit_*`` with the extracted expert counts) and loads ``<out>`` through ``init_checkpoint``; combine it
with a ``data:`` / ``trainer:`` config for ``tools/eval.py`` or ``tools/train.py`` (fine-tuning, router-only tuning).
``--keep-softmax-mass`` keeps the removed experts' router rows, so that the outputs equal the multi-task model's
wherever no selected expert was removed (``docs/methods/modsquad.md``, "Extraction").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from visionkit.methods.modsquad import export_task, load_multitask_checkpoint
from visionkit.weights import save_state_dict


def main(argv: list[str] | None = None) -> Path:
    """Run the extraction; returns the written weight file."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="Lightning checkpoint of a MultiTaskTask run")
    parser.add_argument("--task", required=True, help="the task to cut out (a name of the run's `tasks`)")
    parser.add_argument("--out", type=Path, required=True, help="output weights (.safetensors)")
    parser.add_argument("--thresh", type=float, default=3.0, help="expert selection threshold (released: 3)")
    parser.add_argument(
        "--keep-softmax-mass", action="store_true", help="keep the removed experts' router rows (exact outputs)"
    )
    ns = parser.parse_args(argv)
    try:
        module = load_multitask_checkpoint(ns.ckpt)
    except ValueError as error:
        sys.exit(f"error: {error}")
    if ns.task not in module.hparams.tasks:
        sys.exit(f"error: {ns.ckpt} has no task {ns.task!r}; its tasks are {list(module.hparams.tasks)}")
    try:
        standalone, report, model_config = export_task(module, ns.task, ns.thresh, ns.keep_softmax_mass)
    except ValueError as error:
        sys.exit(f"error: {error}")
    out = save_state_dict(standalone.state_dict(), ns.out, metadata={"extracted_from": ns.ckpt.name, "task": ns.task})
    model_config["init_args"]["init_checkpoint"] = str(out)
    config_path = out.with_suffix(".yaml")
    config_path.write_text(yaml.safe_dump({"model": model_config}, sort_keys=False))
    head = sum(p.numel() for p in module.heads[ns.task].parameters())  # the task's head (the view has none)
    before, after = report.params_before + head, sum(p.numel() for p in standalone.parameters())
    print(report)
    print(f"the {ns.task} model (backbone + its head): {before:,} -> {after:,} parameters")
    print(f"wrote {out} and {config_path}")
    return out


if __name__ == "__main__":
    main()
