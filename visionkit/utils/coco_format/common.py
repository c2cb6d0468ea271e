"""What every COCO-format check shares: the error type, value tests, message helpers and the JSON reader."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["COCOFormatError", "is_int", "is_real", "read_coco_json", "short_repr"]


class COCOFormatError(ValueError):
    """A COCO instances file or a list of COCO result records does not follow the COCO format."""


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters, for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value: Any) -> bool:
    """A python or numpy integer, not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def is_real(value: Any) -> bool:
    """A finite python or numpy int / float, not a bool."""
    if not isinstance(value, int | float | np.integer | np.floating) or isinstance(value, bool | np.bool_):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def read_coco_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file, turning every failure into an error that names the file.

    Args:
        path: The file.
        what: What the file holds, for messages (``"COCO ground-truth"``, ``"COCO results"``).

    Returns:
        The parsed content.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        COCOFormatError: The file cannot be read or is not JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise COCOFormatError(f"{path}: cannot read {what} as JSON ({error})") from error
