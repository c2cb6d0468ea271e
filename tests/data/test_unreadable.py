"""skip_unreadable: truncated training images are replaced by the next item, deterministically, and reported."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from tests.data.test_datamodules import SMALL_ADE, SMALL_COCO, _fit_orders, _setup_fit, train_order
from visionkit.data import ADE20KDataModule, COCODataModule, ImageFolderDataModule
from visionkit.data.image_io import ImageReadError
from visionkit.data.unreadable import SkipUnreadable, item_path

# ---------------------------------------------------------------------------------------------- unreadable images
_SKIP_CASES = {
    "coco": lambda root, **kw: COCODataModule(str(root), **SMALL_COCO, batch_size=2, seed=0, **kw),
    "ade20k": lambda root, **kw: ADE20KDataModule(str(root), **SMALL_ADE, batch_size=2, seed=0, **kw),
    "classification": lambda root, **kw: ImageFolderDataModule(str(root), image_size=16, batch_size=4, seed=0, **kw),
}
_BAD_ITEMS = (1, 4)  # training items whose image files get truncated


def _corrupt_copy(demo_paths, kind: str, tmp_path: Path) -> tuple[Path, list[Path]]:
    """A copy of the demo ``kind`` set whose training items 1 and 4 have their image cut to a third."""
    root = tmp_path / kind
    shutil.copytree(demo_paths[kind]["root"], root)
    dm = _SKIP_CASES[kind](root)
    dm.setup("fit")
    bad = [Path(item_path(dm.dataset("train"), index)) for index in _BAD_ITEMS]
    for path in bad:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    return root, bad


def _ids(targets) -> list[int]:
    return [t["image_id"] for t in targets] if isinstance(targets, list) else list(targets["image_id"])


def _image_id(dataset, index: int) -> int:
    return dataset.image_ids[index] if hasattr(dataset, "image_ids") else index


@pytest.mark.parametrize("kind", sorted(_SKIP_CASES))
def test_skip_unreadable_replaces_truncated_training_images_by_the_next_item(demo_paths, tmp_path, kind):
    clean = _setup_fit(_SKIP_CASES[kind](demo_paths[kind]["root"]))
    root, bad = _corrupt_copy(demo_paths, kind, tmp_path)
    # Off (the default): the first unreadable image stops the epoch, and the error names it.
    strict = _setup_fit(_SKIP_CASES[kind](root))
    with pytest.raises(ImageReadError, match="|".join(re.escape(str(path)) for path in bad)):
        train_order(strict)
    # On: every file is named once in a warning, batches stay full, item i is replaced by item i + 1.
    skipping = _setup_fit(_SKIP_CASES[kind](root, skip_unreadable=True))
    loader = skipping.train_dataloader()
    with pytest.warns(UserWarning, match=r"skip_unreadable: training item \d+ is replaced") as seen:
        batches = list(loader)
    messages = [str(w.message) for w in seen if "skip_unreadable" in str(w.message)]
    assert len(messages) == 2 and all(any(str(path) in m for m in messages) for path in bad)
    size, batch_size = len(skipping.dataset("train")), skipping.batch_size
    assert [len(images) for images, _ in batches] == [min(batch_size, size - i) for i in range(0, size, batch_size)]
    dataset = clean.dataset("train")
    replaced = {_image_id(dataset, i): _image_id(dataset, i + 1) for i in _BAD_ITEMS}  # 2 and 5 are readable
    expected = [replaced.get(image_id, image_id) for image_id in train_order(clean)]
    seen_ids = [i for _, targets in batches for i in _ids(targets)]
    assert seen_ids == expected
    assert loader.dataset.take_report() == list(_BAD_ITEMS) and loader.dataset.take_report() == []
    # Validation is never skipped: a metric over a silently reduced set would not be comparable.
    assert isinstance(loader.dataset, SkipUnreadable) and not isinstance(
        skipping.val_dataloader().dataset, SkipUnreadable
    )


def test_skip_unreadable_is_the_same_with_workers_and_reports_each_epoch(demo_paths, tmp_path):
    root, bad = _corrupt_copy(demo_paths, "classification", tmp_path)

    def fit(num_workers: int) -> list[list[int]]:
        dm = _SKIP_CASES["classification"](root, skip_unreadable=True, num_workers=num_workers)
        return _fit_orders(dm, tmp_path / f"run{num_workers}")

    report = r"epoch {}: 2 of 12 training images could not be read and were replaced by the next readable image"
    with pytest.warns(UserWarning) as seen:
        in_process = fit(0)
    messages = [str(w.message) for w in seen]
    for epoch in (0, 1):  # counted in every epoch, also once the files are known to be unreadable
        (line,) = [m for m in messages if re.match(report.format(epoch), m)]
        assert all(str(path) in line for path in bad)
    assert sum("skip_unreadable: training item" in m for m in messages) == 2  # each file named once, not per epoch
    assert in_process[0] != in_process[1] and all(len(order) == 12 for order in in_process)
    with pytest.warns(UserWarning, match=report.format(1)):
        assert fit(2) == in_process  # the workers' findings reach the report; the same items in the same order


def test_skip_unreadable_gives_up_on_a_broken_set_and_lets_other_errors_through():
    class Broken(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 5

        def __getitem__(self, index: int):
            if index == 4:
                raise ValueError("label 300 out of range in labels_4.png")
            raise FileNotFoundError(2, "image file not found", f"/data/img_{index}.jpg")

    wrapper = SkipUnreadable(Broken(), max_consecutive=3)
    with (
        pytest.warns(UserWarning, match=r"img_0\.jpg"),
        pytest.raises(
            RuntimeError, match=r"3 items in a row, from item 0 .*cannot be read; the first error: .*img_0\.jpg"
        ),
    ):
        wrapper[0]
    with pytest.raises(ValueError, match="label 300 out of range"):  # not an unreadable file: not skipped
        wrapper[4]
    with pytest.raises(IndexError):
        wrapper[5]
