"""Datamodules on the synthetic demo data: batch layout, per-stage setup, seeded order, workers, CLI construction."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.model_helpers import is_overridden
from PIL import Image
from torch import nn

from visionkit.data import (
    ADE20K_CLASSES,
    ADE20KDataModule,
    BaseDataModule,
    COCODataModule,
    ImageFolderDataModule,
    SeededRandomSampler,
    UnlabeledImageFolderDataModule,
)

SMALL_COCO = {"short_side": 48, "max_size": 96}
SMALL_ADE = {"crop_size": 32, "short_side": 40, "max_size": 160}


def coco_module(demo_paths, **kwargs) -> COCODataModule:
    return COCODataModule(str(demo_paths["coco"]["root"]), **SMALL_COCO, **kwargs)


def train_order(datamodule: BaseDataModule) -> list[int]:
    """image_ids of one pass over the training loader."""
    ids = []
    for _, targets in datamodule.train_dataloader():
        ids += [t["image_id"] for t in targets] if isinstance(targets, list) else list(targets["image_id"])
    return ids


# ---------------------------------------------------------------------------------------------------------- COCO
def test_coco_batches_follow_the_detection_contract(demo_paths):
    dm = coco_module(demo_paths, batch_size=3, train_short_sides=[40, 48])
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for images, targets in loader:
            assert isinstance(images, list) and len(images) == len(targets) <= 3
            for image, target in zip(images, targets, strict=True):
                assert image.dtype == torch.float32 and image.shape[0] == 3
                assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
                assert min(image.shape[1:]) in (40, 48)
                n = target["boxes"].shape[0]
                assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (n, 4)
                assert target["labels"].dtype == torch.int64 and target["labels"].shape == (n,)
                assert target["masks"].dtype == torch.bool and target["masks"].shape == (n, *image.shape[1:])
                assert ((target["labels"] >= 0) & (target["labels"] < 3)).all()
                assert isinstance(target["image_id"], int) and isinstance(target["orig_size"], tuple)


def test_coco_metadata_after_setup(demo_paths):
    dm = coco_module(demo_paths)
    with pytest.raises(RuntimeError, match="no dataset is set up yet; call setup"):
        _ = dm.class_names
    dm.setup("validate")
    assert set(dm.datasets) == {"val"}
    assert dm.class_names == ["circle", "square", "triangle"]
    assert dm.num_classes == 3
    assert dm.contiguous_to_category_id == {0: 1, 1: 3, 2: 7}
    assert dm.ann_file == demo_paths["coco"]["val_annotations"]
    with pytest.raises(RuntimeError, match=r"the 'train' split is not set up \(set up: \['val'\]\)"):
        dm.train_dataloader()


def test_coco_test_stage_defaults_to_val_split(demo_paths):
    dm = coco_module(demo_paths)
    dm.setup("test")
    assert set(dm.datasets) == {"test"}
    assert dm.dataset("test").ann_file == demo_paths["coco"]["val_annotations"]
    assert dm.ann_file == demo_paths["coco"]["val_annotations"]
    assert len(list(dm.test_dataloader())) == 2  # 4 val images, batch size 2


def test_coco_filter_empty_train(demo_paths):
    coco = json.loads(demo_paths["coco"]["train_annotations"].read_text())
    with_objects = {a["image_id"] for a in coco["annotations"] if not a.get("iscrowd", 0)}
    assert len(with_objects) < len(coco["images"])  # the demo data has an empty image
    filtered, unfiltered = coco_module(demo_paths), coco_module(demo_paths, filter_empty_train=False)
    filtered.setup("fit")
    unfiltered.setup("fit")
    assert len(filtered.dataset("train")) == len(with_objects)
    assert len(unfiltered.dataset("train")) == len(coco["images"])
    assert len(filtered.dataset("val")) == len(json.loads(demo_paths["coco"]["val_annotations"].read_text())["images"])


def test_coco_setup_and_prepare_data_are_idempotent(demo_paths):
    dm = coco_module(demo_paths)
    dm.prepare_data()
    dm.setup("fit")
    train, val = dm.dataset("train"), dm.dataset("val")
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("validate")
    assert dm.dataset("train") is train and dm.dataset("val") is val
    assert set(dm.datasets) == {"train", "val"}


def test_coco_normalize_option(demo_paths):
    dm = coco_module(demo_paths, normalize=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    dm.setup("validate")
    images, _ = next(iter(dm.val_dataloader()))
    assert float(min(i.min() for i in images)) < 0.0  # (x - 0.5) / 0.5 spans [-1, 1]
    assert float(max(i.max() for i in images)) <= 1.0


def _rewrite_val_json(demo_paths, tmp_path: Path, edit) -> str:
    coco = json.loads(demo_paths["coco"]["val_annotations"].read_text())
    edit(coco)
    path = tmp_path / "instances_val_edited.json"
    path.write_text(json.dumps(coco))
    return str(path)


def test_coco_splits_with_different_category_names_raise(demo_paths, tmp_path):
    def rename(coco):
        coco["categories"][0]["name"] = "disc"

    dm = coco_module(demo_paths, val_ann=_rewrite_val_json(demo_paths, tmp_path, rename))
    with pytest.raises(ValueError, match=r"have different classes: \['disc', 'square', 'triangle'\] vs \['circle'"):
        dm.setup("fit")


def test_coco_splits_with_different_category_ids_raise(demo_paths, tmp_path):
    def renumber(coco):
        for record in coco["categories"] + coco["annotations"]:
            key = "id" if "name" in record else "category_id"
            if record[key] == 7:
                record[key] = 8

    dm = coco_module(demo_paths, val_ann=_rewrite_val_json(demo_paths, tmp_path, renumber))
    with pytest.raises(ValueError, match=r"instances_val_edited.json \(val\) and .*instances_train2017.json \(train\)"):
        dm.setup("fit")


def test_coco_test_paths_must_come_together(demo_paths):
    with pytest.raises(ValueError, match="give both test_images and test_ann or neither"):
        coco_module(demo_paths, test_images="val2017")


# ------------------------------------------------------------------------------------------------------- seeding
def test_same_seed_gives_same_order(demo_paths):
    first = train_order(_setup_fit(coco_module(demo_paths, seed=3)))
    assert train_order(_setup_fit(coco_module(demo_paths, seed=3))) == first
    assert train_order(_setup_fit(coco_module(demo_paths, seed=4))) != first
    assert sorted(first) == sorted(d["image_id"] for _, d in _setup_fit(coco_module(demo_paths)).dataset("train"))
    torch.manual_seed(3)  # seed=None takes torch.initial_seed(), i.e. the seed_everything seed
    assert train_order(_setup_fit(coco_module(demo_paths))) == first


def _setup_fit(dm: BaseDataModule) -> BaseDataModule:
    dm.setup("fit")
    return dm


def test_seeded_sampler_epochs():
    sampler = SeededRandomSampler(20, seed=5)
    epoch0, epoch1 = list(sampler), list(sampler)  # a plain loop advances the epoch
    assert sorted(epoch0) == list(range(20)) and epoch0 != epoch1
    assert list(SeededRandomSampler(20, seed=5)) == epoch0
    assert list(SeededRandomSampler(20, seed=6)) != epoch0
    assert list(SeededRandomSampler(20, seed=5, epoch=1)) == epoch1  # a run resumed at epoch 1
    sampler.set_epoch(1)
    assert list(sampler) == epoch1
    assert len(sampler) == 20


def test_loader_worker_seeds_follow_the_epoch_and_spare_the_global_rng(demo_paths):
    dm = ImageFolderDataModule(str(demo_paths["classification"]["root"]), image_size=16, seed=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(3)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    base_seed = iter(loader)._base_seed  # PyTorch draws each epoch's worker base seed when the iterator is created
    assert torch.equal(torch.rand(3), expected), "creating an iterator must not consume the global RNG"
    other = dm.train_dataloader()
    other.sampler.set_epoch(3)
    assert iter(other)._base_seed == base_seed
    other.sampler.set_epoch(4)
    assert iter(other)._base_seed != base_seed


class TinyModel(pl.LightningModule):
    """Records the image ids of every training batch; a linear layer on the mean colour."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 3)
        self.orders: list[list[int]] = []

    def on_train_epoch_start(self) -> None:
        self.orders.append([])

    def training_step(self, batch, batch_idx):
        images, target = batch
        self.orders[-1] += list(target["image_id"])
        return self.head(images.mean(dim=(2, 3))).square().mean()

    def validation_step(self, batch, batch_idx):
        images, _ = batch
        self.log("val_loss", self.head(images.mean(dim=(2, 3))).square().mean(), batch_size=images.shape[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit_orders(datamodule: BaseDataModule, tmp_path: Path, epochs: int = 2) -> list[list[int]]:
    model = TinyModel()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=datamodule)
    return model.orders


def test_trainer_sets_sampler_epoch(demo_paths, tmp_path):
    root = demo_paths["classification"]["root"]
    orders = _fit_orders(ImageFolderDataModule(str(root), image_size=16, batch_size=4, seed=0), tmp_path)
    assert orders == _fit_orders(ImageFolderDataModule(str(root), image_size=16, batch_size=4, seed=0), tmp_path)
    assert orders[0] != orders[1]
    # Epoch e's order depends only on (seed, e): what a run resumed at epoch 1 would see.
    fresh = ImageFolderDataModule(str(root), image_size=16, batch_size=4, seed=0)
    fresh.setup("fit")
    loader = fresh.train_dataloader()
    loader.sampler.set_epoch(1)
    assert [i for _, target in loader for i in target["image_id"]] == orders[1]


# ------------------------------------------------------------------------------------------------------- workers
def test_two_workers_give_the_same_batches_as_each_other_and_the_same_order(demo_paths):
    root = str(demo_paths["classification"]["root"])
    kwargs = {"image_size": 16, "batch_size": 4, "seed": 1}
    with_workers = ImageFolderDataModule(root, num_workers=2, persistent_workers=True, **kwargs)
    with_workers.setup("fit")

    def run() -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
        torch.manual_seed(0)  # worker seeds derive from the global RNG
        return [(images, target["label"], target["image_id"]) for images, target in with_workers.train_dataloader()]

    first, second = run(), run()
    assert len(first) == 3  # 12 training images
    for (a_images, a_labels, a_ids), (b_images, b_labels, b_ids) in zip(first, second, strict=True):
        assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels) and a_ids == b_ids
    in_process = ImageFolderDataModule(root, num_workers=0, persistent_workers=True, **kwargs)  # persistent ignored
    assert train_order(_setup_fit(in_process)) == [i for *_, ids in first for i in ids]
    val_images, val_target = next(iter(with_workers.val_dataloader()))
    assert val_images.shape == (4, 3, 16, 16) and val_target["label"].dtype == torch.int64


