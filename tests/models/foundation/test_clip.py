"""open_clip adapters: local checkpoints (safetensors, state-dict .pt, TorchScript), preprocessing, ResNet trunk."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import Compose, InterpolationMode, Normalize, Resize, ToTensor

from tests.models.foundation.tiny_models import TINY_RN, TINY_VIT, random_clip
from visionkit.models.foundation import (
    ClipResNetTrunk,
    build_clip,
    load_clip,
    preprocess_boundary,
    preprocess_semantic,
)
from visionkit.models.foundation.checkpoints import is_torchscript_archive
from visionkit.weights import CheckpointMismatchError, save_state_dict


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("cfg", [TINY_VIT, TINY_RN], ids=["vit", "resnet"])
def test_load_clip_round_trip(tmp_path: Path, suffix: str, cfg: dict) -> None:
    reference = random_clip(cfg)
    path = save_state_dict(reference.state_dict(), tmp_path / f"clip{suffix}")
    loaded, tokenizer = load_clip(cfg, path)
    _assert_same_weights(loaded, reference)
    assert not loaded.training
    tokens = tokenizer(["a photo of a cat.", ""])
    assert tokens.shape == (2, 77)
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(tokens), reference.encode_text(tokens))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:.*torch.jit.*deprecated:FutureWarning")
def test_load_clip_reads_openai_style_torchscript_archive(tmp_path: Path) -> None:
    # OpenAI's .pt files are traced TorchScript modules holding fp16 weights plus three non-weight entries.
    reference = random_clip(TINY_VIT)
    holder = _OpenAIStyleHolder(copy.deepcopy(reference))
    traced = torch.jit.trace_module(holder, {"forward": torch.zeros(1, 3, 32, 32)}, check_trace=False).half()
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(traced, str(path))
    assert is_torchscript_archive(path)
    assert {"input_resolution", "vocab_size"} <= set(torch.jit.load(str(path)).state_dict())
    assert not is_torchscript_archive(save_state_dict(reference.state_dict(), tmp_path / "plain.pt"))

    loaded, _ = load_clip(TINY_VIT, path)
    for name, tensor in reference.state_dict().items():
        assert loaded.state_dict()[name].dtype == torch.float32, name
        assert torch.equal(loaded.state_dict()[name], tensor.half().float()), name


class _OpenAIStyleHolder(torch.nn.Module):
    """The CLIP tensors under OpenAI's key names plus the non-weight entries its archives carry."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        for name, module in model.named_children():
            setattr(self, name, module)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for key, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
            self.register_buffer(key, torch.tensor(value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


@pytest.mark.parametrize("arch", ["ViT-B-16", "RN50x64"])
def test_missing_checkpoint_names_file_and_source(tmp_path: Path, arch: str) -> None:
    missing = tmp_path / f"{arch}.pt"
    with pytest.raises(FileNotFoundError) as info:
        load_clip(arch, missing)
    message = str(info.value)
    assert str(missing) in message
    assert "https://openaipublic.azureedge.net/clip/models/" in message and f"/{arch}.pt" in message
    assert "timm/" in message and ".openai" in message


def test_load_clip_without_path_refuses_to_download() -> None:
    with pytest.raises(ValueError, match="never downloads"):
        load_clip("ViT-B-16", None)


def test_load_clip_reports_key_mismatch(tmp_path: Path) -> None:
    path = save_state_dict(random_clip(TINY_RN).state_dict(), tmp_path / "rn.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"(?s)rn\.safetensors does not fit .*missing keys"):
        load_clip(TINY_VIT, path)


def test_quick_gelu_follows_config_then_openai_tag() -> None:
    model, _ = build_clip(TINY_VIT)
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    model, _ = build_clip({**TINY_VIT, "quick_gelu": False})
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    model, _ = build_clip(TINY_VIT, quick_gelu=False)
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_preprocess_semantic_matches_zip_transform() -> None:
    image = _image(30, 40)
    # Zip's H2_ToTensor (zip_utils.py), written out with torchvision.
    zip_transform = Compose(
        [
            Resize((512, 512), interpolation=InterpolationMode.BICUBIC),
            ToTensor(),
            Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    expected = zip_transform(Image.fromarray(image))
    actual = preprocess_semantic(image)
    assert actual.shape == (3, 512, 512)
    assert torch.equal(actual, expected)
    assert torch.equal(preprocess_semantic(Image.fromarray(image)), expected)


def test_preprocess_boundary_keeps_aspect_on_short_side() -> None:
    image = _image(30, 40)
    out = preprocess_boundary(image, short_side=64)
    assert out.shape == (3, 64, 85)  # torchvision: long side int(64 * 40 / 30)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_boundary(image.astype(np.float32))


def test_resnet_trunk_equals_open_clip_layer3_intermediate() -> None:
    model = random_clip(TINY_RN).eval()
    trunk = ClipResNetTrunk(model.visual, last_stage=3)
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = trunk(images)
        expected = model.visual.forward_intermediates(images, indices=[3], intermediates_only=True)
    assert features.shape == (2, 8 * 16, 64 // 16, 96 // 16)
    assert (trunk.out_channels, trunk.reduction) == (128, 16)
    torch.testing.assert_close(features, expected["image_intermediates"][0])
    assert trunk.layer3 is model.visual.layer3  # shared, not copied
    assert not hasattr(trunk, "layer4")
    with pytest.raises(TypeError, match="ModifiedResNet"):
        ClipResNetTrunk(random_clip(TINY_VIT).visual)
