"""Tests of visionkit.registry: timm registration, name checks, checkpoint loading through timm's machinery."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs
from torch import nn

import visionkit
from visionkit import create_model, list_models, register_model, save_state_dict
from visionkit.registry import find_local_weights
from visionkit.weights import CheckpointError, CheckpointMismatchError

TINY = "vk_regtest_tinynet"
PLAIN = "vk_regtest_plainnet"


class TinyNet(nn.Module):
    """A three-level CNN following timm's model contract (feature_info, reset_classifier, forward_head)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, widths: tuple[int, int] = (8, 16)) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = widths[-1]
        self.stem = nn.Conv2d(in_chans, widths[0], 3, stride=2, padding=1)
        self.stages = nn.Sequential(
            nn.Sequential(nn.Conv2d(widths[0], widths[0], 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(widths[0], widths[1], 3, stride=2, padding=1), nn.ReLU()),
        )
        self.feature_info = [
            {"num_chs": widths[0], "reduction": 2, "module": "stem"},
            {"num_chs": widths[0], "reduction": 2, "module": "stages.0"},
            {"num_chs": widths[1], "reduction": 4, "module": "stages.1"},
        ]
        self.head = nn.Linear(widths[-1], num_classes) if num_classes else nn.Identity()

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map the "original" layout (``backbone.conv_stem``, ``backbone.blocks.i``, ``fc``) to TinyNet's keys."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace("backbone.conv_stem.", "stem.").replace("backbone.blocks.", "stages.")
        out[re.sub(r"^fc\.", "head.", key)] = value
    return out


default_cfgs = generate_default_cfgs(
    {
        f"{TINY}.regtest_in1k": {
            "url": "https://example.invalid/vk_regtest_tinynet.pth",
            "num_classes": 10,
            "input_size": (3, 32, 32),
            "first_conv": "stem",
            "classifier": "head",
        }
    }
)


@register_model
def vk_regtest_tinynet(pretrained: bool = False, **kwargs: Any) -> TinyNet:
    return build_model_with_cfg(
        TinyNet,
        TINY,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"flatten_sequential": True},
        **kwargs,
    )


@register_model
def vk_regtest_plainnet(pretrained: bool = False, **kwargs: Any) -> TinyNet:
    """An entry that builds the class directly, bypassing timm's builder (and ignoring its arguments)."""
    for timm_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only", "out_indices"):
        kwargs.pop(timm_only, None)
    return TinyNet(**kwargs)


@pytest.fixture(autouse=True)
def _no_user_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the user's ~/.cache/visionkit and $VISIONKIT_WEIGHTS out of these tests."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VISIONKIT_WEIGHTS", raising=False)


def _seeded(name: str, seed: int, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, **kwargs).eval()


