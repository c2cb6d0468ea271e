"""Skipping unreadable images in a training set (the datamodules' ``skip_unreadable=True``).

Large image collections often hold a few files that do not decode (truncated downloads, disk errors). By default
the first one stops training with an error that names the file. With ``skip_unreadable=True`` the training split is
wrapped in :class:`SkipUnreadable`, which works like this:

- **What is skipped.** An item whose loading raises ``OSError``: :class:`~visionkit.data.image_io.ImageReadError` (a
  file that does not decode), ``FileNotFoundError``, ``PermissionError``. Other errors (a COCO size mismatch, a label
  value out of range) are problems of the annotations and still stop the run.
- **What replaces it.** The next item, ``i + 1`` (wrapping around; further on while that is unreadable too). The
  choice depends only on ``i`` and on which files are unreadable: not on the worker, the batch, the epoch or a random
  draw. Batches therefore keep their size (no empty batch to handle), a run is the same with any number of workers,
  and a run resumed from a checkpoint sees the same items as the uninterrupted one. A failed read draws no random
  number (the transforms run only on a sample that was read), so the augmentations stay aligned too. The replacing
  item is seen twice in that epoch (mmdetection's ``_rand_another`` replaces with a random item instead).
- **What is reported.** The first failure of each file is a warning naming the file and the reason (from the
  process that read it, a DataLoader worker included). Which items were replaced is recorded in shared memory (one
  byte per item), so the main process sees what every worker found: at the end of each training epoch
  :class:`UnreadableImagesReport`, which the datamodule adds to the trainer, warns with the count and the files. A
  file found unreadable is not read again in later epochs (it is still counted in every epoch's report).
- **Where.** The training split only: a validation or test metric over a silently reduced (or duplicated) set would
  not be comparable, so evaluation still stops with the error that names the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import Dataset

__all__ = ["SkipUnreadable", "UnreadableImagesReport", "item_path"]

#: Consecutive unreadable items after which the data set is taken for broken rather than damaged in a few places.
MAX_CONSECUTIVE_UNREADABLE = 64
#: Files named in one epoch-end report (the count is always complete).
REPORT_NAMES = 10


def item_path(dataset: Any, index: int) -> str:
    """The image file of item ``index`` of a visionkit dataset, or ``"item <index>"`` when it cannot tell.

    Args:
        dataset: A COCO, ADE20K or image-folder dataset (or anything else).
        index: Item index.

    Returns:
        The path as a string.
    """
    info_fn = getattr(dataset, "get_image_info", None)
    if callable(info_fn):
        info = info_fn(index)
        if "image_path" in info:
            return str(info["image_path"])
        if "file_name" in info and hasattr(dataset, "root"):
            return str(Path(dataset.root) / info["file_name"])
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list) and index < len(samples):
        return str(samples[index][0])
    paths = getattr(dataset, "paths", None)
    if isinstance(paths, list) and index < len(paths):
        return str(paths[index])
    return f"item {index}"


class SkipUnreadable(Dataset):
    """A map-style dataset in which an item that cannot be read is replaced by the next readable one.

    Rules and reasons are in the module docstring. Attributes of the wrapped dataset (``class_names``,
    ``get_image_info``, ...) are reachable through the wrapper.

    Args:
        dataset: The dataset to wrap (its ``__getitem__`` raises ``OSError`` for an unreadable file).
        max_consecutive: Stop with an error after this many unreadable items in a row (a wrong ``data_root`` or an
            unmounted disk should not train on the few files that are left).

    Raises:
        ValueError: An empty dataset.
    """

    def __init__(self, dataset: Dataset, max_consecutive: int = MAX_CONSECUTIVE_UNREADABLE) -> None:
        size = len(dataset)  # type: ignore[arg-type]
        if size == 0:
            raise ValueError(f"SkipUnreadable needs a non-empty dataset, got {dataset!r}")
        self.dataset = dataset
        self.max_consecutive = max(1, int(max_consecutive))
        # Shared memory, so that what the DataLoader workers find is seen by the main process (and by each other).
        self._unreadable = torch.zeros(size, dtype=torch.uint8).share_memory_()  # ever found unreadable
        self._replaced = torch.zeros(size, dtype=torch.uint8).share_memory_()  # replaced since the last report

    def __len__(self) -> int:
        return int(self._unreadable.numel())

    def __getattr__(self, name: str) -> Any:
        # Only called for names the wrapper lacks; "dataset" itself must not recurse (e.g. while unpickling).
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Any:
        """Item ``index``, or the next readable item if its file cannot be read.

        Raises:
            RuntimeError: ``max_consecutive`` items in a row (or every item) are unreadable; the message names the
                first file and the reason.
        """
        size = len(self)
        if not -size <= index < size:
            raise IndexError(f"index {index} out of range for a dataset of {size} images")
        index %= size
        first_error: OSError | None = None
        attempts = min(self.max_consecutive, size)
        for step in range(attempts):
            candidate = (index + step) % size
            if self._unreadable[candidate]:
                continue
            try:
                sample = self.dataset[candidate]
            except OSError as error:
                self._unreadable[candidate] = 1
                first_error = first_error or error
                warnings.warn(
                    f"skip_unreadable: training item {candidate} is replaced by the next readable item, in this epoch "
                    f"and the following ones: {error}",
                    stacklevel=2,
                )
                continue
            if step:
                self._replaced[index] = 1
            return sample
        reason = f"; the first error: {first_error}" if first_error is not None else ""
        raise RuntimeError(
            f"skip_unreadable: {attempts} items in a row, from item {index} "
            f"({item_path(self.dataset, index)}), cannot be read{reason}. That is not a few damaged files: check "
            f"data_root and the disk, or set skip_unreadable=False to stop at the first one."
        )

    def take_report(self) -> list[int]:
        """Indices of the items replaced since the last call (sorted); the record starts afresh.

        Returns:
            The indices; call from the main process once the epoch's batches are all loaded.
        """
        indices = torch.nonzero(self._replaced).flatten().tolist()
        self._replaced.zero_()
        return indices

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.dataset!r})"


class UnreadableImagesReport(pl.Callback):
    """Warn at the end of each training epoch how many training images could not be read, and which.

    The datamodule adds it to the trainer when its training loader is built with ``skip_unreadable=True``.

    Args:
        dataset: The wrapped training set.
    """

    def __init__(self, dataset: SkipUnreadable) -> None:
        self.dataset = dataset

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warn with the count and the first file names when images were replaced in this epoch."""
        indices = self.dataset.take_report()
        if not indices:
            return
        names = [item_path(self.dataset.dataset, index) for index in indices[:REPORT_NAMES]]
        more = f" and {len(indices) - REPORT_NAMES} more" if len(indices) > REPORT_NAMES else ""
        rank = f" (rank {trainer.global_rank})" if trainer.world_size > 1 else ""
        warnings.warn(
            f"epoch {trainer.current_epoch}{rank}: {len(indices)} of {len(self.dataset)} training images could not be "
            f"read and were replaced by the next readable image (skip_unreadable=True): {', '.join(names)}{more}",
            stacklevel=2,
        )
