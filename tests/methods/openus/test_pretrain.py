"""``OpenUSPretrain``: the training step's rules per optimiser step, exact resume, and what its checkpoint holds."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import visionkit
from visionkit.cli import main
from visionkit.data.multicrop import collate_multicrop
from visionkit.methods.openus.pretrain import OpenUSPretrain
from visionkit.methods.openus.schedules import cosine_schedule_at

TINY_HEAD = {"out_dim": 32, "patch_out_dim": 32, "head_hidden_dim": 16, "head_bottleneck_dim": 8}


class _Crops(Dataset):
    """Multi-crop samples of random images: 2 global 128-px views (4x4 tokens) and 2 local 64-px ones."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed(index)
        views = [torch.randn(3, 128, 128, generator=generator) for _ in range(2)]
        views += [torch.randn(3, 64, 64, generator=generator) for _ in range(2)]
        return views, {"image_id": index}


class _Recorder(pl.Callback):
    """Snapshots, per step, what the rules act on: lr / weight decay in use, teacher before its update, student."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        # Callbacks run before the module's own hook: the teacher is not yet updated for this step.
        groups = trainer.optimizers[0].param_groups
        self.steps.append(
            {
                "epoch": trainer.current_epoch,
                "lr": groups[0]["lr"],
                "weight_decay": [g["weight_decay"] for g in groups],
                "scheduled": [g["scheduled_weight_decay"] for g in groups],
                "teacher": {k: v.clone() for k, v in module.teacher.named_parameters()},
                "student": {k: v.clone() for k, v in module.student.named_parameters()},
                "masked": float(trainer.callback_metrics["train/masked_tokens"]),
                "teacher_grads": [p.grad for p in module.teacher.parameters()],
            }
        )


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    module = OpenUSPretrain(backbone="vmamba_test", warmup_epochs=1, **TINY_HEAD)
    initial_last_layer = {k: v.clone() for k, v in module.student.head.named_parameters() if "last_layer" in k}
    recorder = _Recorder()
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(module, DataLoader(_Crops(), batch_size=4, collate_fn=collate_multicrop))
    return module, recorder.steps, initial_last_layer


def test_every_step_masks_exactly_ceil_ratio_tokens_and_leaves_the_teacher_without_gradients(trained):
    _, steps, _ = trained
    assert len(steps) == 6  # 3 epochs x 2 batches
    for step in steps:
        assert step["masked"] == math.ceil(0.6 * 16)  # 10 of the 4x4 tokens of a 128-px global crop
        assert all(grad is None for grad in step["teacher_grads"])


def test_learning_rate_and_weight_decay_follow_the_released_schedules(trained):
    _, steps, _ = trained
    total, per_epoch = 6, 2
    for index, step in enumerate(steps):
        # the lr in use at step i (LambdaLR has already advanced to i + 1 when the callback reads it)
        expected_lr = cosine_schedule_at(index + 1, total, 5e-4, 1e-6, 1 * per_epoch)
        assert step["lr"] == pytest.approx(expected_lr, rel=1e-9, abs=1e-15)
        expected_wd = cosine_schedule_at(index, total, 0.04, 0.4)
        for value, scheduled in zip(step["weight_decay"], step["scheduled"], strict=True):
            assert value == (pytest.approx(expected_wd) if scheduled else 0.0)


def test_teacher_is_the_cosine_momentum_ema_of_the_student(trained):
    _, steps, _ = trained
    total = len(steps)
    for index in range(total - 1):
        momentum = cosine_schedule_at(index, total, 0.996, 1.0)
        before, student, after = steps[index]["teacher"], steps[index]["student"], steps[index + 1]["teacher"]
        for name, value in after.items():
            expected = momentum * before[name] + (1 - momentum) * student[name]
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=name)


def test_last_layers_are_frozen_during_the_first_epoch_only(trained):
    module, steps, initial = trained
    first_epoch_end = [s for s in steps if s["epoch"] == 0][-1]["student"]
    final = dict(module.student.head.named_parameters())
    for name, value in initial.items():
        torch.testing.assert_close(first_epoch_end[f"head.{name}"], value, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(final[name], value) for name, value in initial.items() if name.endswith("weight_v"))


def test_checkpoint_holds_the_masking_state_and_the_centres(trained):
    module, _, _ = trained
    state = module.state_dict()
    for key in ("recon_importance.ema_loss_map", "recon_importance.ema_initialized", "ibot_loss.center"):
        assert key in state, key
    assert bool(state["recon_importance.ema_initialized"])
    fresh = OpenUSPretrain(backbone="vmamba_test", warmup_epochs=1, **TINY_HEAD)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.recon_importance.importance(4), module.recon_importance.importance(4))


def test_a_batch_without_enough_global_crops_is_a_clear_error():
    module = OpenUSPretrain(backbone="vmamba_test", **TINY_HEAD)
    with pytest.raises(ValueError, match="at least 2 global crops"):
        module.training_step(([torch.zeros(1, 3, 64, 64)], {}), 0)


def _fit_args(root: Path, data_root: Path, epochs: int, *extra: str) -> list[str]:
    return [
        "fit",
        "--config=configs/openus/pretrain_synthetic.yaml",
        f"--data.data_root={data_root}",
        "--data.generate_demo=false",
        "--data.global_size=64",
        "--data.local_size=32",
        "--data.num_local=2",
        "--data.batch_size=4",
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.limit_train_batches=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--model.warmup_epochs=1",
        "--model.warmup_teacher_temp_epochs=1",
        *extra,
    ]


@pytest.mark.slow
def test_resume_from_last_gives_the_weights_of_an_uninterrupted_run(tmp_path, demo_paths, interrupted_fit, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[3])
    data = demo_paths["pretraining"]["root"]
    main(_fit_args(tmp_path / "straight", data, 2))
    interrupted_fit(_fit_args(tmp_path / "resumed", data, 2), epochs=1)
    main(_fit_args(tmp_path / "resumed", data, 2, "--ckpt_path=last"))
    straight = torch.load(tmp_path / "straight/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    resumed = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert straight["global_step"] == resumed["global_step"] == 4
    assert straight["state_dict"].keys() == resumed["state_dict"].keys()
    for name, value in straight["state_dict"].items():  # student, teacher, centres, masking state
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=0, atol=0, msg=name)
    # The teacher's backbone is what the probes start from: it loads into the registered model by name.
    teacher = {k.removeprefix("teacher.backbone."): v for k, v in straight["state_dict"].items()}
    teacher = {k: v for k, v in teacher.items() if not k.startswith(("teacher.", "student.", "ibot_", "recon_"))}
    visionkit.save_state_dict(teacher, tmp_path / "teacher.safetensors")
    model = visionkit.create_model("vmamba_test", num_classes=0, checkpoint_path=tmp_path / "teacher.safetensors")
    torch.testing.assert_close(model.state_dict()["classifier.norm.weight"], teacher["classifier.norm.weight"])