# -------------------------------------------------------------------------------------------------------- ADE20K
@pytest.mark.parametrize("use_parent", [True, False])
def test_ade20k_batches(demo_paths, use_parent):
    folder = demo_paths["ade20k"]["root"]
    dm = ADE20KDataModule(str(folder.parent if use_parent else folder), **SMALL_ADE, batch_size=3)
    dm.setup("fit")
    images, target = next(iter(dm.train_dataloader()))
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert target["mask"].shape == (3, 32, 32) and target["mask"].dtype == torch.int64
    assert set(target["mask"].unique().tolist()) <= {0, 1, 2, 255}  # synthetic labels 1..3, reduced
    for images, target in dm.val_dataloader():
        assert images.shape[-2] % 32 == 0 and images.shape[-1] % 32 == 0
        for index, (height, width) in enumerate(target["image_size"]):
            assert min(height, width) == 40
            assert set(target["mask"][index, height:].unique().tolist()) <= {255}
            assert set(target["mask"][index, :, width:].unique().tolist()) <= {255}
    assert dm.num_classes == 150 and dm.class_names == list(ADE20K_CLASSES) and dm.ignore_index == 255


def test_ade20k_without_reduce_zero_label(demo_paths):
    dm = ADE20KDataModule(str(demo_paths["ade20k"]["root"]), **SMALL_ADE, reduce_zero_label=False)
    dm.setup("validate")
    _, target = next(iter(dm.val_dataloader()))
    assert set(target["mask"].unique().tolist()) <= {0, 1, 2, 3, 255} and 0 in target["mask"]
    assert dm.num_classes == 151


