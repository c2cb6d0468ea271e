"""MultiCrop views, their collate function and MultiCropDataModule on the synthetic pretraining collection."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.model_helpers import is_overridden

from visionkit.data import BaseDataModule, MultiCrop, MultiCropDataModule, collate_multicrop
from visionkit.data.synthetic_corpus import write_unlabeled_corpus
from visionkit.utils.constants import IMAGENET_MEAN, IMAGENET_STD

# Probabilities that switch every photometric step off, for exact checks.
NO_AUGMENT = {
    "flip_prob": 0.0, "jitter_prob": 0.0, "grayscale_prob": 0.0, "global1_blur_prob": 0.0,
    "global2_blur_prob": 0.0, "local_blur_prob": 0.0, "solarize_prob": 0.0,
}  # fmt: skip
SMALL = {"global_size": 32, "local_size": 16}


def _image(height: int = 60, width: int = 80, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _denormalise(view: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (view * std + mean) * 255


def test_default_views_follow_the_released_recipe() -> None:
    transform = MultiCrop()
    assert transform.num_views == 10
    target = {"image_id": 3, "path": "x.png"}
    views, out = transform(_image(), target)
    assert out is target
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 8
    assert all(v.dtype == torch.float32 for v in views)
    # Released settings, as built (the module docstring's table).
    crop = transform.global1.transforms[0]
    assert crop.scale == (0.14, 1.0) and crop.interpolation.value == "bicubic"
    assert transform.local.transforms[0].scale == (0.05, 0.4)
    blur_probs = [pipeline.transforms[4].p for pipeline in (transform.global1, transform.global2, transform.local)]
    assert blur_probs == [1.0, 0.1, 0.5]
    solarize = transform.global2.transforms[5]
    assert type(solarize).__name__ == "RandomSolarize" and solarize.p == 0.2 and solarize.threshold == 128
    assert not any(type(t).__name__ == "RandomSolarize" for t in transform.global1.transforms)
    jitter = transform.global1.transforms[2]
    assert jitter.p == 0.8 and jitter.transforms[0].brightness == (0.6, 1.4) and jitter.transforms[0].hue == (-0.1, 0.1)
    blur = transform.global1.transforms[4].transforms[0]
    assert tuple(blur.kernel_size) == (13, 13) and tuple(blur.sigma) == (0.1, 2.0)


def test_counts_and_sizes_are_arguments() -> None:
    views, _ = MultiCrop(num_global=3, num_local=2, global_size=40, local_size=24)(_image(), {})
    assert [tuple(v.shape[1:]) for v in views] == [(40, 40)] * 3 + [(24, 24)] * 2
    views, _ = MultiCrop(num_global=1, num_local=0, global_size=20)(_image(), {})
    assert len(views) == 1


def test_same_torch_seed_same_views_whatever_python_and_numpy_do() -> None:
    transform, image = MultiCrop(**SMALL), _image()
    torch.manual_seed(5)
    random.seed(1)
    np.random.seed(1)
    first, _ = transform(image, {})
    torch.manual_seed(5)
    random.seed(2)
    np.random.seed(2)
    again, _ = transform(image, {})
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    torch.manual_seed(6)
    other, _ = transform(image, {})
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_normalisation_is_imagenet() -> None:
    image = torch.tensor([200, 100, 30], dtype=torch.uint8).view(3, 1, 1).expand(3, 50, 70).contiguous()
    views, _ = MultiCrop(**SMALL, **NO_AUGMENT)(image, {})
    expected = (torch.tensor([200, 100, 30]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for view in views:
        torch.testing.assert_close(view, expected.view(3, 1, 1).expand_as(view), rtol=0, atol=1e-6)


def test_solarize_only_on_the_second_global_view_and_grey_keeps_three_channels() -> None:
    image = torch.full((3, 50, 70), 200, dtype=torch.uint8)
    settings = {**SMALL, **NO_AUGMENT, "num_global": 3, "num_local": 1}
    views, _ = MultiCrop(**{**settings, "solarize_prob": 1.0})(image, {})
    values = [int(_denormalise(v).round().unique()[0]) for v in views]
    assert values == [200, 55, 55, 200]  # 255 - 200 on the global views after the first
    image = torch.stack([torch.full((50, 70), v, dtype=torch.uint8) for v in (250, 20, 90)])
    views, _ = MultiCrop(**{**settings, "grayscale_prob": 1.0})(image, {})
    for view in views:
        pixels = _denormalise(view).round()
        assert view.shape[0] == 3 and torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])


def test_bad_inputs_and_settings() -> None:
    transform = MultiCrop(**SMALL)
    with pytest.raises(ValueError, match=r"uint8 \(3, H, W\) image, got torch.float32"):
        transform(torch.rand(3, 40, 40), {})
    with pytest.raises(ValueError, match=r"got torch.uint8 \(1, 40, 40\)"):
        transform(torch.zeros(1, 40, 40, dtype=torch.uint8), {})
    for bad in ({"num_global": 0}, {"num_local": -1}, {"local_scale": (0.5, 0.2)}, {"flip_prob": 1.5},
                {"blur_sigma": (0.0, 1.0)}, {"blur_kernel_size": 4}, {"local_size": 6}):  # fmt: skip
        with pytest.raises(ValueError):
            MultiCrop(**{**SMALL, **bad})


def test_collate_stacks_view_by_view() -> None:
    transform = MultiCrop(**SMALL, num_local=3)
    batch = [transform(_image(seed=i), {"image_id": i, "dataset": "us_a"}) for i in range(4)]
    views, targets = collate_multicrop(batch)
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert torch.equal(views[3][2], batch[2][0][3])
    assert targets == {"image_id": [0, 1, 2, 3], "dataset": ["us_a"] * 4}
    with pytest.raises(ValueError, match="sample 1 has views"):
        collate_multicrop([batch[0], (batch[1][0][:-1], {})])
    with pytest.raises(ValueError, match="empty batch"):
        collate_multicrop([])


# ------------------------------------------------------------------------------------------------------ datamodule
@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_unlabeled_corpus(root, ("us_a", "us_b"), images_per_dataset=[5, 3], image_size=(64, 96))
    return root


def _module(root: Path, **kwargs: object) -> MultiCropDataModule:
    return MultiCropDataModule(str(root), **SMALL, num_local=4, batch_size=3, **kwargs)


def test_datamodule_batches(corpus: Path) -> None:
    dm = _module(corpus, seed=0)
    assert is_overridden("train_dataloader", dm)
    assert not any(is_overridden(f"{s}_dataloader", dm) for s in ("val", "test", "predict"))
    dm.setup("fit")
    assert dm.dataset_sizes == {"us_a": 5, "us_b": 3}
    batches = list(dm.train_dataloader())
    assert [len(targets["image_id"]) for _, targets in batches] == [3, 3, 2]
    views, targets = batches[0]
    assert isinstance(views, list) and len(views) == 6
    assert [tuple(v.shape) for v in views] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 4
    assert set(targets) == {"image_id", "path", "dataset"}
    seen = sorted(i for _, t in batches for i in t["image_id"])
    assert seen == list(range(8))
    datasets = {i: d for _, t in batches for i, d in zip(t["image_id"], t["dataset"], strict=True)}
    assert [datasets[i] for i in range(8)] == ["us_a"] * 5 + ["us_b"] * 3


def test_datamodule_views_are_seeded_per_worker(corpus: Path) -> None:
    def first_batch() -> list[torch.Tensor]:
        dm = _module(corpus, seed=3, num_workers=2)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))[0]

    torch.manual_seed(0)
    first = first_batch()
    torch.manual_seed(1)  # the main process's RNG does not reach the workers' views
    again = first_batch()
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_datamodule_generates_the_demo_collection(tmp_path: Path) -> None:
    dm = _module(tmp_path / "demo" / "pretraining", generate_demo=True)
    dm.prepare_data()
    dm.setup("fit")
    assert set(dm.dataset_sizes) == {"us_a", "us_b"}
    with pytest.raises(ValueError, match="has no data for stage 'validate'"):
        dm.setup("validate")
    with pytest.raises(ValueError, match="blur kernel size"):
        MultiCropDataModule(str(tmp_path), local_size=6)  # settings are checked at construction


YAML = """
data:
  class_path: MultiCropDataModule
  init_args:
    data_root: {root}
    image_subdir: images
    num_global: 2
    num_local: 8
    global_size: 224
    local_size: 96
    global_scale: [0.14, 1.0]
    local_scale: [0.05, 0.4]
    batch_size: 32
    num_workers: 8
    drop_last: true
    skip_unreadable: true
"""


def test_builds_from_the_documented_yaml(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import visionkit.data  # noqa: F401  (bare class names resolve among the imported subclasses)

    monkeypatch.setattr(sys, "argv", ["train.py"])
    cli = LightningCLI(
        BoringModel,
        BaseDataModule,
        subclass_mode_data=True,
        run=False,
        save_config_callback=None,
        trainer_defaults={"logger": False, "enable_checkpointing": False, "default_root_dir": str(tmp_path)},
        args=yaml.safe_load(YAML.format(root=corpus)),
    )
    dm = cli.datamodule
    assert isinstance(dm, MultiCropDataModule) and dm.multicrop.num_views == 10
    assert dm.batch_size == 32 and tuple(dm.hparams.global_scale) == (0.14, 1.0) and dm.hparams.image_subdir == "images"
