"""ModSquadViT: release layout and sizes, task selection, timm contract, feature pyramid, upcycling from a dense ViT,
routing hooks and per-task gradients, and the Mod-Squad method tools (statistics, MI loss, extraction, add_task)."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay

import visionkit
from visionkit import create_model
from visionkit.methods.modsquad import (
    add_task,
    attach_routing_stats,
    extract_task_model,
    moe_layers,
    mutual_information_total,
)
from visionkit.models.backbones.modsquad_vit import ModSquadViT, checkpoint_filter_fn
from visionkit.models.heads.pyramid import build_multiscale_backbone

TASKS = ("a", "b", "c")


def _model(**kwargs) -> ModSquadViT:
    torch.manual_seed(0)
    return create_model("modsquad_vit_test", **{"task_names": TASKS, "num_classes": 5, **kwargs})


def _images(*size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, *(size or (64, 64)), generator=torch.Generator().manual_seed(seed))


# --- layout and sizes -------------------------------------------------------------------------------------------------
def test_registered_and_built_with_the_release_layout():
    assert visionkit.list_models("modsquad_vit_*") == ["modsquad_vit_base", "modsquad_vit_small", "modsquad_vit_test"]
    shapes = {k: tuple(v.shape) for k, v in _model().state_dict().items()}
    # models_moe.py names: MoETaskAttention (q_proj = TaskMoE, kv_proj = Sequential(Linear)), Attention, TaskMoE, Mlp
    assert shapes["blocks.0.attn.q_proj.experts.w"] == (6, 32, 32)
    assert shapes["blocks.0.attn.q_proj.output_experts.w"] == (6, 32, 32)
    assert shapes["blocks.0.attn.q_proj.f_gate.2.0.weight"] == (6, 32)
    assert shapes["blocks.0.attn.kv_proj.0.weight"] == (64, 32) and shapes["blocks.0.mlp.fc1.weight"] == (128, 32)
    assert shapes["blocks.1.attn.qkv.weight"] == (3 * 2 * 32, 32) and shapes["blocks.1.attn.proj.weight"] == (32, 64)
    assert shapes["blocks.1.mlp.experts.w"] == (4, 32, 64) and shapes["blocks.1.mlp.output_experts.b"] == (4, 32)
    assert shapes["blocks.3.mlp.f_gate.0.0.weight"] == (4, 32)
    assert shapes["task_embedding"] == (1, 3, 32) and shapes["pos_embed"] == (1, 17, 32)
    assert "blocks.0.attn.q_proj.experts.b" not in shapes and "fc_norm.weight" in shapes and "norm.weight" not in shapes


def test_base_and_small_configurations():
    with torch.device("meta"):
        base, small = create_model("modsquad_vit_base"), create_model("modsquad_vit_small")
    moa, dense_attn, moe = base.blocks[0].attn, base.blocks[1].attn, base.blocks[1].mlp
    assert [b.moe_attn for b in base.blocks] == [i % 2 == 0 for i in range(12)]
    assert [b.moe_mlp for b in base.blocks] == [i % 2 == 1 for i in range(12)]
    assert (moa.num_experts, moa.k, moa.head_dim) == (24, 12, 128)
    assert dense_attn.qkv.out_features == 3 * 1536 and dense_attn.proj.in_features == 1536  # the head_dim quirk
    assert (moe.num_experts, moe.k, moe.experts.w.shape[2]) == (16, 4, 768)
    assert base.blocks[0].mlp.fc1.out_features == 3072
    moa, moe = small.blocks[0].attn, small.blocks[1].mlp
    assert (moa.num_experts, moa.k, moa.head_dim) == (15, 6, 128)
    assert (moe.num_experts, moe.k, moe.experts.w.shape[2]) == (16, 4, 384)
    assert small.blocks[1].attn.qkv.out_features == 3 * 768


# Released counts (main_mt.py: trainable parameters / 1e6) include 13 Taskonomy tasks (--tasks 14: routers and task
# embedding rows), the model's `norm` next to `fc_norm`, and the Taskonomy heads: LayerNorm + Linear for class_object
# (1000) and class_scene (365), Linear(D, 16·16·C) for 11 dense tasks with 16 channels in all.
TASKONOMY = ("class_object", "class_scene", *(f"dense{i}" for i in range(11)))


def _release_count(model: ModSquadViT) -> float:
    d = model.embed_dim
    heads = (2 * d + d * 1000 + 1000) + (2 * d + d * 365 + 365) + 16 * (d * 256 + 256)
    return (sum(p.numel() for p in model.parameters()) + 2 * d + heads) / 1e6


@pytest.mark.parametrize(
    ("name", "kwargs", "ours", "release"),
    [
        ("modsquad_vit_base", {}, 202_752_000, 206.96),
        ("modsquad_vit_base", {"attn_experts": 15}, 191_596_032, 195.80),  # = the release's comment
        ("modsquad_vit_small", {}, 53_331_456, 55.44),
        ("modsquad_vit_small", {"mlp_expert_hidden": 96}, 32_070_144, 34.17),  # = the release's comment
    ],
)
def test_parameter_counts_and_the_release_comments(name, kwargs, ours, release):
    with torch.device("meta"):
        model = create_model(name, num_classes=0, task_names=TASKONOMY, **kwargs)
    assert sum(p.numel() for p in model.parameters()) == ours
    assert round(_release_count(model), 2) == release


def test_release_checkpoint_loads_through_the_filter(tmp_path):
    model = _model(num_classes=0).eval()
    state = dict(model.state_dict())
    state.update({"norm.weight": torch.ones(32), "norm.bias": torch.zeros(32), "task_heads.0.1.weight": torch.ones(3)})
    torch.save({"model": state}, tmp_path / "release.pth")
    loaded = create_model(
        "modsquad_vit_test", task_names=TASKS, num_classes=0, checkpoint_path=tmp_path / "release.pth"
    ).eval()
    x = _images()
    torch.testing.assert_close(loaded(x, task="b"), model(x, task="b"), rtol=0, atol=0)
    bigger = ModSquadViT(img_size=96, embed_dim=32, depth=4, num_heads=2, head_dim=32, attn_experts=6, mlp_experts=4,
                         mlp_k=2, task_names=TASKS, num_classes=0)  # fmt: skip
    bigger.load_state_dict(checkpoint_filter_fn({"model": state}, bigger))
    assert bigger.pos_embed.shape == (1, 37, 32) and bigger(_images(96, 96), task=0).shape == (2, 32)


# --- tasks ------------------------------------------------------------------------------------------------------------
def test_task_by_name_index_and_nested_context():
    model = _model().eval()
    x = _images()
    out_b = model(x, task="b")
    torch.testing.assert_close(model(x, task=1), out_b, rtol=0, atol=0)
    assert not torch.allclose(model(x, task="a"), out_b)
    assert model.current_task is None
    with model.task("a"):
        with model.task(1):
            torch.testing.assert_close(model(x), out_b, rtol=0, atol=0)
            assert model.current_task == 1
        assert model.current_task == 0
        torch.testing.assert_close(model(x, task="b"), out_b, rtol=0, atol=0)  # explicit wins over the context
    assert model.current_task is None
    with pytest.raises(RuntimeError, match=r"3 tasks \['a', 'b', 'c'\].*model.task"):
        model(x)
    with pytest.raises(KeyError, match=r"unknown task 'd'.*'a', 'b', 'c'"):
        model(x, task="d")
    with pytest.raises(IndexError, match="out of range"), model.task(3):
        pass
    assert model._task_stack == []
    single = create_model("modsquad_vit_test")
    assert single.task_names == ["cls"] and single.current_task == 0 and single(x).shape == (2, 1000)


def test_task_embedding_is_added_before_every_block():
    model = _model().eval()
    x = _images()
    tokens = model._pos_embed(model.patch_embed(x))
    for block in model.blocks:
        tokens = block(tokens + model.task_embedding[:, 2:3], 2)
    torch.testing.assert_close(model.forward_features(x, task="c"), model.norm(tokens))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unique"):
        _model(task_names=("a", "a"))
    with pytest.raises(ValueError, match="global_pool"):
        _model(global_pool="max")
    with pytest.raises(ValueError, match="moe_pattern"):
        _model(moe_pattern="every3")


# --- timm contract, pyramid, position embedding -----------------------------------------------------------------------
def test_forward_intermediates_and_head():
    model = _model().eval()
    with model.task("c"):
        final, maps = model.forward_intermediates(_images(), indices=[1, 3])
        assert [m.shape for m in maps] == [(2, 32, 4, 4)] * 2 and final.shape == (2, 17, 32)
        torch.testing.assert_close(final, model.forward_features(_images()))
        tokens = model.forward_intermediates(_images(), indices=1, output_fmt="NLC", intermediates_only=True,
                                             return_prefix_tokens=True)  # fmt: skip
        assert tokens[0][0].shape == (2, 16, 32) and tokens[0][1].shape == (2, 1, 32)
        torch.testing.assert_close(tokens[0][0], maps[-1].flatten(2).transpose(1, 2))
        pooled = model.forward_head(final, pre_logits=True)
        torch.testing.assert_close(pooled, model.fc_norm(final[:, 1:].mean(1)))  # the release's class path
    features = create_model("modsquad_vit_test", features_only=True, task_names=TASKS, dynamic_img_size=True)
    assert features.feature_info.reduction() == [16] * 4 and features.feature_info.channels() == [32] * 4
    with features.model.task("a"):
        assert [tuple(m.shape) for m in features(_images(64, 96))] == [(2, 32, 4, 6)] * 4


def test_multiscale_backbone_under_a_task_context_with_another_input_size():
    model = _model()
    pyramid = build_multiscale_backbone(model)
    assert model.dynamic_img_size and pyramid.channels == [8, 16, 32, 32]
    with model.task("b"):
        maps = pyramid(_images(96, 128))
    assert [tuple(m.shape) for m in maps] == [(2, 8, 24, 32), (2, 16, 12, 16), (2, 32, 6, 8), (2, 32, 3, 4)]
    sum(m.sum() for m in maps).backward()
    assert model.task_embedding.grad[0, 1].abs().sum() > 0 and model.task_embedding.grad[0, 0].abs().sum() == 0


def test_dynamic_image_size_interpolates_the_position_embedding():
    fixed = _model().eval()
    dynamic = _model(dynamic_img_size=True).eval()
    dynamic.load_state_dict(fixed.state_dict())
    torch.testing.assert_close(dynamic(_images(), task=0), fixed(_images(), task=0))
    assert dynamic(_images(80, 112), task=0).shape == (2, 5)
    with pytest.raises(AssertionError):
        fixed(_images(80, 112), task=0)


def test_optimiser_metadata_classifier_and_checkpointing():
    model = _model()
    assert model.no_weight_decay() == {"pos_embed", "cls_token", "task_embedding"}
    groups = param_groups_layer_decay(model, 0.05, list(model.no_weight_decay()), layer_decay=0.75)
    group_of = {id(p): g for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    scale = {name: group_of[id(params[name])]["lr_scale"] for name in params}
    assert scale["task_embedding"] == scale["patch_embed.proj.weight"] < scale["blocks.0.norm1.weight"]
    assert group_of[id(model.task_embedding)]["weight_decay"] == 0.0
    x = _images()
    model.eval()
    reference = model.forward_features(x, task=2)
    model.set_grad_checkpointing()
    checkpointed = model.forward_features(x, task=2)
    torch.testing.assert_close(checkpointed, reference)
    model.reset_classifier(7, "token")
    assert model.get_classifier().out_features == 7 and model(x, task=0).shape == (2, 7)
    assert model.prune_intermediate_layers([1], prune_norm=True) == [1] and len(model.blocks) == 2
    assert isinstance(model.get_classifier(), torch.nn.Identity)


# --- routing ----------------------------------------------------------------------------------------------------------
def test_routing_hooks_fire_once_per_moe_layer_with_the_task():
    model = _model()
    layers = moe_layers(model)
    assert list(layers) == ["blocks.0.attn", "blocks.1.mlp", "blocks.2.attn", "blocks.3.mlp"]
    calls = []
    for path, layer in layers.items():
        layer.register_routing_hook(lambda module, routing, path=path: calls.append((path, routing.task)))
    with model.task("c"):
        model(_images())
    assert calls == [(path, 2) for path in layers]


def test_gradients_reach_only_the_current_tasks_router_and_embedding():
    model = _model()
    F.cross_entropy(model(_images(), task="b"), torch.tensor([0, 1])).backward()
    routers = {n: p.grad for n, p in model.named_parameters() if ".f_gate." in n}
    assert len(routers) == 4 * 3
    for name, grad in routers.items():
        if ".f_gate.1." in name:
            assert grad is not None and grad.abs().sum() > 0, name
        else:
            assert grad is None, name
    row_norms = model.task_embedding.grad[0].abs().sum(-1)
    assert row_norms[1] > 0 and row_norms[0] == 0 and row_norms[2] == 0


# --- upcycling from a dense ViT ---------------------------------------------------------------------------------------
def _dense_pair() -> tuple[torch.nn.Module, ModSquadViT, object]:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, embed_dim=32, depth=4, num_heads=4, num_classes=5,
                            global_pool="avg").eval()  # fmt: skip
    # 4 dense heads of 8; the MoA / wide heads are 16 wide: pairs of dense heads, 2 head groups
    model, report = ModSquadViT.from_dense(
        vit.state_dict(), img_size=64, embed_dim=32, depth=4, num_heads=4, head_dim=16, attn_experts=6,
        mlp_experts=4, mlp_k=2, task_names=TASKS, num_classes=5,
    )  # fmt: skip
    return vit, model.eval(), report


def test_from_dense_copies_and_reports():
    vit, model, report = _dense_pair()
    dense = vit.state_dict()
    for name in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.2.mlp.fc1.weight", "blocks.3.norm2.bias",
                 "fc_norm.weight", "head.weight"):  # fmt: skip
        assert name in report.copied and torch.equal(model.state_dict()[name], dense[name]), name
    assert sorted(report.new) == sorted(n for n, _ in model.named_parameters() if ".f_gate." in n)
    assert report.unused == ["blocks.0.attn.proj.bias", "blocks.2.attn.proj.bias"]  # MoA experts have no bias
    assert torch.count_nonzero(model.task_embedding) == 0
    assert "blocks.0.attn.q_proj.experts.w" in report.derived and "blocks.1.mlp.output_experts.b" in report.derived
    q = dense["blocks.0.attn.qkv.weight"][:32].view(2, 16, 32)  # head groups (0, 1) and (2, 3)
    experts = model.blocks[0].attn.q_proj.experts.w
    for e in range(6):
        torch.testing.assert_close(experts[e], q[e % 2].T * math.sqrt(2))
    k = dense["blocks.0.attn.qkv.weight"][32:64].view(2, 16, 32).mean(0)
    torch.testing.assert_close(model.blocks[0].attn.kv_proj[0].weight[:16], k)
    with pytest.raises(ValueError, match="same width"):
        ModSquadViT.from_dense(vit.state_dict(), img_size=64, embed_dim=48, depth=2, num_heads=4, head_dim=24)


def test_from_dense_keeps_the_dense_attention_and_mlp_functions():
    vit, model, _ = _dense_pair()
    y = torch.randn(2, 17, 32)
    torch.testing.assert_close(model.blocks[1].attn(y), vit.blocks[1].attn(y))  # wide attention, same function
    torch.testing.assert_close(model.blocks[0].mlp(y), vit.blocks[0].mlp(y))  # dense MLP copied
    moe = model.blocks[3].mlp  # 128 hidden = 2 chunks of 64; experts 0 and 1 cover them, unit gates give the MLP
    covered = sum(
        F.gelu(y @ moe.experts.w[e] + moe.experts.b[e]) @ moe.output_experts.w[e] + moe.output_experts.b[e]
        for e in (0, 1)
    )
    torch.testing.assert_close(covered, vit.blocks[3].mlp(y))
    assert torch.isfinite(model(_images(), task="a")).all()


# --- Mod-Squad tools on the model -------------------------------------------------------------------------------------
def _trained_with_stats() -> tuple[ModSquadViT, dict[str, torch.Tensor]]:
    model = _model(num_classes=3)
    stats = attach_routing_stats(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = {t: (_images(seed=i), torch.tensor([i % 3, (i + 1) % 3])) for i, t in enumerate(TASKS)}
    for _ in range(3):
        loss = sum(F.cross_entropy(model(x, task=t), y) for t, (x, y) in batches.items())
        mi = mutual_information_total(stats, weight=0.005)
        assert mi.requires_grad and torch.isfinite(mi)
        optimizer.zero_grad()
        (loss + mi).backward()
        optimizer.step()
    with torch.no_grad():  # one more training-mode forward of "b", committed, so its experts count as used
        model(batches["b"][0], task="b")
        mutual_information_total(stats)
    assert all((s.usage_ema.sum(1) > 0).all() for s in stats.values())
    return model, {t: x for t, (x, _) in batches.items()}


def test_routing_stats_mi_loss_and_extraction():
    model, images = _trained_with_stats()
    single, report = extract_task_model(model, "b")
    assert single.task_names == ["b"] and single.num_tasks == 1 and single.task_embedding.shape == (1, 1, 32)
    torch.testing.assert_close(single.task_embedding[0, 0], model.task_embedding[0, 1])
    assert list(report.layers) == list(moe_layers(model)) and report.params_after < report.params_before
    assert all(len(layer.f_gate if hasattr(layer, "f_gate") else layer.q_proj.f_gate) == 1
               for layer in moe_layers(single).values())  # fmt: skip
    assert single.eval()(images["b"]).shape == (2, 3)  # one task: no task argument needed

    # With thresh 0 every expert "b" used is kept: the first MoE layer (same input) picks the same experts
    kept_all, kept = extract_task_model(model, "b", thresh=0.0)
    chosen = {}
    for key, net in (("full", model.eval()), ("single", kept_all.eval())):
        net.blocks[0].attn.register_routing_hook(lambda m, r, key=key: chosen.setdefault(key, r.topk_idx))
    model(images["b"], task="b")
    kept_all(images["b"])
    ids = torch.tensor(kept.layers["blocks.0.attn"].kept)
    torch.testing.assert_close(ids[chosen["single"]], chosen["full"], rtol=0, atol=0)


def test_add_task_leaves_old_tasks_identical():
    model = _model().eval()
    x = _images()
    before = model(x, task="a")
    add_task(model, "d", new_experts_per_layer=1)
    assert model.task_names == ["a", "b", "c", "d"] and model.num_tasks == 4
    torch.testing.assert_close(model(x, task="a"), before, rtol=0, atol=0)
    with model.task("d"):
        assert model(x).shape == (2, 5)


def test_extraction_keeping_the_softmax_mass_gives_the_full_models_outputs():
    model, images = _trained_with_stats()
    model.eval()
    with torch.no_grad():
        full = model(images["b"], task="b")
        exact, report = extract_task_model(model, "b", thresh=0.0, keep_softmax_mass=True)
        released, _ = extract_task_model(model, "b", thresh=0.0)
        cut = sum(layer.total - len(layer.kept) for layer in report.layers.values())
        assert cut > 0 and report.params_after < report.params_before  # experts "b" never used are gone
        torch.testing.assert_close(exact.eval()(images["b"]), full, rtol=0, atol=1e-6)
        # the released slicing renormalises the softmax over the kept experts: the gates, so the outputs, move
        assert not torch.allclose(released.eval()(images["b"]), full, atol=1e-6)