def _image(size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------------- registration


def test_registered_models_are_timm_models_and_listed() -> None:
    model = timm.create_model(TINY)
    assert isinstance(model, TinyNet)
    assert model.pretrained_cfg["tag"] == "regtest_in1k"
    assert TINY in timm.list_models("vk_regtest_*")
    assert list_models("*regtest*") == [PLAIN, TINY]
    assert "resnet18" not in list_models()
    with_timm = list_models("resnet1*", include_timm=True)
    assert "resnet18" in with_timm and with_timm == sorted(with_timm)


def test_register_model_refuses_to_shadow_timm() -> None:
    def resnet18(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return nn.Identity()

    with pytest.raises(ValueError, match=r"'resnet18' .* is already a timm model; .* rename the entry function"):
        register_model(resnet18)
    assert isinstance(timm.create_model("resnet18", num_classes=2), timm.models.ResNet)


def test_register_model_refuses_a_name_of_another_visionkit_module() -> None:
    def vk_regtest_tinynet(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return nn.Identity()

    vk_regtest_tinynet.__module__ = "visionkit.models.elsewhere"
    with pytest.raises(ValueError, match=rf"'{TINY}' is registered by {re.escape(__name__)} already"):
        register_model(vk_regtest_tinynet)
    assert isinstance(create_model(TINY), TinyNet)


def test_visionkit_top_level_exports() -> None:
    assert visionkit.create_model is create_model and visionkit.register_model is register_model


# ----------------------------------------------------------------------------------------------- names and kwargs


@pytest.mark.parametrize("name", ["./resnet18", "weights/resnet18.pth", "C:\\models\\resnet18", "timm/resnet18"])
def test_path_like_names_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match=r"has no source prefix but looks like .* pass its name and checkpoint_path="):
        create_model(name)


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(ValueError, match=r"Unknown model 'resnt18'\. Close matches: resnet18\b"):
        create_model("resnt18")
    with pytest.raises(ValueError, match=rf"Unknown model 'vk_regtest_tinynt'\. Close matches: {TINY}"):
        create_model("vk_regtest_tinynt")
    with pytest.raises(ValueError, match="non-empty string"):
        create_model("")


def test_none_kwargs_are_dropped() -> None:
    # the plain entry forwards kwargs to TinyNet, which has no drop_rate argument
    assert isinstance(create_model(PLAIN, drop_rate=None, num_classes=None), TinyNet)
    with pytest.raises(TypeError, match="drop_rate"):
        create_model(PLAIN, drop_rate=0.1)


def test_out_indices_needs_features_only() -> None:
    with pytest.raises(ValueError, match=r"out_indices=\(1, 2\) needs features_only=True"):
        create_model("resnet18", out_indices=(1, 2))


def test_pretrained_and_checkpoint_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="either pretrained=True or checkpoint_path"):
        create_model("resnet18", pretrained=True, checkpoint_path=tmp_path / "w.pth")


# ----------------------------------------------------------------------------------------------- checkpoints

ARCHS = [
    ("resnet18", {}),
    ("convnext_atto", {}),
    ("vit_tiny_patch16_224", {"img_size": 32}),
    (TINY, {}),
]


@pytest.mark.parametrize(("name", "kwargs"), ARCHS, ids=[a for a, _ in ARCHS])
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path: Path, name: str, kwargs: dict[str, Any]) -> None:
    source = _seeded(name, 0, **kwargs)
    path = save_state_dict(source.state_dict(), tmp_path / f"{name}.safetensors")
    assert not _same_state(source, _seeded(name, 1, **kwargs))  # different seeds give different weights
    loaded = _seeded(name, 1, checkpoint_path=path, **kwargs)
    assert _same_state(source, loaded)
    x = _image()
    assert torch.equal(source(x), loaded(x))
    assert "state_dict" not in loaded.pretrained_cfg  # the tensors are not kept alive on the model
    assert loaded.pretrained_cfg["file"] == str(path)


@pytest.mark.parametrize(
    ("name", "kwargs", "out_indices"),
    [("resnet18", {}, (1, 3)), ("convnext_atto", {}, (0, 2)), ("vit_tiny_patch16_224", {"img_size": 32}, (2, 11))],
    ids=["resnet18", "convnext_atto", "vit_tiny"],
)
def test_features_only_with_checkpoint_matches_intermediates(
    tmp_path: Path, name: str, kwargs: dict[str, Any], out_indices: tuple[int, ...]
) -> None:
    source = _seeded(name, 0, **kwargs)
    path = save_state_dict(source.state_dict(), tmp_path / f"{name}.pth")
    features = _seeded(name, 1, checkpoint_path=path, features_only=True, out_indices=out_indices, **kwargs)
    x = _image()
    expected = source.forward_intermediates(x, indices=out_indices, intermediates_only=True)
    actual = features(x)
    assert len(actual) == len(out_indices)
    for got, want in zip(actual, expected, strict=True):
        assert torch.equal(got, want)
    assert all("state_dict" not in m.__dict__.get("pretrained_cfg", {}) for m in features.modules())


def test_family_filter_fn_maps_an_original_layout(tmp_path: Path) -> None:
    source = _seeded(TINY, 0)
    original = {}
    for key, value in source.state_dict().items():
        key = key.replace("stem.", "backbone.conv_stem.").replace("stages.", "backbone.blocks.")
        original[key.replace("head.", "fc.")] = value
    path = save_state_dict(original, tmp_path / "original.pth")
    x = _image()
    assert torch.equal(_seeded(TINY, 1, checkpoint_path=path)(x), source(x))
    features = _seeded(TINY, 1, checkpoint_path=path, features_only=True, out_indices=(0, 2))
    stem = source.stem(x)
    got = features(x)
    assert torch.equal(got[0], stem)
    assert torch.equal(got[1], source.stages(stem))


