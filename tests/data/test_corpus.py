"""Pretraining collections: the ``root/<dataset>/images`` layout, image modes of real exports, the synthetic corpus."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionkit.data.image_folder import UnlabeledImageFolder
from visionkit.data.image_io import read_image
from visionkit.data.synthetic import DEMO_KINDS, DEMO_SIZES, MANIFEST_NAME, write_demo_data
from visionkit.data.synthetic_corpus import CORPUS_FORMATS, corpus_dataset_names, write_unlabeled_corpus

GREY = np.array([[0, 1, 127], [128, 200, 255]], dtype=np.uint8)


def _save(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


# ------------------------------------------------------------------------------------------- modes of real exports
@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_sixteen_bit_full_range_scales_by_the_dtype_range(tmp_path: Path, suffix: str) -> None:
    values = np.array([[0, 255, 256, 4095], [32768, 65279, 65280, 65535]], dtype=np.uint16)
    path = _save(tmp_path / f"deep.{suffix}", Image.fromarray(values))
    assert Image.open(path).mode == "I;16"
    image = read_image(path)
    assert image.shape == (3, 2, 4) and image.dtype == torch.uint8
    assert (image[0] == image[1]).all() and (image[0] == image[2]).all()
    # value >> 8: 0 -> 0, 65535 -> 255, the midpoint to 128; within 1 of round(v * 255 / 65535).
    assert image[0].tolist() == [[0, 0, 1, 15], [128, 254, 255, 255]]
    assert np.abs(image[0].numpy().astype(int) - np.rint(values.astype(np.float64) * 255 / 65535)).max() <= 1


def test_eight_bit_grey_exported_at_16_bit_reads_back_exactly(tmp_path: Path) -> None:
    path = _save(tmp_path / "grey16.png", Image.fromarray(GREY.astype(np.uint16) * 257))
    assert read_image(path)[0].tolist() == GREY.tolist()


def test_twelve_bit_data_in_a_16_bit_file_comes_out_dark(tmp_path: Path) -> None:
    # The documented behaviour: 0..4095 becomes 0..15 (nothing guesses the bit depth from the values).
    twelve = np.array([[0, 2048, 4095]], dtype=np.uint16)
    path = _save(tmp_path / "twelve.tif", Image.fromarray(twelve))
    assert read_image(path)[0].tolist() == [[0, 8, 15]]


def test_greyscale_rgb_tiff_and_rgba_png(tmp_path: Path) -> None:
    grey = read_image(_save(tmp_path / "grey.png", Image.fromarray(GREY, mode="L")))
    assert all(grey[c].tolist() == GREY.tolist() for c in range(3))
    rgb = np.stack([GREY, 255 - GREY, np.full_like(GREY, 7)], axis=2)
    tiff = read_image(_save(tmp_path / "colour.tif", Image.fromarray(rgb, mode="RGB")))
    assert tiff.permute(1, 2, 0).numpy().tolist() == rgb.tolist()
    rgba = np.concatenate([rgb, np.zeros_like(GREY)[:, :, None]], axis=2)  # fully transparent: colour still kept
    png = read_image(_save(tmp_path / "alpha.png", Image.fromarray(rgba, mode="RGBA")))
    assert png.shape == (3, 2, 3) and png.permute(1, 2, 0).numpy().tolist() == rgb.tolist()


# ---------------------------------------------------------------------------------------- root/<dataset>/images
@pytest.fixture()
def collection(tmp_path: Path) -> Path:
    root = tmp_path / "collection"
    block = Image.fromarray(np.full((4, 5), 90, dtype=np.uint8), mode="L")
    for name in ("b.png", "a.png", "deeper/c.tif"):
        _save(root / "us_b" / "images" / name, block)
    _save(root / "us_a" / "images" / "x.png", Image.fromarray(np.full((4, 5), 30, dtype=np.uint16) * 257))
    _save(root / "us_a" / "masks" / "x.png", block)  # a sibling of images/: never part of the corpus
    _save(root / "us_a" / "loose.png", block)  # outside images/
    _save(root / "stray.png", block)  # a file directly in the root
    _save(root / ".cache" / "images" / "hidden.png", block)  # a hidden folder
    return root


def test_subdir_layout_reads_only_the_image_folders(collection: Path) -> None:
    dataset = UnlabeledImageFolder(collection, image_subdir="images")
    names = [path.relative_to(collection).as_posix() for path in dataset.paths]
    assert names == ["us_a/images/x.png", "us_b/images/a.png", "us_b/images/b.png", "us_b/images/deeper/c.tif"]
    assert dataset.dataset_names == ["us_a", "us_b"]
    assert dataset.dataset_sizes == {"us_a": 1, "us_b": 3}
    image, target = dataset[0]
    assert (image == 30).all()  # the 16-bit file, scaled back to 8 bit
    assert target == {"image_id": 0, "path": str(collection / "us_a" / "images" / "x.png"), "dataset": "us_a"}
    assert [dataset[i][1]["dataset"] for i in range(len(dataset))] == ["us_a", "us_b", "us_b", "us_b"]
    assert "datasets=2" in repr(dataset)


def test_plain_layout_is_unchanged(collection: Path) -> None:
    dataset = UnlabeledImageFolder(collection)
    assert len(dataset) == 7  # everything but the hidden folder
    assert dataset.dataset_sizes == {} and "dataset" not in dataset[0][1]


def test_dataset_without_image_folder_is_an_error_naming_it(collection: Path) -> None:
    (collection / "us_c" / "frames").mkdir(parents=True)
    (collection / "us_d" / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"2 of 4 dataset folders give no images") as error:
        UnlabeledImageFolder(collection, image_subdir="images")
    message = str(error.value)
    assert "1 without a 'images' folder: ['us_c']" in message and "['us_d']" in message
    assert "skip_incomplete=True" in message
    with pytest.warns(UserWarning, match=r"us_c.*us_d.*skipped"):
        dataset = UnlabeledImageFolder(collection, image_subdir="images", skip_incomplete=True)
    assert dataset.dataset_sizes == {"us_a": 1, "us_b": 3}


def test_collection_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no dataset folders in " + re.escape(str(tmp_path))):
        UnlabeledImageFolder(tmp_path, image_subdir="images")
    (tmp_path / "us_a").mkdir()
    with pytest.raises(ValueError, match="no images left"):
        UnlabeledImageFolder(tmp_path, image_subdir="images", skip_incomplete=True)


# ------------------------------------------------------------------------------------------------ synthetic corpus
def test_corpus_layout_formats_and_reading(tmp_path: Path) -> None:
    paths = write_unlabeled_corpus(tmp_path, ("us_a", "us_b"), images_per_dataset=[5, 4], image_size=(64, 96))
    assert paths == {"root": tmp_path, "us_a": tmp_path / "us_a" / "images", "us_b": tmp_path / "us_b" / "images"}
    files = sorted(p.name for p in paths["us_a"].iterdir())
    assert files == ["us_a_00000.png", "us_a_00001.png", "us_a_00002.png", "us_a_00003.tif", "us_a_00004.png"]
    for index, name in enumerate(files):
        with Image.open(paths["us_a"] / name) as stored:
            assert stored.mode == CORPUS_FORMATS[index % 4][1]
            assert 64 <= min(stored.size) <= max(stored.size) <= 96
    dataset = UnlabeledImageFolder(tmp_path, image_subdir="images")
    assert dataset.dataset_sizes == {"us_a": 5, "us_b": 4}
    for index in range(len(dataset)):
        image, _ = dataset[index]
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert image.float().std() > 5, "a scene, not a flat image"
    # 16-bit files hold the full range (grey * 257), so they decode to the 8-bit grey they were made from.
    deep = np.asarray(Image.open(paths["us_a"] / "us_a_00002.png")).astype(np.int64)
    assert (deep % 257 == 0).all() and deep.max() > 255 * 100
    assert read_image(paths["us_a"] / "us_a_00002.png")[0].numpy().tolist() == (deep // 257).tolist()
    # The ultrasound-look dataset is black outside its fan (the top corners).
    fan = read_image(paths["us_b"] / "us_b_00000.png")
    assert (fan[:, 0, 0] == 0).all() and (fan[:, 0, -1] == 0).all()


def test_corpus_is_deterministic_and_stable_under_growth(tmp_path: Path) -> None:
    write_unlabeled_corpus(tmp_path / "a", images_per_dataset=4, image_size=(64, 80), seed=1)
    write_unlabeled_corpus(tmp_path / "b", images_per_dataset=6, image_size=(64, 80), seed=1)
    write_unlabeled_corpus(tmp_path / "c", images_per_dataset=4, image_size=(64, 80), seed=2)
    for path in sorted((tmp_path / "a").rglob("*.*")):
        relative = path.relative_to(tmp_path / "a")
        assert path.read_bytes() == (tmp_path / "b" / relative).read_bytes(), relative
    differ = [p.read_bytes() != (tmp_path / "c" / p.relative_to(tmp_path / "a")).read_bytes()
              for p in (tmp_path / "a").rglob("*.*")]  # fmt: skip
    assert all(differ)


def test_corpus_argument_errors(tmp_path: Path) -> None:
    write_unlabeled_corpus(tmp_path, ("one",), 1, image_size=(64, 64))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_unlabeled_corpus(tmp_path, ("one",), 1, image_size=(64, 64))
    write_unlabeled_corpus(tmp_path, ("one",), 2, image_size=(64, 64), overwrite=True)
    assert len(list((tmp_path / "one" / "images").iterdir())) == 2
    for datasets in ((), ("a", "a"), (".hidden",), ("a/b",)):
        with pytest.raises(ValueError):
            write_unlabeled_corpus(tmp_path / "x", datasets, 1)
    with pytest.raises(ValueError, match="got 1 image counts for 2 datasets"):
        write_unlabeled_corpus(tmp_path / "x", ("a", "b"), [3])
    with pytest.raises(ValueError, match=r"images_per_dataset\[b\] must be >= 0"):
        write_unlabeled_corpus(tmp_path / "x", ("a", "b"), [3, -1])
    assert corpus_dataset_names(3) == ("us_a", "us_b", "us_c")
    with pytest.raises(ValueError):
        corpus_dataset_names(0)


def test_pretraining_demo_kind(tmp_path: Path) -> None:
    result = write_demo_data(tmp_path, kinds=["pretraining"], sizes={"pretraining": (3, 3)})
    paths = result["pretraining"]
    assert set(paths) == {"root", "us_a", "us_b", "us_c", "manifest"}
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["complete"] and len(manifest["files"]) == 9
    assert MANIFEST_NAME not in [p.name for p in UnlabeledImageFolder(paths["root"]).paths]
    assert UnlabeledImageFolder(paths["root"], image_subdir="images").dataset_sizes == {"us_a": 3, "us_b": 3, "us_c": 3}
    stamp = paths["manifest"].stat().st_mtime_ns
    write_demo_data(tmp_path, kinds=["pretraining"], sizes={"pretraining": (3, 3)})  # complete: skipped
    assert paths["manifest"].stat().st_mtime_ns == stamp


def test_make_data_tool_writes_the_collection(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tool_path = Path(__file__).resolve().parents[2] / "tools" / "make_data.py"
    spec = importlib.util.spec_from_file_location("make_data_tool", tool_path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.parse_args([]).kinds == list(DEMO_KINDS) and "pretraining" in DEMO_KINDS
    assert tool.main(["--root", str(tmp_path), "--kinds", "pretraining"]) == 0
    per_dataset, datasets = DEMO_SIZES["pretraining"]
    out = capsys.readouterr().out
    assert f"pretraining: {tmp_path / 'pretraining'} (written: {datasets} datasets of {per_dataset} images" in out
    assert f"us_a               {tmp_path / 'pretraining' / 'us_a' / 'images'}  ({per_dataset} files)" in out
