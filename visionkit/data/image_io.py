"""Image and label-map decoding into tensors, with errors that name the file.

Pillow does the decoding. :func:`read_image` turns every common mode into 8-bit RGB (rules in its docstring);
:func:`read_label_map` keeps the stored integers untouched, because a label map's values are class indices,
not colours.
"""

from __future__ import annotations

import errno
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "read_image", "read_label_map"]

# Lower-case suffixes that the folder datasets treat as images (all decodable by Pillow).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_LABEL_MAP_MODES = ("L", "P", "1", "I", *_SIXTEEN_BIT_MODES)
# Everything Pillow raises for a file that exists but does not decode: unknown format, truncated data, bad headers.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class ImageReadError(OSError):
    """A file exists but cannot be decoded as an image (corrupt, truncated, not an image, too large)."""


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


def read_image(path: str | Path, *, apply_exif_orientation: bool = True) -> torch.Tensor:
    """Read an image file as an RGB uint8 tensor.

    Conversion rules:
        - The EXIF orientation tag is applied (``ImageOps.exif_transpose``), so the result is upright as image
          viewers show it, unless ``apply_exif_orientation`` is False (raw stored pixels).
        - Greyscale, 1-bit, palette, CMYK, YCbCr and other colour modes are converted with Pillow's ``convert("RGB")``.
        - Alpha (RGBA, LA, palette transparency) is dropped: the stored colour under transparent pixels is kept,
          nothing is composited over a background.
        - 16-bit greyscale (modes ``I;16*``) is scaled to 8 bit by ``value >> 8``; 32-bit integer mode ``I`` is
          clipped to 0..65535 first and scaled the same way.
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
    image = _open_decoded(path)
    if apply_exif_orientation:
        try:
            image = ImageOps.exif_transpose(image)
        except _DECODE_ERRORS as error:
            raise ImageReadError(f"cannot apply the EXIF orientation of {path}: {error}") from error
    array = _to_rgb_array(image, path)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


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
