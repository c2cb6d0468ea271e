"""A datamodule over several task datamodules (multi-task training), with exact mid-epoch resume.

:class:`MultiTaskDataModule` holds one child datamodule per task (each keeps its own transforms, image size, batch
size and collate). Training batches are ``{task: sub-batch}`` from Lightning's ``CombinedLoader``
(``max_size_cycle``); validation, test and predict run the children's own loaders one after the other
(``sequential``; ``dataloader_idx`` follows ``task_names``, skipping children without that split).

Every task's training loader has the same number of batches per epoch, ``steps``: ``steps_per_epoch``, or the
largest ``len(train set) / global batch`` over the tasks (rounded down with the child's ``drop_last``, else up),
where the global batch is the child's ``batch_size`` times the ranks that train the task. Task ``t`` then reads, in
epoch ``e``, ``steps`` global batches from consecutive permutations of its training set, pass ``c`` seeded from
``(seed, t, e, c)`` (a shorter set is cycled, each pass with a new permutation; the last pass is cut), and rank ``r``
of the task's ``W`` ranks takes items ``r, r + W, ...`` of that sequence (:class:`TaskEpochSampler`). The sampler
subclasses ``DistributedSampler``, so Lightning uses it as it is under DDP instead of wrapping it.

Each training loader (:class:`ResumableDataLoader`) reports ``{"epoch", "batches"}`` to Lightning, which stores it
in mid-epoch checkpoints and hands it back on restart; the resumed loader then skips the batches already trained in
the sampler (their images are never read) and continues with the same items. Each item's random augmentations are
drawn from a seed of its own, ``(seed, t, e, position in the epoch's sequence)`` (:class:`SeededItems`: torch's,
NumPy's and Python's generators are seeded for that item and restored afterwards), so they depend neither on the
worker that loads the item nor on where a run was resumed: a resumed run reads the same augmented batches as an
uninterrupted one, with or without workers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from visionkit.data.datamodule_base import BaseDataModule
from visionkit.utils.seeding import derive_seed

__all__ = ["SAMPLING_MODES", "MultiTaskDataModule", "ResumableDataLoader", "SeededItems", "TaskEpochSampler"]

Sampling = Literal["mixed", "per_rank", "per_step"]
#: ``mixed`` (every rank, every step, every task), ``per_rank`` (rank ``r`` trains task ``r mod T`` only),
#: ``per_step`` (the datamodule yields every task; the model picks one per step).
SAMPLING_MODES: tuple[str, ...] = ("mixed", "per_rank", "per_step")
_PASS_STREAM, _WORKER_STREAM, _ITEM_STREAM = 0, 1, 2


class TaskEpochSampler(DistributedSampler):
    """One task's training indices for one rank: ``num_steps`` batches per epoch from seeded permutations.

    The global sequence of epoch ``e`` is ``num_steps * batch_size * world_size`` indices: consecutive permutations
    of ``range(dataset_size)``, pass ``c`` seeded from ``(seed, task_index, e, c)``, the last one cut. This rank
    yields items ``rank::world_size`` of it, so local batch ``b`` of every rank together form global batch ``b``.
    :meth:`resume` makes the next pass of an epoch start at a given local batch (the skipped indices are never
    yielded). A plain loop moves on to the next epoch after each pass; Lightning calls :meth:`set_epoch` instead.

    ``DistributedSampler`` is subclassed only so that Lightning leaves the sampler in place under DDP; its
    ``__init__`` is not used. ``num_samples`` is this rank's count per epoch, as in ``DistributedSampler``.

    Args:
        dataset_size: Length of the task's training set.
        batch_size: Per-rank batch size.
        num_steps: Batches per epoch (the same on every rank).
        seed: Base seed.
        task_index: The task's position (separates the tasks' permutations).
        epoch: First epoch (the epoch a resumed run starts at).
        rank: This rank's position among the ranks that train the task.
        world_size: Number of ranks that train the task.
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        num_steps: int,
        seed: int,
        task_index: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if dataset_size < 1 or batch_size < 1 or num_steps < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"TaskEpochSampler needs dataset_size, batch_size, num_steps, world_size >= 1 and 0 <= rank < "
                f"world_size, got {dataset_size}, {batch_size}, {num_steps}, {world_size}, rank {rank}"
            )
        self.dataset_size, self.batch_size, self.num_steps = dataset_size, batch_size, num_steps
        self.seed, self.task_index = seed, task_index
        self.rank, self.num_replicas = rank, world_size
        self.num_samples = num_steps * batch_size
        self.total_size = self.num_samples * world_size
        self.shuffle, self.drop_last = True, False
        self.loader_generator = torch.Generator()  # the DataLoader's: its worker seeds, re-seeded every epoch
        self._resume: tuple[int, int] | None = None  # (epoch, local batches to skip) for the next pass
        self.current_pass: tuple[int, int] | None = None  # (epoch, skipped batches) of the pass being read
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Read ``epoch`` in the next pass; a pending :meth:`resume` of another epoch is dropped."""
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None
        self.epoch = epoch
        self.loader_generator.manual_seed(derive_seed(self.seed, _WORKER_STREAM, self.task_index, epoch, self.rank))

    def resume(self, epoch: int, batches: int) -> None:
        """Make the next pass read ``epoch`` from local batch ``batches`` on (``batches`` already trained)."""
        self.set_epoch(epoch)
        self._resume = (epoch, batches) if batches > 0 else None

    @property
    def pending_batches(self) -> int:
        """Batches the next pass skips (0 unless :meth:`resume` is pending for the current epoch)."""
        return self._resume[1] if self._resume is not None else 0

    def global_indices(self, epoch: int) -> list[int]:
        """The global sequence of ``epoch`` over all ranks of the task (``total_size`` indices)."""
        passes = []
        for c in range(math.ceil(self.total_size / self.dataset_size)):
            generator = torch.Generator().manual_seed(derive_seed(self.seed, _PASS_STREAM, self.task_index, epoch, c))
            passes.append(torch.randperm(self.dataset_size, generator=generator))
        return torch.cat(passes)[: self.total_size].tolist()

    def __iter__(self) -> Iterator[int]:
        epoch, start = self.epoch, self.pending_batches
        self._resume = None
        self.current_pass = (epoch, start)
        positions = range(self.rank, self.total_size, self.num_replicas)[start * self.batch_size :]
        indices = self.global_indices(epoch)[self.rank :: self.num_replicas][start * self.batch_size :]
        self.set_epoch(epoch + 1)
        for position, index in zip(positions, indices, strict=True):
            yield (index, derive_seed(self.seed, _ITEM_STREAM, self.task_index, epoch, position))

    def __len__(self) -> int:
        return self.num_samples


class SeededItems(Dataset):
    """A dataset read with ``(index, seed)`` keys: each item's random draws come from its own seed.

    Before reading ``dataset[index]`` the torch, NumPy and Python generators are seeded with ``seed``; their states are
    restored afterwards, so loading in the main process does not disturb the training's random stream. A plain
    integer key reads the item without seeding.

    Args:
        dataset: The wrapped dataset.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        states = torch.get_rng_state(), np.random.get_state(), random.getstate()
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(states[0])
            np.random.set_state(states[1])
            random.setstate(states[2])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`TaskEpochSampler` that saves and restores its position within the epoch.

    Lightning's ``_Stateful`` protocol: Lightning saves :meth:`state_dict` in its checkpoints and, when a fit restarts
    mid-epoch, passes it to :meth:`load_state_dict` before it creates the epoch's iterator. ``epoch_finished`` (set by
    the datamodule) tells whether the restored Lightning epoch had already reached its last batch (as with
    ``limit_train_batches``), in which case the next epoch starts from its first batch. With another sampler (Lightning
    re-creates the loader with a sequential one for ``overfit_batches``) it is a plain ``DataLoader`` with state ``{}``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch_finished: Callable[[], bool] | None = None
        self._yielded = 0

    @property
    def _task_sampler(self) -> TaskEpochSampler | None:
        return self.sampler if isinstance(self.sampler, TaskEpochSampler) else None

    def __iter__(self) -> Iterator[Any]:
        if self._task_sampler is not None:
            self._task_sampler.current_pass = None
        self._yielded = 0
        return self._counted(super().__iter__())

    def _counted(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            self._yielded += 1  # before the yield: a checkpoint taken for this batch counts it as trained
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": e, "batches": n}``: the epoch being read and the batches of it yielded so far."""
        sampler = self._task_sampler
        if sampler is None:
            return {}
        epoch, start = sampler.current_pass or (sampler.epoch, sampler.pending_batches)
        return {"epoch": epoch, "batches": start + self._yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue at batch ``state_dict["batches"]`` of ``state_dict["epoch"]`` (the next epoch if it was over)."""
        sampler = self._task_sampler
        if sampler is None or not state_dict:
            return
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if batches >= len(self) or (self.epoch_finished is not None and self.epoch_finished()):
            epoch, batches = epoch + 1, 0
        if epoch >= sampler.epoch:  # else the loader was built for a later epoch: the saved one is over
            sampler.resume(epoch, batches)
        sampler.current_pass, self._yielded = None, 0


class MultiTaskDataModule(BaseDataModule):
    """One child datamodule per task; training batches are ``{task: sub-batch}``.

    A :class:`BaseDataModule` subclass so that ``visionkit.cli`` accepts it as ``data.class_path``; it has none of
    that class's loader settings: each child keeps its own (batch sizes, workers, ``drop_last``, collate,
    ``skip_unreadable``). The children's ``seed`` is not used for training order: this module's is (see the module
    docstring). Children get this module's ``trainer`` (Lightning attaches only the top datamodule), so they resume
    at the right epoch and register their ``skip_unreadable`` reports.

    Args:
        datamodules: ``{task name: datamodule}`` in task order (YAML: ``{name: {class_path, init_args}}``). Not saved
            as hyper-parameters (the resolved config records them).
        sampling: ``"mixed"`` and ``"per_step"`` give every rank every task; ``"per_rank"`` gives rank ``r`` only
            task ``task_names[r % T]``, sharded over the ranks that hold it.
        steps_per_epoch: Training batches per epoch for every task; ``None``: the largest task's epoch.
        seed: Seed of the training order; ``None`` uses ``torch.initial_seed()`` when the training loader is built.

    Raises:
        ValueError: If ``datamodules`` is empty, a name is not a non-empty string, ``sampling`` is unknown or
            ``steps_per_epoch < 1``.
        TypeError: If a child is not a :class:`BaseDataModule`.
    """

    def __init__(
        self,
        datamodules: dict[str, BaseDataModule],
        sampling: Sampling = "mixed",
        steps_per_epoch: int | None = None,
        seed: int | None = None,
    ) -> None:
        if not datamodules:
            raise ValueError("MultiTaskDataModule: datamodules is empty; give at least one {name: datamodule}")
        for name, child in datamodules.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"MultiTaskDataModule: task names must be non-empty strings, got {name!r}")
            if not isinstance(child, BaseDataModule):
                raise TypeError(f"MultiTaskDataModule: task {name!r} is a {type(child).__name__}, not a BaseDataModule")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"MultiTaskDataModule: sampling must be one of {list(SAMPLING_MODES)}, got {sampling!r}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"MultiTaskDataModule: steps_per_epoch must be >= 1 or None, got {steps_per_epoch}")
        super(BaseDataModule, self).__init__()  # not BaseDataModule's: its loader settings belong to the children
        self.save_hyperparameters(ignore=["datamodules"], logger=False)
        self.datamodules: dict[str, BaseDataModule] = dict(datamodules)
        self.sampling = sampling
        self.steps_per_epoch = steps_per_epoch
        self.seed = seed

    @property
    def task_names(self) -> list[str]:
        """Task names, in order."""
        return list(self.datamodules)

    def datamodule(self, name: str) -> BaseDataModule:
        """The child datamodule of task ``name``."""
        if name not in self.datamodules:
            raise KeyError(f"MultiTaskDataModule has no task {name!r}; tasks: {self.task_names}")
        return self.datamodules[name]

    def dataset(self, split: str) -> Dataset:
        """Not available: every task has its own datasets.

        Raises:
            RuntimeError: Always.
        """
        raise RuntimeError(
            f"MultiTaskDataModule has no {split!r} dataset of its own; use datamodule(name).dataset({split!r}) "
            f"for a task name in {self.task_names}"
        )

    build_dataset = dataset

    def _first_dataset(self, order: tuple[str, ...] = ()) -> Any:
        raise RuntimeError(f"MultiTaskDataModule has no classes of its own; use datamodule(name) for {self.task_names}")

    def _children(self) -> dict[str, BaseDataModule]:
        """The children, each given this module's trainer first."""
        for child in self.datamodules.values():
            child.trainer = self.trainer
        return self.datamodules

    def prepare_data(self) -> None:
        """Every child's ``prepare_data`` (demo sets)."""
        for child in self._children().values():
            child.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """Every child's ``setup(stage)``; a child without data for ``stage`` (e.g. no val split) is skipped."""
        for child in self._children().values():
            if stage is None or stage in child.stage_splits:
                child.setup(stage)

    def teardown(self, stage: str | None = None) -> None:
        """Every child's ``teardown``."""
        for child in self._children().values():
            child.teardown(stage)

    def rank_and_world_size(self) -> tuple[int, int]:
        """``(global rank, world size)``: the trainer's, else ``torch.distributed``'s, else ``(0, 1)``."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def task_ranks(self, name: str, world_size: int) -> list[int]:
        """The global ranks that train task ``name`` (all of them unless ``sampling="per_rank"``)."""
        if self.sampling != "per_rank":
            return list(range(world_size))
        return list(range(self.task_names.index(name), world_size, len(self.datamodules)))

    def _train_set(self, child: BaseDataModule) -> Dataset:
        return child._skipping_dataset("train") if child.skip_unreadable else child.dataset("train")

    def epoch_steps(self, world_size: int = 1) -> int:
        """Training batches per epoch, the same for every task and rank (after ``setup("fit")``).

        Args:
            world_size: Number of ranks.

        Raises:
            ValueError: If no task has a full global batch (with ``drop_last``) and ``steps_per_epoch`` is unset.
        """
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        steps = {}
        for name, child in self.datamodules.items():
            ranks = len(self.task_ranks(name, world_size))
            if ranks:
                size, global_batch = len(self._train_set(child)), child.batch_size * ranks
                steps[name] = size // global_batch if child.drop_last else math.ceil(size / global_batch)
        if max(steps.values()) < 1:
            raise ValueError(
                f"MultiTaskDataModule: no task has a full global batch per epoch (steps {steps}, world size "
                f"{world_size}); lower the batch sizes, set drop_last=False or set steps_per_epoch"
            )
        return max(steps.values())

    def _lightning_epoch_finished(self) -> bool:
        """Whether the trainer's restored epoch had reached its last batch (read when loader states are loaded)."""
        trainer = self.trainer
        return trainer is not None and bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)

    def train_dataloader(self) -> CombinedLoader:
        """``CombinedLoader({task: loader}, "max_size_cycle")`` of the tasks this rank trains, all ``steps`` long."""
        children = self._children()
        rank, world_size = self.rank_and_world_size()
        unheld = [name for name in children if not self.task_ranks(name, world_size)]
        if unheld:
            rank_zero_warn(
                f"MultiTaskDataModule(sampling='per_rank'): no rank trains {unheld} (world size {world_size})"
            )
        steps = self.epoch_steps(world_size)
        seed = self.seed if self.seed is not None else torch.initial_seed()
        # A resumed run creates its iterator before Lightning calls set_epoch (see datamodule_base).
        epoch = self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0
        loaders = {}
        for index, (name, child) in enumerate(children.items()):
            ranks = self.task_ranks(name, world_size)
            if rank not in ranks:
                continue
            sampler = TaskEpochSampler(
                len(self._train_set(child)), child.batch_size, steps, seed, index, epoch, ranks.index(rank), len(ranks)
            )
            loader = ResumableDataLoader(
                SeededItems(self._train_set(child)),
                batch_size=child.batch_size,
                sampler=sampler,
                generator=sampler.loader_generator,
                num_workers=child.num_workers,
                pin_memory=child.pin_memory,
                persistent_workers=child.persistent_workers and child.num_workers > 0,
                collate_fn=child.collate_fn,
            )
            loader.epoch_finished = self._lightning_epoch_finished
            loaders[name] = loader
        return CombinedLoader(loaders, mode="max_size_cycle")

    def _evaluation_loaders(self, split: str) -> CombinedLoader:
        hook = f"{split}_dataloader"
        loaders = {
            name: getattr(child, hook)()
            for name, child in self._children().items()
            if split in child.datasets and is_overridden(hook, child, pl.LightningDataModule)
        }
        return CombinedLoader(loaders, mode="sequential")

    def val_dataloader(self) -> CombinedLoader:
        """The children's val loaders, ``CombinedLoader({task: loader}, "sequential")``."""
        return self._evaluation_loaders("val")

    def test_dataloader(self) -> CombinedLoader:
        """The children's test loaders, ``CombinedLoader({task: loader}, "sequential")``."""
        return self._evaluation_loaders("test")

    def predict_dataloader(self) -> CombinedLoader:
        """The children's predict loaders, ``CombinedLoader({task: loader}, "sequential")``."""
        return self._evaluation_loaders("predict")

    def state_dict(self) -> dict[str, Any]:
        """The children's non-empty ``state_dict``s by task (the loaders' positions are Lightning's to save)."""
        return {name: state for name, child in self.datamodules.items() if (state := child.state_dict())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Give each child its saved state."""
        for name, state in state_dict.items():
            if name in self.datamodules:
                self.datamodules[name].load_state_dict(state)