# --------------------------------------------------------------------------------------------------- image folder
def test_image_folder_batches_and_classes(demo_paths):
    dm = ImageFolderDataModule(str(demo_paths["classification"]["root"]), image_size=24, batch_size=5)
    dm.setup(None)
    assert set(dm.datasets) == {"train", "val", "test", "predict"}
    images, target = next(iter(dm.train_dataloader()))
    assert images.shape == (5, 3, 24, 24) and images.dtype == torch.float32
    assert target["label"].shape == (5,) and target["label"].dtype == torch.int64
    assert dm.class_names == ["circle", "square", "triangle"] and dm.num_classes == 3
    assert dm.dataset("test").split_dir == demo_paths["classification"]["val"]


def _write_png_tree(root: Path, layout: dict[str, list[str]]) -> None:
    for split, classes in layout.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            Image.fromarray(np.full((8, 8, 3), 40, dtype=np.uint8)).save(root / split / name / "0.png")


def test_image_folder_val_uses_training_classes(tmp_path):
    _write_png_tree(tmp_path, {"train": ["a", "b", "c"], "val": ["a", "c"]})
    dm = ImageFolderDataModule(str(tmp_path), image_size=8)
    with pytest.warns(UserWarning, match="1 of 3 class folder"):
        dm.setup("validate")  # the val set alone: "c" must keep label 2
    assert set(dm.datasets) == {"val"}
    assert dm.class_names == ["a", "b", "c"]
    _, target = next(iter(dm.val_dataloader()))
    assert target["label"].tolist() == [0, 2]


