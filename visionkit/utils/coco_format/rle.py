"""COCO RLE ``counts``: validation of compressed strings (vectorised) and of uncompressed run lists.

Compressed RLE ``counts`` strings (pycocotools ``maskApi.c`` ``rleToString`` / ``rleFrString``): every run length is
written in 5-bit groups, least significant first, each group stored as the character ``48 + group``; bit ``0x20`` of a
group means "another group follows" and bit ``0x10`` of the last group is the sign. From the fourth run on (0-based
index ``>= 3``), the stored value is the difference to the run two places before. A valid string decodes to
non-negative runs that add up to ``height * width``. :func:`check_compressed_rles` checks any number of strings at
once with numpy (no per-character Python loop), :func:`decode_rle_string` is the plain reference decoder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from visionkit.utils.coco_format.common import is_int, short_repr

__all__ = [
    "MAX_RLE_GROUPS",
    "RLE_CHUNK_BYTES",
    "RLE_OK",
    "check_compressed_rles",
    "decode_rle_string",
    "rle_problem",
    "rle_size_problem",
    "rle_string_problem_text",
]

# A compressed-RLE value has at most 7 groups (35 bits, signed): enough for any run or run difference of an image of
# fewer than 2**32 pixels (pycocotools stores runs as 32-bit ``uint``); longer values are rejected as malformed.
MAX_RLE_GROUPS = 7
#: Bytes of ``counts`` strings decoded per numpy pass by default (bounds the temporary arrays to a few tens of MiB).
RLE_CHUNK_BYTES = 1 << 22

# Problem codes of check_compressed_rles.
RLE_OK, RLE_BAD_CHARACTER, RLE_TRUNCATED, RLE_VALUE_TOO_LONG, RLE_NEGATIVE_RUN, RLE_RUN_TOO_LONG, RLE_WRONG_SUM = range(
    7
)


def decode_rle_string(counts: str | bytes) -> list[int] | None:
    """Reference decoder of a compressed-RLE ``counts`` string into run lengths (one value at a time, in Python).

    Args:
        counts: The string (``str`` or ``bytes``).

    Returns:
        The runs (possibly negative if the string encodes negative values), or ``None`` if the string is not a valid
        encoding (a character outside ``'0'..'o'``, a last value whose "more" bit is set, a value longer than
        ``MAX_RLE_GROUPS`` groups).
    """
    data = counts.encode("utf-8") if isinstance(counts, str) else bytes(counts)
    runs: list[int] = []
    position = 0
    while position < len(data):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(data) or shift >= 5 * MAX_RLE_GROUPS:
                return None
            group = data[position] - 48
            if not 0 <= group < 64:
                return None
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _as_bytes_list(counts: Sequence[str | bytes]) -> tuple[bytes, np.ndarray]:
    """All strings concatenated as bytes, and the byte length of each."""
    if all(type(c) is str for c in counts):
        joined = "".join(counts)  # type: ignore[arg-type]
        if joined.isascii():
            return joined.encode("ascii"), np.fromiter(map(len, counts), np.int64, len(counts))
    parts = [c.encode("utf-8", "surrogatepass") if isinstance(c, str) else bytes(c) for c in counts]
    return b"".join(parts), np.fromiter(map(len, parts), np.int64, len(parts))


def _check_rle_chunk(data: bytes, lengths: np.ndarray, areas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Problem code and run sum of each string of one chunk (see :func:`check_compressed_rles`).

    Whole-array passes only: bytes -> 5-bit groups -> values (most are one group; the few longer ones are completed
    in at most ``MAX_RLE_GROUPS`` passes over themselves) -> runs (cumulative sums along the odd and along the even
    value positions, restarted at every string) -> per-string minimum, maximum and sum with ``reduceat``.
    """
    count = lengths.size
    problems = np.zeros(count, np.int8)
    sums = np.zeros(count, np.int64)
    nonempty = np.flatnonzero(lengths)
    if nonempty.size == 0:
        problems[areas != 0] = RLE_WRONG_SUM
        return problems, sums
    byte_ends = np.cumsum(lengths)[nonempty]
    byte_starts = byte_ends - lengths[nonempty]
    last_bytes = byte_ends - 1

    def flag(records: np.ndarray, code: int) -> None:
        problems[records[problems[records] == RLE_OK]] = code

    groups = np.frombuffer(data, np.uint8) - np.uint8(48)  # wraps below '0' to >= 208
    bad = np.maximum.reduceat(groups, byte_starts) > 63
    if bad.any():
        flag(nonempty[bad], RLE_BAD_CHARACTER)
        groups = np.where(groups > 63, np.uint8(0), groups)
    more = (groups & np.uint8(0x20)) != 0  # "another group follows"
    flag(nonempty[more[last_bytes]], RLE_TRUNCATED)
    more[last_bytes] = False  # a value never spans two strings
    groups[last_bytes] &= np.uint8(0x1F)
    is_start = np.concatenate(([True], ~more[:-1]))  # first group of a value
    first_groups = groups[is_start]
    values = (first_groups & np.uint8(0x1F)).astype(np.int64)
    values -= ((first_groups & np.uint8(0x30)) == 0x10) * np.int64(32)  # one-group values with the sign bit
    longer = np.flatnonzero(first_groups & np.uint8(0x20))  # values of several groups (few)
    if longer.size:
        positions = np.flatnonzero(is_start & more)
        partial = values[longer]
        for k in range(1, MAX_RLE_GROUPS + 1):
            if k == MAX_RLE_GROUPS:  # still more groups: longer than any valid value
                flag(nonempty[np.searchsorted(byte_ends, positions, side="right")], RLE_VALUE_TOO_LONG)
                values[longer] = 0
                break
            group = groups[positions + k]
            partial |= (group & np.uint8(0x1F)).astype(np.int64) << (5 * k)
            done = (group & np.uint8(0x20)) == 0
            partial[done & ((group & np.uint8(0x10)) != 0)] -= np.int64(1) << (5 * (k + 1))
            values[longer[done]] = partial[done]
            longer, positions, partial = longer[~done], positions[~done], partial[~done]
            if longer.size == 0:
                break

    # Runs: run j = value j for j < 3, value j + run j-2 from j = 3 on (pycocotools' rleFrString), i.e. cumulative
    # sums along the odd positions and along the even positions from 2 on, restarted at every string.
    per_record = np.add.reduceat((~more).view(np.uint8), byte_starts, dtype=np.int64)
    first_value = np.cumsum(per_record) - per_record
    odd = np.repeat((first_value & 1).astype(bool), per_record)  # parity of the string's first value ...
    odd[1::2] ^= True  # ... xor the parity of the position in the chunk = parity of the position in the string
    chains = []
    for chain in (odd, ~odd):
        part = np.where(chain, values, 0)
        part[first_value] = 0  # run 0 belongs to no chain
        part[first_value[1:]] -= np.add.reduceat(part, first_value)[:-1]  # restart the sums at every string
        chains.append(np.cumsum(part))
    runs = np.where(odd, chains[0], chains[1])
    runs[first_value] = values[first_value]
    flag(nonempty[np.minimum.reduceat(runs, first_value) < 0], RLE_NEGATIVE_RUN)
    flag(nonempty[np.maximum.reduceat(runs, first_value) > areas[nonempty]], RLE_RUN_TOO_LONG)
    sums[nonempty] = np.add.reduceat(runs, first_value)
    flag(np.flatnonzero(sums != areas), RLE_WRONG_SUM)
    return problems, sums


