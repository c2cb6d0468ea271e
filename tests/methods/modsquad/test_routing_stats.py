"""RoutingStats on real TaskMoE / MoAttention layers: window, MI loss, usage EMA, checkpoints, and 2 gloo ranks."""

from __future__ import annotations

import copy
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from visionkit.methods.modsquad import (
    RoutingStats,
    attach_routing_stats,
    detach_routing_stats,
    find_routing_stats,
    mutual_information_loss,
    mutual_information_total,
    switch_loss,
    z_loss,
)
from visionkit.models.layers import Routing, TaskMoE


def capture(model: torch.nn.Module) -> dict[str, list[Routing]]:
    """Record every routing of every MoE layer (by the module the hook is called with)."""
    seen: dict[str, list[Routing]] = {}
    for name, stats in find_routing_stats(model).items():
        layer = dict(model.named_modules())[name]
        seen[name] = []
        layer.register_routing_hook(lambda _m, r, store=seen[name]: store.append(r))
        assert isinstance(stats, RoutingStats)
    return seen


def table_of(routings: list[Routing], num_tasks: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    joint = torch.zeros(num_tasks, num_experts)
    counts = torch.zeros(num_tasks, num_experts)
    for r in routings:
        joint = joint.index_add(0, torch.tensor([r.task]), r.probs.sum(0, keepdim=True))
        counts[r.task] += torch.bincount(r.topk_idx.flatten(), minlength=num_experts).float()
    return joint, counts


def test_attach_registers_one_stats_child_per_outermost_layer(toy_model_cls) -> None:
    model = toy_model_cls()
    stats = attach_routing_stats(model, ema=0.9)
    assert list(stats) == ["attn", "mlp"]  # attn.q_proj is part of the attention layer
    assert model.attn.routing_stats is stats["attn"] and stats["attn"].ema == 0.9
    assert (stats["attn"].num_tasks, stats["attn"].num_experts, stats["attn"].k) == (2, 6, 2)
    assert [k for k in model.state_dict() if "routing_stats" in k] == [
        "attn.routing_stats.usage_ema",
        "mlp.routing_stats.usage_ema",
    ]
    assert attach_routing_stats(model) == stats  # idempotent: existing stats are kept
    assert detach_routing_stats(model) == stats and find_routing_stats(model) == {}


def test_loss_is_the_mi_of_the_window_and_resets_it(toy_model_cls) -> None:
    model = toy_model_cls().train()
    stats = attach_routing_stats(model)
    seen = capture(model)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    model(x, 0)
    model(x[:1], 1)
    joint, counts = table_of(seen["mlp"], 2, 8)
    assert counts.sum() == (10 + 5) * 2  # every token in k = 2 experts
    expected = mutual_information_loss(joint, counts.sum() / 2)
    loss = stats["mlp"].loss()
    assert torch.allclose(loss, expected, atol=1e-7)
    loss.backward()
    assert model.mlp.f_gate[0][0].weight.grad.abs().sum() > 0 and model.mlp.f_gate[1][0].weight.grad.abs().sum() > 0
    assert stats["mlp"].loss().item() == 0.0  # new, empty window
    # the usage EMA got the window's hard counts
    assert torch.allclose(stats["mlp"].usage_ema, 0.05 * counts)


def test_usage_ema_updates_only_the_tasks_of_the_window(toy_model_cls) -> None:
    model = toy_model_cls().train()
    stats = attach_routing_stats(model)["attn"]
    seen = capture(model)["attn"]
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(2))
    model(x, 0)
    model(x, 1)
    stats.loss()
    first = stats.usage_ema.clone()
    seen.clear()
    model(x * 2, 0)
    stats.loss()
    _, counts = table_of(seen, 2, 6)
    assert torch.allclose(stats.usage_ema[0], 0.95 * first[0] + 0.05 * counts[0])
    assert torch.equal(stats.usage_ema[1], first[1])
    assert torch.allclose(stats.usage_percent().sum(1), torch.full((2,), 100.0))


def test_eval_forwards_are_ignored_unless_tracked(toy_model_cls) -> None:
    model = toy_model_cls().eval()
    stats = attach_routing_stats(model)["mlp"]
    x = torch.randn(1, 4, 8)
    model(x, 0)
    stats.commit_usage()
    assert stats.usage_ema.sum() == 0
    stats.track_eval = True
    with torch.no_grad():
        model(x, 0)
    assert stats.loss().item() == 0.0  # eval forwards never enter the loss ...
    assert stats.usage_ema[0].sum() == pytest.approx(0.05 * 4 * 2)  # ... but their counts reach the EMA
    model(x, 1)
    stats.commit_usage()
    assert stats.usage_ema[1].sum() == pytest.approx(0.05 * 4 * 2)


