"""The object collectives without a process group (the multi-process behaviour is covered by the gloo tests)."""

import pytest

from visionkit.utils import all_gather_objects, gather_to_rank0, get_rank, get_world_size, run_on_rank0


def test_single_process_collectives_are_identities() -> None:
    assert get_world_size() == 1 and get_rank() == 0
    assert gather_to_rank0({"a": 1}) == [{"a": 1}]
    assert all_gather_objects([1, 2]) == [[1, 2]]
    assert run_on_rank0(lambda: 42) == 42


def test_run_on_rank0_raises_the_error_of_the_computation() -> None:
    def fail() -> int:
        raise ValueError("bad ground truth")

    with pytest.raises(ValueError, match="bad ground truth"):
        run_on_rank0(fail)
