"""Holding out part of a split folder as another split: a validation set for datasets that ship only train / test.

The datamodules' ``val_fraction`` uses these: a probe then selects its epoch on the held-out part of the training
folder and reports the official test (or validation) folder separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from visionkit.data.unreadable import item_path

__all__ = ["HeldOutSplit", "holdout_indices"]


def holdout_indices(
    num_items: int, fraction: float, groups: Sequence[int] | None = None
) -> tuple[list[int], list[int]]:
    """Split ``range(num_items)`` into kept and held-out indices, the same way on every run.

    Each group (e.g. class) holds out ``fraction * size`` of its items, rounded half up but keeping at least one item
    of every group, picked by a permutation seeded with ``(0, group)`` only: the held-out set depends neither on the
    training seed nor on the other groups.

    Args:
        num_items: Number of items.
        fraction: Share to hold out, in ``(0, 1)``.
        groups: Group (e.g. label) of every item; ``None``: one group.

    Returns:
        ``(kept, held_out)``, both sorted.

    Raises:
        ValueError: ``fraction`` outside ``(0, 1)``, or nothing held out or nothing kept.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    labels = np.zeros(num_items, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    held: list[int] = []
    for group in np.unique(labels):
        members = np.flatnonzero(labels == group)
        order = np.random.default_rng([0, int(group)]).permutation(len(members))
        count = min(int(fraction * len(members) + 0.5), len(members) - 1)
        held += members[order[:count]].tolist()
    held_set = set(held)
    kept = [index for index in range(num_items) if index not in held_set]
    if not held or not kept:
        raise ValueError(f"holding out {fraction} of {num_items} items leaves {len(held)} held out, {len(kept)} kept")
    return kept, sorted(held)


class HeldOutSplit(Dataset):
    """Items ``indices`` of ``dataset``: one part of a split folder (see ``val_fraction`` of the datamodules).

    Items keep the full dataset's targets (``image_id`` is the index in the full folder); ``class_names`` and
    ``get_image_info`` (in this subset's item order) are the full dataset's.

    Args:
        dataset: The whole split, with ``class_names``.
        indices: Its items that form this part.
    """

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.class_names: list[str] = list(dataset.class_names)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        """Item ``indices[index]`` of the full dataset."""
        return self.dataset[self.indices[index]]

    def get_image_info(self, index: int) -> dict[str, Any]:
        """The full dataset's ``get_image_info`` of the item, else its ``image_id`` and ``image_path``."""
        inner = self.indices[index]
        info_fn = getattr(self.dataset, "get_image_info", None)
        return (
            dict(info_fn(inner))
            if callable(info_fn)
            else {"image_id": inner, "image_path": item_path(self.dataset, inner)}
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.dataset!r}, items={len(self)})"
