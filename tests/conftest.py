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

COCO categories: circle (id 1), square (id 3), triangle (id 7) -> contiguous labels 0, 1, 2. In each COCO/ADE split
image 0 has two touching squares, image 1 two overlapping circles, image 2 a crowd region, image 3 is empty. Image
sizes vary in 96..160 px. Treat the folder as read-only: it is shared by every test in the session.

``demo_paths`` gives the same folders by name: ``demo_paths["coco"]["val_annotations"]``,
``demo_paths["ade20k"]["root"]`` (the ``ADEChallengeData2016`` folder), ``demo_paths["classification"]["train"]``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from visionkit.data.synthetic import write_demo_data

DEMO_TEST_SIZES: dict[str, tuple[int, int]] = {"coco": (8, 4), "ade20k": (6, 4), "classification": (4, 2)}


@pytest.fixture(scope="session")
def demo_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Write the demo datasets once per session; returns ``write_demo_data``'s dict of paths per kind."""
    root = tmp_path_factory.mktemp("demo")
    return write_demo_data(root, seed=0, sizes=DEMO_TEST_SIZES)


@pytest.fixture(scope="session")
def demo_root(demo_paths: dict[str, dict[str, Path]]) -> Path:
    """Root folder of the session's demo datasets (layout in this module's docstring)."""
    return demo_paths["coco"]["root"].parent


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide pytest's own arguments from code under test that looks at ``sys.argv`` (LightningCLI warns about them)."""
    monkeypatch.setattr("sys.argv", ["visionkit"])
