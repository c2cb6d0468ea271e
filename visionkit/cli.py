"""The one command line of visionkit: a LightningCLI over every task and datamodule, plus offline COCO evaluation.

``tools/train.py`` runs ``fit``; ``tools/eval.py`` runs ``validate`` / ``test`` / ``predict`` and ``coco`` (score a COCO
results JSON against a ground-truth file). YAML files pick the task and the data with ``class_path`` (bare class names
work because every task and datamodule is imported here, the torchgeo pattern)::

    python tools/train.py fit --config configs/quickstart.yaml
    python tools/train.py fit --config configs/quickstart.yaml --ckpt_path last       # resume an interrupted run
    python tools/eval.py validate --config configs/quickstart.yaml --ckpt_path last
    python tools/eval.py test --config probe.yaml --ckpt_path best     # the epoch ModelCheckpoint's monitor chose
    python tools/eval.py coco --gt instances_val2017.json --results results.json --iou-type bbox segm

Defaults added to Lightning's: ``seed_everything=0``; logs (CSV) and the resolved config under
``<default_root_dir>/logs/version_N/``; a ``ModelCheckpoint`` (``checkpoint.*`` options) that always writes
``<default_root_dir>/checkpoints/last.ckpt``, so that ``--ckpt_path last`` finds it from a new process; checkpoints
written atomically (temporary file + rename), so an interrupted save never leaves a truncated ``last.ckpt``; every
random generator re-seeded from ``(seed, epoch)`` at each epoch start, so a resumed run continues exactly as the
uninterrupted one would have (``visionkit.tasks.callbacks``).

``--ckpt_path`` is checked before the subcommand runs. ``last`` resolves to the newest ``last*.ckpt`` of the
checkpoint folder; when there is none, ``fit`` prints one line saying that training starts from scratch, and the
evaluation subcommands stop with an error (there are no weights to evaluate). For ``validate`` / ``test`` /
``predict``, ``best`` resolves to the best checkpoint that the run's monitored ``ModelCheckpoint``
(``checkpoint.monitor``) recorded in that ``last.ckpt`` (Lightning's own ``best`` only knows the checkpoints of the
current process, so it cannot find a finished run's); one line names the file and its score. The run must have been
trained with a monitor, e.g. ``--checkpoint.monitor=val/top1 --checkpoint.mode=max``; when there is no ``last.ckpt``,
no monitored best, or the recorded file is gone, the run stops with an error naming the files.

A checkpoint that is damaged (empty, truncated, a CRC mismatch, not loadable) stops the run with one message that
names the file and the intact ``*.ckpt`` files next to it that could be used instead (exit status 1), instead of a
torch traceback mid-run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, _InstantiatorFn
from lightning.pytorch.loggers import CSVLogger

from visionkit.tasks.callbacks import (
    AtomicCheckpointIO,
    ReseedEveryEpoch,
    checkpoint_problem,
    intact_checkpoints_near,
    read_checkpoint,
)
from visionkit.utils import write_json_atomic

__all__ = ["VisionkitCLI", "coco_main", "main"]

DEFAULT_ROOT_DIR = "outputs"


class _OuterModuleInstantiator(_InstantiatorFn):
    """Lightning's instantiator for the ``model`` / ``data`` key, applied to the configured class only.

    Lightning hands the key's whole config to ``save_hyperparameters`` of every task or datamodule that jsonargparse
    builds under that key, nested ones included; a datamodule made of child datamodules (``MultiTaskDataModule``)
    would give each child its parent's hyper-parameters. Nested modules are built without it and save their own.
    """

    def __call__(self, class_type: type, *args: Any, applied_instantiation_links: dict, **kwargs: Any) -> Any:
        self.cli._dump_config()
        class_path = str((self.cli.config_dump.get(self.key) or {}).get("class_path", ""))
        if class_path and class_path.rsplit(".", 1)[-1] != class_type.__name__:
            return class_type(*args, **kwargs)
        return super().__call__(class_type, *args, applied_instantiation_links=applied_instantiation_links, **kwargs)


class VisionkitCLI(LightningCLI):
    """LightningCLI in subclass mode over ``visionkit.tasks.BaseTask`` and ``visionkit.data.BaseDataModule``."""

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        import visionkit.methods.zip  # noqa: F401  (ZipTask and its datamodule by bare class name in YAML)
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

    def _add_instantiators(self) -> None:
        for key, base in (("model", self._model_class), ("data", self._datamodule_class)):
            self.parser.add_instantiator(_OuterModuleInstantiator(cli=self, key=key), base, subclasses=True)

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

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """Lightning's keyword arguments of the subcommand, with ``ckpt_path`` resolved and checked first."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") is not None:
            weights_only = kwargs.get("weights_only") is not False
            kwargs["ckpt_path"] = self._checked_ckpt_path(subcommand, str(kwargs["ckpt_path"]), weights_only)
        return kwargs

    def _last_checkpoint(self) -> tuple[str | None, str]:
        """The newest ``last*.ckpt`` of the ModelCheckpoint folders (``None``: none) and the folders, for messages."""
        folders = sorted({str(c.dirpath) for c in self.trainer.checkpoint_callbacks if getattr(c, "dirpath", None)})
        found = {
            path
            for callback in self.trainer.checkpoint_callbacks
            if isinstance(callback, ModelCheckpoint)
            for path in callback._find_last_checkpoints(self.trainer)
            if Path(path).is_file()
        }
        where = ", ".join(folders) or "the checkpoint folder (no ModelCheckpoint is configured)"
        return (max(found, key=os.path.getmtime) if found else None), where

    def _best_checkpoint(self, subcommand: str, weights_only: bool) -> str:
        """The best checkpoint recorded by the monitored ModelCheckpoint state in ``last.ckpt``, or ``SystemExit``."""
        start = f"visionkit {subcommand}: --ckpt_path best:"
        advice = (
            "Train with a monitored checkpoint (e.g. --checkpoint.monitor=val/top1 --checkpoint.mode=max) or give "
            "--ckpt_path=<file>."
        )
        last, where = self._last_checkpoint()
        if last is None:
            raise SystemExit(f"{start} there is no last.ckpt in {where}, where a run records its best. {advice}")
        checkpoint, problem = read_checkpoint(last, weights_only)
        if checkpoint is None:
            raise SystemExit(f"{start} cannot read {last}, which records the best checkpoint: {problem}. {advice}")
        callbacks = checkpoint.get("callbacks") or {}
        states = {key: state for key, state in callbacks.items() if isinstance(state, dict) and "monitor" in state}
        monitored = {key: state for key, state in states.items() if state["monitor"] and state.get("best_model_path")}
        # Prefer the state of this config's own monitored ModelCheckpoint (its state_key names monitor and mode).
        own = [c.state_key for c in self.trainer.checkpoint_callbacks if getattr(c, "monitor", None)]
        chosen = [key for key in own if key in monitored] or list(monitored)
        if not chosen:
            unset = [state["monitor"] for state in states.values() if state["monitor"]]
            reason = (
                f"the ModelCheckpoint monitoring {unset} has not saved a best checkpoint yet (was the metric logged?)"
                if unset
                else "the run's ModelCheckpoint had no monitor, so it only kept the newest epochs"
            )
            raise SystemExit(f"{start} {last} records no monitored best checkpoint: {reason}. {advice}")
        if len(chosen) > 1:
            monitors = [monitored[key]["monitor"] for key in chosen]
            raise SystemExit(
                f"{start} {last} records the best checkpoints of several monitors {monitors}; set --checkpoint.monitor "
                "(and --checkpoint.mode) as in training to pick one, or give --ckpt_path=<file>."
            )
        state = monitored[chosen[0]]
        best = Path(state["best_model_path"])
        if not best.is_file():
            moved = Path(last).parent / best.name  # the run folder was moved or copied since training
            if not moved.is_file():
                raise SystemExit(
                    f"{start} {last} names {best} as the best checkpoint ({state['monitor']}), but neither it nor "
                    f"{moved} exists. Give --ckpt_path=<file>."
                )
            best = moved
        if rank_zero_only.rank == 0:
            score = state.get("best_model_score")
            value = f" = {float(score):.6g}" if score is not None else ""
            print(f"{start} {best} (best {state['monitor']}{value}, recorded in {last})", file=sys.stderr, flush=True)
        return str(best)

    def _checked_ckpt_path(self, subcommand: str, ckpt_path: str, weights_only: bool) -> str | None:
        """The checkpoint file the subcommand should load (``None``: none), or ``SystemExit`` with the reason.

        ``best`` of ``fit``, ``hpc`` and remote paths (``s3://...``) are left to Lightning.
        """
        if ckpt_path == "best" and subcommand != "fit":
            ckpt_path = self._best_checkpoint(subcommand, weights_only)
        if ckpt_path in ("best", "hpc") or "://" in ckpt_path:
            return ckpt_path
        if ckpt_path == "last":
            found, where = self._last_checkpoint()
            if found is None:
                if subcommand != "fit":
                    raise SystemExit(
                        f"visionkit {subcommand}: --ckpt_path last: there is no last.ckpt in {where}, so there are no "
                        "weights to evaluate. Train first (tools/train.py fit) or give --ckpt_path=<file>."
                    )
                if rank_zero_only.rank == 0:
                    print(
                        f"visionkit fit: --ckpt_path last: no last.ckpt in {where} yet; training starts from scratch.",
                        file=sys.stderr,
                        flush=True,
                    )
                return None
            ckpt_path = found
        problem = checkpoint_problem(ckpt_path, weights_only)
        if problem is None:
            return ckpt_path
        action = "resume from" if subcommand == "fit" else "load"
        message = f"visionkit {subcommand}: cannot {action} the checkpoint {ckpt_path}: {problem}."
        intact, unchecked = intact_checkpoints_near(ckpt_path, weights_only)
        if intact:
            listed = "\n".join(f"  {path}" for path in intact)
            message += (
                f"\nIntact checkpoints next to it (newest first) that you could {action} instead:\n{listed}\n"
                f"e.g. --ckpt_path={intact[0]}"
            )
        else:
            message += f"\nNo intact *.ckpt file next to it in {Path(ckpt_path).parent}."
            if subcommand == "fit":
                message += " Start again without --ckpt_path, or give a checkpoint from elsewhere."
        if unchecked:
            message += f"\n({unchecked} older *.ckpt file(s) there were not checked.)"
        raise SystemExit(message)


