"""`tools/convert_checkpoint.py`: Lightning / torch checkpoints -> .safetensors that create_model loads."""

import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import visionkit
from visionkit.weights import load_metadata, load_state_dict

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "convert_checkpoint.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=300)


def test_lightning_checkpoint_converts_to_weights_create_model_loads(tmp_path):
    torch.manual_seed(0)
    model = visionkit.create_model("test_resnet", num_classes=3).eval()
    ckpt = tmp_path / "last.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3, "pytorch-lightning_version": "2.6.6"}, ckpt)
    out = _run(str(ckpt), str(tmp_path / "backbone.safetensors"), "--strip-prefix", "model.")
    assert out.returncode == 0, out.stderr
    assert "backbone.safetensors" in out.stdout
    assert load_metadata(tmp_path / "backbone.safetensors")["converted_from"] == "last.ckpt"
    reloaded = visionkit.create_model("test_resnet", checkpoint_path=tmp_path / "backbone.safetensors").eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)


def test_select_prefix_keeps_one_sub_network(tmp_path):
    torch.manual_seed(0)
    model = visionkit.create_model("test_resnet", num_classes=3).eval()
    other = torch.nn.Linear(2, 2)
    state = {f"teacher.backbone.{k}": v for k, v in model.state_dict().items()}
    state.update({f"student.backbone.{k}": torch.zeros_like(v) for k, v in model.state_dict().items()})
    state.update({f"teacher.head.{k}": v for k, v in other.state_dict().items()})
    torch.save({"state_dict": state}, tmp_path / "last.ckpt")
    out = _run(str(tmp_path / "last.ckpt"), str(tmp_path / "t.safetensors"), "--select-prefix", "teacher.backbone.")
    assert out.returncode == 0, out.stderr
    reloaded = visionkit.create_model("test_resnet", checkpoint_path=tmp_path / "t.safetensors").eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)
    missing = _run(str(tmp_path / "last.ckpt"), str(tmp_path / "x.safetensors"), "--select-prefix", "ema.")
    assert missing.returncode == 1
    assert "no keys under 'ema.'" in missing.stderr and "student." in missing.stderr and "teacher." in missing.stderr


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {pathlib.Path(os.environ['VK_PWNED'])}",))


def test_code_carrying_pickle_is_refused_without_trust(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("VK_PWNED", str(marker))
    bad = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "payload": _Payload()}, bad)
    out = _run(str(bad), str(tmp_path / "out.safetensors"))
    assert out.returncode != 0
    assert "system" in out.stderr and "--trust-pickle" in out.stderr
    assert not marker.exists(), "the payload must never run"
    assert not (tmp_path / "out.safetensors").exists()


def test_trusted_pickle_with_non_allowlisted_objects_converts(tmp_path):
    src = tmp_path / "old.pth"
    torch.save({"model": {"w": torch.arange(3.0)}, "config_path": pathlib.PurePosixPath("/x/cfg.yaml")}, src)
    with pytest.raises(visionkit.weights.UnsafeCheckpointError):
        load_state_dict(src)
    out = _run(str(src), str(tmp_path / "new.safetensors"), "--trust-pickle")
    assert out.returncode == 0, out.stderr
    torch.testing.assert_close(load_state_dict(tmp_path / "new.safetensors")["w"], torch.arange(3.0))
