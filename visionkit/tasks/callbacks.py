"""Lightning plug-ins that make runs safe to interrupt and exact to resume.

- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file next to its destination, fsyncs it and renames
  it, so an interrupted save never leaves a truncated ``last.ckpt``.
- :class:`ReseedEveryEpoch` re-seeds every random generator at the start of each training epoch from
  ``(seed, epoch)``. Lightning does not store random-generator states in checkpoints, so without it a run resumed from
  the end of epoch ``e`` would draw different augmentations, shuffles and dropout masks than the uninterrupted run; with
  it, ``fit`` for 2 epochs and ``fit`` for 1 epoch + ``--ckpt_path last`` give the same weights on CPU.
- :func:`checkpoint_problem` tells whether a checkpoint file is intact before a run resumes from it (a file damaged
  by a disk error, a copy cut short or a save from an older, non-atomic writer), and :func:`intact_checkpoints_near`
  lists the checkpoints next to a damaged one that could be used instead; ``visionkit.cli`` uses both.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.seed import seed_everything
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from visionkit.weights import atomic_torch_save

__all__ = [
    "AtomicCheckpointIO",
    "ReseedEveryEpoch",
    "checkpoint_problem",
    "intact_checkpoints_near",
    "read_checkpoint",
]

#: Checkpoints next to a damaged one that :func:`intact_checkpoints_near` checks at most (newest first); each check
#: reads the whole file once.
MAX_CHECKED_NEIGHBOURS = 10


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic (temporary file in the same folder + fsync + rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` at ``path`` atomically.

        Args:
            checkpoint: The state Lightning collected.
            path: Destination file.
            storage_options: Not supported (must be None).
        """
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}.")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(checkpoint, path)


class ReseedEveryEpoch(pl.Callback):
    """Seed Python, NumPy and torch with ``seed + epoch`` when each training epoch starts.

    The hook runs after the samplers' ``set_epoch`` and before the epoch's dataloader iterator is created, so worker
    seeds, shuffles and augmentations of epoch ``e`` depend only on ``(seed, e)``.

    Args:
        seed: Base seed; ``None`` takes the one ``seed_everything`` stored in ``PL_GLOBAL_SEED`` (and does nothing if
            the run is not seeded).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Re-seed from ``(seed, trainer.current_epoch, global rank)``."""
        seed = self.seed if self.seed is not None else os.environ.get("PL_GLOBAL_SEED")
        if seed is None:
            return
        # Different ranks keep different streams, as after seed_everything with DDP (the sampler splits the data).
        seed_everything(int(seed) + 1000 * trainer.current_epoch + trainer.global_rank, workers=True, verbose=False)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _zip_problem(path: Path) -> str | None:
    """Read every member of a zip checkpoint and check its CRC-32; a description of the damage, or ``None``.

    ``torch.load`` checks no CRC: a tensor overwritten with garbage loads silently. Members stored with CRC 0
    (``torch.serialization.config.save.compute_crc32 = False``) are not checked.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:
                    continue
                with archive.open(info) as member:
                    while member.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as error:
        return f"its zip archive is damaged ({_first_line(error)})"
    return None


def checkpoint_problem(path: str | os.PathLike[str], weights_only: bool = True) -> str | None:
    """What is wrong with a Lightning checkpoint file, or ``None`` when it is intact and loads.

    Checks, in order: the file exists and is not empty; a zip checkpoint (what ``torch.save`` writes) is complete and
    every member matches its CRC-32 (this reads the whole file once); ``torch.load`` (memory-mapped, on the CPU)
    unpickles it; the result is a dict with a ``state_dict``.

    Args:
        path: The checkpoint file.
        weights_only: Passed to ``torch.load`` (as Lightning will load it; ``False`` only for trusted files).

    Returns:
        A short description of the problem (e.g. ``"the file is empty (0 bytes)"``), or ``None``.
    """
    return read_checkpoint(path, weights_only)[1]


def read_checkpoint(path: str | os.PathLike[str], weights_only: bool = True) -> tuple[dict | None, str | None]:
    """Load a Lightning checkpoint after the checks of :func:`checkpoint_problem`, reading the file once.

    Args:
        path: The checkpoint file.
        weights_only: Passed to ``torch.load``.

    Returns:
        ``(checkpoint, None)`` (memory-mapped tensors, on the CPU) or ``(None, problem)``.
    """
    path = Path(path)
    if not path.exists():
        return None, "the file does not exist"
    if not path.is_file():
        return None, "it is not a regular file"
    if path.stat().st_size == 0:
        return None, "the file is empty (0 bytes)"
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        problem = _zip_problem(path)
        if problem is not None:
            return None, problem
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=is_zip)
    except Exception as error:  # whatever torch.load raises, the file cannot be resumed from
        if not is_zip:  # torch.save writes a zip archive, whose directory sits at the end of the file
            missing = "torch.save's zip directory at its end is missing"
            return None, f"it is truncated or not a PyTorch checkpoint ({missing})"
        return None, f"torch.load fails ({_first_line(error)})"
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return None, "it is not a Lightning checkpoint (no 'state_dict' entry)"
    return checkpoint, None


def intact_checkpoints_near(path: str | os.PathLike[str], weights_only: bool = True) -> tuple[list[Path], int]:
    """The intact ``*.ckpt`` files in the folder of ``path`` (``path`` itself excluded), newest first.

    Args:
        path: A (damaged) checkpoint file.
        weights_only: Passed to :func:`checkpoint_problem`.

    Returns:
        The intact files among the :data:`MAX_CHECKED_NEIGHBOURS` newest, and the number of older ones not checked.
    """
    path = Path(path)
    try:
        others = [p for p in path.parent.glob("*.ckpt") if p.is_file() and p.resolve() != path.resolve()]
    except OSError:
        return [], 0
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    checked, unchecked = others[:MAX_CHECKED_NEIGHBOURS], len(others) - min(len(others), MAX_CHECKED_NEIGHBOURS)
    return [p for p in checked if checkpoint_problem(p, weights_only) is None], unchecked
