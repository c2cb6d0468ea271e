"""Image and label-map decoding into tensors, with errors that name the file.

Pillow does the decoding. :func:`read_image` turns every common mode into 8-bit RGB (rules in its docstring);
:func:`read_label_map` keeps the stored integers untouched, because a label map's values are class indices,
not colours.

EXIF orientation: a camera stores the sensor's pixels and an orientation tag (1..8) saying how to turn them upright.
An annotated dataset must be read in the frame its annotations were made in, which the tag alone does not tell:
COCO JSON boxes/polygons and ADE20K label maps were drawn on the stored pixels (pycocotools and torchvision read those),
while photos annotated in a viewer were seen upright. :func:`read_image_for_annotation` decides per image, from the
tag and the annotation's size, with ``exif_orientation``:

- ``"stored"``: always the stored pixels (the pycocotools / torchvision convention);
- ``"upright"``: always the tag applied;
- ``"auto"``: an image without a tag (or tag 1) as it is; a tagged image (2..8) as stored when the stored size equals
  the annotation's (this covers the square and the 180° / mirrored images, whose sizes cannot tell the frames apart),
  else upright when that size matches.

A size that matches neither frame is an :class:`AnnotationSizeError` naming the file. :class:`AnnotatedImageReader`
adds, for a dataset, one warning per dataset (across its DataLoader workers) when ``"auto"`` meets a tagged image.
"""

from __future__ import annotations

import errno
import warnings
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "EXIF_ORIENTATION_MODES",
    "IMAGE_EXTENSIONS",
    "AnnotatedImageReader",
    "AnnotationSizeError",
    "ExifDecision",
    "ExifOrientationMode",
    "ImageReadError",
    "read_exif_orientation",
    "read_image",
    "read_image_for_annotation",
    "read_label_map",
]

# Lower-case suffixes that the folder datasets treat as images (all decodable by Pillow).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_LABEL_MAP_MODES = ("L", "P", "1", "I", *_SIXTEEN_BIT_MODES)
# Everything Pillow raises for a file that exists but does not decode: unknown format, truncated data, bad headers.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ImageReadError(OSError):
    """A file exists but cannot be decoded as an image (corrupt, truncated, not an image, too large)."""


class AnnotationSizeError(ValueError):
    """An image's size matches neither its stored nor (per the EXIF orientation policy) its upright frame."""


#: How an annotated dataset treats the EXIF orientation tag (see the module docstring).
ExifOrientationMode = Literal["auto", "stored", "upright"]
EXIF_ORIENTATION_MODES: tuple[str, ...] = ("auto", "stored", "upright")
_ORIENTATION_TAG = 0x0112  # EXIF Orientation
_ORIENTATION_NAMES = {
    2: "mirrored left-right",
    3: "rotated 180°",
    4: "mirrored top-bottom",
    5: "transposed",
    6: "rotated 90° clockwise",
    7: "transversed",
    8: "rotated 90° counter-clockwise",
}


class ExifDecision(NamedTuple):
    """What :func:`read_image_for_annotation` did with one image.

    Attributes:
        orientation: The EXIF orientation tag, 1 when absent or not one of 1..8.
        applied: Whether the tag was applied (the pixels are upright rather than as stored).
        stored_size: ``(H, W)`` of the stored pixels.
        upright_size: ``(H, W)`` once the tag is applied (``stored_size`` swapped for tags 5..8).
    """

    orientation: int
    applied: bool
    stored_size: tuple[int, int]
    upright_size: tuple[int, int]


def _open_decoded(path: str | Path) -> Image.Image:
    """Open and fully decode ``path``; the pixel data is loaded, so the file handle can be closed."""
    path = Path(path)
    try:
        exists, is_file = path.exists(), path.is_file()
    except (OSError, ValueError) as error:  # e.g. a name too long, or with a NUL character
        raise ImageReadError(f"cannot read image {path}: {error}") from error
    if not exists:
        raise FileNotFoundError(errno.ENOENT, "image file not found", str(path))
    if not is_file:
        raise ImageReadError(f"cannot read image {path}: not a regular file")
    try:
        with Image.open(path) as opened:
            opened.load()
            # Image.open is lazy and tied to the file; copy() detaches the decoded pixels and keeps info/EXIF.
            return opened.copy()
    except _DECODE_ERRORS as error:
        reason = f"{type(error).__name__}: {error}"
        raise ImageReadError(f"cannot read image {path}: {reason}") from error


