"""VMamba v2: state-dict layout against the official code, parameter counts, official checkpoint loading, SS2D against
a straightforward re-implementation, timm contract, mask token, gradients and the multi-scale wrapper."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

import visionkit.models.backbones  # noqa: F401  (registers the VMamba sizes)
from visionkit import create_model
from visionkit.models.backbones.ss2d import SS2D
from visionkit.models.backbones.vmamba import VSSM, checkpoint_filter_fn
from visionkit.models.heads.pyramid import build_multiscale_backbone
from visionkit.ops.selective_scan import selective_scan_reference
from visionkit.weights import CheckpointMismatchError

BACKEND = "torch"  # the scan backend of these tests ("auto" would pick numba on CPU)


def _test_model(**kwargs) -> VSSM:
    return create_model("vmamba_test", scan_backend=BACKEND, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# (1) state-dict layout, derived by hand from MzeroMiko/VMamba vmamba.py (SS2Dv2.__initv2__, VSSBlock, VSSM
# _make_patch_embed "v2", _make_downsample "v3", classifier), for dims (16, 32, 64, 128), depths (1, 1, 1, 1),
# ssm_ratio 2, d_state 1, dt_rank ceil(dim / 16), mlp_ratio 4, 1000 classes.
# ---------------------------------------------------------------------------------------------------------------------
def _official_block(prefix: str, dim: int, d_inner: int, rank: int, d_state: int = 1) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.norm.weight": (dim,),
        f"{prefix}.norm.bias": (dim,),
        f"{prefix}.op.x_proj_weight": (4, rank + 2 * d_state, d_inner),
        f"{prefix}.op.dt_projs_weight": (4, d_inner, rank),
        f"{prefix}.op.dt_projs_bias": (4, d_inner),
        f"{prefix}.op.A_logs": (4 * d_inner, d_state),
        f"{prefix}.op.Ds": (4 * d_inner,),
        f"{prefix}.op.in_proj.weight": (d_inner, dim),
        f"{prefix}.op.conv2d.weight": (d_inner, 1, 3, 3),
        f"{prefix}.op.out_norm.weight": (d_inner,),
        f"{prefix}.op.out_norm.bias": (d_inner,),
        f"{prefix}.op.out_proj.weight": (dim, d_inner),
        f"{prefix}.norm2.weight": (dim,),
        f"{prefix}.norm2.bias": (dim,),
        f"{prefix}.mlp.fc1.weight": (4 * dim, dim),
        f"{prefix}.mlp.fc1.bias": (4 * dim,),
        f"{prefix}.mlp.fc2.weight": (dim, 4 * dim),
        f"{prefix}.mlp.fc2.bias": (dim,),
    }


VMAMBA_TEST_KEYS: dict[str, tuple[int, ...]] = {
    "patch_embed.0.weight": (8, 3, 3, 3),
    "patch_embed.0.bias": (8,),
    "patch_embed.2.weight": (8,),
    "patch_embed.2.bias": (8,),
    "patch_embed.5.weight": (16, 8, 3, 3),
    "patch_embed.5.bias": (16,),
    "patch_embed.7.weight": (16,),
    "patch_embed.7.bias": (16,),
    **_official_block("layers.0.blocks.0", 16, 32, 1),
    "layers.0.downsample.1.weight": (32, 16, 3, 3),
    "layers.0.downsample.1.bias": (32,),
    "layers.0.downsample.3.weight": (32,),
    "layers.0.downsample.3.bias": (32,),
    **_official_block("layers.1.blocks.0", 32, 64, 2),
    "layers.1.downsample.1.weight": (64, 32, 3, 3),
    "layers.1.downsample.1.bias": (64,),
    "layers.1.downsample.3.weight": (64,),
    "layers.1.downsample.3.bias": (64,),
    **_official_block("layers.2.blocks.0", 64, 128, 4),
    "layers.2.downsample.1.weight": (128, 64, 3, 3),
    "layers.2.downsample.1.bias": (128,),
    "layers.2.downsample.3.weight": (128,),
    "layers.2.downsample.3.bias": (128,),
    **_official_block("layers.3.blocks.0", 128, 256, 8),
    "classifier.norm.weight": (128,),
    "classifier.norm.bias": (128,),
    "classifier.head.weight": (1000, 128),
    "classifier.head.bias": (1000,),
}


def test_vmamba_test_state_dict_matches_the_official_layout():
    with torch.device("meta"):
        model = create_model("vmamba_test")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == VMAMBA_TEST_KEYS


def test_vmamba_small_stage3_last_block_keys():
    with torch.device("meta"):
        model = create_model("vmamba_small")
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # dim 384, d_inner 768, dt_rank ceil(384 / 16) = 24, d_state 1 (docs/models/vmamba.md, "Per-stage shapes").
    assert {k: v for k, v in state.items() if k.startswith("layers.2.blocks.14.op.")} == {
        "layers.2.blocks.14.op.x_proj_weight": (4, 26, 768),
        "layers.2.blocks.14.op.dt_projs_weight": (4, 768, 24),
        "layers.2.blocks.14.op.dt_projs_bias": (4, 768),
        "layers.2.blocks.14.op.A_logs": (3072, 1),
        "layers.2.blocks.14.op.Ds": (3072,),
        "layers.2.blocks.14.op.in_proj.weight": (768, 384),
        "layers.2.blocks.14.op.conv2d.weight": (768, 1, 3, 3),
        "layers.2.blocks.14.op.out_norm.weight": (768,),
        "layers.2.blocks.14.op.out_norm.bias": (768,),
        "layers.2.blocks.14.op.out_proj.weight": (384, 768),
    }
    assert "layers.2.blocks.15.norm.weight" not in state and "layers.3.downsample.1.weight" not in state
    assert state["layers.3.blocks.1.op.x_proj_weight"] == (4, 48 + 2, 1536)
    assert state["patch_embed.0.weight"] == (48, 3, 3, 3) and state["classifier.head.weight"] == (1000, 768)


# (2) parameter counts: VMamba's analyze scripts print Params 30249064 (tiny s1l8), 50147752 (small), 88557800 (base);
# the README rounds them to 30M / 50M / 89M.
@pytest.mark.parametrize(
    ("name", "official"), [("vmamba_tiny", 30_249_064), ("vmamba_small", 50_147_752), ("vmamba_base", 88_557_800)]
)
def test_parameter_counts_equal_the_official_ones(name, official):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == official


def test_tiny_small_base_configs():
    with torch.device("meta"):
        tiny, small, base = (create_model(n) for n in ("vmamba_tiny", "vmamba_small", "vmamba_base"))
    assert [len(s.blocks) for s in tiny.layers] == [2, 2, 8, 2] and tiny.layers[0].blocks[0].op.d_inner == 96
    assert [len(s.blocks) for s in small.layers] == [2, 2, 15, 2] and small.layers[0].blocks[0].op.d_inner == 192
    assert base.dims == [128, 256, 512, 1024] and base.layers[3].blocks[1].op.d_inner == 2048
    # Stochastic depth linear from 0 to drop_path over all blocks: the last block of each model gets the maximum.
    for model, rate in ((tiny, 0.2), (small, 0.3), (base, 0.6)):
        assert model.layers[3].blocks[-1].drop_path.drop_prob == pytest.approx(rate)
        assert not hasattr(model.layers[0].blocks[0].drop_path, "drop_prob")  # rate 0: Identity


# ---------------------------------------------------------------------------------------------------------------------
# (3) an official-format checkpoint ({"model": state} with legacy key names) loads with no missing/unexpected keys
# ---------------------------------------------------------------------------------------------------------------------
LEGACY_NAMES = (
    (r"^patch_embed\.0\.", "patch_embed.proj."),
    (r"^patch_embed\.2\.", "patch_embed.norm."),
    (r"^(layers\.\d+\.blocks\.\d+)\.norm\.", r"\1.ln_1."),
    (r"^(layers\.\d+\.blocks\.\d+)\.op\.", r"\1.self_attention."),
    (r"^classifier\.norm\.", "norm."),
    (r"^classifier\.head\.", "head."),
)


def _legacy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, replacement in LEGACY_NAMES:
            key = re.sub(pattern, replacement, key)
        out[key] = value.clone()
    return out


def test_official_format_checkpoint_with_legacy_names_loads_exactly(tmp_path):
    torch.manual_seed(0)
    source = _test_model().eval()
    legacy = _legacy(source.state_dict())
    assert "head.weight" in legacy and "layers.1.blocks.0.self_attention.A_logs" in legacy
    path = tmp_path / "vssm_official.pth"
    torch.save({"model": legacy, "epoch": 264, "max_accuracy": 82.6}, path)
    loaded = create_model("vmamba_test", checkpoint_path=path, scan_backend=BACKEND).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_checkpoint_as_backbone_and_mismatch_errors(tmp_path):
    torch.manual_seed(0)
    source = _test_model().eval()
    path = tmp_path / "official.pth"
    torch.save({"model": source.state_dict()}, path)
    x = torch.randn(1, 3, 64, 64)
    headless = create_model("vmamba_test", checkpoint_path=path, num_classes=0, scan_backend=BACKEND).eval()
    features = create_model("vmamba_test", checkpoint_path=path, features_only=True, scan_backend=BACKEND).eval()
    with torch.no_grad():
        torch.testing.assert_close(headless(x), source.forward_head(source.forward_features(x), pre_logits=True))
        expected = source.forward_intermediates(x, intermediates_only=True)
        for got, want in zip(features(x), expected, strict=True):
            torch.testing.assert_close(got, want)
    state = source.state_dict()
    del state["layers.1.blocks.0.op.Ds"]
    torch.save({"model": {**state, "stray.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointMismatchError, match=r"layers\.1\.blocks\.0\.op\.Ds[\s\S]*stray\.weight"):
        create_model("vmamba_test", checkpoint_path=path, scan_backend=BACKEND)


def test_checkpoint_filter_drops_backbone_and_openus_extras_only():
    model = _test_model()
    state = dict(model.state_dict())
    extras = {
        "outnorm0.weight": torch.ones(16),
        "decoder.0.weight": torch.zeros(3072, 128, 1, 1),
        "decoder2.0.bias": torch.zeros(768),
        "ema_loss_map": torch.zeros(49),
        "ema_initialized": torch.tensor(True),
        "masked_embed": torch.zeros(1, 16),
    }
    filtered = checkpoint_filter_fn({"state_dict": {**state, **extras, "pos_embed": torch.zeros(1)}}, model)
    assert set(filtered) == {*state, "pos_embed"}  # an unknown key is passed on so that the loader reports it
    masked = _test_model(mask_token=True)
    kept = checkpoint_filter_fn({"model": {**masked.state_dict(), "outnorm3.bias": torch.zeros(128)}}, masked)
    assert set(kept) == set(masked.state_dict())  # the mask token stays when the model has one


def test_linear2d_loads_a_1x1_conv_weight():
    model = _test_model()
    state = model.state_dict()
    state["layers.0.blocks.0.op.in_proj.weight"] = torch.randn(32, 16, 1, 1)
    model.load_state_dict(state)
    loaded = model.layers[0].blocks[0].op.in_proj.weight
    torch.testing.assert_close(loaded, state["layers.0.blocks.0.op.in_proj.weight"].flatten(1))


# ---------------------------------------------------------------------------------------------------------------------
# (4) SS2D against an explicit four-direction re-implementation with the sequential reference scan
# ---------------------------------------------------------------------------------------------------------------------
def _ss2d_by_hand(m: SS2D, x: torch.Tensor) -> torch.Tensor:
    batch, _, height, width = x.shape
    d_inner, rank, n = m.d_inner, m.dt_rank, m.d_state
    length = height * width
    h = torch.einsum("oc,bchw->bohw", m.in_proj.weight, x)
    h = F.silu(F.conv2d(h, m.conv2d.weight, m.conv2d.bias, padding=1, groups=d_inner))

    def to_sequence(k: int, t: torch.Tensor) -> torch.Tensor:
        seq = t.reshape(batch, d_inner, length) if k in (0, 2) else t.transpose(2, 3).reshape(batch, d_inner, length)
        return seq.flip(-1) if k >= 2 else seq

    def to_map(k: int, seq: torch.Tensor) -> torch.Tensor:
        seq = seq.flip(-1) if k >= 2 else seq
        if k in (0, 2):
            return seq.reshape(batch, d_inner, height, width)
        return seq.reshape(batch, d_inner, width, height).transpose(2, 3)

    a = -torch.exp(m.A_logs).view(4, d_inner, n)
    total = torch.zeros(batch, d_inner, height, width, dtype=x.dtype)
    for k in range(4):
        u = to_sequence(k, h)
        proj = torch.einsum("cd,bdl->bcl", m.x_proj_weight[k], u)
        dt_low, b, c = proj[:, :rank], proj[:, rank : rank + n], proj[:, rank + n :]
        delta = torch.einsum("dr,brl->bdl", m.dt_projs_weight[k], dt_low)
        y = selective_scan_reference(
            u, delta, a[k], b, c, D=m.Ds.view(4, d_inner)[k], delta_bias=m.dt_projs_bias[k], delta_softplus=True
        )
        total = total + to_map(k, y)
    y = F.layer_norm(total.permute(0, 2, 3, 1), (d_inner,), m.out_norm.weight, m.out_norm.bias, 1e-5)
    return torch.einsum("oc,bhwc->bohw", m.out_proj.weight, y)


@pytest.mark.parametrize("d_state", [1, 2])
def test_ss2d_equals_four_explicit_directions(d_state):
    torch.manual_seed(0)
    m = SS2D(8, d_state=d_state, ssm_ratio=2.0, scan_backend=BACKEND).double()
    with torch.no_grad():  # move every parameter away from its structured initial value
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)  # non-square, so row- and column-major orders differ
    with torch.no_grad():
        torch.testing.assert_close(m(x), _ss2d_by_hand(m, x), rtol=1e-10, atol=1e-10)


def test_ss2d_initialisation_follows_mamba_init():
    torch.manual_seed(0)
    m = SS2D(96, d_state=1, ssm_ratio=2.0)
    assert m.dt_rank == 6 and m.d_inner == 192
    assert torch.equal(m.A_logs, torch.zeros(768, 1)) and torch.equal(m.Ds, torch.ones(768))
    dt = F.softplus(m.dt_projs_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert m.dt_projs_weight.abs().max() <= 6**-0.5 and m.x_proj_weight.abs().max() <= 192**-0.5
    with pytest.raises(ValueError, match="odd d_conv"):
        SS2D(8, d_conv=2)
    with pytest.raises(ValueError, match="dt_rank"):
        SS2D(8, dt_rank="big")


# ---------------------------------------------------------------------------------------------------------------------
# (5) timm contract
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # a fresh interpreter (timm import) takes ~8 s
def test_import_visionkit_registers_the_models_with_timm():
    code = (
        "import timm, visionkit; "
        "names = set(visionkit.list_models('vmamba_*')); "
        "assert {'vmamba_tiny', 'vmamba_small', 'vmamba_base', 'vmamba_test'} <= names; "
        "m = timm.create_model('vmamba_test', scan_backend='torch'); print(type(m).__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "VSSM"


def test_features_only_gives_four_maps_at_strides_4_to_32():
    model = timm.create_model("vmamba_test", features_only=True, scan_backend=BACKEND)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [16, 32, 64, 128]
    maps = model(torch.randn(2, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 24), (2, 32, 8, 12), (2, 64, 4, 6), (2, 128, 2, 3)]


def test_forward_intermediates_forward_features_and_head():
    torch.manual_seed(0)
    model = _test_model().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        features = model.forward_features(x)
        torch.testing.assert_close(final, features)
        torch.testing.assert_close(maps[-1], features)
        assert [m.shape[1:] for m in maps] == [(16, 16, 24), (32, 8, 12), (64, 4, 6), (128, 2, 3)]
        # Each intermediate is the stage output before its downsampling.
        torch.testing.assert_close(model.layers[2].forward_blocks(model.layers[1].downsample(maps[1])), maps[2])
        pooled = model.forward_head(features, pre_logits=True)
        manual = model.classifier.norm(features).mean(dim=(2, 3))
        torch.testing.assert_close(pooled, manual)
        torch.testing.assert_close(model(x), model.classifier.head(manual))
        normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], model.classifier.norm(features))
        early = model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], maps[2])
        torch.testing.assert_close(early[1], maps[3])
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_reset_classifier_and_pruning():
    model = _test_model()
    assert model.get_classifier().out_features == 1000 and model.num_classes == 1000
    model.reset_classifier(7)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 128)
    model.reset_classifier(0, global_pool="")
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 128, 1, 1)
    with pytest.raises(ValueError, match="global_pool='avg'"):
        model.reset_classifier(5)
    with pytest.raises(ValueError, match="global_pool 'avg' or ''"):
        model.reset_classifier(5, global_pool="max")
    pruned = _test_model()
    assert pruned.prune_intermediate_layers([0, 1]) == [0, 1]
    assert len(pruned.layers) == 2 and pruned.num_features == 32
    assert isinstance(pruned.layers[1].downsample, torch.nn.Identity)
    assert [m.shape[1] for m in pruned.forward_intermediates(torch.randn(1, 3, 32, 32), indices=[0, 1])[1]] == [16, 32]


def test_metadata_for_optimisers():
    model = _test_model(mask_token=True)
    no_decay = model.no_weight_decay()
    assert "masked_embed" in no_decay and "layers.3.blocks.0.op.A_logs" in no_decay
    assert "layers.0.blocks.0.op.Ds" in no_decay and not any("x_proj" in n for n in no_decay)
    groups = timm.optim.param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=no_decay)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    layer_of = timm.models.group_parameters(model, model.group_matcher(), reverse=False)
    assert len(layer_of) > 4  # stem, each block, each downsample, final norm
    model.set_grad_checkpointing(True)
    x = torch.randn(1, 3, 32, 32)
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n != "masked_embed")


# ---------------------------------------------------------------------------------------------------------------------
# (6) mask token
# ---------------------------------------------------------------------------------------------------------------------
def test_mask_token_replaces_masked_positions_only():
    torch.manual_seed(0)
    model = _test_model(mask_token=True).eval()
    with torch.no_grad():
        model.masked_embed.normal_()
    x = torch.randn(2, 3, 64, 64)  # patch-embed grid 16 x 16
    none = torch.zeros(2, 16, 16, dtype=torch.bool)
    coarse = torch.zeros(2, 2, 2, dtype=torch.bool)
    coarse[0, 1, 0] = True  # one 8 x 8 block of the first image
    fine = coarse.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)
    with torch.no_grad():
        plain = model.forward_features(x)
        torch.testing.assert_close(model.forward_features(x, mask=none), plain, rtol=0, atol=0)
        masked = model.forward_features(x, mask=coarse)
        torch.testing.assert_close(model.forward_features(x, mask=fine), masked, rtol=0, atol=0)
        assert not torch.allclose(masked[0], plain[0])
        torch.testing.assert_close(masked[1], plain[1])  # the unmasked image is unaffected
        embedded = model._embed(x, coarse)
        assert torch.equal(embedded[0, :, 8:16, 0:8], model.masked_embed[0, :, None, None].expand(16, 8, 8))
        assert torch.equal(embedded[0, :, :8], model.patch_embed(x)[0, :, :8])
        inter = model.forward_intermediates(x, mask=coarse, intermediates_only=True)
        torch.testing.assert_close(inter[-1], masked)


def test_mask_errors():
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="without a mask token; create it with mask_token=True"):
        _test_model()(x, mask=torch.zeros(2, 16, 16, dtype=torch.bool))
    model = _test_model(mask_token=True)
    with pytest.raises(ValueError, match=r"mask grid 3x3 must divide the patch-embed grid 16x16"):
        model(x, mask=torch.zeros(2, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"shape \(B, h, w\) with B=2"):
        model(x, mask=torch.zeros(1, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor"):
        model(x, mask=torch.zeros(2, 16, 16))


# (7) gradients reach every parameter, the mask token included
def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = _test_model(mask_token=True, drop_path_rate=0.1).train()
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 1:3, 1:3] = True
    model(torch.randn(2, 3, 64, 64), mask=mask).logsumexp(dim=1).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert model.masked_embed.grad.abs().sum() > 0


# (8) the multi-scale wrapper the detection and segmentation tasks use
def test_build_multiscale_backbone():
    pyramid = build_multiscale_backbone(_test_model())
    assert pyramid.mode == "intermediates" and pyramid.channels == [16, 32, 64, 128]
    maps = pyramid(torch.randn(2, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 24), (2, 32, 8, 12), (2, 64, 4, 6), (2, 128, 2, 3)]
    sum(m.square().mean() for m in maps).backward()
    assert [n for n, p in pyramid.named_parameters() if p.grad is None] == []


def test_odd_input_sizes_round_up_like_the_convolutions():
    model = _test_model()
    maps = model.forward_intermediates(torch.randn(1, 3, 50, 70), intermediates_only=True)
    sizes = [(50, 70)]
    for _ in range(5):
        sizes.append(tuple(math.ceil(s / 2) for s in sizes[-1]))
    assert [tuple(m.shape[2:]) for m in maps] == sizes[2:]
