"""Helpers every layer needs: atomic file writes, distributed collectives, derived seeds, data-contract constants.

This package imports nothing of visionkit, so ``ops``, ``models``, ``data``, ``eval``, ``tasks`` and ``methods`` can all
use it without an upward arrow.
"""

from visionkit.utils.constants import CLIP_MEAN, CLIP_STD, IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from visionkit.utils.distributed import (
    all_gather_objects,
    gather_to_rank0,
    get_rank,
    get_world_size,
    run_on_rank0,
)
from visionkit.utils.io import atomic_write, remove_stale_temporaries, write_json_atomic
from visionkit.utils.seeding import derive_seed

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "all_gather_objects",
    "atomic_write",
    "derive_seed",
    "gather_to_rank0",
    "get_rank",
    "get_world_size",
    "remove_stale_temporaries",
    "run_on_rank0",
    "write_json_atomic",
]
