"""visionkit.ops.moe: dispatch, every backend against a dense all-experts reference, and no host syncs.

Tolerances: the reference runs in float64 on the same (rounded) inputs; a result passes when its largest error is
within ``tol · max|reference|``, tol = 1e-5 for float32 and 2e-2 for bfloat16 (8-bit mantissa: each bf16 rounding of
an intermediate is up to 2^-9 relative, and the hidden activations and outputs are rounded a few times).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visionkit.ops.moe import (
    expert_map,
    expert_reduce,
    grouped_linear,
    moe_combine,
    moe_dispatch,
    moe_gather,
    moe_mlp,
    moe_unsort,
    resolve_moe_backend,
)

BACKENDS = ("loop", "grouped_mm", "dense")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _problem(n: int, k: int, e: int = 6, d: int = 16, h: int = 32, dtype=torch.float32, seed: int = 0):
    """Tokens, top-k routing that never picks experts 1 and 4 (they receive no token), and expert weights."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, e, generator=g)
    logits[:, [1, 4]] = -30.0
    gates, topk_idx = logits.softmax(-1).topk(k, dim=-1)
    tensors = {
        "x": torch.randn(n, d, generator=g),
        "gates": gates,
        "w1": torch.randn(e, d, h, generator=g) / d**0.5,
        "b1": torch.randn(e, h, generator=g),
        "w2": torch.randn(e, h, d, generator=g) / h**0.5,
        "b2": torch.randn(e, d, generator=g),
    }
    tensors = {name: t.to(dtype).requires_grad_() for name, t in tensors.items()}
    return tensors, topk_idx


def _dense_reference(x, gates, topk_idx, w, b, act=None, w2=None, b2=None):
    """All experts on all tokens in float64, mixed with the (N, E) scattered gates."""
    x, w, b = x.double(), w.double(), b.double()
    full = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64).scatter(1, topk_idx, gates.double())
    y = torch.einsum("ni,eio->neo", x, w) + b
    if w2 is not None:
        y = torch.einsum("nei,eio->neo", act(y), w2.double()) + b2.double()
    return torch.einsum("ne,neo->no", full, y)


def _grads(out, inputs):
    g = torch.Generator().manual_seed(1)
    cot = torch.randn(out.shape, generator=g, dtype=torch.float64)
    return torch.autograd.grad((out.double() * cot).sum(), inputs, allow_unused=True)


def _assert_close(actual, expected, dtype, what):
    actual, expected = actual.double(), expected.double()
    scale = max(expected.abs().max().item(), 1e-12)
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]} x {scale:.3g}"


