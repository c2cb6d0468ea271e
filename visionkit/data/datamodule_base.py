"""The base LightningDataModule (loader settings, seeded per-epoch shuffling, demo data) and its sampler.

Shuffling is seeded: the training sampler's permutation for epoch ``e`` depends only on ``(seed, e)``, where ``seed``
is the ``seed`` argument or, when that is ``None``, ``torch.initial_seed()`` when the training loader is built (the
seed of ``seed_everything``); so do the seeds PyTorch gives the loader's workers, and creating an iterator does not
touch the global RNG. Random augmentations draw from torch's global RNG: in the main process (``num_workers=0``) or
in each worker, seeded from its worker seed. A run resumed from an end-of-epoch checkpoint therefore sees the same
order and (with ``visionkit.tasks.callbacks.ReseedEveryEpoch``) the same augmentations as an uninterrupted run, with
or without workers: Lightning creates the resumed epoch's iterator before it calls ``set_epoch``, so the loader starts
at the restored epoch count. That holds as long as nothing asks for the training loader before Lightning restores the
loops (``BaseTask`` reads ``estimated_stepping_batches`` only at the first optimiser step for this reason).

``skip_unreadable=True`` wraps the training split in :class:`~visionkit.data.unreadable.SkipUnreadable` (an
unreadable image is replaced by the next readable item, deterministically, so the above still holds) and adds an
:class:`~visionkit.data.unreadable.UnreadableImagesReport` to the trainer, which warns at each epoch end with the count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from visionkit.data.collate import collate_detection
from visionkit.data.synthetic import write_demo_data
from visionkit.data.unreadable import SkipUnreadable, UnreadableImagesReport
from visionkit.utils.seeding import derive_seed

__all__ = ["BaseDataModule", "SeededRandomSampler"]


class SeededRandomSampler(Sampler[int]):
    """Random permutation of ``range(num_samples)`` that depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before every training epoch (as for ``DistributedSampler``); in a plain loop the
    epoch advances by one after each pass. ``loader_generator`` is meant to be the ``DataLoader``'s ``generator``:
    it is re-seeded from ``(seed, epoch)`` as well, so the worker seeds that PyTorch draws from it when an epoch's
    iterator is created depend neither on the global RNG nor on when the iterator was created.

    Args:
        num_samples: Dataset length.
        seed: Base seed.
        epoch: First epoch (the epoch a resumed run starts at).
    """

    def __init__(self, num_samples: int, seed: int, epoch: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.loader_generator = torch.Generator()
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation and worker seeds of ``epoch`` for the next pass."""
        self.epoch = epoch
        self.loader_generator.manual_seed(derive_seed(self.seed, epoch, 1))

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(derive_seed(self.seed, self.epoch, 0))
        permutation = torch.randperm(self.num_samples, generator=generator).tolist()
        self.set_epoch(self.epoch + 1)
        yield from permutation

    def __len__(self) -> int:
        return self.num_samples


