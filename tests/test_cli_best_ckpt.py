"""Probe protocol: distinct val and test splits, and ``--ckpt_path best`` read from a finished run's last.ckpt."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from visionkit.cli import main
from visionkit.data import ADE20KDataModule, HeldOutSplit, ImageFolderDataModule, holdout_indices
from visionkit.data.synthetic import write_shapes_classification


# ------------------------------------------------------------------------------------------------------- splits
def test_holdout_is_stratified_and_fixed() -> None:
    groups = [0] * 8 + [1] * 4 + [2] * 2
    kept, held = holdout_indices(len(groups), 0.25, groups)
    assert [groups[i] for i in held] == [0, 0, 1, 2]  # 0.25 * n per group, half up
    kept_small, held_small = holdout_indices(3, 0.9, [0, 0, 1])  # every group keeps at least one item
    assert len(held_small) == 1 and 2 in kept_small
    assert sorted(kept + held) == list(range(len(groups))) and not set(kept) & set(held)
    assert holdout_indices(len(groups), 0.25, groups) == (kept, held)
    assert len(holdout_indices(10, 0.3)[1]) == 3
    for fraction in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"in \(0, 1\)"):
            holdout_indices(10, fraction)
    with pytest.raises(ValueError, match="leaves 0 held out"):
        holdout_indices(1, 0.2)


def test_image_folder_val_fraction_keeps_test_distinct(demo_paths) -> None:
    root = demo_paths["classification"]["root"]  # 4 train and 2 val images per class
    dm = ImageFolderDataModule(str(root), image_size=16, batch_size=4, val_fraction=0.25, seed=0)
    dm.setup("fit")
    dm.setup("test")
    train, val, test = dm.datasets["train"], dm.datasets["val"], dm.datasets["test"]
    assert isinstance(train, HeldOutSplit) and isinstance(val, HeldOutSplit)
    assert (len(train), len(val), len(test)) == (9, 3, 6)
    assert sorted(val.dataset.targets[i] for i in val.indices) == [0, 1, 2]
    assert not set(train.indices) & set(val.indices)
    assert test.split == "val" and dm.class_names == ["circle", "square", "triangle"]
    assert "train" in str(val.get_image_info(0)["image_path"])
    _, targets = next(iter(dm.val_dataloader()))
    assert sorted(targets["label"].tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        ImageFolderDataModule(str(root), val_fraction=1.0)


def test_classification_writer_adds_a_test_split_without_touching_the_others(tmp_path: Path) -> None:
    plain = write_shapes_classification(tmp_path / "plain", 2, 1)
    with_test = write_shapes_classification(tmp_path / "with_test", 2, 1, num_per_class_test=3)
    assert "test" not in plain and not (tmp_path / "plain" / "test").exists()
    for split in ("train", "val"):
        for path in sorted(plain[split].rglob("*.png")):
            assert path.read_bytes() == (with_test[split] / path.relative_to(plain[split])).read_bytes()
    assert len(list(with_test["test"].rglob("*.png"))) == 9
    test_bytes = {p.read_bytes() for p in with_test["test"].rglob("*.png")}
    assert not test_bytes & {p.read_bytes() for p in with_test["train"].rglob("*.png")}
    dm = ImageFolderDataModule(str(with_test["root"]), image_size=16, test_split="test")
    dm.setup("test")
    assert len(dm.datasets["test"]) == 9


def test_ade20k_val_fraction_holds_out_training_images(demo_paths) -> None:
    root = demo_paths["ade20k"]["root"]  # 6 training, 4 validation images
    small = {"crop_size": 32, "short_side": 40, "max_size": 160, "batch_size": 2}
    dm = ADE20KDataModule(str(root), val_fraction=0.5, **small)
    dm.setup("fit")
    dm.setup("test")
    train, val, test = dm.datasets["train"], dm.datasets["val"], dm.datasets["test"]
    assert (len(train), len(val), len(test)) == (3, 3, 4)
    assert train.dataset.split == val.dataset.split == "training" and test.split == "validation"
    assert sorted(train.indices + val.indices) == list(range(6))
    assert dm.num_classes == 150
    assert val.get_image_info(0)["stem"].startswith("ADE_train_")
    images, targets = next(iter(dm.val_dataloader()))
    assert images.shape[0] == 2 and targets["mask"].shape[0] == 2
    default = ADE20KDataModule(str(root), **small)
    default.setup("fit")
    assert default.datasets["val"].split == "validation"  # unchanged without val_fraction


# ---------------------------------------------------------------------------------------------- --ckpt_path best
def _args(subcommand: str, root: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        subcommand,
        "--model=ClassificationTask",
        "--model.backbone=test_resnet",
        "--model.num_classes=3",
        "--model.lr=0.02",
        "--model.warmup_steps=1",
        "--data=ImageFolderDataModule",
        f"--data.data_root={data_root}",
        "--data.image_size=32",
        "--data.batch_size=3",
        "--data.val_fraction=0.25",
        f"--trainer.default_root_dir={root}",
        "--trainer.max_epochs=4",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        *extra,
    ]


MONITOR = ("--checkpoint.monitor=val/loss", "--checkpoint.mode=min")


@pytest.fixture(scope="module")
def probe_run(demo_paths, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished 4-epoch run that selected its best epoch on val/loss: ``(run folder, data root)``."""
    root = tmp_path_factory.mktemp("probe")
    data_root = demo_paths["classification"]["root"]
    main(_args("fit", root, data_root, *MONITOR))
    return root, data_root


