"""MultiTaskDataModule: children's batches, seeded per-task order, mid-epoch resume, sharding, errors, YAML."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.connectors.data_connector import _process_dataloader
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, default_collate

from visionkit.cli import main
from visionkit.data import (
    ADE20KDataModule,
    BaseDataModule,
    COCODataModule,
    ImageFolderDataModule,
    MultiTaskDataModule,
    UnlabeledImageFolderDataModule,
)
from visionkit.data.multitask import ResumableDataLoader, SeededItems, TaskEpochSampler
from visionkit.data.unreadable import UnreadableImagesReport

REPO = Path(__file__).resolve().parents[2]


class TensorDataModule(BaseDataModule):
    """``size`` random 4-d features with ids ``offset .. offset + size - 1``; batches ``[features, ids]``."""

    collate_fn = staticmethod(default_collate)

    def __init__(self, size: int, offset: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.size, self.offset = size, offset

    def build_dataset(self, split: str) -> TensorDataset:
        features = torch.randn(self.size, 4, generator=torch.Generator().manual_seed(self.offset))
        return TensorDataset(features, torch.arange(self.size) + self.offset)


class IdRecorder(pl.LightningModule):
    """A linear model that records the ids of every training step per task."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.seen: list[dict[str, list[int]]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append({name: ids.tolist() for name, (_, ids) in batch.items()})
        return sum(self.linear(features).pow(2).mean() for features, _ in batch.values())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def tensor_tasks(seed: int | None = 5, num_workers: int = 0, **kwargs) -> MultiTaskDataModule:
    """Task ``a``: 10 items in batches of 3 (4 steps); task ``b``: 4 items in batches of 2 (cycled)."""
    children = {
        "a": TensorDataModule(10, 0, batch_size=3, num_workers=num_workers),
        "b": TensorDataModule(4, 100, batch_size=2, num_workers=num_workers, drop_last=True),
    }
    return MultiTaskDataModule(children, seed=seed, **kwargs)


def epoch_ids(datamodule: MultiTaskDataModule) -> dict[str, list[list[int]]]:
    """One pass over the training loader: ids per task, per batch."""
    ids: dict[str, list[list[int]]] = {name: [] for name in datamodule.task_names}
    for batch, _, _ in iter(datamodule.train_dataloader()):
        for name, (_, batch_ids) in batch.items():
            ids[name].append(batch_ids.tolist())
    return ids


def quiet_trainer(root: Path, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **kwargs,
    )


