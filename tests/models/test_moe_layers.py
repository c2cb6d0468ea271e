"""TaskMoE and MoAttention against a hand transcription of the released forward (Mod-Squad at 1d17e81).

The transcription below follows ``parallel_linear/parallel_experts/moe.py`` (``TaskMoE.top_k_gating``,
``forward``, ``map``, ``reduce``) and ``models_moe.py`` (``MoETaskAttention.forward``) one token and one expert at a
time, on a state dict with the release's key names, so that layout, router, gates and combine are all checked.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visionkit.models.layers import MoAttention, Routing, TaskMoE

D, HID, E, K, T = 16, 12, 6, 2, 3
BACKENDS = ("loop", "grouped_mm", "dense")


def _release_state(noisy: bool, bias: bool, hidden: int = HID, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"f_gate.{t}.0.weight": torch.randn(2 * E if noisy else E, D, generator=g) for t in range(T)}
    sd["experts.w"] = torch.randn(E, D, hidden, generator=g) / D**0.5
    sd["output_experts.w"] = torch.randn(E, hidden, D, generator=g) / hidden**0.5
    if bias:
        sd["experts.b"] = torch.randn(E, hidden, generator=g)
        sd["output_experts.b"] = torch.randn(E, D, generator=g)
    return sd


def _release_route(gate_w, x_n, noisy, eps_n, renormalize=False):
    """``TaskMoE.top_k_gating`` for one token and the task's router weight: returns (gates (k,), experts (k,))."""
    raw = gate_w @ x_n
    if noisy:
        clean, raw_std = raw[:E], raw[E:]
        logits = clean + eps_n * (F.softplus(raw_std) + 1e-2)
    else:
        logits = raw
    probs = torch.softmax(logits, dim=0) + 1e-4
    gates, experts = probs.topk(K)
    return (gates / gates.sum() if renormalize else gates), experts


def _release_task_moe(sd, x, task, noisy, eps, renormalize=False):
    """``TaskMoE.forward`` token by token: y_n = Σ_j g_j (gelu(x_n W1[e] + b1[e]) W2[e] + b2[e])."""
    flat = x.reshape(-1, D)
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        gates, experts = _release_route(
            sd[f"f_gate.{task}.0.weight"], flat[n], noisy, eps[n] if noisy else None, renormalize
        )
        for g, e in zip(gates, experts.tolist(), strict=True):
            h = F.gelu(flat[n] @ sd["experts.w"][e] + sd["experts.b"][e])
            out[n] += g * (h @ sd["output_experts.w"][e] + sd["output_experts.b"][e])
    return out.view(x.shape)


def _release_moa(sd, x, task, noisy, eps, head_dim):
    """``MoETaskAttention.forward``: per-token query experts, shared K/V, Σ_j g_j o_j W_o[e_j]."""
    b, length, _ = x.shape
    out = torch.zeros_like(x)
    for bi in range(b):
        kv = x[bi] @ sd["kv_proj.0.weight"].T + sd["kv_proj.0.bias"]
        keys, values = kv[:, :head_dim], kv[:, head_dim:]
        for i in range(length):
            n = bi * length + i
            gates, experts = _release_route(
                sd[f"q_proj.f_gate.{task}.0.weight"], x[bi, i], noisy, eps[n] if noisy else None
            )
            for g, e in zip(gates, experts.tolist(), strict=True):
                q = x[bi, i] @ sd["q_proj.experts.w"][e]
                attn = torch.softmax(keys @ q * head_dim**-0.5, dim=0)
                out[bi, i] += g * ((attn[:, None] * values).sum(0) @ sd["q_proj.output_experts.w"][e])
    return out


def test_task_moe_state_dict_is_the_release_layout():
    m = TaskMoE(D, HID, E, K, T, noisy_gating=True)
    shapes = {key: tuple(v.shape) for key, v in m.state_dict().items()}
    assert shapes == {**{f"f_gate.{t}.0.weight": (2 * E, D) for t in range(T)}, "experts.w": (E, D, HID),
                      "experts.b": (E, HID), "output_experts.w": (E, HID, D), "output_experts.b": (E, D)}  # fmt: skip
    assert set(TaskMoE(D, HID, E, K, T, bias=False).state_dict()) == {f"f_gate.{t}.0.weight" for t in range(T)} | {
        "experts.w",
        "output_experts.w",
    }
    assert (m.num_experts, m.k, m.num_tasks) == (E, K, T)


