"""Per-task extraction, router-only tuning and continual learning on a small hand-built two-task MoE model."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from visionkit.methods.modsquad import (
    add_task,
    attach_routing_stats,
    extract_layer,
    extract_task_model,
    find_routing_stats,
    freeze_for_router_tuning,
    mutual_information_total,
    select_experts,
)
from visionkit.models.layers import Routing


def record_usage(model: nn.Module, x: Tensor) -> None:
    """One training window over both tasks on ``x``: the usage EMA then covers exactly the experts ``x`` uses."""
    model.train()
    for task in range(model.num_tasks):
        model(x, task)
    mutual_information_total(model)
    model.eval()


def selections(model: nn.Module, layer: str, x: Tensor, task: int | str) -> Tensor:
    seen: list[Routing] = []
    handle = dict(model.named_modules())[layer].register_routing_hook(lambda _m, r: seen.append(r))
    model(x, task)
    handle.remove()
    return seen[0].topk_idx


def test_select_experts_released_rule() -> None:
    # k = 2, thresh 3: keep usage > 1.5 %
    assert select_experts(torch.tensor([50.0, 30.0, 0.5, 19.5]), k=2).tolist() == [0, 1, 3]
    # fewer than k pass: the k most used, ascending
    assert select_experts(torch.tensor([0.4, 97.0, 2.0, 0.6]), k=3, thresh=6.0).tolist() == [1, 2, 3]


@pytest.fixture
def trained(toy_model_cls) -> tuple[nn.Module, Tensor]:
    model = toy_model_cls(attn_experts=8, mlp_experts=8)
    attach_routing_stats(model)
    x = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(4))  # 6 slots per layer: some experts unused
    record_usage(model, x)
    return model, x


def test_released_extraction_keeps_selections_and_slices_everything(trained) -> None:
    model, x = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, report = extract_task_model(model, "b")
    assert sum(len(layer.kept) < layer.total for layer in report.layers.values()) >= 1
    assert report.params_after < report.params_before == sum(p.numel() for p in model.parameters())
    keep = torch.tensor(report.layers["attn"].kept)
    # the first MoE layer sees the same input, so it picks the same experts (renumbered)
    assert torch.equal(keep[selections(small, "attn", x, "b")], selections(model, "attn", x, "b"))
    # router slot 0 = task b's rows of the kept experts; experts sliced; task attributes sliced
    keep_mlp = torch.tensor(report.layers["mlp"].kept)
    assert torch.equal(small.mlp.f_gate[0][0].weight, model.mlp.f_gate[1][0].weight[keep_mlp])
    assert torch.equal(small.mlp.experts.w, model.mlp.experts.w[keep_mlp])
    assert torch.equal(small.mlp.output_experts.b, model.mlp.output_experts.b[keep_mlp])
    assert torch.equal(small.attn.q_proj.output_experts.w, model.attn.q_proj.output_experts.w[keep])
    assert small.mlp.num_experts == len(keep_mlp) and small.attn.num_experts == len(keep) and small.mlp.num_tasks == 1
    assert torch.equal(small.task_embedding, model.task_embedding[:, 1:2])
    assert small.task_names == ["b"] and small.num_tasks == 1 and len(small.task_heads) == 1
    assert torch.equal(small.task_heads[0].weight, model.task_heads[1].weight)
    # fresh single-task statistics carry the task's sliced EMA; the original model is untouched
    new_stats = find_routing_stats(small)["mlp"]
    assert torch.equal(new_stats.usage_ema[0], model.mlp.routing_stats.usage_ema[1, keep_mlp])
    small.train()(x, 0)
    assert model.mlp.routing_stats.pack().abs().sum() == 0 and new_stats.pack().abs().sum() > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "attn: " in str(report)


def test_keep_softmax_mass_reproduces_the_full_model(toy_model_cls) -> None:
    model = toy_model_cls(attn_experts=8, mlp_experts=8)
    attach_routing_stats(model)
    x = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(4))
    record_usage(model, x)
    small, report = extract_task_model(model, 1, keep_softmax_mass=True)
    assert any(len(layer.kept) < layer.total for layer in report.layers.values())
    with torch.no_grad():
        full_out, small_out = model(x, 1), small(x, 0)
        released, _ = extract_task_model(model, 1)
        released_out = released(x, 0)
    assert torch.allclose(small_out, full_out, atol=1e-6)
    assert not torch.allclose(released_out, full_out, atol=1e-4)  # renormalised gates shift the outputs


def test_noisy_routers_keep_both_halves(toy_model_cls) -> None:
    model = toy_model_cls(noisy=True)
    attach_routing_stats(model)
    record_usage(model, torch.randn(1, 3, 8))
    small, report = extract_task_model(model, 0)
    keep = torch.tensor(report.layers["mlp"].kept)
    full = model.mlp.f_gate[0][0].weight
    assert torch.equal(small.mlp.f_gate[0][0].weight, torch.cat([full[keep], full[8 + keep]]))
    assert small(torch.randn(2, 3, 8), 0).shape == (2, 3)


def test_extraction_errors(toy_model_cls, trained) -> None:
    model = toy_model_cls()
    with pytest.raises(ValueError, match="no usage statistics"):
        extract_task_model(model, 0)
    attach_routing_stats(model)
    with pytest.raises(ValueError, match="no recorded usage"):
        extract_task_model(model, "a")
    with pytest.raises(KeyError, match="unknown task"):
        extract_task_model(model, "z")
    with pytest.raises(ValueError, match="k=2"):
        extract_layer(model.mlp, 0, torch.tensor([3]))
    usage = {"attn": torch.ones(2, 6), "mlp": torch.ones(2, 8)}
    _, report = extract_task_model(model, 0, usage=usage)  # explicit usage instead of the stats
    assert [len(layer.kept) for layer in report.layers.values()] == [6, 8]
    del model.task_heads
    with pytest.raises(ValueError, match="task_heads"):
        add_task(model, "c", 1, head=nn.Linear(8, 3))
    assert model.mlp.num_experts == 8 and model.num_tasks == 2  # checked before anything changed


def test_router_tuning_freezes_everything_but_routers_norms_heads(toy_model_cls) -> None:
    model = toy_model_cls()
    trainable = freeze_for_router_tuning(model)
    assert "mlp.f_gate.0.0.weight" in trainable and "attn.q_proj.f_gate.1.0.weight" in trainable
    assert "norm1.weight" in trainable and "task_heads.0.bias" in trainable
    assert not model.mlp.experts.w.requires_grad and not model.attn.kv_proj[0].weight.requires_grad
    assert not model.task_embedding.requires_grad
    experts = model.mlp.experts.w.clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(2, 3, 8), 0).sum().backward()
    optimizer.step()
    assert torch.equal(model.mlp.experts.w, experts) and model.mlp.experts.w.grad is None


def test_add_task_keeps_old_tasks_bit_identical_through_training(toy_model_cls) -> None:
    model = toy_model_cls().eval()
    attach_routing_stats(model)
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(6))
    record_usage(model, x)
    usage = model.mlp.routing_stats.usage_ema.clone()
    with torch.no_grad():
        old = [model(x, t) for t in range(2)]
    add_task(model, "c", {"attn": 2, "mlp": 3}, head=nn.Linear(8, 3))
    assert (model.attn.num_experts, model.mlp.num_experts, model.mlp.num_tasks) == (8, 11, 3)
    assert model.mlp.f_gate[0][0].weight.shape == (8, 8) and model.mlp.f_gate[2][0].weight.shape == (11, 8)
    assert model.task_names == ["a", "b", "c"] and model.task_embedding.shape == (1, 3, 8)
    stats = model.mlp.routing_stats
    assert stats.usage_ema.shape == (3, 11) and torch.equal(stats.usage_ema[:2, :8], usage)
    with torch.no_grad():
        assert all(torch.equal(model(x, t), old[t]) for t in range(2))
    new_experts = model.mlp.experts.w[8:].clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        model.train()
        loss = model(x, "c").square().mean() + mutual_information_total(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert not torch.equal(model.mlp.experts.w[8:], new_experts)  # the new task trains its experts ...
    with torch.no_grad():
        assert all(torch.equal(model(x, t), old[t]) for t in range(2))  # ... and old tasks do not move
    assert not model.mlp.f_gate[0][0].weight.requires_grad and not model.norm1.weight.requires_grad
    small, report = extract_task_model(model, "c")
    assert report.layers["mlp"].total == 11 and small(x, "c").shape == (2, 3)
    _, report_old = extract_task_model(model, "a")
    assert max(report_old.layers["mlp"].kept) < 8  # an old router only addresses the old experts