def test_entry_without_timm_builder_loads_strictly(tmp_path: Path) -> None:
    source = _seeded(PLAIN, 0)
    path = save_state_dict(source.state_dict(), tmp_path / "plain.safetensors")
    x = _image()
    assert torch.equal(_seeded(PLAIN, 1, checkpoint_path=path)(x), source(x))
    with pytest.raises(CheckpointError, match=r"does not build through timm\.models\.build_model_with_cfg"):
        create_model(PLAIN, checkpoint_path=path, features_only=True)
    state = source.state_dict()
    state["extra"] = torch.zeros(1)
    bad = save_state_dict(state, tmp_path / "plain_bad.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(1\): extra"):
        create_model(PLAIN, checkpoint_path=bad)


def test_checkpoint_key_selects_ema(tmp_path: Path) -> None:
    plain, ema = _seeded("resnet18", 0, num_classes=3), _seeded("resnet18", 1, num_classes=3)
    torch.save({"state_dict": plain.state_dict(), "state_dict_ema": ema.state_dict()}, tmp_path / "train.pth")
    assert _same_state(create_model("resnet18", checkpoint_path=tmp_path / "train.pth"), plain)
    assert _same_state(
        create_model("resnet18", checkpoint_path=tmp_path / "train.pth", checkpoint_key="state_dict_ema"), ema
    )


def test_missing_checkpoint_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"Checkpoint not found: {re.escape(str(path))}"):
        create_model("resnet18", checkpoint_path=path)


@pytest.mark.parametrize(
    "kwargs", [{}, {"features_only": True}, {"num_classes": 3}], ids=["strict", "features_only", "new_head"]
)
def test_unexpected_and_missing_keys_are_errors(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    # features_only and a new head make timm load non-strictly; the result must still be checked
    state = _seeded("vit_tiny_patch16_224", 0, img_size=32).state_dict()
    state["extra.weight"] = torch.zeros(2)
    del state["blocks.0.norm1.weight"]
    path = save_state_dict(state, tmp_path / "vit_bad.safetensors")
    with pytest.raises(CheckpointMismatchError) as caught:
        create_model("vit_tiny_patch16_224", img_size=32, checkpoint_path=path, **kwargs)
    assert str(caught.value).splitlines() == [
        f"Checkpoint {path} does not fit model 'vit_tiny_patch16_224':",
        "missing keys (1): blocks.0.norm1.weight",
        "unexpected keys (1): extra.weight",
    ]


def test_shape_mismatch_is_an_error(tmp_path: Path) -> None:
    state = _seeded("resnet18", 0).state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3)
    path = save_state_dict(state, tmp_path / "shape.pth")
    for kwargs in ({}, {"features_only": True}):
        with pytest.raises(CheckpointMismatchError, match=r"other problems \(1\): size mismatch for layer1\.0\.conv1"):
            create_model("resnet18", checkpoint_path=path, **kwargs)


def test_lightning_prefix_gets_a_hint(tmp_path: Path) -> None:
    state = {f"model.{k}": v for k, v in _seeded("resnet18", 0).state_dict().items()}
    path = save_state_dict(state, tmp_path / "task.pth")
    with pytest.raises(CheckpointMismatchError, match=r"extra 'model\.' prefix .*strip_prefixes="):
        create_model("resnet18", checkpoint_path=path)


# ----------------------------------------------------------------------------------------------- head and stem


def test_num_classes_defaults_to_the_checkpoint_head(tmp_path: Path) -> None:
    source = _seeded("resnet18", 0, num_classes=10)
    path = save_state_dict(source.state_dict(), tmp_path / "r10.safetensors")
    loaded = _seeded("resnet18", 1, checkpoint_path=path)
    assert loaded.num_classes == 10
    assert torch.equal(loaded(_image()), source(_image()))
    assert _same_state(_seeded("resnet18", 1, checkpoint_path=path, num_classes=10), source)