def main(args: ArgsType = None, run: bool = True) -> VisionkitCLI:
    """Run the LightningCLI (``fit``, ``validate``, ``test``, ``predict``).

    Args:
        args: Command-line arguments (default: ``sys.argv[1:]``), or a config dict.
        run: Run the subcommand (``False`` only instantiates the classes).

    Returns:
        The CLI object, holding ``model``, ``datamodule`` and ``trainer``.

    Raises:
        SystemExit: Bad arguments (status 2, from the parser), or a ``--ckpt_path`` that is damaged or, for the
            evaluation subcommands, ``last`` without a checkpoint or ``best`` without a recorded monitored best
            (status 1; the message names the file and, for a damaged one, the intact checkpoints next to it).
    """
    return VisionkitCLI(args=args, run=run)


def coco_main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """Score a COCO results JSON against a ground-truth instances JSON; print the table(s) and write them as JSON.

    A user error (a missing file, a file that is not JSON, a malformed record, ids not in the ground truth) prints
    ``error: <message>`` (naming the file and the record) on stderr and exits with status 2, without a traceback.

    Args:
        argv: Arguments after ``coco`` (default: ``sys.argv[2:]``).

    Returns:
        The metrics, keyed by IoU type.

    Raises:
        SystemExit: Status 2 on a user error (and on bad arguments, from argparse).
    """
    from visionkit.eval import evaluate_coco, format_coco_table
    from visionkit.eval.coco import COCO_ENGINE, iou_type_label
    from visionkit.utils.coco_format import COCOFormatError

    parser = argparse.ArgumentParser(prog="tools/eval.py coco", description=coco_main.__doc__)
    parser.add_argument("--gt", required=True, type=Path, help="ground-truth COCO instances JSON")
    parser.add_argument("--results", required=True, type=Path, help="COCO results JSON (a list of result records)")
    parser.add_argument("--iou-type", nargs="+", choices=("bbox", "segm"), default=["bbox"], help="what to evaluate")
    parser.add_argument("--class-agnostic", action="store_true", help="merge all categories into one")
    parser.add_argument(
        "--segm-area",
        choices=("mask", "box"),
        default="mask",
        help="area of a segm detection for the small/medium/large split: 'mask' (detectron2, default) or 'box' (the "
        "record's bbox w*h, as pycocotools' loadRes and mmdet; see docs/eval/coco.md)",
    )
    parser.add_argument("--output", type=Path, default=None, help="metrics JSON (default: next to the results file)")
    ns = parser.parse_args(sys.argv[2:] if argv is None else argv)

    metrics: dict[str, dict[str, float]] = {}
    mode = "class-agnostic" if ns.class_agnostic else "class-aware"
    suffix = "_agnostic" if ns.class_agnostic else ""
    output = ns.output or ns.results.with_name(f"{ns.results.stem}_metrics{suffix}.json")
    try:
        for iou_type in ns.iou_type:
            stats = evaluate_coco(
                ns.gt, ns.results, iou_type=iou_type, class_agnostic=ns.class_agnostic, segm_area=ns.segm_area
            )
            metrics[iou_type] = stats
            print(format_coco_table(stats, title=f"{iou_type_label(iou_type, ns.segm_area)}, {mode}: {ns.results}"))
        # NaN (a class without ground truth) is written as null: JSON has no NaN.
        clean = {k: {n: (None if math.isnan(v) else v) for n, v in stats.items()} for k, stats in metrics.items()}
        header = {"gt": str(ns.gt), "results": str(ns.results), "mode": mode, "engine": COCO_ENGINE}
        header["segm_area"] = ns.segm_area if "segm" in ns.iou_type else None
        write_json_atomic({**header, **clean}, output, indent=2)
    except (FileNotFoundError, COCOFormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as error:  # the metrics file cannot be written
        print(f"error: cannot write {output}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"metrics written to {output}")
    return metrics