# ------------------------------------------------------------------------------------------------------ unlabeled
def test_unlabeled_is_train_only(demo_paths, tmp_path):
    dm = UnlabeledImageFolderDataModule(str(demo_paths["classification"]["train"]), image_size=16, batch_size=4)
    assert is_overridden("train_dataloader", dm)
    assert not any(is_overridden(f"{s}_dataloader", dm) for s in ("val", "test", "predict"))
    with pytest.raises(ValueError, match=r"has no data for stage 'validate'; supported: \['fit'\]"):
        dm.setup("validate")
    orders = _fit_orders(dm, tmp_path, epochs=1)  # runs without any validation loader
    assert sorted(orders[0]) == list(range(12))
    images, target = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and len(target["path"]) == 4


# ------------------------------------------------------------------------------------------------ CLI / hparams
def _cli_cases(demo_paths) -> dict[str, dict]:
    return {
        "COCODataModule": {
            "data_root": str(demo_paths["coco"]["root"]),
            "train_short_sides": [40, 48],
            "mean": [0.5, 0.5, 0.5],
            **SMALL_COCO,
        },
        "ADE20KDataModule": {"data_root": str(demo_paths["ade20k"]["root"]), "scale_range": [0.5, 1.0], **SMALL_ADE},
        "ImageFolderDataModule": {"data_root": str(demo_paths["classification"]["root"]), "image_size": 16},
        "UnlabeledImageFolderDataModule": {"data_root": str(demo_paths["classification"]["train"]), "image_size": 16},
    }


