"""Tests of visionkit.weights: the safe loader, atomic saving, container unwrapping and refusal of unsafe pickles."""

from __future__ import annotations

import argparse
import os
import pickle
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch

from visionkit.weights import (
    CheckpointError,
    UnsafeCheckpointError,
    atomic_torch_save,
    describe_key_mismatch,
    find_weight_file,
    load_metadata,
    load_state_dict,
    save_state_dict,
)


def _mixed_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "conv.bias": torch.randn(4, generator=generator).to(torch.bfloat16),
        "norm.weight": torch.randn(4, generator=generator).to(torch.float16),
        "norm.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
        "mask": torch.rand(5, generator=generator) > 0.5,
        "lut": torch.randint(0, 255, (6,), dtype=torch.uint8, generator=generator),
        "empty": torch.zeros(0, 3),
    }


def _assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected) or sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name], tensor), name


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt", ".bin", ".ckpt"])
def test_round_trip_keeps_dtypes_shapes_values(tmp_path: Path, suffix: str) -> None:
    state = _mixed_state()
    path = save_state_dict(state, tmp_path / f"weights{suffix}")
    _assert_same_state(load_state_dict(path), state)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_metadata_round_trip(tmp_path: Path, suffix: str) -> None:
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    path = save_state_dict(state, tmp_path / f"m{suffix}", metadata={"arch": "resnet18", "epoch": "3"})
    assert load_metadata(path) == {"arch": "resnet18", "epoch": "3"}
    _assert_same_state(load_state_dict(path), state)


def test_metadata_must_be_strings(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"metadata must map str to str; offending keys: \['epoch'\]"):
        save_state_dict({"w": torch.ones(1)}, tmp_path / "m.safetensors", metadata={"epoch": 3})  # type: ignore[dict-item]


def test_save_rejects_non_tensor_values(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"'epoch' is a int, not a tensor"):
        save_state_dict({"w": torch.ones(1), "epoch": 3}, tmp_path / "m.pth")  # type: ignore[dict-item]


def test_tied_views_and_non_contiguous_tensors_save_to_safetensors(tmp_path: Path) -> None:
    weight = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    state = {"embed.weight": weight, "head.weight": weight, "first_rows": weight[:2], "transposed": weight.t()}
    with pytest.raises(RuntimeError):  # what the helper exists for: safetensors refuses shared storage
        safetensors.torch.save_file(state, str(tmp_path / "raw.safetensors"))
    loaded = load_state_dict(save_state_dict(state, tmp_path / "tied.safetensors"))
    _assert_same_state(loaded, {k: v.contiguous() for k, v in state.items()})
    assert torch.equal(weight, state["embed.weight"])  # the caller's tensors are untouched


def test_lightning_style_checkpoint_yields_its_state_dict(tmp_path: Path) -> None:
    state = _mixed_state()
    checkpoint = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": state,
        "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": 0.1, "backbone": "resnet18"},
    }
    torch.save(checkpoint, tmp_path / "last.ckpt")
    _assert_same_state(load_state_dict(tmp_path / "last.ckpt"), state)


def test_real_lightning_checkpoint_loads(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(pl.LightningModule):
        def __init__(self, lr: float = 0.1) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Linear(3, 2)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    torch.manual_seed(0)
    module = Tiny()
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(2, 3)), batch_size=2))
    trainer.save_checkpoint(tmp_path / "tiny.ckpt")
    loaded = load_state_dict(tmp_path / "tiny.ckpt", strip_prefixes=("net.",))
    _assert_same_state(loaded, {"weight": module.net.weight.detach(), "bias": module.net.bias.detach()})


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"model": sd, "epoch": 1},
        lambda sd: {"module": sd},
        lambda sd: {"model_state": sd, "optimizer": {"lr": 0.1}},
        lambda sd: {"state_dict": {"model": sd}, "meta": "x"},
        lambda sd: {"model": {"state_dict": sd}},
    ],
    ids=["model", "module", "model_state", "state_dict/model", "model/state_dict"],
)
def test_containers_are_unwrapped(tmp_path: Path, wrap) -> None:
    state = _mixed_state()
    torch.save(wrap(state), tmp_path / "c.pth")
    _assert_same_state(load_state_dict(tmp_path / "c.pth"), state)


