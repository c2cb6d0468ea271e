"""MultiTaskTask through the CLI on the demo sets: per-task logging, exact mid-epoch resume, option B under 2-process
DDP (the MI loss of the pooled table), extraction to a single-task config, the usage report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from tests.methods.modsquad.test_multitask import TASKS as TINY_TASKS
from visionkit.cli import main
from visionkit.methods.modsquad import MultiTaskTask, mutual_information_total
from visionkit.tasks.callbacks import read_checkpoint

REPO = Path(__file__).resolve().parents[3]
# the unit tests' tiny tasks; the ADE20K demo has 3 classes, and no PNG is drawn
TASKS = {
    "coco": {**TINY_TASKS["coco"], "num_vis_images": 0, "box_score_thresh": 0.05},
    "ade20k": {**TINY_TASKS["ade20k"], "num_classes": 3},
    "cls": {**TINY_TASKS["cls"], "top_k": [1]},
}


def children(demo_root: Path) -> dict[str, dict]:
    return {
        "coco": {
            "class_path": "COCODataModule",
            "init_args": {"data_root": str(demo_root / "coco"), "short_side": 64, "max_size": 64, "batch_size": 2},
        },
        "ade20k": {
            "class_path": "ADE20KDataModule",
            "init_args": {
                "data_root": str(demo_root / "ade20k"),
                "crop_size": 64,
                "short_side": 64,
                "max_size": 128,
                "batch_size": 2,
            },
        },
        "cls": {
            "class_path": "ImageFolderDataModule",
            "init_args": {"data_root": str(demo_root / "classification"), "image_size": 64, "batch_size": 4},
        },
    }


def write_config(tmp_path: Path, demo_root: Path, tasks: dict | None = None, **model_args) -> Path:
    tasks = tasks or TASKS
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "log_every_n_steps": 1},
        "model": {
            "class_path": "visionkit.methods.modsquad.MultiTaskTask",
            "init_args": {
                "backbone": "modsquad_vit_test",
                "backbone_kwargs": {"img_size": 64},
                "tasks": tasks,
                "lr": 1e-3,
                **model_args,
            },
        },
        "data": {
            "class_path": "visionkit.data.MultiTaskDataModule",
            "init_args": {
                "datamodules": {k: children(demo_root)[k] for k in tasks},
                "steps_per_epoch": 4,
            },
        },
    }
    path = tmp_path / "multitask.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_fit_and_validate_log_every_task_under_its_name(tmp_path, demo_root):
    config = write_config(tmp_path, demo_root)
    cli = main(["fit", f"--config={config}", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2",
                "--trainer.limit_val_batches=1"])  # fmt: skip
    logged = cli.trainer.logged_metrics
    for name in ("train/coco/loss", "train/ade20k/loss_decode", "train/cls/loss", "train/routing_loss", "train/loss"):
        assert name in logged, sorted(logged)
    assert cli.trainer.global_step == 2
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)  # plain hyper-parameters
    assert checkpoint["hyper_parameters"]["tasks"]["coco"]["kind"] == "instance_segmentation"
    cli = main(["validate", f"--config={config}", f"--trainer.default_root_dir={tmp_path}", "--ckpt_path=last",
                "--trainer.limit_val_batches=1"])  # fmt: skip
    logged = cli.trainer.logged_metrics
    for name in ("val/coco/segm_AP", "val/coco/bbox_AP50", "val/ade20k/mIoU", "val/cls/top1", "val/cls/loss"):
        assert name in logged, sorted(logged)
    assert not any("dataloader_idx" in name for name in logged)


class KillAtStep(pl.Callback):
    """Stop the process's training abruptly when step ``step`` is about to start (its checkpoints are written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt  # what Ctrl-C / a preemption does mid-epoch


