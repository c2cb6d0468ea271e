"""Shared pytest fixtures.

``demo_root`` (session scope) writes the synthetic demo datasets once per test session into a temporary folder, with
the sizes in ``DEMO_TEST_SIZES`` (about 60 small images, well under a second). Layout (see
``visionkit/data/synthetic.py`` for what the scenes contain)::

    <demo_root>/
      coco/
        train2017/000000000001.jpg ... 000000000008.jpg         (8 images, ids 1..8)
        val2017/000001000001.jpg ... 000001000004.jpg           (4 images, ids 1000001..1000004)
        annotations/instances_train2017.json, instances_val2017.json
        visionkit_manifest.json
      ade20k/
        ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_0000000k.jpg       (6 train, 4 val)
        ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_0000000k.png  (labels 0..3)
        visionkit_manifest.json
      classification/
        {train,val}/{circle,square,triangle}/<class>_000k.png   (4 train and 2 val images per class, 64×64)
        visionkit_manifest.json
      pretraining/
        <dataset>/images/*.{png,tif}    (2 dataset folders, 6 images each: colour, grey and 16-bit files)
        visionkit_manifest.json

COCO categories: circle (id 1), square (id 3), triangle (id 7) -> contiguous labels 0, 1, 2. In each COCO/ADE split
image 0 has two touching squares, image 1 two overlapping circles, image 2 a crowd region, image 3 is empty. Image
sizes vary in 96..160 px. Treat the folder as read-only: it is shared by every test in the session.

``demo_paths`` gives the same folders by name: ``demo_paths["coco"]["val_annotations"]``,
``demo_paths["ade20k"]["root"]`` (the ``ADEChallengeData2016`` folder), ``demo_paths["classification"]["train"]``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Without a GPU the Triton kernels run in Triton's interpreter. The switch must be on before `triton` itself is
# imported (its language helpers are decorated at import, and lightning imports triton), so it comes first here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lightning.pytorch as pl
import pytest

from visionkit.cli import main
from visionkit.data.synthetic import write_demo_data

DEMO_TEST_SIZES: dict[str, tuple[int, int]] = {
    "coco": (8, 4), "ade20k": (6, 4), "classification": (4, 2), "pretraining": (6, 2)
}  # fmt: skip


@pytest.fixture(scope="session")
def demo_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Write the demo datasets once per session; returns ``write_demo_data``'s dict of paths per kind."""
    root = tmp_path_factory.mktemp("demo")
    return write_demo_data(root, seed=0, sizes=DEMO_TEST_SIZES)


@pytest.fixture(scope="session")
def demo_root(demo_paths: dict[str, dict[str, Path]]) -> Path:
    """Root folder of the session's demo datasets (layout in this module's docstring)."""
    return demo_paths["coco"]["root"].parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``@pytest.mark.gpu`` when no CUDA device is available (one reason, in the summary)."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (marked gpu); torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide pytest's own arguments from code under test that looks at ``sys.argv`` (LightningCLI warns about them)."""
    monkeypatch.setattr("sys.argv", ["visionkit"])


class _StopAfterEpochs(pl.Callback):
    """Ends ``fit`` after ``epochs`` epochs, as an interruption would (the epoch's checkpoint is kept)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


@pytest.fixture()
def interrupted_fit():
    """``interrupted_fit(fit_args, epochs)``: run the CLI's ``fit`` with ``fit_args`` but stop after ``epochs`` epochs.

    The run is configured for its full length (so the learning-rate schedule is the uninterrupted one) and stops as an
    interrupted run would, leaving ``last.ckpt`` for ``--ckpt_path last``.
    """

    def run(fit_args: list[str], epochs: int) -> None:
        assert fit_args[0] == "fit"
        cli = main(fit_args[1:], run=False)
        cli.trainer.callbacks.append(_StopAfterEpochs(epochs))
        cli.trainer.fit(cli.model, cli.datamodule)
        assert cli.trainer.current_epoch == epochs

    return run


# ----------------------------------------------------------------------------------------------------------------
# Tiny random-weight CLIP / SAM models (foundation adapters, Zip, config and DDP tests); configs and builders in
# tests/models/foundation/tiny_models.py. Session scope: treat the models as read-only.
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_clip_vit() -> tuple[torch.nn.Module, object]:
    """``(model, tokenizer)``: the tiny ViT CLIP (``TINY_VIT``) with seeded random weights, eval mode."""
    from tests.models.foundation.tiny_models import TINY_VIT, clip_tokenizer, random_clip

    return random_clip(TINY_VIT), clip_tokenizer(TINY_VIT)


@pytest.fixture(scope="session")
def tiny_clip_resnet() -> torch.nn.Module:
    """The tiny ModifiedResNet CLIP (``TINY_RN``) with seeded random weights, eval mode."""
    from tests.models.foundation.tiny_models import TINY_RN, random_clip

    return random_clip(TINY_RN, seed=1)


@pytest.fixture(scope="session")
def tiny_sam() -> torch.nn.Module:
    """The tiny SAM (``vit_test``) with seeded random weights, eval mode."""
    from tests.models.foundation.tiny_models import random_sam

    return random_sam()


@pytest.fixture(scope="session")
def tiny_zip_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Tiny CLIP ViT / CLIP ResNet / SAM checkpoint files and their archs, as ``ZipTask`` arguments."""
    from tests.models.foundation.tiny_models import write_tiny_checkpoints

    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny_foundation"))
