from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as pycoco_mask

from visionkit.eval import decode_rle, encode_mask, encode_masks, rle_area, rle_to_bbox

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _hand_mask() -> np.ndarray:
    # 3 x 4 mask; column-major order reads 0,1,0 | 0,1,1 | 0,0,0 | 1,1,1
    return np.array([[0, 0, 0, 1], [1, 1, 0, 1], [0, 1, 0, 1]], dtype=bool)


def test_encode_mask_hand_worked_column_major_runs(runs_rle) -> None:
    mask = _hand_mask()
    rle = encode_mask(mask)
    assert rle["size"] == [3, 4]
    assert isinstance(rle["counts"], str)
    # Column-major runs: 0 | 1 | 0 0 | 1 1 | 0 0 0 | 1 1 1 -> [1, 1, 2, 2, 3, 3]
    assert runs_rle(mask)["counts"] == [1, 1, 2, 2, 3, 3]
    runs = pycoco_mask.frPyObjects({"size": [3, 4], "counts": [1, 1, 2, 2, 3, 3]}, 3, 4)
    assert rle["counts"] == runs["counts"].decode("utf-8")
    json.dumps(rle)  # JSON-serialisable as is


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (5, 7), (31, 64)])
def test_round_trip_random_masks(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.3, 1.0):
        mask = rng.random(shape) < density
        rle = encode_mask(mask)
        decoded = decode_rle(rle)
        assert decoded.dtype == np.bool_
        np.testing.assert_array_equal(decoded, mask)
        assert rle_area(rle) == int(mask.sum())


def test_encode_mask_accepts_tensors_and_non_contiguous_arrays() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((9, 13)) < 0.5
    expected = encode_mask(mask)
    assert encode_mask(torch.from_numpy(mask)) == expected
    assert encode_mask(mask.astype(np.uint8)) == expected
    transposed = np.ascontiguousarray(mask.T).T  # a Fortran-ordered view
    assert encode_mask(transposed) == expected
    assert encode_mask(mask[::1, :]) == expected


def test_encode_masks_matches_per_mask_encoding() -> None:
    rng = np.random.default_rng(1)
    masks = rng.random((300, 11, 6)) < 0.4  # more than 255 masks in one call
    batch = encode_masks(torch.from_numpy(masks))
    assert len(batch) == 300
    assert batch == [encode_mask(mask) for mask in masks]
    assert encode_masks(np.zeros((0, 4, 4), dtype=bool)) == []


def test_decode_accepts_bytes_and_uncompressed_counts(runs_rle) -> None:
    mask = _hand_mask()
    rle = encode_mask(mask)
    np.testing.assert_array_equal(decode_rle({"size": [3, 4], "counts": rle["counts"].encode()}), mask)
    np.testing.assert_array_equal(decode_rle(runs_rle(mask)), mask)
    assert rle_area(runs_rle(mask)) == 6


def test_rle_to_bbox_is_xywh() -> None:
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:9] = True  # rows 2..4, columns 3..8
    assert rle_to_bbox(encode_mask(mask)) == [3.0, 2.0, 6.0, 3.0]
    assert rle_to_bbox(encode_mask(np.zeros((4, 4), dtype=bool))) == [0.0, 0.0, 0.0, 0.0]


def test_bad_masks_raise() -> None:
    with pytest.raises(ValueError, match=r"masks must be bool \(or integer 0/1\), got dtype float32"):
        encode_mask(np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"integer masks must hold only 0 and 1"):
        encode_mask(np.full((3, 3), 2, dtype=np.int64))
    with pytest.raises(ValueError, match=r"expected a mask of shape \(H, W\), got shape \(1, 3, 3\)"):
        encode_mask(np.zeros((1, 3, 3), dtype=bool))
    with pytest.raises(ValueError, match=r"expected a mask of shape \(N, H, W\), got shape \(3, 3\)"):
        encode_masks(np.zeros((3, 3), dtype=bool))
    with pytest.raises(ValueError, match=r"uncompressed RLE runs sum to 5, expected height \* width = 6"):
        decode_rle({"size": [2, 3], "counts": [2, 3]})
    with pytest.raises(ValueError, match=r"compressed RLE runs sum to 2, expected height \* width = 6"):
        decode_rle({"size": [2, 3], "counts": "2"})  # a string cut short: the engine would read past its runs
    with pytest.raises(ValueError, match=r"not a valid RLE string \(a character outside '0'..'o'\)"):
        rle_area({"size": [2, 3], "counts": "6~"})
    with pytest.raises(ValueError, match=r"an RLE must be a dict with 'size' and 'counts'"):
        decode_rle({"counts": "abc"})