def check_compressed_rles(
    counts: Sequence[str | bytes], areas: Sequence[int] | np.ndarray, *, chunk_bytes: int = RLE_CHUNK_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """Check many compressed-RLE strings at once (vectorised with numpy, in chunks of a few MiB).

    Args:
        counts: ``N`` ``counts`` strings (``str`` or ``bytes``).
        areas: ``(N,)`` expected run sums, ``height * width`` of each mask.
        chunk_bytes: Bytes of strings decoded per numpy pass (bounds the temporary arrays).

    Returns:
        ``(problems, sums)``: ``(N,)`` int8 problem codes (``RLE_OK`` = 0, else ``RLE_BAD_CHARACTER``,
        ``RLE_TRUNCATED``, ``RLE_VALUE_TOO_LONG``, ``RLE_NEGATIVE_RUN``, ``RLE_RUN_TOO_LONG``, ``RLE_WRONG_SUM``; see
        :func:`rle_string_problem_text`) and ``(N,)`` int64 sums of the runs (meaningful where the code is
        ``RLE_OK`` or ``RLE_WRONG_SUM``).
    """
    expected = np.asarray(areas, dtype=np.int64).reshape(-1)
    if len(counts) != expected.size:
        raise ValueError(f"got {len(counts)} counts strings and {expected.size} areas")
    data, lengths = _as_bytes_list(counts)
    problems = np.zeros(expected.size, np.int8)
    sums = np.zeros(expected.size, np.int64)
    ends = np.cumsum(lengths)
    start_record, start_byte = 0, 0
    while start_record < expected.size:
        stop_record = int(np.searchsorted(ends, start_byte + chunk_bytes, side="right"))
        stop_record = max(stop_record, start_record + 1)
        stop_byte = int(ends[stop_record - 1])
        chunk = slice(start_record, stop_record)
        problems[chunk], sums[chunk] = _check_rle_chunk(data[start_byte:stop_byte], lengths[chunk], expected[chunk])
        start_record, start_byte = stop_record, stop_byte
    return problems, sums


def rle_string_problem_text(code: int, total: int, area: int, counts: str | bytes) -> str:
    """Message for one problem code of :func:`check_compressed_rles`."""
    if code == RLE_WRONG_SUM:
        return f"compressed RLE runs sum to {total}, expected height * width = {area}"
    reason = {
        RLE_BAD_CHARACTER: "a character outside '0'..'o'",
        RLE_TRUNCATED: "the last value is cut short (its 'more' bit is set)",
        RLE_VALUE_TOO_LONG: f"a value of more than {MAX_RLE_GROUPS} characters",
        RLE_NEGATIVE_RUN: "a negative run length",
        RLE_RUN_TOO_LONG: f"a run longer than height * width = {area}",
    }.get(code, f"problem code {code}")
    return f"compressed RLE 'counts' is not a valid RLE string ({reason}): {short_repr(counts)}"


def rle_size_problem(size: Any, height: int | None, width: int | None) -> str | None:
    """What is wrong with an RLE's ``size``; ``None`` if it is ``[height, width]`` of non-negative integers.

    Args:
        size: The RLE's ``size`` entry.
        height: The image height it must equal; ``None``: any.
        width: The image width it must equal.

    Returns:
        A description of the problem, or ``None``.
    """
    if not (isinstance(size, Sequence) and not isinstance(size, str | bytes) and len(size) == 2):
        return f"RLE 'size' must be [height, width] integers, got {short_repr(size)}"
    if not all(is_int(v) for v in size):
        return f"RLE 'size' must be [height, width] integers, got {short_repr(size)}"
    if height is not None and (int(size[0]), int(size[1])) != (height, width):
        return f"RLE 'size' {[int(v) for v in size]} differs from the image's [height, width] [{height}, {width}]"
    if min(int(v) for v in size) < 0:
        return f"RLE 'size' must be non-negative, got {short_repr(size)}"
    return None


def _uncompressed_problem(counts: Any, area: int) -> str | None:
    """Problem of an uncompressed (list) ``counts``; None if the runs are non-negative ints summing to ``area``."""
    try:
        runs = np.asarray(counts)
    except (ValueError, TypeError, OverflowError):
        runs = np.asarray([None])
    if runs.ndim != 1 or (runs.size and runs.dtype.kind not in "iu") or (runs.size and (runs < 0).any()):
        return "uncompressed RLE 'counts' must be non-negative integers"
    if runs.size and runs.max() > area:
        return f"uncompressed RLE has a run longer than height * width = {area}"
    total = int(runs.sum(dtype=np.int64)) if runs.size else 0  # no overflow: every run is <= area
    if total != area:
        return f"uncompressed RLE runs sum to {total}, expected height * width = {area}"
    return None


def rle_problem(rle: Any, height: int | None = None, width: int | None = None) -> str | None:
    """What is wrong with one COCO RLE dict (compressed or uncompressed); ``None`` if it is valid.

    Args:
        rle: ``{"size": [H, W], "counts": str | bytes | list[int]}``.
        height: The image height the RLE must have; ``None``: any size.
        width: The image width the RLE must have.

    Returns:
        A description of the first problem found, or ``None``.
    """
    if not isinstance(rle, Mapping):
        return f"an RLE must be a dict with 'size' and 'counts', got {type(rle).__name__}"
    if "size" not in rle or "counts" not in rle:
        return f"RLE 'segmentation' needs 'size' and 'counts', got keys {sorted(map(str, rle))}"
    problem = rle_size_problem(rle["size"], height, width)
    if problem is not None:
        return problem
    area = int(rle["size"][0]) * int(rle["size"][1])
    counts = rle["counts"]
    if isinstance(counts, str | bytes):
        codes, sums = check_compressed_rles([counts], [area])
        return None if codes[0] == RLE_OK else rle_string_problem_text(int(codes[0]), int(sums[0]), area, counts)
    if isinstance(counts, Sequence | np.ndarray):
        return _uncompressed_problem(counts, area)
    return f"RLE 'counts' must be a list (uncompressed) or a string (compressed), got {type(counts).__name__}"
