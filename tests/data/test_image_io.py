import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionkit.data.image_io import (
    AnnotatedImageReader,
    AnnotationSizeError,
    ImageReadError,
    read_exif_orientation,
    read_image,
    read_image_for_annotation,
    read_label_map,
)

EXIF_ORIENTATION = 0x0112


def _asymmetric_rgb(height: int = 24, width: int = 40) -> np.ndarray:
    """An image whose every rotation/flip differs: coloured blocks in three corners."""
    array = np.full((height, width, 3), 40, dtype=np.uint8)
    array[:6, :10] = (250, 10, 10)
    array[:6, -8:] = (10, 250, 10)
    array[-5:, :12] = (10, 10, 250)
    return array


# EXIF orientation -> how the stored pixels must be turned to be upright (torch.rot90 on dims (H, W); flip on W).
@pytest.mark.parametrize(
    ("orientation", "upright"),
    [
        (3, lambda t: torch.rot90(t, 2, dims=(1, 2))),
        (6, lambda t: torch.rot90(t, -1, dims=(1, 2))),  # rotate 90° clockwise
        (8, lambda t: torch.rot90(t, 1, dims=(1, 2))),  # rotate 90° counter-clockwise
        (2, lambda t: torch.flip(t, dims=(2,))),  # mirror left-right
    ],
)
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, upright) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(_asymmetric_rgb()).save(path, exif=exif.tobytes(), quality=95)

    raw = read_image(path, apply_exif_orientation=False)
    image = read_image(path)

    assert raw.shape == (3, 24, 40)
    assert torch.equal(image, upright(raw))
    if orientation in (6, 8):
        assert image.shape == (3, 40, 24)


def test_rgb_png_round_trip_and_contract(tmp_path: Path) -> None:
    array = _asymmetric_rgb()
    Image.fromarray(array).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.dtype == torch.uint8
    assert image.shape == (3, 24, 40)
    assert image.is_contiguous()
    assert np.array_equal(image.permute(1, 2, 0).numpy(), array)


def test_greyscale_is_repeated_to_three_channels(tmp_path: Path) -> None:
    grey = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    image = read_image(tmp_path / "grey.png")
    for channel in range(3):
        assert np.array_equal(image[channel].numpy(), grey)


def test_palette_png_gives_palette_colours(tmp_path: Path) -> None:
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    palette_image = Image.fromarray(indices, mode="P")
    palette_image.putpalette([0, 0, 0, 200, 30, 40, 5, 250, 60])
    palette_image.save(tmp_path / "palette.png")
    image = read_image(tmp_path / "palette.png")
    colours = np.array([[0, 0, 0], [200, 30, 40], [5, 250, 60]], dtype=np.uint8)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), colours[indices])


