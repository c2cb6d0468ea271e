"""Lightning plug-ins that make runs safe to interrupt and exact to resume.

- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file next to its destination, fsyncs it and renames
  it, so an interrupted save never leaves a truncated ``last.ckpt``.
- :class:`ReseedEveryEpoch` re-seeds every random generator at the start of each training epoch from
  ``(seed, epoch)``. Lightning does not store random-generator states in checkpoints, so without it a run resumed from
  the end of epoch ``e`` would draw different augmentations, shuffles and dropout masks than the uninterrupted run; with
  it, ``fit`` for 2 epochs and ``fit`` for 1 epoch + ``--ckpt_path last`` give the same weights on CPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.seed import seed_everything
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from visionkit.weights import atomic_torch_save

__all__ = ["AtomicCheckpointIO", "ReseedEveryEpoch"]


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