def _val_losses(root: Path) -> list[float]:
    with (root / "logs" / "version_0" / "metrics.csv").open() as handle:
        return [float(row["val/loss"]) for row in csv.DictReader(handle) if row.get("val/loss")]


def test_best_resolves_to_the_epoch_the_monitor_chose(probe_run, capsys) -> None:
    root, data_root = probe_run
    losses = _val_losses(root)
    assert len(losses) == 4
    best_epoch = min(range(4), key=losses.__getitem__)
    last = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    recorded = [s["best_model_path"] for s in last["callbacks"].values() if s.get("monitor") == "val/loss"]
    assert len(recorded) == 1 and Path(recorded[0]).name.startswith(f"epoch={best_epoch}-")
    cli = main(_args("test", root, data_root, *MONITOR, "--ckpt_path=best"))
    assert cli.trainer.ckpt_path == recorded[0]
    assert f"--ckpt_path best: {recorded[0]} (best val/loss = {losses[best_epoch]:.6g}" in capsys.readouterr().err
    assert "test/top1" in cli.trainer.callback_metrics
    assert len(cli.datamodule.datasets["test"]) == 6 and "val" not in cli.datamodule.datasets
    # The monitor need not be repeated at evaluation time: the one state recorded in last.ckpt is used.
    assert main(_args("validate", root, data_root, "--ckpt_path=best")).trainer.ckpt_path == recorded[0]


def test_best_after_the_run_folder_moved(probe_run, tmp_path: Path) -> None:
    root, data_root = probe_run
    moved = tmp_path / "moved" / "checkpoints"
    shutil.copytree(root / "checkpoints", moved)
    shutil.move(root / "checkpoints", tmp_path / "original")  # the absolute path recorded in last.ckpt is gone
    try:
        for path in moved.glob("epoch=*.ckpt"):
            path.rename(path.with_name(f"renamed_{path.name}"))
        with pytest.raises(SystemExit, match=r"names .*epoch=.* as the best checkpoint \(val/loss\), but neither"):
            main(_args("test", moved.parent, data_root, "--ckpt_path=best"))
        for path in moved.glob("renamed_*.ckpt"):
            path.rename(path.with_name(path.name.removeprefix("renamed_")))
        cli = main(_args("test", moved.parent, data_root, "--ckpt_path=best"))  # the copy next to last.ckpt
        assert Path(cli.trainer.ckpt_path).parent == moved
    finally:
        shutil.move(tmp_path / "original", root / "checkpoints")


def test_best_without_a_run_or_a_monitor_is_a_clear_error(demo_paths, tmp_path: Path) -> None:
    data_root = demo_paths["classification"]["root"]
    with pytest.raises(SystemExit, match=r"--ckpt_path best: there is no last\.ckpt in .*checkpoints"):
        main(_args("test", tmp_path / "nothing", data_root, "--ckpt_path=best"))
    main(_args("fit", tmp_path / "plain", data_root, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1"))
    with pytest.raises(SystemExit, match=r"last\.ckpt records no monitored best checkpoint: .* had no monitor"):
        main(_args("test", tmp_path / "plain", data_root, "--ckpt_path=best"))