def test_ema_weights_only_when_asked(tmp_path: Path) -> None:
    plain, ema = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    torch.save(
        {"state_dict": plain, "state_dict_ema": ema, "model_ema": {"w": torch.full((2,), 2.0)}}, tmp_path / "e.pth"
    )
    assert torch.equal(load_state_dict(tmp_path / "e.pth")["w"], plain["w"])
    assert torch.equal(load_state_dict(tmp_path / "e.pth", key="state_dict_ema")["w"], ema["w"])
    assert torch.equal(load_state_dict(tmp_path / "e.pth", key="model_ema")["w"], torch.full((2,), 2.0))
    with pytest.raises(
        CheckpointError, match=r"e\.pth has no entry 'ema'; its top-level entries are: state_dict \(dict\)"
    ):
        load_state_dict(tmp_path / "e.pth", key="ema")


def test_wrapper_prefixes_are_stripped(tmp_path: Path) -> None:
    state = {
        "module._orig_mod.conv.weight": torch.ones(1),
        "_orig_mod.module.fc.bias": torch.zeros(1),
        "b": torch.ones(2),
    }
    torch.save(state, tmp_path / "ddp.pth")
    assert sorted(load_state_dict(tmp_path / "ddp.pth")) == ["b", "conv.weight", "fc.bias"]
    assert sorted(load_state_dict(tmp_path / "ddp.pth", strip_prefixes=())) == sorted(state)


def test_prefix_collision_is_an_error(tmp_path: Path) -> None:
    torch.save({"module.w": torch.ones(1), "w": torch.zeros(1)}, tmp_path / "clash.pth")
    with pytest.raises(CheckpointError, match=r"clash\.pth: keys 'module\.w' and 'w' both become 'w'"):
        load_state_dict(tmp_path / "clash.pth")


def test_non_tensor_entries_are_dropped_with_a_count(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2), "epoch": 3, "note": "x"}, tmp_path / "mixed.pth")
    with pytest.warns(UserWarning, match=r"mixed\.pth: dropped 2 non-tensor entries from the state dict: epoch, note"):
        loaded = load_state_dict(tmp_path / "mixed.pth")
    assert list(loaded) == ["w"]


def test_no_tensors_is_an_error_that_suggests_a_key(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "net": {"w": torch.ones(1)}, "ema": {"w": torch.ones(1)}}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"odd\.pth holds no tensors; .*net \(dict\).*Pass key=<entry>"):
        load_state_dict(tmp_path / "odd.pth")
    assert list(load_state_dict(tmp_path / "odd.pth", key="net")) == ["w"]


def test_argparse_namespace_is_allowed(tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=0.1)}, tmp_path / "timm.pth")
    assert list(load_state_dict(tmp_path / "timm.pth")) == ["w"]


