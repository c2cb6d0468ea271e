"""The one command line of visionkit: a LightningCLI over every task and datamodule, plus offline COCO evaluation.

``tools/train.py`` runs ``fit``; ``tools/eval.py`` runs ``validate`` / ``test`` / ``predict`` and ``coco`` (score a COCO
results JSON against a ground-truth file). YAML files pick the task and the data with ``class_path`` (bare class names
work because every task and datamodule is imported here, the torchgeo pattern)::

    python tools/train.py fit --config configs/quickstart.yaml
    python tools/train.py fit --config configs/quickstart.yaml --ckpt_path last       # resume an interrupted run
    python tools/eval.py validate --config configs/quickstart.yaml --ckpt_path last
    python tools/eval.py coco --gt instances_val2017.json --results results.json --iou-type bbox segm

Defaults added to Lightning's: ``seed_everything=0``; logs (CSV) and the resolved config under
``<default_root_dir>/logs/version_N/``; a ``ModelCheckpoint`` (``checkpoint.*`` options) that always writes
``<default_root_dir>/checkpoints/last.ckpt``, so that ``--ckpt_path last`` finds it from a new process; checkpoints
written atomically (temporary file + rename), so an interrupted save never leaves a truncated ``last.ckpt``; every
random generator re-seeded from ``(seed, epoch)`` at each epoch start, so a resumed run continues exactly as the
uninterrupted one would have (``visionkit.tasks.callbacks``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from visionkit.tasks.callbacks import AtomicCheckpointIO, ReseedEveryEpoch
from visionkit.utils import write_json_atomic

__all__ = ["VisionkitCLI", "coco_main", "main"]

DEFAULT_ROOT_DIR = "outputs"


class VisionkitCLI(LightningCLI):
    """LightningCLI in subclass mode over ``visionkit.tasks.BaseTask`` and ``visionkit.data.BaseDataModule``."""

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        from visionkit.data import BaseDataModule
        from visionkit.tasks import BaseTask

        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("trainer_defaults", {"default_root_dir": DEFAULT_ROOT_DIR})
        super().__init__(
            model_class=BaseTask,
            datamodule_class=BaseDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the ``checkpoint.*`` options (a ModelCheckpoint that always keeps ``last.ckpt``)."""
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})

    def _parse_ckpt_path(self) -> None:
        """Keep the config (YAML + command line) as the one source of the model's arguments.

        LightningCLI would re-apply the hyper-parameters stored in ``--ckpt_path`` over the command line, so that
        ``tools/eval.py predict --config c.yaml --ckpt_path x.ckpt --model.predictions_path out.json`` silently
        ignored the override. Here the checkpoint only supplies the weights (and training state); a config that
        builds a different network fails when the weights are loaded, with the mismatching keys named.
        """

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        root = Path(config.get("default_root_dir") or DEFAULT_ROOT_DIR)
        config["default_root_dir"] = str(root)
        if config.get("logger") is None or config.get("logger") is True:
            config["logger"] = CSVLogger(save_dir=root, name="logs")
        for callback in callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                # Fixed folder (not under the versioned log dir) so that `--ckpt_path last` finds it in a new run.
                callback.dirpath = os.path.realpath(root / "checkpoints")
        if not config.get("plugins"):
            config["plugins"] = [AtomicCheckpointIO()]
        if not any(isinstance(c, ReseedEveryEpoch) for c in [*callbacks, *(config.get("callbacks") or [])]):
            callbacks.append(ReseedEveryEpoch())
        return super()._instantiate_trainer(config, callbacks)


def main(args: ArgsType = None, run: bool = True) -> VisionkitCLI:
    """Run the LightningCLI (``fit``, ``validate``, ``test``, ``predict``).

    Args:
        args: Command-line arguments (default: ``sys.argv[1:]``), or a config dict.
        run: Run the subcommand (``False`` only instantiates the classes).

    Returns:
        The CLI object, holding ``model``, ``datamodule`` and ``trainer``.
    """
    return VisionkitCLI(args=args, run=run)


def coco_main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Score a COCO results JSON against a ground-truth instances JSON; print the table(s) and write them as JSON.

    Args:
        argv: Arguments after ``coco`` (default: ``sys.argv[2:]``).

    Returns:
        The metrics, keyed by IoU type.
    """
    from visionkit.eval import evaluate_coco, format_coco_table

    parser = argparse.ArgumentParser(prog="tools/eval.py coco", description=coco_main.__doc__)
    parser.add_argument("--gt", required=True, type=Path, help="ground-truth COCO instances JSON")
    parser.add_argument("--results", required=True, type=Path, help="COCO results JSON (a list of result records)")
    parser.add_argument("--iou-type", nargs="+", choices=("bbox", "segm"), default=["bbox"], help="what to evaluate")
    parser.add_argument("--class-agnostic", action="store_true", help="merge all categories into one")
    parser.add_argument("--output", type=Path, default=None, help="metrics JSON (default: next to the results file)")
    ns = parser.parse_args(sys.argv[2:] if argv is None else argv)

    metrics: dict[str, dict[str, float]] = {}
    mode = "class-agnostic" if ns.class_agnostic else "class-aware"
    for iou_type in ns.iou_type:
        stats = evaluate_coco(ns.gt, ns.results, iou_type=iou_type, class_agnostic=ns.class_agnostic)
        metrics[iou_type] = stats
        print(format_coco_table(stats, title=f"{iou_type} ({mode}): {ns.results}"))
    suffix = "_agnostic" if ns.class_agnostic else ""
    output = ns.output or ns.results.with_name(f"{ns.results.stem}_metrics{suffix}.json")
    # NaN (a class without ground truth) is written as null: JSON has no NaN.
    clean = {k: {n: (None if math.isnan(v) else v) for n, v in stats.items()} for k, stats in metrics.items()}
    write_json_atomic({"gt": str(ns.gt), "results": str(ns.results), "mode": mode, **clean}, output, indent=2)
    print(f"metrics written to {output}")
    return metrics