class BaseDataModule(pl.LightningDataModule):
    """Base datamodule: loader settings, seeded shuffling and per-stage dataset construction.

    Subclasses implement :meth:`build_dataset` and set ``collate_fn``. ``setup(stage)`` builds only the splits that
    ``stage`` needs (``fit``: train and val; ``validate``: val; ``test``: test; ``predict``: predict) and is
    idempotent.

    Args:
        batch_size: Training batch size.
        val_batch_size: Batch size of the val/test/predict loaders; ``None`` uses ``batch_size``.
        num_workers: Dataloader worker processes (0 loads in the main process).
        pin_memory: Pin batches in page-locked memory (faster host-to-GPU copies).
        persistent_workers: Keep workers alive between epochs (only used when ``num_workers > 0``).
        drop_last: Drop the last incomplete training batch.
        seed: Shuffling seed; ``None`` uses ``torch.initial_seed()`` when the training loader is built.
        generate_demo: Write the synthetic demo dataset of this datamodule's kind (``visionkit.data.synthetic``) into
            ``data_root`` in ``prepare_data`` if it is not there yet (the quickstart uses it); ``data_root`` must then
            be a ``<demo root>/<kind>`` folder, e.g. ``data/demo/coco``.
        skip_unreadable: In the training split, replace an image that cannot be read (a corrupt, truncated or
            missing file) by the next readable one instead of stopping, with a warning naming the file and, at each
            epoch end, one with the count (:mod:`visionkit.data.unreadable`). Off by default: the first unreadable
            image stops the run with an error naming it. Validation, test and predict always stop.
        demo_sizes: ``(train, val)`` counts of the demo set that ``generate_demo`` writes (per class for
            classification), instead of the kind's default (``visionkit.data.DEMO_SIZES``). A demo folder written with
            other sizes is rewritten, so give a larger set its own root (e.g. ``data/demo_large/ade20k``).
    """

    #: Which demo set (``visionkit.data.synthetic.DEMO_KINDS``) ``generate_demo`` writes; None: no demo set.
    demo_kind: ClassVar[str | None] = None
    #: Batches a list of samples; a plain function (or ``functools.partial``) so that workers can pickle it.
    collate_fn: Callable[[list[Any]], Any] = staticmethod(collate_detection)
    #: Splits built by each ``setup`` stage.
    stage_splits: ClassVar[dict[str, tuple[str, ...]]] = {
        "fit": ("train", "val"),
        "validate": ("val",),
        "test": ("test",),
        "predict": ("predict",),
    }

    def __init__(
        self,
        batch_size: int = 2,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        drop_last: bool = False,
        seed: int | None = None,
        generate_demo: bool = False,
        skip_unreadable: bool = False,
        demo_sizes: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size}, val_batch_size={val_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        # logger=False: a task and a datamodule may both have e.g. `max_size` with different meanings; Lightning
        # refuses to merge such hparams for the logger. The resolved config.yaml next to the logs records both.
        self.save_hyperparameters(logger=False)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.drop_last = drop_last
        self.seed = seed
        self.generate_demo = generate_demo
        self.skip_unreadable = skip_unreadable
        self.datasets: dict[str, Dataset] = {}
        self._skipping: dict[str, SkipUnreadable] = {}  # one wrapper per split, kept across loader rebuilds

    def build_dataset(self, split: str) -> Dataset:
        """Construct the dataset of ``split`` (one of ``train``, ``val``, ``test``, ``predict``) with its transforms."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_dataset")

    def prepare_data(self) -> None:
        """Write the demo set if ``generate_demo`` (rank 0 only); nothing is ever downloaded.

        Datasets themselves are checked when ``setup`` builds them.
        """
        if not self.generate_demo:
            return
        if self.demo_kind is None:
            raise ValueError(f"{type(self).__name__} has no demo dataset; set generate_demo: false")
        data_root = Path(self.hparams.data_root)
        demo_root = next((p.parent for p in (data_root, *data_root.parents) if p.name == self.demo_kind), None)
        if demo_root is None:
            raise ValueError(
                f"generate_demo writes the {self.demo_kind!r} demo set to <demo root>/{self.demo_kind}; "
                f"data_root must be that folder (or inside it), got {data_root}"
            )
        sizes = {self.demo_kind: tuple(self.hparams.demo_sizes)} if self.hparams.get("demo_sizes") else None
        write_demo_data(demo_root, kinds=[self.demo_kind], sizes=sizes)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets ``stage`` needs (every split of every stage when ``None``); already built ones are kept.

        Args:
            stage: ``fit``, ``validate``, ``test``, ``predict`` or ``None``.

        Raises:
            ValueError: If the datamodule does not support ``stage``.
        """
        if stage is None:
            splits = tuple(dict.fromkeys(split for group in self.stage_splits.values() for split in group))
        elif stage in self.stage_splits:
            splits = self.stage_splits[stage]
        else:
            raise ValueError(
                f"{type(self).__name__} has no data for stage {stage!r}; supported: {list(self.stage_splits)}"
            )
        for split in splits:
            if split not in self.datasets:
                dataset = self.build_dataset(split)
                for other_split, other in self.datasets.items():
                    self.check_compatible(split, dataset, other_split, other)
                self.datasets[split] = dataset

    def check_compatible(self, split: str, dataset: Any, other_split: str, other: Any) -> None:
        """Raise ``ValueError`` if two splits disagree on their classes (a model trained on one mislabels the other).

        Args:
            split: Name of the newly built split.
            dataset: Its dataset.
            other_split: Name of an already built split.
            other: Its dataset.
        """
        names, other_names = getattr(dataset, "class_names", None), getattr(other, "class_names", None)
        if names is not None and other_names is not None and list(names) != list(other_names):
            raise ValueError(
                f"{type(self).__name__}: the {split} split ({dataset!r}) and the {other_split} split ({other!r}) "
                f"have different classes: {list(names)} vs {list(other_names)}"
            )

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` after :meth:`setup`.

        Raises:
            RuntimeError: If ``split`` has not been set up.
        """
        if split not in self.datasets:
            raise RuntimeError(
                f"{type(self).__name__}: the {split!r} split is not set up (set up: {sorted(self.datasets)}); "
                f"call setup() with the stage that needs it first"
            )
        return self.datasets[split]

    def _skipping_dataset(self, split: str) -> SkipUnreadable:
        """The :class:`SkipUnreadable` view of ``split``, with its epoch-end report registered on the trainer."""
        dataset = self.dataset(split)
        wrapper = self._skipping.get(split)
        if wrapper is None or wrapper.dataset is not dataset:
            wrapper = self._skipping[split] = SkipUnreadable(dataset)
        trainer = self.trainer
        if trainer is not None and not any(
            isinstance(c, UnreadableImagesReport) and c.dataset is wrapper for c in trainer.callbacks
        ):
            trainer.callbacks.append(UnreadableImagesReport(wrapper))
        return wrapper

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        dataset = self._skipping_dataset(split) if train and self.skip_unreadable else self.dataset(split)
        sampler = None
        if train:
            seed = self.seed if self.seed is not None else torch.initial_seed()
            # A resumed run builds (and, with workers, starts) its iterator before Lightning calls set_epoch, so
            # start at the epoch Lightning will pass to set_epoch: the restored count of processed epochs.
            epoch = self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0
            sampler = SeededRandomSampler(len(dataset), seed, epoch)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.val_batch_size,
            sampler=sampler,
            shuffle=False if sampler is None else None,
            generator=sampler.loader_generator if sampler is not None else None,
            drop_last=self.drop_last and train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            collate_fn=self.collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training loader (seeded, see the module docstring)."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation loader, in dataset order."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """Test loader, in dataset order."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Prediction loader, in dataset order."""
        return self._loader("predict")

    def _first_dataset(self, order: tuple[str, ...] = ("val", "test", "predict", "train")) -> Any:
        for split in order:
            if split in self.datasets:
                return self.datasets[split]
        raise RuntimeError(f"{type(self).__name__}: no dataset is set up yet; call setup() first")

    @property
    def class_names(self) -> list[str]:
        """Class names in contiguous label order (after :meth:`setup`)."""
        return list(self._first_dataset().class_names)

    @property
    def num_classes(self) -> int:
        """Number of classes (after :meth:`setup`)."""
        return len(self.class_names)
