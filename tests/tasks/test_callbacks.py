import os
import pickle
import random

import numpy as np
import pytest
import torch

from visionkit.tasks.callbacks import AtomicCheckpointIO, ReseedEveryEpoch


def test_atomic_checkpoint_io_round_trip(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(4.0)}, "epoch": 3}, path)
    loaded = io.load_checkpoint(path, weights_only=True)
    assert loaded["epoch"] == 3
    torch.testing.assert_close(loaded["state_dict"]["w"], torch.arange(4.0))


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise pickle.PicklingError("simulated crash while writing")

    with pytest.raises(pickle.PicklingError, match="simulated crash"):
        io.save_checkpoint({"epoch": 2, "bad": Unpicklable()}, path)
    assert io.load_checkpoint(path, weights_only=True)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]


def test_atomic_checkpoint_io_rejects_storage_options(tmp_path):
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint({}, tmp_path / "x.ckpt", storage_options={"a": 1})


class _FakeTrainer:
    def __init__(self, epoch: int, rank: int = 0):
        self.current_epoch = epoch
        self.global_rank = rank


def _draws():
    return torch.rand(3).tolist(), np.random.rand(2).tolist(), random.random()


def test_reseed_every_epoch_depends_only_on_seed_and_epoch():
    callback = ReseedEveryEpoch(seed=7)
    callback.on_train_epoch_start(_FakeTrainer(2), None)
    first = _draws()
    torch.rand(100)  # consume the generators in between, as a training epoch would
    callback.on_train_epoch_start(_FakeTrainer(2), None)
    assert _draws() == first
    callback.on_train_epoch_start(_FakeTrainer(3), None)
    assert _draws() != first
    callback.on_train_epoch_start(_FakeTrainer(2, rank=1), None)
    assert _draws() != first


def test_reseed_every_epoch_is_inert_without_a_seed(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    ReseedEveryEpoch().on_train_epoch_start(_FakeTrainer(5), None)
    torch.testing.assert_close(torch.rand(3), expected)