def test_new_num_classes_keeps_the_backbone_and_makes_a_new_head(tmp_path: Path) -> None:
    source = _seeded("convnext_atto", 0)
    path = save_state_dict(source.state_dict(), tmp_path / "c.safetensors")
    adapted = _seeded("convnext_atto", 1, checkpoint_path=path, num_classes=7)
    assert adapted.get_classifier().out_features == 7
    reference = source.state_dict()
    for key, value in adapted.state_dict().items():
        if not key.startswith("head.fc."):
            assert torch.equal(value, reference[key]), key
    x = _image()
    assert torch.equal(
        adapted.forward_head(adapted.forward_features(x), pre_logits=True),
        source.forward_head(source.forward_features(x), pre_logits=True),
    )


def test_headless_checkpoint_needs_num_classes(tmp_path: Path) -> None:
    path = save_state_dict(_seeded("resnet18", 0, num_classes=0).state_dict(), tmp_path / "backbone.safetensors")
    with pytest.raises(
        CheckpointMismatchError, match=r"missing keys \(2\): fc\.weight, fc\.bias\nThe checkpoint has no"
    ):
        create_model("resnet18", checkpoint_path=path)
    assert create_model("resnet18", checkpoint_path=path, num_classes=5).fc.out_features == 5
    assert isinstance(create_model("resnet18", checkpoint_path=path, num_classes=0).fc, nn.Identity)


def test_in_chans_adapts_the_stem(tmp_path: Path) -> None:
    source = _seeded("resnet18", 0)
    path = save_state_dict(source.state_dict(), tmp_path / "r.safetensors")
    gray = create_model("resnet18", checkpoint_path=path, in_chans=1)
    # timm's adapt_input_conv sums the RGB filters for a single input channel
    torch.testing.assert_close(gray.conv1.weight[:, 0], source.conv1.weight.sum(dim=1))


# ----------------------------------------------------------------------------------------------- pretrained=True


def test_pretrained_visionkit_model_without_local_file_explains_where_to_put_it(tmp_path: Path) -> None:
    expected = tmp_path / "home" / ".cache" / "visionkit" / "weights" / f"{TINY}.regtest_in1k.safetensors"
    with pytest.raises(FileNotFoundError) as caught:
        create_model(TINY, pretrained=True)
    message = str(caught.value)
    assert "https://example.invalid/vk_regtest_tinynet.pth" in message
    assert str(expected) in message and "VISIONKIT_WEIGHTS" in message and "never downloads" in message


@pytest.mark.parametrize("stem", [TINY, f"{TINY}.regtest_in1k"])
def test_pretrained_visionkit_model_from_weights_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stem: str
) -> None:
    source = _seeded(TINY, 0)
    weights_dir = tmp_path / "weights"
    path = save_state_dict(source.state_dict(), weights_dir / f"{stem}.safetensors")
    monkeypatch.setenv("VISIONKIT_WEIGHTS", str(weights_dir))
    assert find_local_weights(TINY) == path
    assert _same_state(_seeded(TINY, 1, pretrained=True), source)


def test_pretrained_timm_model_goes_to_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def fake_create_model(name: str, **kwargs: Any) -> nn.Module:
        calls.append((name, kwargs))
        return nn.Identity()

    monkeypatch.setattr(timm, "create_model", fake_create_model)
    create_model("resnet18.a1_in1k", pretrained=True, num_classes=4, drop_rate=None)
    assert calls == [("resnet18.a1_in1k", {"pretrained": True, "num_classes": 4})]


def test_global_hooks_are_removed(tmp_path: Path) -> None:
    from torch.nn.modules import module as torch_module

    before = len(torch_module._global_module_registration_hooks)
    path = save_state_dict(_seeded(TINY, 0).state_dict(), tmp_path / "t.safetensors")
    model = create_model(TINY, checkpoint_path=path)
    assert len(torch_module._global_module_registration_hooks) == before
    assert all(not m._load_state_dict_post_hooks for m in model.modules())
