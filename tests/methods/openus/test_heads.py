"""OpenUS heads against release-style modules (models/head.py iBOTHead of iBOT / OpenUS, the backbone's decoder)."""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visionkit.methods.openus import IBOTHead, PixelShuffleDecoder, WeightNormLinear


def old_weight_norm(layer: nn.Linear) -> nn.Module:
    """``torch.nn.utils.weight_norm`` as the release uses it (deprecated: weight_g / weight_v parameters)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nn.utils.weight_norm(layer)


class ReleasedHead(nn.Module):
    """The released iBOTHead with norm=None, act='gelu', last_norm=None, bottleneck_dim > 0."""

    def __init__(self, in_dim: int, out_dim: int, patch_out_dim: int, hidden: int, bottleneck: int, shared: bool):
        super().__init__()
        act = nn.GELU()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), act, nn.Linear(hidden, hidden), act, nn.Linear(hidden, bottleneck)
        )
        self.last_layer = old_weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        self.last_layer2 = (
            self.last_layer if shared else old_weight_norm(nn.Linear(bottleneck, patch_out_dim, bias=False))
        )
        if not shared:
            self.last_layer2.weight_g.data.fill_(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = nn.functional.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x[:, 0]), self.last_layer2(x[:, 1:])


def randomise(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3 + 0.1)


@pytest.mark.parametrize("shared", [False, True])
def test_release_style_state_dict_loads_and_matches(shared: bool) -> None:
    released = ReleasedHead(12, 20, 20, 16, 8, shared)
    randomise(released, 0)
    state = released.state_dict()
    expected = {
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
        "mlp.4.weight",
        "mlp.4.bias",
        "last_layer.weight_g",
        "last_layer.weight_v",
        "last_layer2.weight_g",
        "last_layer2.weight_v",
    }
    assert set(state) == expected
    head = IBOTHead(12, out_dim=20, patch_out_dim=20, hidden_dim=16, bottleneck_dim=8, shared_head=shared)
    assert set(head.state_dict()) == expected
    head.load_state_dict(state)  # strict
    tokens = torch.randn(3, 1 + 5, 12)
    cls, patches = head(tokens)
    ref_cls, ref_patches = released(tokens)
    assert cls.shape == (3, 20) and patches.shape == (3, 5, 20)
    assert torch.allclose(cls, ref_cls, atol=1e-6) and torch.allclose(patches, ref_patches, atol=1e-6)
    assert (head.last_layer2 is head.last_layer) == shared


def test_hand_built_release_dict_with_different_patch_size() -> None:
    generator = torch.Generator().manual_seed(1)
    v1, v2 = torch.randn(6, 4, generator=generator), torch.randn(5, 4, generator=generator)
    state = OrderedDict(
        [
            ("mlp.0.weight", torch.randn(7, 3, generator=generator)),
            ("mlp.0.bias", torch.randn(7, generator=generator)),
            ("mlp.2.weight", torch.randn(7, 7, generator=generator)),
            ("mlp.2.bias", torch.randn(7, generator=generator)),
            ("mlp.4.weight", torch.randn(4, 7, generator=generator)),
            ("mlp.4.bias", torch.randn(4, generator=generator)),
            ("last_layer.weight_g", torch.full((6, 1), 2.0)),
            ("last_layer.weight_v", v1),
            ("last_layer2.weight_g", torch.ones(5, 1)),
            ("last_layer2.weight_v", v2),
        ]
    )
    head = IBOTHead(3, out_dim=6, patch_out_dim=5, hidden_dim=7, bottleneck_dim=4)
    head.load_state_dict(state)
    tokens = torch.randn(2, 3, 3, generator=generator)
    x = tokens @ state["mlp.0.weight"].T + state["mlp.0.bias"]
    x = F.gelu(x) @ state["mlp.2.weight"].T + state["mlp.2.bias"]
    x = F.gelu(x) @ state["mlp.4.weight"].T + state["mlp.4.bias"]
    x = x / x.norm(dim=-1, keepdim=True)
    w1 = 2.0 * v1 / v1.norm(dim=1, keepdim=True)
    w2 = v2 / v2.norm(dim=1, keepdim=True)
    cls, patches = head(tokens)
    assert torch.allclose(cls, x[:, 0] @ w1.T, atol=1e-6)
    assert torch.allclose(patches, x[:, 1:] @ w2.T, atol=1e-6)
    assert torch.allclose(head.forward_cls(tokens[:, 0]), cls, atol=1e-6)


def test_weight_norm_linear_matches_torch_and_survives_deepcopy() -> None:
    reference = old_weight_norm(nn.Linear(8, 5, bias=False))
    randomise(reference, 2)
    ours = WeightNormLinear(8, 5, fixed_gain=False)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(4, 8)
    assert torch.allclose(ours(x), reference(x), atol=1e-6)
    twin = copy.deepcopy(ours)
    assert torch.allclose(twin(x), ours(x)) and twin.weight_v is not ours.weight_v


def test_initialisation_and_frozen_gains() -> None:
    torch.manual_seed(0)
    head = IBOTHead(64, out_dim=300, patch_out_dim=200, hidden_dim=512, bottleneck_dim=128)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    for linear in linears:
        assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for layer in (head.last_layer, head.last_layer2):
        assert torch.equal(layer.weight_g, torch.ones_like(layer.weight_g)) and not layer.weight_g.requires_grad
        bound = 1 / 128**0.5  # nn.Linear's default (kaiming uniform, a = sqrt 5), not the truncated normal
        assert layer.weight_v.abs().max() <= bound and layer.weight_v.std() > 0.5 * bound / 3**0.5
    trainable = IBOTHead(8, 10, 10, 16, 4, norm_last_layer=False)
    assert trainable.last_layer.weight_g.requires_grad and trainable.last_layer2.weight_g.requires_grad
    one_layer = IBOTHead(8, 10, 10, 16, 4, nlayers=1)
    assert {k for k in one_layer.state_dict() if k.startswith("mlp")} == {"mlp.weight", "mlp.bias"}
    assert one_layer(torch.randn(2, 3, 8))[1].shape == (2, 2, 10)


def test_cancel_last_layer_gradients_in_epoch_zero_only() -> None:
    head = IBOTHead(8, 10, 12, 16, 4, norm_last_layer=False)

    def backward() -> None:
        head.zero_grad(set_to_none=True)
        cls, patches = head(torch.randn(2, 4, 8))
        (cls.sum() + patches.sum()).backward()

    backward()
    assert head.cancel_last_layer_gradients(epoch=0)
    for name, param in head.named_parameters():
        assert (param.grad is None) == name.startswith("last_layer"), name
    backward()
    assert not head.cancel_last_layer_gradients(epoch=1)
    assert all(param.grad is not None for param in head.parameters())
    assert head.cancel_last_layer_gradients(epoch=2, freeze_epochs=3)
    shared = IBOTHead(8, 10, 10, 16, 4, shared_head=True)
    assert len(shared.last_layer_parameters()) == 2  # weight_g and weight_v once


def test_head_errors() -> None:
    with pytest.raises(ValueError, match="shared_head"):
        IBOTHead(8, 10, 12, shared_head=True)
    with pytest.raises(ValueError, match="bottleneck_dim"):
        IBOTHead(8, 10, 10, bottleneck_dim=0)
    with pytest.raises(ValueError, match="nlayers"):
        IBOTHead(8, 10, 10, nlayers=0)
    with pytest.raises(ValueError, match=r"\(B, 1 \+ L, in_dim\)"):
        IBOTHead(8, 10, 10, 16, 4)(torch.randn(2, 8))


def test_pixel_shuffle_decoder_matches_the_release() -> None:
    released = nn.Sequential(nn.Conv2d(16, 4**2 * 3, kernel_size=1), nn.PixelShuffle(4))
    randomise(released, 3)
    decoder = PixelShuffleDecoder(in_dim=16, stride=4, out_chans=3)
    assert set(decoder.state_dict()) == {"0.weight", "0.bias"}
    decoder.load_state_dict(released.state_dict())
    features = torch.randn(2, 16, 3, 2)
    out = decoder(features)
    assert out.shape == (2, 3, 12, 8) and torch.allclose(out, released(features))
    # Channel c·s² + i·s + j of the 1×1 conv lands at pixel (h·s + i, w·s + j) of output channel c.
    conv = F.conv2d(features, decoder[0].weight, decoder[0].bias)
    assert torch.allclose(out[:, 1, 2 * 4 + 3, 1 * 4 + 2], conv[:, 1 * 16 + 3 * 4 + 2, 2, 1])
    parent = nn.Module()
    parent.decoder = decoder
    assert set(parent.state_dict()) == {"decoder.0.weight", "decoder.0.bias"}


def test_pixel_shuffle_decoder_defaults_and_errors() -> None:
    decoder = PixelShuffleDecoder()
    assert decoder[0].weight.shape == (32 * 32 * 3, 768, 1, 1)
    assert decoder(torch.randn(1, 768, 2, 2)).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"\(B, 768, h, w\)"):
        decoder(torch.randn(1, 384, 2, 2))
    with pytest.raises(ValueError, match="positive"):
        PixelShuffleDecoder(stride=0)