# ------------------------------------------------------------------------------------------- children and order
def test_children_keep_their_batches_and_loaders_have_equal_lengths(demo_paths):
    children = {
        "coco": COCODataModule(str(demo_paths["coco"]["root"]), short_side=48, max_size=96, batch_size=2),
        "ade20k": ADE20KDataModule(
            str(demo_paths["ade20k"]["root"]), crop_size=32, short_side=40, max_size=160, batch_size=3
        ),
        "cls": ImageFolderDataModule(str(demo_paths["classification"]["root"]), image_size=16, batch_size=4),
    }
    dm = MultiTaskDataModule(children, seed=0)
    dm.setup("fit")
    sizes = {name: len(child.dataset("train")) for name, child in children.items()}
    steps = max(-(-sizes[name] // child.batch_size) for name, child in children.items())
    loader = dm.train_dataloader()
    assert isinstance(loader, CombinedLoader) and loader._mode == "max_size_cycle"
    assert all(isinstance(child, ResumableDataLoader) for child in loader.iterables.values())
    assert {name: len(child) for name, child in loader.iterables.items()} == dict.fromkeys(children, steps)
    coco_ids, batches = [], 0
    for batch, _, _ in iter(loader):
        batches += 1
        assert list(batch) == ["coco", "ade20k", "cls"]
        images, targets = batch["coco"]  # detection: lists of images and target dicts
        assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 2
        coco_ids += [target["image_id"] for target in targets]
        images, targets = batch["ade20k"]  # segmentation: a padded tensor and a dict
        assert images.ndim == 4 and images.shape[0] == 3 and targets["mask"].shape == (3, *images.shape[-2:])
        images, targets = batch["cls"]  # classification: a tensor and a dict
        assert images.shape == (4, 3, 16, 16) and targets["label"].shape == (4,)
    assert batches == steps
    first_pass = coco_ids[: sizes["coco"]]
    assert sorted(first_pass) == sorted(children["coco"].dataset("train").image_ids)
    val = dm.val_dataloader()
    assert val._mode == "sequential" and list(val.iterables) == ["coco", "ade20k", "cls"]
    assert [child.batch_size for child in val.iterables.values()] == [2, 3, 4]
    assert all(child.trainer is None for child in children.values())


def item_indices(sampler: TaskEpochSampler) -> list[int]:
    return [index for index, _ in sampler]


def test_shorter_task_is_cycled_with_a_new_permutation_per_pass():
    sampler = TaskEpochSampler(dataset_size=7, batch_size=4, num_steps=5, seed=3, task_index=1)
    indices = item_indices(sampler)
    assert len(indices) == len(sampler) == 20
    passes = [indices[0:7], indices[7:14], indices[14:20]]
    assert sorted(passes[0]) == sorted(passes[1]) == list(range(7))  # every index once per pass
    assert len(set(passes[2])) == 6  # the last pass is cut, still without repeats
    assert passes[0] != passes[1] and passes[0][:6] != passes[2] and passes[1][:6] != passes[2]
    assert sampler.epoch == 1  # a plain loop moves on to the next epoch
    assert item_indices(sampler) != indices
    other_task = TaskEpochSampler(dataset_size=7, batch_size=4, num_steps=5, seed=3, task_index=0)
    assert item_indices(other_task) != indices


def test_epoch_length_follows_the_largest_task_and_drop_last():
    dm = tensor_tasks()
    dm.setup("fit")
    assert dm.epoch_steps() == 4  # a: ceil(10 / 3); b (drop_last): 4 // 2
    assert dm.epoch_steps(world_size=2) == 2  # a: ceil(10 / 6); b: 4 // 4
    ids = epoch_ids(dm)
    assert [len(batches) for batches in ids.values()] == [4, 4]
    flat_b = [i for batch in ids["b"] for i in batch]
    assert sorted(flat_b[:4]) == sorted(flat_b[4:]) == [100, 101, 102, 103] and flat_b[:4] != flat_b[4:]
    assert MultiTaskDataModule(dm.datamodules, steps_per_epoch=7).epoch_steps() == 7


def test_same_seed_gives_same_batches_and_epochs_differ():
    first, second = tensor_tasks(seed=11), tensor_tasks(seed=11)
    for dm in (first, second):
        dm.setup("fit")
    assert epoch_ids(first) == epoch_ids(second)
    loader = first.train_dataloader()
    epochs = []
    for epoch in (0, 1, 0):
        for child in loader.iterables.values():
            child.sampler.set_epoch(epoch)
        epochs.append([batch["a"][1].tolist() for batch, _, _ in iter(loader)])
    assert epochs[0] == epochs[2] != epochs[1]
    other = tensor_tasks(seed=12)
    other.setup("fit")
    assert epoch_ids(other) != epoch_ids(first)


def test_seed_none_uses_the_initial_seed_at_loader_build():
    dm = tensor_tasks(seed=None)
    dm.setup("fit")
    torch.manual_seed(4)
    first = epoch_ids(dm)
    torch.manual_seed(4)
    assert epoch_ids(dm) == first
    torch.manual_seed(5)
    assert epoch_ids(dm) != first


def test_pending_resume_survives_set_epoch_of_the_same_epoch_only():
    dm = tensor_tasks()
    dm.setup("fit")
    loader = dm.train_dataloader().iterables["a"]
    full = [ids.tolist() for _, ids in loader]  # epoch 0
    assert loader.state_dict() == {"epoch": 0, "batches": 4}
    loader.sampler.set_epoch(0)
    loader.load_state_dict({"epoch": 0, "batches": 3})
    iterator = iter(loader)  # Lightning creates the iterator, then calls set_epoch with the same epoch
    loader.sampler.set_epoch(0)
    assert loader.state_dict() == {"epoch": 0, "batches": 3}
    assert [ids.tolist() for _, ids in iterator] == full[3:]
    assert loader.state_dict() == {"epoch": 0, "batches": 4}
    loader.sampler.set_epoch(1)
    next_epoch = iter(loader)
    next(next_epoch)
    assert loader.state_dict() == {"epoch": 1, "batches": 1}  # the count restarts after an epoch end
    loader.load_state_dict({"epoch": 1, "batches": 2})
    loader.sampler.set_epoch(2)  # another epoch: the pending offset is dropped
    assert [len(batch) for batch in loader] == [2, 2, 2, 2]
    loader.load_state_dict({"epoch": 2, "batches": 4})  # a finished epoch: the next one from its start
    assert loader.sampler.epoch == 3 and loader.state_dict() == {"epoch": 3, "batches": 0}


# ----------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize(
    ("stop_step", "num_workers", "limit"),
    [(2, 0, 1.0), (6, 0, 1.0), (4, 0, 1.0), (6, 2, 1.0), (3, 0, 3)],
    ids=["epoch0-mid", "epoch1-mid", "epoch0-last-batch", "workers", "limited-epoch-end"],
)
def test_mid_epoch_resume_matches_the_uninterrupted_run(tmp_path, stop_step, num_workers, limit):
    epochs = 3
    pl.seed_everything(0, verbose=False)
    straight = IdRecorder()
    quiet_trainer(tmp_path / "straight", max_epochs=epochs, limit_train_batches=limit).fit(
        straight, tensor_tasks(num_workers=num_workers)
    )
    pl.seed_everything(0, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop_step, save_top_k=-1)
    quiet_trainer(
        tmp_path / "stopped", max_epochs=epochs, max_steps=stop_step, limit_train_batches=limit, callbacks=[checkpoint]
    ).fit(IdRecorder(), tensor_tasks(num_workers=num_workers))
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    saved = torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert [state["batches"] for state in saved] == ([stop_step % 4 or 4] * 2 if limit == 1.0 else [3, 3])
    pl.seed_everything(0, verbose=False)
    resumed, datamodule = IdRecorder(), tensor_tasks(num_workers=num_workers)
    trainer = quiet_trainer(tmp_path / "resumed", max_epochs=epochs, limit_train_batches=limit)
    trainer.fit(resumed, datamodule, ckpt_path=ckpt)
    assert len(straight.seen) == epochs * (4 if limit == 1.0 else limit)
    assert resumed.seen == straight.seen[stop_step:]
    assert torch.equal(resumed.linear.weight, straight.linear.weight)
    assert torch.equal(resumed.linear.bias, straight.linear.bias)
    assert all(child.trainer is trainer for child in datamodule.datamodules.values())


def test_children_see_the_trainer_and_register_skip_unreadable_reports(tmp_path):
    children = {"a": TensorDataModule(6, batch_size=2, skip_unreadable=True), "b": TensorDataModule(4, 10)}
    dm = MultiTaskDataModule(children, seed=0)
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    trainer.fit(IdRecorder(), dm)
    assert trainer.datamodule is dm and all(child.trainer is trainer for child in children.values())
    reports = [c for c in trainer.callbacks if isinstance(c, UnreadableImagesReport)]
    assert len(reports) == 1 and reports[0].dataset is children["a"]._skipping["train"]


# -------------------------------------------------------------------------------------------------- sharding / DDP
def test_ranks_get_disjoint_equal_shards_of_the_global_sequence():
    samplers = [TaskEpochSampler(9, 2, 3, seed=1, rank=rank, world_size=2) for rank in (0, 1)]
    keys = [list(sampler) for sampler in samplers]
    shards = [[index for index, _ in rank_keys] for rank_keys in keys]
    global_sequence = TaskEpochSampler(9, 2, 3, seed=1, world_size=2).global_indices(0)
    assert len(global_sequence) == 12 and len(shards[0]) == len(shards[1]) == 6
    assert sorted(shards[0] + shards[1]) == sorted(global_sequence)
    # Local batch b of both ranks is global batch b: the ranks interleave within each global batch.
    assert [shards[step % 2][step // 2] for step in range(12)] == global_sequence
    assert set(global_sequence[:9]) == set(range(9))
    # every item of the epoch has its own augmentation seed, whichever rank reads it
    seeds = [keys[step % 2][step // 2][1] for step in range(12)]
    assert len(set(seeds)) == 12 and seeds == [seed for _, seed in TaskEpochSampler(9, 2, 6, seed=1)]


def test_seeded_items_draw_from_their_own_seed_and_restore_the_generators():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, index: int) -> tuple[float, float, float]:
            return torch.rand(()).item(), float(np.random.rand()), random.random()

    items = SeededItems(Noisy())
    torch.manual_seed(0)
    before = torch.rand(2)
    torch.manual_seed(0)
    first = items[(1, 123)]
    assert torch.equal(torch.rand(2), before)  # the training's stream is untouched
    assert items[(1, 123)] == first and items[(1, 124)] != first and items[(2, 123)] == first
    assert len(items) == 3 and isinstance(items[0], tuple)


def test_per_rank_sampling_gives_each_rank_its_task(monkeypatch):
    children = {
        name: TensorDataModule(8, offset, batch_size=2) for name, offset in (("t0", 0), ("t1", 100), ("t2", 200))
    }
    dm = MultiTaskDataModule(children, sampling="per_rank", seed=0)
    dm.setup("fit")
    monkeypatch.setattr(dm, "rank_and_world_size", lambda: (1, 3))
    loader = dm.train_dataloader()
    assert list(loader.iterables) == ["t1"] and len(loader.iterables["t1"]) == 4
    assert dm.task_ranks("t0", 4) == [0, 3] and dm.task_ranks("t2", 4) == [2]
    monkeypatch.setattr(dm, "rank_and_world_size", lambda: (3, 4))
    sampler = dm.train_dataloader().iterables["t0"].sampler
    assert (sampler.rank, sampler.num_replicas, len(dm.train_dataloader().iterables["t0"])) == (1, 2, 4)
    mixed = MultiTaskDataModule(children, sampling="per_step", seed=0)
    monkeypatch.setattr(mixed, "rank_and_world_size", lambda: (1, 3))
    assert list(mixed.train_dataloader().iterables) == ["t0", "t1", "t2"]


def test_lightning_keeps_the_loader_and_sampler_under_ddp(tmp_path):
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, default_root_dir=tmp_path)
    dm = tensor_tasks()
    dm.setup("fit")
    loader = dm.train_dataloader().iterables["a"]
    assert not trainer._data_connector._requires_distributed_sampler(loader)
    assert _process_dataloader(trainer, TrainerFn.FITTING, RunningStage.TRAINING, loader) is loader
    plain = DataLoader(TensorDataset(torch.arange(8)), batch_size=2, shuffle=True)  # contrast: replaced
    assert _process_dataloader(trainer, TrainerFn.FITTING, RunningStage.TRAINING, plain) is not plain


DDP_SCRIPT = """
import json, sys
import lightning.pytorch as pl
import torch
from tests.data.test_multitask import IdRecorder, TensorDataModule
from visionkit.data import MultiTaskDataModule

out, sampling = sys.argv[1], sys.argv[2]
children = {"a": TensorDataModule(10, 0, batch_size=2), "b": TensorDataModule(6, 100, batch_size=3)}
dm = MultiTaskDataModule(children, sampling=sampling, seed=3)
model = IdRecorder()
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     limit_val_batches=0, use_distributed_sampler=True, default_root_dir=out)
trainer.fit(model, dm)
samplers = {name: [type(loader).__name__, type(loader.sampler).__name__]
            for name, loader in trainer.train_dataloader.items()}
with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
    json.dump({"seen": model.seen, "samplers": samplers}, f)
# leave the process group before exit: gloo can abort ("terminate called without an active exception") when the
# interpreter tears it down itself
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("sampling", ["mixed", "per_rank"])
def test_two_process_ddp_shards_every_task(tmp_path, sampling):
    script = tmp_path / "ddp_multitask.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("LOCAL_RANK", None)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path), sampling], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # Lightning kept the loaders and their samplers (no DistributedSampler wrapper, no re-instantiation).
    assert all(kinds == ["ResumableDataLoader", "TaskEpochSampler"] for r in ranks for kinds in r["samplers"].values())
    if sampling == "mixed":  # a: ceil(10 / 4) = 3 steps; both tasks on both ranks, disjoint within each pass
        assert [len(r["seen"]) for r in ranks] == [3, 3]
        for index, (name, batch_size, offset) in enumerate((("a", 2, 0), ("b", 3, 100))):
            sampler = TaskEpochSampler(10 if name == "a" else 6, batch_size, 3, seed=3, task_index=index, world_size=2)
            expected = [i + offset for i in sampler.global_indices(0)]
            # Global batch s is rank 0's and rank 1's batch s, interleaved.
            merged = [ranks[j % 2]["seen"][s][name][j // 2] for s in range(3) for j in range(2 * batch_size)]
            assert merged == expected
    else:  # rank 0 trains a (10 / 2 = 5 steps), rank 1 trains b (2 steps); the epoch is 5 steps on both
        assert [list(r["seen"][0]) for r in ranks] == [["a"], ["b"]]
        assert [len(r["seen"]) for r in ranks] == [5, 5]
        assert sorted(i for step in ranks[0]["seen"] for i in step["a"]) == list(range(10))


# ------------------------------------------------------------------------------------------ errors and lookups
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"datamodules": {}}, ValueError, "datamodules is empty"),
        ({"datamodules": {"": None}}, ValueError, "task names must be non-empty strings, got ''"),
        ({"datamodules": {3: None}}, ValueError, "task names must be non-empty strings, got 3"),
        ({"datamodules": {"a": object()}}, TypeError, "task 'a' is a object, not a BaseDataModule"),
        ({"sampling": "round_robin"}, ValueError, r"sampling must be one of \['mixed', 'per_rank', 'per_step'\]"),
        ({"steps_per_epoch": 0}, ValueError, "steps_per_epoch must be >= 1 or None, got 0"),
    ],
)
def test_invalid_arguments_are_named(kwargs, error, match):
    arguments = {"datamodules": {"a": TensorDataModule(4)}, **kwargs}
    with pytest.raises(error, match=match):
        MultiTaskDataModule(**arguments)


def test_parent_has_no_datasets_of_its_own_and_skips_children_without_a_split(demo_paths, tmp_path):
    children = {
        "cls": ImageFolderDataModule(str(demo_paths["classification"]["root"]), image_size=16, batch_size=2),
        "pre": UnlabeledImageFolderDataModule(str(demo_paths["pretraining"]["root"]), image_size=16, batch_size=2),
    }
    dm = MultiTaskDataModule(children)
    assert dm.task_names == ["cls", "pre"] and dm.datamodule("pre") is children["pre"]
    with pytest.raises(KeyError, match=r"no task 'x'; tasks: \['cls', 'pre'\]"):
        dm.datamodule("x")
    with pytest.raises(RuntimeError, match=r"use datamodule\(name\)\.dataset\('val'\)"):
        dm.dataset("val")
    with pytest.raises(RuntimeError, match="no classes of its own"):
        _ = dm.class_names
    dm.setup("validate")  # the unlabelled child has no validate stage: skipped
    assert set(children["cls"].datasets) == {"val"} and not children["pre"].datasets
    assert list(dm.val_dataloader().iterables) == ["cls"]
    dm.setup("fit")
    assert list(dm.val_dataloader().iterables) == ["cls"]
    assert list(dm.train_dataloader().iterables) == ["cls", "pre"]
    torch.save(dict(dm.hparams_initial), tmp_path / "hparams.pt")
    assert torch.load(tmp_path / "hparams.pt", weights_only=True) == {
        "sampling": "mixed",
        "steps_per_epoch": None,
        "seed": None,
    }


def test_yaml_config_builds_three_children_through_the_cli(demo_paths, tmp_path):
    config = {
        "seed_everything": 0,
        "trainer": {"logger": False, "default_root_dir": str(tmp_path), "accelerator": "cpu", "devices": 1},
        "model": {"class_path": "ClassificationTask", "init_args": {"backbone": "test_resnet", "num_classes": 3}},
        "data": {
            "class_path": "visionkit.data.MultiTaskDataModule",
            "init_args": {
                "datamodules": {
                    "coco": {
                        "class_path": "COCODataModule",
                        "init_args": {"data_root": str(demo_paths["coco"]["root"]), "generate_demo": True,
                                      "short_side": 48, "max_size": 96, "batch_size": 4},
                    },
                    "ade20k": {
                        "class_path": "ADE20KDataModule",
                        "init_args": {"data_root": str(demo_paths["ade20k"]["root"]), "crop_size": 32, "batch_size": 2},
                    },
                    "cls": {
                        "class_path": "ImageFolderDataModule",
                        "init_args": {"data_root": str(demo_paths["classification"]["root"]), "image_size": 16},
                    },
                },
                "sampling": "mixed",
            },
        },
    }  # fmt: skip
    path = tmp_path / "multitask.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cli = main(["--config", str(path)], run=False)
    dm = cli.datamodule
    assert isinstance(dm, MultiTaskDataModule) and dm.sampling == "mixed"
    assert [type(child).__name__ for child in dm.datamodules.values()] == [
        "COCODataModule",
        "ADE20KDataModule",
        "ImageFolderDataModule",
    ]
    assert dm.datamodule("coco").batch_size == 4 and dm.datamodule("ade20k").batch_size == 2
    assert dm.datamodule("coco").generate_demo is True
    assert "datamodules" not in dm.hparams
    # each child saved its own hyper-parameters, not the parent's config (visionkit.cli: nested modules)
    assert dm.datamodule("coco").hparams.data_root == str(demo_paths["coco"]["root"])
    assert dm.datamodule("ade20k").hparams.crop_size == 32 and "_class_path" not in dm.datamodule("cls").hparams
    assert dm.hparams["_class_path"] == "visionkit.data.MultiTaskDataModule"