def _to_rgb_array(image: Image.Image, path: Path) -> np.ndarray:
    """Convert a decoded Pillow image of any supported mode to a uint8 (H, W, 3) RGB array."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image)
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image).astype(np.int64)
        # Mode "I" (32-bit) is read as 16-bit data, the usual source of it (16-bit PNG/TIFF in older Pillow).
        grey = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        grey = np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        # Going through RGBA avoids Pillow's warning about palette transparency; the alpha is then dropped.
        return np.asarray(image.convert("RGBA").convert("RGB"))
    try:
        return np.asarray(image.convert("RGB"))
    except ValueError as error:
        raise ImageReadError(f"cannot read image {path}: mode {mode!r} cannot be converted to RGB ({error})") from error


def _to_tensor(image: Image.Image, path: Path, upright: bool) -> torch.Tensor:
    """A decoded image as uint8 ``(3, H, W)`` RGB, turned upright by its EXIF orientation first if ``upright``."""
    if upright:
        try:
            image = ImageOps.exif_transpose(image)
        except _DECODE_ERRORS as error:
            raise ImageReadError(f"cannot apply the EXIF orientation of {path}: {error}") from error
    array = _to_rgb_array(image, path)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def read_image(path: str | Path, *, apply_exif_orientation: bool = True) -> torch.Tensor:
    """Read an image file as an RGB uint8 tensor.

    Conversion rules:
        - The EXIF orientation tag is applied (``ImageOps.exif_transpose``), so the result is upright as image
          viewers show it, unless ``apply_exif_orientation`` is False (raw stored pixels).
        - Greyscale, 1-bit, palette, CMYK, YCbCr and other colour modes are converted with Pillow's ``convert("RGB")``.
        - Alpha (RGBA, LA, palette transparency) is dropped: the stored colour under transparent pixels is kept,
          nothing is composited over a background.
        - 16-bit greyscale (modes ``I;16*``: 16-bit PNG and TIFF) is scaled to 8 bit by ``value >> 8``, i.e. by the
          range of the dtype: 0 → 0, 65535 → 255, within 1 of ``round(value * 255 / 65535)`` and identical to
          torchvision's ``to_dtype(uint16 → uint8, scale=True)``. (Pillow's own ``convert("L")`` clips every value
          above 255 to white instead.) 32-bit integer mode ``I`` is clipped to 0..65535 first and scaled the same
          way. 12-bit data stored in a 16-bit file (values 0..4095, as some medical and ultrasound exports hold)
          therefore comes out as 0..15, nearly black. Nothing is guessed from the pixel values (a dark 16-bit image
          would be brightened by mistake) and Pillow does not report PNG's optional ``sBIT`` chunk: rescale such
          data before use (e.g. ``value << 4``).
        - Float images (mode ``F``) are taken on the 0..255 scale: clipped to [0, 255] and rounded; NaN becomes 0.
        - Greyscale results are repeated to 3 channels.

    Args:
        path: Image file.
        apply_exif_orientation: Apply the EXIF orientation tag (default True).

    Returns:
        uint8 tensor (3, H, W), RGB, H and W after the EXIF orientation.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImageReadError: The file cannot be decoded (message names the file and Pillow's reason).
    """
    path = Path(path)
    return _to_tensor(_open_decoded(path), path, apply_exif_orientation)


def read_exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag of a decoded Pillow image: 2..8 when it turns the pixels, else 1.

    Args:
        image: An image from ``Image.open`` (or a copy of one, which keeps its EXIF block).

    Returns:
        The tag; 1 when there is none, when it is not an integer in 1..8, or when the EXIF block does not parse.
    """
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except _DECODE_ERRORS:  # a damaged EXIF block: the pixels themselves decoded, so read them as stored
        return 1
    return value if type(value) is int and value in _ORIENTATION_NAMES else 1


def _orientation_text(orientation: int) -> str:
    return f"EXIF orientation {orientation}: {_ORIENTATION_NAMES[orientation]}"


def read_image_for_annotation(
    path: str | Path,
    annotation_size: tuple[int, int],
    exif_orientation: ExifOrientationMode = "auto",
    reference: str = "the annotation",
) -> tuple[torch.Tensor, ExifDecision]:
    """Read an annotated image in the frame its annotations were made in (rules in the module docstring).

    The file is decoded once; the tag is applied only when the policy picks the upright frame.

    Args:
        path: Image file.
        annotation_size: ``(H, W)`` the annotations were made at (COCO ``height``/``width``, a label map's shape).
        exif_orientation: ``"auto"``, ``"stored"`` or ``"upright"``.
        reference: Where ``annotation_size`` comes from, for messages, e.g. ``"image id 7 in instances.json"``.

    Returns:
        The uint8 ``(3, H, W)`` RGB pixels, ``(H, W) == annotation_size``, and what was decided.

    Raises:
        ValueError: An unknown ``exif_orientation``.
        FileNotFoundError: ``path`` does not exist.
        ImageReadError: The file cannot be decoded.
        AnnotationSizeError: The size the policy allows differs from ``annotation_size`` (the message names the file,
            both sizes and, for a tagged image, which other policy would fit).
    """
    if exif_orientation not in EXIF_ORIENTATION_MODES:
        raise ValueError(f"exif_orientation must be one of {EXIF_ORIENTATION_MODES}, got {exif_orientation!r}")
    path = Path(path)
    expected = (int(annotation_size[0]), int(annotation_size[1]))
    image = _open_decoded(path)
    orientation = read_exif_orientation(image)
    stored = (image.height, image.width)
    upright = stored[::-1] if orientation >= 5 else stored
    if orientation == 1:
        apply = False
    elif exif_orientation == "auto":
        apply = stored != expected and upright == expected
    else:
        apply = exif_orientation == "upright"
    size = upright if apply else stored
    if size != expected:
        raise AnnotationSizeError(
            _mismatch_message(path, orientation, stored, upright, expected, exif_orientation, reference)
        )
    return _to_tensor(image, path, apply), ExifDecision(orientation, apply, stored, upright)


def _mismatch_message(
    path: Path,
    orientation: int,
    stored: tuple[int, int],
    upright: tuple[int, int],
    expected: tuple[int, int],
    mode: str,
    reference: str,
) -> str:
    if orientation == 1 or stored == upright:
        sizes = f"{stored}"
    else:
        sizes = f"{stored} as stored, {upright} upright ({_orientation_text(orientation)})"
    message = f"{path}: decoded image size (H, W) = {sizes} differs from the size {expected} that {reference} gives"
    if mode == "upright" and stored == expected:
        message += "; the stored pixels match it: use exif_orientation='auto' or 'stored'"
    elif mode == "stored" and upright == expected:
        message += "; the upright image matches it: use exif_orientation='auto' or 'upright'"
    return message


class AnnotatedImageReader:
    """:func:`read_image_for_annotation` for one dataset, warning once per dataset when ``"auto"`` meets a tag.

    The warning says which file, what was decided and why, and that every other tagged image of the dataset is decided
    the same way without a warning. The "already warned" flag is a one-byte tensor in shared memory, so the
    dataset's DataLoader workers (forked or spawned, persistent or not) share it: one warning per dataset, not one per
    worker and epoch. ``"stored"`` and ``"upright"`` are explicit choices and do not warn.

    Args:
        exif_orientation: ``"auto"``, ``"stored"`` or ``"upright"`` (see the module docstring).
        owner: How the warning names the dataset, e.g. ``"COCODataset(annotations/instances_train2017.json)"``.

    Raises:
        ValueError: An unknown ``exif_orientation``.
    """

    def __init__(self, exif_orientation: ExifOrientationMode = "auto", owner: str = "dataset") -> None:
        if exif_orientation not in EXIF_ORIENTATION_MODES:
            raise ValueError(f"exif_orientation must be one of {EXIF_ORIENTATION_MODES}, got {exif_orientation!r}")
        self.exif_orientation = exif_orientation
        self.owner = owner
        self._warned = torch.zeros(1, dtype=torch.uint8).share_memory_()

    def __call__(self, path: str | Path, annotation_size: tuple[int, int], reference: str) -> torch.Tensor:
        """The pixels ``(3, H, W)`` uint8 of ``path`` in its annotations' frame (see :func:`read_image_for_annotation`).

        Args:
            path: Image file.
            annotation_size: ``(H, W)`` of the annotations.
            reference: Where that size comes from, for messages.

        Returns:
            The pixels, ``(H, W) == annotation_size``.
        """
        pixels, decision = read_image_for_annotation(path, annotation_size, self.exif_orientation, reference)
        if decision.orientation != 1 and self.exif_orientation == "auto" and not int(self._warned[0]):
            self._warned[0] = 1
            warnings.warn(self._auto_message(Path(path), decision, reference), stacklevel=2)
        return pixels

    def _auto_message(self, path: Path, decision: ExifDecision, reference: str) -> str:
        tag = _orientation_text(decision.orientation)
        if decision.applied:
            what = (
                f"the stored size {decision.stored_size} differs from the size {decision.upright_size} that "
                f"{reference} gives, but the upright image ({tag}) matches it; using the upright image"
            )
        elif decision.stored_size != decision.upright_size:
            what = (
                f"the EXIF orientation changes the size to {decision.upright_size} ({tag}) but {reference} gives "
                f"{decision.stored_size}; using the stored pixels, which match the annotations"
            )
        else:
            what = (
                f"{tag} keeps the size {decision.stored_size} that {reference} gives, so the sizes cannot tell the two "
                "frames apart; using the stored pixels, which annotation tools for COCO JSON and label maps work on"
            )
        return (
            f"{self.owner}: {path}: {what}. exif_orientation='auto' reads every image with an EXIF orientation tag "
            "this way (the stored pixels when their size matches the annotation, else upright); this warning is shown "
            "once per dataset. Set exif_orientation='stored' or 'upright' to decide explicitly."
        )


def read_label_map(path: str | Path) -> torch.Tensor:
    """Read a single-channel label map (e.g. an ADE20K annotation PNG) as class indices.

    The stored integers are returned unchanged: no EXIF rotation (annotation tools write label maps in the stored
    pixel frame), no colour conversion, and a palette ("P") PNG yields its palette *indices*, not colours. Accepted
    modes: ``L``, ``P``, ``1``, ``I;16*`` and ``I``.

    Args:
        path: Label map file (normally PNG).

    Returns:
        int64 tensor (H, W).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImageReadError: The file cannot be decoded.
        ValueError: The image is not single-channel (e.g. an RGB colour-coded map) or holds negative values.
    """
    path = Path(path)
    image = _open_decoded(path)
    if image.mode not in _LABEL_MAP_MODES:
        raise ValueError(
            f"label map {path} has mode {image.mode!r} with {len(image.getbands())} band(s); expected a "
            f"single-channel image of class indices (modes {', '.join(_LABEL_MAP_MODES)}). Colour-coded label maps "
            "must be converted to index maps first."
        )
    if image.getexif().get(0x0112, 1) != 1:  # 0x0112 = EXIF Orientation
        warnings.warn(f"label map {path} has an EXIF orientation tag; it is ignored (label maps are read as stored)",
                      stacklevel=2)  # fmt: skip
    values = np.asarray(image).astype(np.int64)
    if image.mode == "I" and values.size and values.min() < 0:
        raise ValueError(
            f"label map {path} holds negative values (min {int(values.min())}); class indices must be >= 0"
        )
    return torch.from_numpy(np.ascontiguousarray(values))