def test_moa_state_dict_is_the_release_layout():
    m = MoAttention(D, E, K, head_dim=8, num_tasks=T)
    shapes = {key: tuple(v.shape) for key, v in m.state_dict().items()}
    assert shapes == {**{f"q_proj.f_gate.{t}.0.weight": (E, D) for t in range(T)}, "q_proj.experts.w": (E, D, 8),
                      "q_proj.output_experts.w": (E, 8, D), "kv_proj.0.weight": (16, D),
                      "kv_proj.0.bias": (16,)}  # fmt: skip
    assert (m.num_experts, m.k, m.num_tasks) == (E, K, T)


def test_release_initialisation():
    m = TaskMoE(768, 768, 16, 4, 2)
    assert all(g[0].weight.abs().max() == 0 for g in m.f_gate)
    assert m.experts.w.abs().max() <= 1 / 768 and m.experts.w.abs().max() > 0.9 / 768
    assert m.experts.b.abs().max() <= 1 / 768**0.5 and m.experts.b.abs().max() > 0.9 / 768**0.5
    # zero routers: uniform probabilities, every token picks the same (tie-broken) expert set
    seen = []
    m.register_routing_hook(lambda mod, r: seen.append(r))
    m(torch.randn(2, 5, 768), task=1)
    torch.testing.assert_close(seen[0].probs, torch.full((10, 16), 1 / 16 + 1e-4))
    assert (seen[0].topk_idx == seen[0].topk_idx[:1]).all()


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_task_moe_matches_release_transcription(backend, noisy, renormalize):
    sd = _release_state(noisy, bias=True)
    m = TaskMoE(D, HID, E, K, T, noisy_gating=noisy, backend=backend, renormalize_gates=renormalize)
    m.load_state_dict(sd, strict=True)
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    y = m(x, task=2)
    torch.manual_seed(11)
    eps = torch.randn(14, E)  # the release draws randn_like(clean_logits) once per call, (N, E)
    torch.testing.assert_close(y, _release_task_moe(sd, x, 2, noisy, eps, renormalize), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_moa_matches_release_transcription(backend, noisy):
    hd = 8
    sd = {f"q_proj.{key}": v for key, v in _release_state(noisy, bias=False, hidden=hd).items()}
    g = torch.Generator().manual_seed(5)
    sd["kv_proj.0.weight"] = torch.randn(2 * hd, D, generator=g) / D**0.5
    sd["kv_proj.0.bias"] = torch.randn(2 * hd, generator=g)
    m = MoAttention(D, E, K, head_dim=hd, num_tasks=T, noisy_gating=noisy, backend=backend)
    m.load_state_dict(sd, strict=True)
    x = torch.randn(2, 5, D, generator=g)
    torch.manual_seed(7)
    y = m(x, task=1)
    torch.manual_seed(7)
    eps = torch.randn(10, E)
    torch.testing.assert_close(y, _release_moa(sd, x, 1, noisy, eps, hd), rtol=1e-5, atol=1e-5)


def _starve_experts(m: TaskMoE, task: int, starved: list[int]) -> tuple[torch.Tensor, list[Routing]]:
    """Router weights that never pick ``starved`` for positive inputs; returns such inputs and a routing record."""
    with torch.no_grad():
        w = m.f_gate[task][0].weight
        w.normal_()
        w[starved] = -10.0
    seen: list[Routing] = []
    m.register_routing_hook(lambda mod, r: seen.append(r))
    return torch.rand(2, 6, w.shape[1]) + 0.1, seen


def _assert_grads_on_used_experts_only(params, routing: Routing, starved: list[int]) -> None:
    used = torch.zeros(E, dtype=torch.bool)
    used[routing.topk_idx.unique()] = True
    assert not used[starved].any()
    for p in params:
        per_expert = p.grad.abs().amax(dim=tuple(range(1, p.ndim)))
        assert (per_expert[~used] == 0).all() and (per_expert[used] > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_used_experts_only(backend):
    m = TaskMoE(D, HID, E, K, T, backend=backend)
    x, seen = _starve_experts(m, 1, [1, 4])
    m(x, task=1).square().sum().backward()
    params = (m.experts.w, m.experts.b, m.output_experts.w, m.output_experts.b)
    _assert_grads_on_used_experts_only(params, seen[0], [1, 4])
    assert m.f_gate[1][0].weight.grad is not None
    assert m.f_gate[0][0].weight.grad is None and m.f_gate[2][0].weight.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_moa_gradients_reach_used_experts_only(backend):
    m = MoAttention(D, E, K, head_dim=8, num_tasks=T, backend=backend)
    x, seen = _starve_experts(m.q_proj, 0, [2, 3])
    m(x, task=0).square().sum().backward()
    _assert_grads_on_used_experts_only((m.q_proj.experts.w, m.q_proj.output_experts.w), seen[0], [2, 3])
    assert m.kv_proj[0].weight.grad is not None and m.q_proj.f_gate[1][0].weight.grad is None


def test_routing_hooks_fire_with_shapes_and_remove():
    m = TaskMoE(D, HID, E, K, T, noisy_gating=True)
    a = MoAttention(D, E, K, head_dim=8, num_tasks=T)
    seen: list[tuple[object, Routing]] = []
    handles = [layer.register_routing_hook(lambda mod, r: seen.append((mod, r))) for layer in (m, a)]
    x = torch.randn(3, 4, D)
    m(x, task=2)
    a(x, task=0)
    assert [s[0] for s in seen] == [m, a.q_proj]
    for (_, r), task in zip(seen, (2, 0), strict=True):
        assert r.task == task and r.logits.shape == r.probs.shape == (12, E)
        assert r.topk_idx.shape == r.gates.shape == (12, K) and r.topk_idx.dtype == torch.int64
        assert r.probs.requires_grad and r.gates.requires_grad
        torch.testing.assert_close(r.probs.gather(1, r.topk_idx), r.gates)
    for h in handles:
        h.remove()
    m(x, task=0)
    a(x, task=0)
    assert len(seen) == 2


def test_noise_at_eval_flag():
    sd = _release_state(noisy=True, bias=True)
    x = torch.randn(1, 9, D)
    released = TaskMoE(D, HID, E, K, T, noisy_gating=True).eval()
    released.load_state_dict(sd)
    assert not torch.equal(released(x, 0), released(x, 0))  # noise in eval mode too, as released
    clean = TaskMoE(D, HID, E, K, T, noisy_gating=True, noise_at_eval=False).eval()
    clean.load_state_dict(sd)
    torch.testing.assert_close(clean(x, 0), _release_task_moe(sd, x, 0, True, torch.zeros(9, E)))


def test_renormalized_gates_sum_to_one():
    m = TaskMoE(D, HID, E, K, T, renormalize_gates=True)
    seen = []
    m.register_routing_hook(lambda mod, r: seen.append(r))
    m(torch.randn(1, 5, D), 0)
    torch.testing.assert_close(seen[0].gates.sum(-1), torch.ones(5))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="unknown MoE backend"):
        TaskMoE(D, HID, E, K, T, backend="cuda")
    with pytest.raises(IndexError, match="task 3 out of range"):
        TaskMoE(D, HID, E, K, T)(torch.randn(1, 2, D), 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layers_under_bf16_autocast(backend):
    torch.manual_seed(0)
    layers = [TaskMoE(D, 16, E, K, T, backend=backend), MoAttention(D, E, K, head_dim=8, num_tasks=T, backend=backend)]
    x = torch.randn(2, 5, D)
    for layer in layers:
        with torch.no_grad():
            for g in layer.modules():
                if isinstance(g, torch.nn.Linear) and g.bias is None:
                    g.weight.normal_()  # routers off zero init, so that routing is not a tie
        want = layer(x, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer(x, 1)
        assert (got.float() - want).abs().max() <= 2e-2 * want.abs().max()
        got.float().sum().backward()
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in layer.parameters())