def test_usage_is_saved_and_release_checkpoints_load_strictly(toy_model_cls) -> None:
    model = toy_model_cls().train()
    attach_routing_stats(model)
    model(torch.randn(1, 3, 8), 1)
    mutual_information_total(model)
    state = model.state_dict()
    fresh = toy_model_cls(seed=5)
    attach_routing_stats(fresh)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.mlp.routing_stats.usage_ema, model.mlp.routing_stats.usage_ema)
    release = {k: v for k, v in state.items() if "routing_stats" not in k}
    fresh.load_state_dict(release)  # strict: a checkpoint without statistics keeps the current EMA
    assert torch.equal(fresh.mlp.routing_stats.usage_ema, model.mlp.routing_stats.usage_ema)
    with pytest.raises(RuntimeError, match="Unexpected"):
        toy_model_cls().load_state_dict(state)  # stats in the checkpoint need attach_routing_stats first


def test_total_switch_and_z_losses(toy_model_cls) -> None:
    model = toy_model_cls().train()
    stats = attach_routing_stats(model, track_z=True)
    seen = capture(model)
    x = torch.randn(2, 3, 8)
    model(x, 0)
    model(x, 1)
    expected = torch.zeros(())
    for name, num_experts in (("attn", 6), ("mlp", 8)):
        joint, counts = table_of(seen[name], 2, num_experts)
        logits = torch.cat([r.logits for r in seen[name]])
        expected = expected + 0.005 * mutual_information_loss(joint, counts.sum() / 2)
        expected = expected + 0.01 * switch_loss(joint.sum(0), counts.sum(0)) + 0.001 * z_loss(logits)
    total = mutual_information_total(stats, weight=0.005, switch_weight=0.01, z_weight=0.001)
    assert torch.allclose(total, expected, atol=1e-6)
    assert mutual_information_total(stats).item() == 0.0


def test_narrow_router_rows_are_zero_padded() -> None:
    stats = RoutingStats(2, 5, 2)
    probs = torch.softmax(torch.randn(4, 3), -1) + 1e-4
    stats.update(Routing(1, probs.log(), probs, probs.topk(2).indices, probs.topk(2).values))
    packed = stats.pack()
    assert torch.allclose(packed[5:10], torch.cat([probs.sum(0), torch.zeros(2)]))
    assert packed[:5].sum() == 0


def test_deepcopy_keeps_each_model_with_its_own_stats(toy_model_cls) -> None:
    model = toy_model_cls().train()
    attach_routing_stats(model)
    twin = copy.deepcopy(model)
    twin(torch.randn(1, 3, 8), 0)
    assert twin.mlp.routing_stats.pack().abs().sum() > 0
    assert model.mlp.routing_stats.pack().abs().sum() == 0
    detach_routing_stats(twin)  # removes the copy's hooks, not the original's
    model(torch.randn(1, 3, 8), 0)
    assert model.mlp.routing_stats.pack().abs().sum() > 0


def make_layer() -> TaskMoE:
    torch.manual_seed(0)
    layer = TaskMoE(6, 8, num_experts=5, k=2, num_tasks=2, backend="loop")
    for gate in layer.f_gate:
        torch.nn.init.normal_(gate[0].weight)
    return layer


def run_rank(layer: TaskMoE, inputs: list[torch.Tensor], tasks: list[int]) -> dict[str, object]:
    """Forward each input with its task, take the MI loss (weight 1) and backpropagate it alone."""
    stats = attach_routing_stats(layer)
    xs = [x.clone().requires_grad_(True) for x in inputs]
    for x, task in zip(xs, tasks, strict=True):
        layer(x, task)
    loss = mutual_information_total(stats, weight=1.0)
    loss.backward()
    return {"loss": loss.detach(), "grads": [x.grad for x in xs], "usage": stats[""].usage_ema.clone()}


def ddp_worker(rank: int, port: int, inputs: list[torch.Tensor], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        result = run_rank(make_layer(), [inputs[rank]], [rank])  # rank r sees task r only
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # two spawned interpreters import torch
def test_two_ranks_with_one_task_each_match_one_process_with_both(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    inputs = [torch.randn(2, 4, 6, generator=generator), torch.randn(1, 5, 6, generator=generator)]
    context = mp.start_processes(
        ddp_worker, args=(free_port(), inputs, str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("gloo workers did not finish in 240 s")
    single = run_rank(make_layer(), inputs, [0, 1])
    assert single["loss"].item() < -1e-3  # both tasks in one window: a real MI signal
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(out["loss"], single["loss"], atol=1e-6)
        # all-reduce backward sums the ranks' identical upstream gradients: world_size × the local share;
        # DDP's mean over ranks turns this into the single-process gradient
        assert torch.allclose(out["grads"][0] / 2, single["grads"][rank], atol=1e-6)
        assert torch.allclose(out["usage"], single["usage"])
