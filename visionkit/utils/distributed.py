"""The few ``torch.distributed`` collectives visionkit uses, each a no-op when no process group is initialised.

Metrics whose state is a tensor summed over ranks are torchmetrics ``Metric`` objects (``visionkit.eval``); these
helpers are for Python objects (COCO result records): gather them to rank 0, compute there once, send the answer (or
the error) back, so that every rank returns the same value or raises the same error instead of waiting forever.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

__all__ = ["all_gather_objects", "gather_to_rank0", "get_rank", "get_world_size", "run_on_rank0"]

T = TypeVar("T")


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of processes of the default group; 1 without ``torch.distributed``."""
    return dist.get_world_size() if _initialised() else 1


def get_rank() -> int:
    """Rank of this process in the default group; 0 without ``torch.distributed``."""
    return dist.get_rank() if _initialised() else 0


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Collect one picklable object per rank on rank 0.

    Args:
        obj: This rank's object.

    Returns:
        On rank 0, the objects of ranks ``0..world-1`` in rank order (``[obj]`` without distribution); ``None`` on the
        other ranks.
    """
    if get_world_size() == 1:
        return [obj]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def all_gather_objects(obj: Any) -> list[Any]:
    """The objects of every rank, in rank order, on every rank (``[obj]`` without distribution)."""
    if get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def run_on_rank0(compute: Callable[[], T]) -> T:
    """Run ``compute`` on rank 0 only and return its result on every rank.

    An exception raised on rank 0 is sent to the other ranks and raised on every rank, so no rank is left waiting in
    a collective. Without distribution this is ``compute()``.

    Args:
        compute: The work; called on rank 0 only. Its result must be picklable.

    Returns:
        ``compute()``'s result, on every rank.
    """
    if get_world_size() == 1:
        return compute()
    payload: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            payload[0] = ("ok", compute())
        except Exception as error:  # sent to the other ranks so that they raise too instead of hanging
            payload[0] = ("error", error)
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise value
    return value
