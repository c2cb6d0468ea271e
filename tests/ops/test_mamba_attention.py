"""Tests of visionkit.ops.mamba_attention_map: a brute-force loop over the recurrence for every mode, chunking,
triangularity per direction, the raster re-ordering (hand-worked 2x2 and against cross_merge), the true-kernel mode
against the selective scan itself, normalisation, dtypes and error messages."""

from __future__ import annotations

import math

import pytest
import torch

from visionkit.ops import MAMBA_ATTENTION_MODES, cross_merge, mamba_attention_map
from visionkit.ops.mamba_attention import raster_order
from visionkit.ops.selective_scan import selective_scan_reference

K = 4


def _inputs(batch=2, d_inner=2, n_state=2, height=2, width=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    length = height * width
    delta = torch.rand(batch, K * d_inner, length, generator=g, dtype=dtype) - 0.5
    A = -torch.rand(K * d_inner, n_state, generator=g, dtype=dtype) * 1.5 - 0.1
    B = torch.randn(batch, K, n_state, length, generator=g, dtype=dtype)
    C = torch.randn(batch, K, n_state, length, generator=g, dtype=dtype)
    bias = torch.rand(K * d_inner, generator=g, dtype=dtype) - 0.5
    return delta, A, B, C, bias


def _seq_to_raster(k: int, height: int, width: int) -> list[int]:
    """Raster index of each sequence position of direction k, written out from the direction definitions."""
    length = height * width
    col_major = [(p % height) * width + p // height for p in range(length)]  # position w·H + h holds (h, w)
    return [list(range(length)), col_major, list(range(length))[::-1], col_major[::-1]][k]


def _brute_force(delta, A, B, C, height, width, bias, softplus, mode, normalize):
    """Explicit loops over batch, direction, channel, t, s and n, in Python floats."""
    batch, channels, length = delta.shape
    d_inner, n_state = channels // K, A.shape[1]
    out = torch.zeros(batch, length, length, dtype=torch.float64)
    for b in range(batch):
        for k in range(K):
            raster = _seq_to_raster(k, height, width)
            mean = [[0.0] * length for _ in range(length)]
            for d in range(d_inner):
                ch = k * d_inner + d
                dt = [float(delta[b, ch, t]) + (float(bias[ch]) if bias is not None else 0.0) for t in range(length)]
                if softplus:
                    dt = [math.log1p(math.exp(x)) for x in dt]
                w = []
                for n in range(n_state):
                    cum, row = 0.0, []
                    for t in range(length):
                        cum += dt[t] * float(A[ch, n])
                        row.append(math.exp(cum))
                    w.append(row)
                for t in range(length):
                    for s in range(t + 1):
                        val = 0.0
                        for n in range(n_state):
                            c_t, b_s = float(C[b, k, n, t]), float(B[b, k, n, s])
                            w_t, w_s = w[n][t], max(w[n][s], 1e-20)
                            q, key = {
                                "CB": (c_t, b_s),
                                "CBdt": (c_t, b_s * dt[s]),
                                "CwBw": (c_t * w_t, b_s / w_s),
                                "CwBdtw": (c_t * w_t, b_s * dt[s] / w_s),
                                "ww": (w_t, 1.0 / w_s),
                            }[mode]
                            val += q * key
                        mean[t][s] += val / d_inner
            for t in range(length):
                for s in range(length):
                    out[b, raster[t], raster[s]] += mean[t][s]
    if normalize:
        out = (out - out.min()) / (out.max() - out.min())
    return out


@pytest.mark.parametrize("mode", MAMBA_ATTENTION_MODES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_brute_force_loop(mode, with_bias, softplus, normalize):
    delta, A, B, C, bias = _inputs()
    if not softplus:
        delta = delta + 0.6  # keep raw step sizes positive, as softplus would
    bias = bias if with_bias else None
    got = mamba_attention_map(
        delta, A, B, C, height=2, width=3, delta_bias=bias, delta_softplus=softplus, mode=mode, normalize=normalize
    )
    want = _brute_force(delta, A, B, C, 2, 3, bias, softplus, mode, normalize)
    assert got.dtype == torch.float64 and got.shape == (2, 6, 6)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_default_mode_is_cwbw_normalised():
    delta, A, B, C, bias = _inputs()
    default = mamba_attention_map(delta, A, B, C, height=2, width=3, delta_bias=bias)
    explicit = mamba_attention_map(delta, A, B, C, height=2, width=3, delta_bias=bias, mode="CwBw", normalize=True)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    assert default.min() == 0 and default.max() == 1


@pytest.mark.parametrize("mode", ["CwBw", "CwBdtw", "CBdt"])
def test_chunked_equals_unchunked(mode):
    delta, A, B, C, bias = _inputs(batch=3, d_inner=10, n_state=3, height=3, width=4, dtype=torch.float32, seed=1)
    kwargs = dict(height=3, width=4, delta_bias=bias, mode=mode, normalize=False)
    whole = mamba_attention_map(delta, A, B, C, channel_chunk=10, **kwargs)
    for chunk in (1, 3, 7, 64, None):
        got = mamba_attention_map(delta, A, B, C, channel_chunk=chunk, **kwargs)
        torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["CwBw", "CB"])
def test_each_direction_is_lower_triangular_in_its_own_order(mode):
    delta, A, B, C, bias = _inputs(height=3, width=2)
    order = raster_order(3, 2)
    for k in range(K):
        only_k = torch.zeros_like(C)
        only_k[:, k] = C[:, k]
        raster = mamba_attention_map(
            delta, A, B, only_k, height=3, width=2, delta_bias=bias, mode=mode, normalize=False
        )
        in_sequence = raster[:, order[k]][:, :, order[k]]
        assert torch.all(torch.triu(in_sequence, diagonal=1) == 0)
        assert torch.all(torch.diagonal(in_sequence, dim1=1, dim2=2) != 0)


def test_raster_reordering_hand_worked_2x2():
    # N = 1, D = 1, mode CB, C = 1, B_s = s + 1: in sequence order att[t, s] = s + 1 for s <= t. Raster indices
    # (h, w) -> 2h + w; sequences: row-major [0, 1, 2, 3], column-major [0, 2, 1, 3], reversed [3, 2, 1, 0],
    # reversed column-major [3, 1, 2, 0]; entry [r1, r2] = pos(r2) + 1 if pos(r2) <= pos(r1) else 0.
    expected = [
        [[1, 0, 0, 0], [1, 2, 0, 0], [1, 2, 3, 0], [1, 2, 3, 4]],
        [[1, 0, 0, 0], [1, 3, 2, 0], [1, 0, 2, 0], [1, 3, 2, 4]],
        [[4, 3, 2, 1], [0, 3, 2, 1], [0, 0, 2, 1], [0, 0, 0, 1]],
        [[4, 2, 3, 1], [0, 2, 0, 1], [0, 2, 3, 1], [0, 0, 0, 1]],
    ]
    delta = torch.zeros(1, 4, 4)
    A = -torch.ones(4, 1)
    B = torch.arange(1.0, 5.0).expand(1, 4, 1, 4).clone()
    for k in range(K):
        C = torch.zeros(1, 4, 1, 4)
        C[:, k] = 1.0
        got = mamba_attention_map(delta, A, B, C, height=2, width=2, mode="CB", normalize=False)
        assert got[0].tolist() == expected[k], f"direction {k}"
    summed = mamba_attention_map(delta, A, B, torch.ones(1, 4, 1, 4), height=2, width=2, mode="CB", normalize=False)
    assert summed[0].tolist() == torch.tensor(expected, dtype=torch.float32).sum(0).tolist()


@pytest.mark.parametrize(("height", "width"), [(2, 3), (3, 2), (1, 4), (3, 3)])
def test_raster_order_is_the_permutation_cross_merge_undoes(height, width):
    length = height * width
    order = raster_order(height, width)
    for k in range(K):
        assert order[k].tolist() == _seq_to_raster(k, height, width)
        seqs = torch.zeros(1, K, 1, length)
        seqs[0, k, 0] = torch.arange(length, dtype=torch.float32)  # position p carries p
        merged = cross_merge(seqs.view(1, K, 1, height, width))[0, 0]
        assert merged[order[k]].tolist() == list(range(length))  # raster order[k][p] received position p


def test_cwbdtw_is_the_selective_scan_kernel():
    # Feeding u = e_s to the scan gives y_t = Σ_n C_t exp(Σ_{s<τ≤t} Δ_τ A) Δ_s B_s: column s of the true kernel.
    delta, A, B, C, bias = _inputs(batch=2, d_inner=3, n_state=2, height=2, width=2)
    length, d_inner = 4, 3
    kernel = torch.zeros(2, K * d_inner, length, length, dtype=torch.float64)
    for s in range(length):
        u = torch.zeros_like(delta)
        u[:, :, s] = 1.0
        y = selective_scan_reference(u, delta, A, B, C, delta_bias=bias, delta_softplus=True)
        kernel[:, :, :, s] = y
    order = raster_order(2, 2)
    for k in range(K):
        only_k = torch.zeros_like(C)
        only_k[:, k] = C[:, k]
        raster = mamba_attention_map(
            delta, A, B, only_k, height=2, width=2, delta_bias=bias, mode="CwBdtw", normalize=False
        )
        in_sequence = raster[:, order[k]][:, :, order[k]]
        torch.testing.assert_close(
            in_sequence, kernel[:, k * d_inner : (k + 1) * d_inner].mean(1), rtol=1e-10, atol=1e-12
        )


def test_normalisation_of_a_constant_map_gives_zeros():
    delta, A, _, _, _ = _inputs()
    zeros = torch.zeros(2, K, 2, 6, dtype=torch.float64)
    out = mamba_attention_map(delta, A, zeros, zeros, height=2, width=3)
    assert torch.equal(out, torch.zeros(2, 6, 6, dtype=torch.float64))


def test_dtypes_no_grad_and_gradients():
    delta, A, B, C, _ = _inputs(dtype=torch.float32)
    with torch.no_grad():
        assert mamba_attention_map(delta, A, B, C, height=2, width=3).dtype == torch.float32
        half = mamba_attention_map(delta.half(), A, B.bfloat16(), C.half(), height=2, width=3)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    delta.requires_grad_(True)
    mamba_attention_map(delta, A, B, C, height=2, width=3, normalize=False).sum().backward()
    assert delta.grad is not None and torch.isfinite(delta.grad).all()


def test_underflowing_decay_stays_finite():
    # Σ Δ·A far below log(1e-20): the release's clamp truncates the map to 0 there; nothing may turn into nan / inf.
    delta, A, B, C, _ = _inputs(dtype=torch.float32)
    out = mamba_attention_map(delta + 40.0, A * 10, B, C, height=2, width=3, normalize=False)
    assert torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_matches_cpu():
    delta, A, B, C, bias = _inputs(batch=3, d_inner=8, height=3, width=3, dtype=torch.float32)
    cpu = mamba_attention_map(delta, A, B, C, height=3, width=3, delta_bias=bias, channel_chunk=3)
    gpu = mamba_attention_map(
        delta.cuda(), A.cuda(), B.cuda(), C.cuda(), height=3, width=3, delta_bias=bias.cuda(), channel_chunk=3
    )
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


def test_error_messages_name_the_tensor_and_shapes():
    delta, A, B, C, bias = _inputs()
    call = dict(height=2, width=3)
    with pytest.raises(ValueError, match=r"delta must be \(batch, K·D, L\), got shape \(8, 6\)"):
        mamba_attention_map(delta[0], A, B, C, **call)
    with pytest.raises(ValueError, match=r"L = 6 positions but height x width = 3 x 3 = 9"):
        mamba_attention_map(delta, A, B, C, height=3, width=3)
    with pytest.raises(ValueError, match=r"7 channels, not a multiple of the 4 scan directions"):
        mamba_attention_map(delta[:, :7], A[:7], B, C, **call)
    with pytest.raises(ValueError, match=r"A must have shape \(8, N\), got \(4, 2\)"):
        mamba_attention_map(delta, A[:4], B, C, **call)
    with pytest.raises(ValueError, match=r"B must have shape \(batch, K, N, L\) = \(2, 4, 2, 6\), got \(2, 4, 1, 6\)"):
        mamba_attention_map(delta, A, B[:, :, :1], C, **call)
    with pytest.raises(ValueError, match=r"C must have shape \(batch, K, N, L\) = \(2, 4, 2, 6\), got \(2, 2, 6\)"):
        mamba_attention_map(delta, A, B, C[:, 0], **call)
    with pytest.raises(ValueError, match=r"delta_bias must have shape \(8,\), got \(4, 2\)"):
        mamba_attention_map(delta, A, B, C, delta_bias=bias.view(4, 2), **call)
    with pytest.raises(ValueError, match=r"unknown mode 'CwB'"):
        mamba_attention_map(delta, A, B, C, mode="CwB", **call)
    with pytest.raises(ValueError, match=r"channel_chunk must be a positive int or None, got 0"):
        mamba_attention_map(delta, A, B, C, channel_chunk=0, **call)