class _Payload:
    """Pickles as a call to os.system: unpickling it would run the shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


class _HarmlessButUnknown:
    def __init__(self) -> None:
        self.value = 1


def _system_global_pattern() -> str:
    return r"(posix|nt|os)\.system"


def test_malicious_zip_checkpoint_is_refused_without_running_it(tmp_path: Path) -> None:
    flag = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "payload": _Payload(f"echo pwned > {flag}")}, path)
    with pytest.raises(UnsafeCheckpointError) as caught:
        load_state_dict(path)
    message = str(caught.value)
    assert str(path) in message
    assert re.search(_system_global_pattern(), message)
    assert "refused for safety" in message
    assert "weights_only=False" in message and "save_state_dict" in message
    assert isinstance(caught.value, pickle.UnpicklingError)
    assert caught.value.path == path
    assert not flag.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, 5])
def test_malicious_plain_pickle_is_refused_without_running_it(tmp_path: Path, protocol: int) -> None:
    flag = tmp_path / "pwned.txt"
    path = tmp_path / "evil.bin"
    with path.open("wb") as file:
        pickle.dump({"payload": _Payload(f"echo pwned > {flag}")}, file, protocol=protocol)
    with pytest.raises(UnsafeCheckpointError, match=_system_global_pattern()) as caught:
        load_state_dict(path)
    assert str(path) in str(caught.value)
    assert not flag.exists()


def test_unknown_class_is_refused_and_named(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1), "extra": _HarmlessButUnknown()}, tmp_path / "custom.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"custom\.pth: .*_HarmlessButUnknown"):
        load_state_dict(tmp_path / "custom.pth")


def test_missing_file_names_path_and_hint(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"Checkpoint not found: {re.escape(str(path))}\. Get it from X"):
        load_state_dict(path, hint="Get it from X")


def test_truncated_zip_checkpoint(tmp_path: Path) -> None:
    path = save_state_dict({"w": torch.ones(1000)}, tmp_path / "cut.pth")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} could not be read as a PyTorch checkpoint"):
        load_state_dict(path)


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = save_state_dict({"w": torch.ones(1000)}, tmp_path / "cut.safetensors")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} is not a readable safetensors file"):
        load_state_dict(path)


def test_random_bytes_and_empty_file(tmp_path: Path) -> None:
    noise = tmp_path / "noise.pth"
    noise.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(3)).tolist()))
    with pytest.raises(CheckpointError, match=re.escape(str(noise))) as caught:
        load_state_dict(noise)
    assert "weights_only=False will likely succeed" not in str(caught.value)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(empty))} is empty or truncated"):
        load_state_dict(empty)


def test_directory_prefers_the_single_safetensors(tmp_path: Path) -> None:
    save_state_dict({"w": torch.ones(1)}, tmp_path / "model.safetensors")
    save_state_dict({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    assert find_weight_file(tmp_path) == tmp_path / "model.safetensors"
    assert torch.equal(load_state_dict(tmp_path)["w"], torch.ones(1))


def test_directory_with_only_a_pickle(tmp_path: Path) -> None:
    save_state_dict({"w": torch.zeros(1)}, tmp_path / "weights.pth")
    assert torch.equal(load_state_dict(tmp_path)["w"], torch.zeros(1))


def test_ambiguous_or_empty_directory(tmp_path: Path) -> None:
    save_state_dict({"w": torch.ones(1)}, tmp_path / "a.safetensors")
    save_state_dict({"w": torch.ones(1)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"holds several weight files \(a\.safetensors, b\.safetensors\)"):
        load_state_dict(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"No weight file in {re.escape(str(empty))}"):
        load_state_dict(empty)


def test_map_location_accepts_a_device(tmp_path: Path) -> None:
    path = save_state_dict({"w": torch.ones(2)}, tmp_path / "d.safetensors")
    assert load_state_dict(path, map_location=torch.device("cpu"))["w"].device.type == "cpu"


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize(
    ("suffix", "module", "writer"), [(".pth", torch, "save"), (".safetensors", safetensors.torch, "save_file")]
)
def test_failed_save_leaves_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, module: object, writer: str
) -> None:
    path = save_state_dict({"w": torch.ones(3)}, tmp_path / f"w{suffix}")
    original = path.read_bytes()

    def write_half_then_fail(obj: object, target: object, *args: object, **kwargs: object) -> None:
        if isinstance(target, (str, Path)):
            Path(target).write_bytes(b"partial")
        else:
            target.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(module, writer, write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict({"w": torch.zeros(3)}, path)
    assert path.read_bytes() == original
    assert _files(tmp_path) == [path.name]


def test_atomic_torch_save_round_trip_and_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.ones(2)}, "epoch": 1}, path)
    atomic_torch_save({"state_dict": {"w": torch.zeros(2)}, "epoch": 2}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 2 and torch.equal(loaded["state_dict"]["w"], torch.zeros(2))
    assert _files(tmp_path) == ["ckpt.ckpt"]


def test_saved_file_mode_follows_umask(tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    path = save_state_dict({"w": torch.ones(1)}, tmp_path / "perm.safetensors")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_describe_key_mismatch_lists_first_keys() -> None:
    text = describe_key_mismatch([f"k{i}" for i in range(12)], ["x"], ["size mismatch for y"], limit=3)
    assert text.splitlines() == [
        "missing keys (12): k0, k1, k2, ... (9 more)",
        "unexpected keys (1): x",
        "other problems (1): size mismatch for y",
    ]