@pytest.mark.parametrize(
    "name", ["COCODataModule", "ADE20KDataModule", "ImageFolderDataModule", "UnlabeledImageFolderDataModule"]
)
def test_builds_from_lightning_cli(demo_paths, tmp_path, monkeypatch, name):
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI also looks at sys.argv
    init_args = {**_cli_cases(demo_paths)[name], "batch_size": 3, "num_workers": 0, "seed": 11}
    cli = LightningCLI(
        BoringModel,
        BaseDataModule,
        subclass_mode_data=True,
        run=False,
        save_config_callback=None,
        trainer_defaults={"logger": False, "enable_checkpointing": False, "default_root_dir": str(tmp_path)},
        args={"data": {"class_path": f"visionkit.data.{name}", "init_args": init_args}},
    )
    dm = cli.datamodule
    assert type(dm).__name__ == name
    assert dm.batch_size == 3 and dm.seed == 11 and dm.val_batch_size == 3
    # The base loader settings reach the parser through **kwargs: all of them appear in the parsed config.
    parsed = cli.config["data"]["init_args"]
    for key in ("batch_size", "val_batch_size", "num_workers", "pin_memory", "persistent_workers", "drop_last", "seed"):
        assert key in parsed
    if name == "COCODataModule":
        assert tuple(dm.hparams.mean) == (0.5, 0.5, 0.5) and list(dm.hparams.train_short_sides) == [40, 48]
    dm.setup("fit")
    images, _ = next(iter(dm.train_dataloader()))
    assert len(images) == 3


def test_hyperparameters_load_weights_only(demo_paths, tmp_path):
    dm = ADE20KDataModule(demo_paths["ade20k"]["root"], **SMALL_ADE, batch_size=4)  # a Path, not a str
    assert dm.hparams.data_root == str(demo_paths["ade20k"]["root"]) and dm.hparams.batch_size == 4
    torch.save(dict(dm.hparams_initial), tmp_path / "hparams.pt")
    assert torch.load(tmp_path / "hparams.pt", weights_only=True) == dict(dm.hparams_initial)


def test_invalid_loader_settings_raise(demo_paths):
    with pytest.raises(ValueError, match="batch sizes must be >= 1, got batch_size=0"):
        coco_module(demo_paths, batch_size=0)
    with pytest.raises(ValueError, match="num_workers must be >= 0, got -1"):
        coco_module(demo_paths, num_workers=-1)


def test_generate_demo_writes_the_coco_demo_set_once(tmp_path):
    from visionkit.data import COCODataModule

    dm = COCODataModule(str(tmp_path / "demo" / "coco"), short_side=96, max_size=160, generate_demo=True)
    dm.prepare_data()
    ann = tmp_path / "demo" / "coco" / "annotations" / "instances_val2017.json"
    assert ann.is_file()
    assert not (tmp_path / "demo" / "ade20k").exists(), "only the datamodule's own kind is written"
    stamp = ann.stat().st_mtime_ns
    dm.prepare_data()  # complete set: skipped, not rewritten
    assert ann.stat().st_mtime_ns == stamp
    dm.setup("validate")
    assert dm.num_classes == 3 and dm.ann_file == ann


def test_generate_demo_needs_a_kind_folder(tmp_path):
    from visionkit.data import ADE20KDataModule

    with pytest.raises(ValueError, match=r"data_root must be that folder"):
        ADE20KDataModule(str(tmp_path / "somewhere"), generate_demo=True).prepare_data()


def test_generate_demo_for_ade20k_resolves_the_nested_folder(tmp_path):
    from visionkit.data import ADE20KDataModule

    dm = ADE20KDataModule(str(tmp_path / "ade20k"), crop_size=64, short_side=96, generate_demo=True)
    dm.prepare_data()
    dm.setup("validate")
    image, target = dm.dataset("val")[0]
    assert image.shape[0] == 3 and target["mask"].ndim == 2


def test_generate_demo_with_own_sizes(tmp_path):
    from visionkit.data import ADE20KDataModule

    dm = ADE20KDataModule(str(tmp_path / "ade20k"), crop_size=64, generate_demo=True, demo_sizes=(6, 3))
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.dataset("train")), len(dm.dataset("val"))) == (6, 3)


def test_exif_orientation_reaches_the_datasets(demo_paths):
    coco = coco_module(demo_paths, exif_orientation="stored")
    coco.setup("validate")
    assert coco.dataset("val")._image_reader.exif_orientation == "stored"
    ade = ADE20KDataModule(str(demo_paths["ade20k"]["root"]), **SMALL_ADE, exif_orientation="upright")
    ade.setup("validate")
    assert ade.dataset("val").exif_orientation == "upright"
    assert ADE20KDataModule(str(demo_paths["ade20k"]["root"])).hparams.exif_orientation == "auto"