@pytest.mark.slow
def test_kill_and_resume_mid_epoch_gives_identical_weights(tmp_path, demo_root):
    config = write_config(tmp_path, demo_root)
    # a checkpoint after every step, as a long run would keep one every N steps; last.ckpt is the newest
    common = [f"--config={config}", "--trainer.limit_val_batches=0", "--trainer.max_steps=6",
              "--checkpoint.every_n_train_steps=1"]  # fmt: skip
    main(["fit", *common, f"--trainer.default_root_dir={tmp_path / 'whole'}"])
    interrupted = tmp_path / "interrupted"
    kill = json.dumps({"class_path": f"{__name__}.KillAtStep", "init_args": {"step": 3}})
    with pytest.raises((KeyboardInterrupt, SystemExit)):  # killed after step 3 of the 4-step epoch 0
        main(["fit", *common, f"--trainer.default_root_dir={interrupted}", f"--trainer.callbacks+={kill}"])
    killed, _ = read_checkpoint(interrupted / "checkpoints" / "last.ckpt")
    assert (
        killed["global_step"] == 3 and killed["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    )  # mid-epoch, loader state
    main(["fit", *common, f"--trainer.default_root_dir={interrupted}", "--ckpt_path=last"])
    whole, _ = read_checkpoint(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    resumed, _ = read_checkpoint(interrupted / "checkpoints" / "last.ckpt")
    assert whole["global_step"] == resumed["global_step"] == 6
    assert whole["state_dict"].keys() == resumed["state_dict"].keys()
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


DDP_SCRIPT = """
import json, sys
import torch
from visionkit.cli import main
from visionkit.methods.modsquad import MultiTaskTask

config, out = sys.argv[1], sys.argv[2]
original = MultiTaskTask.training_step


def training_step(self, batch, batch_idx):
    if self.global_step == 0:
        torch.save({"state": self.state_dict(), "batch": batch}, f"{out}/rank{self.global_rank}.pt")
    return original(self, batch, batch_idx)


MultiTaskTask.training_step = training_step
cli = main(["fit", f"--config={config}", f"--trainer.default_root_dir={out}", "--trainer.devices=2",
            "--trainer.strategy=ddp_find_unused_parameters_true", "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0", "--model.sampling=per_rank", "--data.sampling=per_rank"])
metrics = {k: float(v) for k, v in cli.trainer.logged_metrics.items()}
with open(f"{out}/metrics{cli.trainer.global_rank}.json", "w") as f:
    json.dump(metrics, f)
# leave the process group before exit: gloo can abort ("terminate called without an active exception") when the
# interpreter tears it down itself
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_option_b_ddp_gives_the_mutual_information_of_the_pooled_table(tmp_path, demo_root):
    tasks = {"cls": TASKS["cls"], "ade20k": TASKS["ade20k"]}
    config = write_config(tmp_path, demo_root, tasks=tasks)
    script = tmp_path / "ddp_multitask.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("LOCAL_RANK", None)
    out = subprocess.run([sys.executable, str(script), str(config), str(tmp_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert [list(r["batch"]) for r in ranks] == [["cls"], ["ade20k"]]  # option B: one task per rank
    metrics = [json.loads((tmp_path / f"metrics{rank}.json").read_text()) for rank in (0, 1)]
    assert metrics[0]["train/routing_loss"] == pytest.approx(metrics[1]["train/routing_loss"], abs=1e-7)
    # one process, both ranks' sub-batches: the MI of the table pooled over the two tasks
    module = MultiTaskTask(**yaml.safe_load(config.read_text())["model"]["init_args"])
    module.load_state_dict(ranks[0]["state"])
    module.train()
    images_cls = ranks[0]["batch"]["cls"][0]
    images_ade = ranks[1]["batch"]["ade20k"][0]
    with torch.no_grad():
        module.heads["cls"].forward_features(images_cls)
        module.heads["ade20k"].pyramid(images_ade)
        pooled = mutual_information_total(module.routing_stats, weight=module.hparams.mi_weight)
        module.heads["cls"].forward_features(images_cls)  # one task alone: what an unsynchronised rank would see
        alone = mutual_information_total(module.routing_stats, weight=module.hparams.mi_weight)
    assert metrics[0]["train/routing_loss"] == pytest.approx(pooled.item(), rel=1e-5, abs=1e-8)
    assert pooled.item() != pytest.approx(alone.item(), rel=0.5)  # not what one rank alone would compute


def test_extraction_tool_and_usage_report(tmp_path, demo_root):
    config = write_config(tmp_path, demo_root)
    main(["fit", f"--config={config}", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2",
          "--trainer.limit_val_batches=0"])  # fmt: skip
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import extract_task_model
        import modsquad_usage
    finally:
        sys.path.remove(str(REPO / "tools"))
    out = extract_task_model.main(["--ckpt", str(ckpt), "--task", "cls", "--out", str(tmp_path / "cls.safetensors"),
                                   "--keep-softmax-mass", "--thresh", "0"])  # fmt: skip
    model_config = yaml.safe_load(out.with_suffix(".yaml").read_text())["model"]
    assert model_config["class_path"] == "visionkit.tasks.classification.ClassificationTask"
    assert model_config["init_args"]["backbone"] == "modsquad_vit_test"
    assert model_config["init_args"]["init_checkpoint"] == str(out)
    # the single-task CLI evaluates it unchanged (model section from the tool, data from a single-task config)
    data = {"data": children(demo_root)["cls"], "trainer": {"accelerator": "cpu", "enable_progress_bar": False}}
    data_config = tmp_path / "cls_data.yaml"
    data_config.write_text(yaml.safe_dump(data))
    cli = main(["validate", f"--config={data_config}", f"--config={out.with_suffix('.yaml')}",
                f"--trainer.default_root_dir={tmp_path / 'single'}"])  # fmt: skip
    assert "val/top1" in cli.trainer.logged_metrics
    with pytest.raises(SystemExit, match="has no task 'imagenet'"):
        extract_task_model.main(["--ckpt", str(ckpt), "--task", "imagenet", "--out", str(tmp_path / "x.safetensors")])
    results = modsquad_usage.main([str(ckpt), "--out", str(tmp_path / "usage.png"), "--labels", "run"])
    layers = results["run"]
    assert set(layers) == {"blocks.0.attn", "blocks.1.mlp", "blocks.2.attn", "blocks.3.mlp"}
    for row in layers.values():
        assert 0.0 <= row["overlap"] <= 1.0 and row["entropy"].shape == (3,)
    assert (tmp_path / "usage.png").stat().st_size > 0