def test_palette_with_transparency_drops_alpha_without_warning(tmp_path: Path) -> None:
    palette_image = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    palette_image.putpalette([10, 20, 30, 200, 100, 50])
    palette_image.info["transparency"] = 0
    palette_image.save(tmp_path / "transparent.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = read_image(tmp_path / "transparent.png")
    assert image[:, 0, 0].tolist() == [10, 20, 30]
    assert image[:, 0, 1].tolist() == [200, 100, 50]


def test_rgba_and_la_drop_alpha_and_keep_stored_colour(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = (120, 60, 30)
    rgba[0, 0, 3] = 0  # fully transparent: its stored colour is kept, not composited
    rgba[1, 1, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    image = read_image(tmp_path / "rgba.png")
    assert image.shape == (3, 2, 2)
    assert (image.permute(1, 2, 0).reshape(-1, 3) == torch.tensor([120, 60, 30], dtype=torch.uint8)).all()

    la = np.stack([np.full((2, 3), 77, np.uint8), np.zeros((2, 3), np.uint8)], axis=-1)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    assert (read_image(tmp_path / "la.png") == 77).all()


def test_cmyk_is_converted_to_rgb(tmp_path: Path) -> None:
    # Pillow's CMYK -> RGB: R = 255 - C - K (clipped), likewise G from M and B from Y.
    Image.new("CMYK", (3, 2), (0, 255, 255, 0)).save(tmp_path / "red.tiff")
    Image.new("CMYK", (3, 2), (0, 0, 0, 255)).save(tmp_path / "black.tiff")
    assert read_image(tmp_path / "red.tiff")[:, 0, 0].tolist() == [255, 0, 0]
    assert (read_image(tmp_path / "black.tiff") == 0).all()


def test_sixteen_bit_png_is_shifted_to_eight_bit(tmp_path: Path) -> None:
    values = np.array([[0, 255, 256, 4660], [32768, 40000, 65280, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as stored:
        assert stored.mode.startswith("I;16")
    image = read_image(tmp_path / "deep.png")
    expected = np.array([[0, 0, 1, 18], [128, 156, 255, 255]], dtype=np.uint8)  # value >> 8
    for channel in range(3):
        assert np.array_equal(image[channel].numpy(), expected)


def test_int32_image_is_clipped_to_sixteen_bit_then_shifted(tmp_path: Path) -> None:
    values = np.array([[-5, 512, 70000]], dtype=np.int32)
    Image.fromarray(values, mode="I").save(tmp_path / "int.tiff")
    assert read_image(tmp_path / "int.tiff")[0].tolist() == [[0, 2, 255]]


def test_float_image_is_clipped_and_rounded(tmp_path: Path) -> None:
    values = np.array([[-3.0, 12.4, 12.6, 300.0, np.nan]], dtype=np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "float.tiff")
    assert read_image(tmp_path / "float.tiff")[0].tolist() == [[0, 12, 13, 255, 0]]


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        read_image(path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        read_label_map(path)


def test_truncated_jpeg_raises_image_read_error(tmp_path: Path) -> None:
    full = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageReadError, match=re.escape(str(truncated)) + r".*(?i:truncated)") as info:
        read_image(truncated)
    assert isinstance(info.value, OSError)


def test_text_file_renamed_jpg_raises_image_read_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageReadError, match=re.escape(str(path)) + r".*cannot identify image file"):
        read_image(path)
    with pytest.raises(ImageReadError, match=re.escape(str(path))):
        read_label_map(path)


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match=re.escape(str(tmp_path)) + ": not a regular file"):
        read_image(tmp_path)


def test_label_map_keeps_palette_indices(tmp_path: Path) -> None:
    indices = np.array([[0, 3, 150], [7, 7, 1]], dtype=np.uint8)
    label_png = Image.fromarray(indices, mode="P")
    label_png.putpalette(list(np.random.default_rng(1).integers(0, 255, 768)))
    label_png.save(tmp_path / "label.png")
    labels = read_label_map(tmp_path / "label.png")
    assert labels.dtype == torch.int64
    assert np.array_equal(labels.numpy(), indices)


def test_label_map_grey_and_sixteen_bit_values_unchanged(tmp_path: Path) -> None:
    grey = np.array([[0, 255], [12, 151]], dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    assert np.array_equal(read_label_map(tmp_path / "grey.png").numpy(), grey)
    deep = np.array([[0, 300], [1000, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert np.array_equal(read_label_map(tmp_path / "deep.png").numpy(), deep.astype(np.int64))


def test_label_map_ignores_exif_orientation(tmp_path: Path) -> None:
    labels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.fromarray(labels, mode="L").save(tmp_path / "tagged.png", exif=exif.tobytes())
    with pytest.warns(UserWarning, match="EXIF orientation tag; it is ignored"):
        result = read_label_map(tmp_path / "tagged.png")
    assert np.array_equal(result.numpy(), labels)


def test_rgb_label_map_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "colour_coded.png"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r" has mode 'RGB' with 3 band\(s\)"):
        read_label_map(path)


# ------------------------------------------------------------------------------------- EXIF against annotations
def _tagged_jpeg(path: Path, orientation: int | None, height: int, width: int) -> Path:
    exif = Image.Exif()
    if orientation is not None:
        exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(_asymmetric_rgb(height, width)).save(path, exif=exif.tobytes(), quality=95)
    return path


@pytest.mark.parametrize(
    ("orientation", "stored_hw", "annotation_hw", "mode", "applied"),
    [
        (None, (24, 40), (24, 40), "auto", False),  # no tag: as it is
        (1, (24, 40), (24, 40), "upright", False),  # tag 1 turns nothing
        (6, (32, 32), (32, 32), "auto", False),  # square: sizes cannot tell, annotations are on the stored pixels
        (6, (32, 32), (32, 32), "upright", True),
        (6, (24, 40), (24, 40), "auto", False),  # annotated on the stored pixels
        (6, (24, 40), (40, 24), "auto", True),  # annotated upright
        (8, (24, 40), (40, 24), "upright", True),
        (3, (24, 40), (24, 40), "auto", False),  # 180°: same size both ways, stored
        (3, (24, 40), (24, 40), "upright", True),
        (6, (24, 40), (24, 40), "stored", False),
    ],
)
def test_read_image_for_annotation_decides_from_the_tag(
    tmp_path: Path, orientation, stored_hw, annotation_hw, mode, applied
) -> None:
    path = _tagged_jpeg(tmp_path / "photo.jpg", orientation, *stored_hw)
    pixels, decision = read_image_for_annotation(path, annotation_hw, mode, reference="test.json")
    assert decision.orientation == (orientation or 1) and decision.applied is applied
    assert decision.stored_size == stored_hw
    assert tuple(pixels.shape) == (3, *annotation_hw)
    assert torch.equal(pixels, read_image(path, apply_exif_orientation=applied))


def test_read_image_for_annotation_names_the_file_when_no_frame_fits(tmp_path: Path) -> None:
    path = _tagged_jpeg(tmp_path / "photo.jpg", 6, 24, 40)
    sizes = "(24, 40) as stored, (40, 24) upright (EXIF orientation 6: rotated 90° clockwise)"
    with pytest.raises(AnnotationSizeError, match=re.escape(f"{path}: decoded image size (H, W) = {sizes} differs")):
        read_image_for_annotation(path, (24, 24), "auto", reference="image id 3 in x.json")
    with pytest.raises(
        AnnotationSizeError, match=r"the stored pixels match it: use exif_orientation='auto' or 'stored'"
    ):
        read_image_for_annotation(path, (24, 40), "upright")
    with pytest.raises(
        AnnotationSizeError, match=r"upright image matches it: use exif_orientation='auto' or 'upright'"
    ):
        read_image_for_annotation(path, (40, 24), "stored")
    untagged = _tagged_jpeg(tmp_path / "plain.jpg", None, 24, 40)
    with pytest.raises(
        AnnotationSizeError, match=re.escape(f"{untagged}: decoded image size (H, W) = (24, 40) differs")
    ):
        read_image_for_annotation(untagged, (40, 24), "auto", reference="image id 4 in x.json")
    with pytest.raises(ValueError, match="exif_orientation must be one of"):
        read_image_for_annotation(untagged, (24, 40), "rotate")  # type: ignore[arg-type]


def test_exif_orientation_tag_reading(tmp_path: Path) -> None:
    for tag, expected in [(None, 1), (1, 1), (6, 6), (9, 1), (0, 1)]:  # out-of-range values turn nothing
        with Image.open(_tagged_jpeg(tmp_path / f"t{tag}.jpg", tag, 8, 8)) as image:
            assert read_exif_orientation(image) == expected


class _ReadEveryImage(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], reader: AnnotatedImageReader) -> None:
        self.paths, self.reader = paths, reader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.reader(self.paths[index], (16, 16), "the test")


def test_annotated_image_reader_warns_once_per_dataset_across_workers(tmp_path: Path) -> None:
    paths = [_tagged_jpeg(tmp_path / f"{i}.jpg", 6, 16, 16) for i in range(4)]
    reader = AnnotatedImageReader("auto", owner="TestSet")
    with pytest.warns(UserWarning, match=r"^TestSet: .*0\.jpg: EXIF orientation 6.*shown once per dataset") as seen:
        for path in paths:
            reader(path, (16, 16), "the test")
    assert len(seen) == 1
    # The flag is shared memory: a worker process that warns first silences the main process and the other workers.
    fresh = AnnotatedImageReader("auto", owner="TestSet")
    loader = torch.utils.data.DataLoader(_ReadEveryImage(paths, fresh), batch_size=2, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the workers' own stderr, not this process's warnings
        assert [tuple(batch.shape) for batch in loader] == [(2, 3, 16, 16), (2, 3, 16, 16)]
    assert int(fresh._warned[0]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh(paths[0], (16, 16), "the test")