def test_dispatch_by_hand():
    topk_idx = torch.tensor([[2, 0], [0, 2], [3, 0]])
    d = moe_dispatch(topk_idx, num_experts=5)
    # flat ids 2,0,0,2,3,0 -> expert 0: slots 1,2,5; expert 2: slots 0,3; expert 3: slot 4 (stable)
    assert d.order.tolist() == [1, 2, 5, 0, 3, 4]
    assert d.token_index.tolist() == [0, 1, 2, 0, 1, 2]
    assert d.counts.tolist() == [3, 0, 2, 1, 0] and d.counts.dtype == torch.int64
    assert d.offsets.tolist() == [3, 3, 5, 6, 6] and d.offsets.dtype == torch.int32
    assert d.expert_index.tolist() == [0, 0, 0, 2, 2, 3]
    with pytest.raises(ValueError, match="topk_idx must be"):
        moe_dispatch(topk_idx.flatten(), 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_linear_and_combine_match_dense_reference(backend, k, dtype):
    t, topk_idx = _problem(23, k, dtype=dtype)
    d = moe_dispatch(topk_idx, 6)
    assert d.counts[1] == 0 and d.counts[4] == 0
    y_sorted = grouped_linear(moe_gather(t["x"], d), t["w1"], t["b1"], d, backend=backend)
    assert y_sorted.dtype == dtype
    y = moe_combine(y_sorted, t["gates"], d, num_tokens=23)
    inputs = [t["x"], t["w1"], t["b1"], t["gates"]]
    ref_inputs = [v.detach().double().requires_grad_() for v in inputs]
    ref = _dense_reference(ref_inputs[0], ref_inputs[3], topk_idx, ref_inputs[1], ref_inputs[2])
    _assert_close(y, ref, dtype, "output")
    grads = _grads(y, inputs)
    for name, got, want in zip(("x", "w", "b", "gates"), grads, _grads(ref, ref_inputs), strict=True):
        _assert_close(got, want, dtype, f"grad {name}")
    assert grads[1][1].abs().max() == 0 and grads[1][4].abs().max() == 0  # experts without tokens: exact zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_mlp_matches_dense_reference(backend, k, dtype):
    t, topk_idx = _problem(19, k, dtype=dtype)
    names = ["x", "gates", "w1", "b1", "w2", "b2"]
    y = moe_mlp(t["x"], topk_idx, t["gates"], t["w1"], t["b1"], t["w2"], t["b2"], F.gelu, backend=backend)
    ref_t = {n: t[n].detach().double().requires_grad_() for n in names}
    ref = _dense_reference(ref_t["x"], ref_t["gates"], topk_idx, ref_t["w1"], ref_t["b1"], F.gelu, ref_t["w2"],
                           ref_t["b2"])  # fmt: skip
    _assert_close(y, ref, dtype, "output")
    for name, got, want in zip(names, _grads(y, [t[n] for n in names]), _grads(ref, [ref_t[n] for n in names]),
                               strict=True):  # fmt: skip
        _assert_close(got, want, dtype, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_map_and_reduce_keep_slots_apart(backend):
    t, topk_idx = _problem(11, 3)
    q = expert_map(t["x"], t["w1"], None, topk_idx, backend=backend)  # (N, k, H)
    assert q.shape == (11, 3, 32)
    for j in range(3):
        want = torch.einsum("ni,nio->no", t["x"], t["w1"][topk_idx[:, j]])
        torch.testing.assert_close(q[:, j], want, rtol=1e-5, atol=1e-5)
    y = expert_reduce(q, t["gates"], t["w2"], t["b2"], topk_idx, backend=backend)
    want = sum(
        t["gates"][:, j, None]
        * (torch.einsum("ni,nio->no", q[:, j], t["w2"][topk_idx[:, j]]) + t["b2"][topk_idx[:, j]])
        for j in range(3)
    )
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend):
    t, _ = _problem(1, 2)
    topk_idx = torch.zeros(0, 2, dtype=torch.long)
    x, gates = t["x"][:0], t["gates"][:0]
    y = moe_mlp(x, topk_idx, gates, t["w1"], t["b1"], t["w2"], t["b2"], F.gelu, backend=backend)
    assert y.shape == (0, 16)
    grads = torch.autograd.grad(y.sum(), [t["w1"], t["b2"]], allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)
    d = moe_dispatch(topk_idx, 6)
    assert d.counts.tolist() == [0] * 6 and moe_unsort(torch.zeros(0, 5), d).shape == (0, 5)


def test_gradient_with_stride_zero_cotangent():
    # the built-in grouped_mm backward rejects the expanded (stride-0) gradient of a sum
    t, topk_idx = _problem(9, 2)
    d = moe_dispatch(topk_idx, 6)
    grouped_linear(moe_gather(t["x"], d), t["w1"], None, d, backend="grouped_mm").sum().backward()
    assert t["w1"].grad is not None and t["x"].grad is not None


@pytest.fixture
def no_host_sync(monkeypatch):
    """Make every Python-level device-to-host read of a tensor raise."""

    def fail(*args, **kwargs):
        raise AssertionError("host sync: a tensor value was read back to the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, fail)


@pytest.mark.parametrize("backend", ["grouped_mm", "dense"])
def test_no_host_sync_forward_and_backward(backend, no_host_sync):
    t, topk_idx = _problem(17, 2)
    d = moe_dispatch(topk_idx, 6)
    y1 = moe_combine(grouped_linear(moe_gather(t["x"], d), t["w1"], t["b1"], d, backend), t["gates"], d, 17)
    y2 = moe_mlp(t["x"], topk_idx, t["gates"], t["w1"], t["b1"], t["w2"], t["b2"], F.gelu, backend=backend)
    q = expert_map(t["x"], t["w1"], None, topk_idx, backend=backend, dispatch=d)
    y3 = expert_reduce(q, t["gates"], t["w2"], None, topk_idx, backend=backend, dispatch=d)
    (y1.sum() + y2.sum() + y3.sum()).backward()
    assert all(t[n].grad is not None for n in ("x", "gates", "w1", "b1", "w2", "b2"))


def test_loop_backend_does_sync(no_host_sync):
    t, topk_idx = _problem(5, 2)
    d = moe_dispatch(topk_idx, 6)
    with pytest.raises(AssertionError, match="host sync"):
        grouped_linear(moe_gather(t["x"], d), t["w1"], None, d, backend="loop")


def test_backend_resolution():
    x, w = torch.randn(4, 16), torch.randn(3, 16, 32)
    assert resolve_moe_backend("auto", x, w) == "loop"  # CPU
    assert resolve_moe_backend("dense", x, w) == "dense"
    with pytest.raises(ValueError, match="unknown MoE backend 'fast'"):
        resolve_moe_backend("fast", x, w)
    with pytest.raises(RuntimeError, match="16-byte multiples"):
        resolve_moe_backend("grouped_mm", x, torch.randn(3, 16, 5))


def test_grouped_mm_under_cpu_autocast_runs_in_bf16():
    t, topk_idx = _problem(13, 2)
    d = moe_dispatch(topk_idx, 6)
    ref = grouped_linear(moe_gather(t["x"], d), t["w1"], t["b1"], d, backend="loop")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_linear(moe_gather(t["x"], d), t["w1"], t["b1"], d, backend="grouped_mm")
    assert y.dtype == torch.bfloat16
    _assert_close(y, ref.detach(), torch.bfloat16, "autocast output")
    y.float().sum().backward()
    assert t["w1"].grad.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["grouped_mm", "dense"])
def test_cuda_bf16_without_sync(backend):
    t, topk_idx = _problem(300, 4, e=16, d=64, h=128)
    t = {n: v.detach().cuda().to(torch.bfloat16).requires_grad_() for n, v in t.items()}
    topk_idx = topk_idx.cuda()
    args = (t["x"], topk_idx, t["gates"], t["w1"], t["b1"], t["w2"], t["b2"], F.gelu)
    ref = moe_mlp(*args, backend="loop")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = moe_mlp(*args, backend=backend)
        y.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _assert_close(y, ref.detach(), torch.bfloat16, "cuda output")
    assert resolve_moe_backend("auto", t["x"], t["w1"]) in ("grouped_mm", "loop")
