"""Tests of the Triton selective-scan kernels against the sequential reference.

On a machine without CUDA, tests/conftest.py turns on ``TRITON_INTERPRET=1`` before the kernels are imported, so the
same kernels run in Triton's interpreter on CPU tensors (slow: shapes are kept tiny). With CUDA they run compiled on
the GPU (``bench/gpu_check.sh`` runs this file there).
"""

import os

import pytest
import torch

from tests.ops.scan_cases import TOL, clone_inputs, grad_tols, make_inputs
from visionkit.ops import selective_scan, selective_scan_reference

pytest.importorskip("triton")
triton_scan = pytest.importorskip("visionkit.ops.selective_scan.triton_scan")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - conftest sets it
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1", allow_module_level=True)


def to_device(inputs):
    return {
        k: (v.detach().to(DEVICE).requires_grad_(v.requires_grad) if v is not None else None) for k, v in inputs.items()
    }


def check_against_reference(inputs, softplus=True, last_state=True, dtype=torch.float32):
    ref_in = clone_inputs(inputs)
    tri_in = to_device(clone_inputs(inputs))
    ref = selective_scan_reference(**ref_in, delta_softplus=softplus, return_last_state=last_state)
    tri = selective_scan(**tri_in, delta_softplus=softplus, return_last_state=last_state, backend="triton")
    if last_state:
        (ref, ref_h), (tri, tri_h) = ref, tri
    rtol, atol = TOL[dtype]
    assert tri.dtype == inputs["u"].dtype
    torch.testing.assert_close(tri.float().cpu(), ref.float(), rtol=rtol, atol=atol)
    if last_state:
        torch.testing.assert_close(tri_h.cpu(), ref_h, rtol=rtol, atol=atol)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(ref.dtype)
    ref.backward(g)
    tri.backward(g.to(DEVICE))
    has_z = inputs["z"] is not None
    for name, v in ref_in.items():
        if v is None:
            continue
        r, a = grad_tols(name, rtol, atol, inputs["B"].dim() == 2, has_z)
        got = tri_in[name].grad
        assert got.dtype == v.dtype, name
        torch.testing.assert_close(
            got.float().cpu(), v.grad.float(), rtol=r, atol=a, msg=lambda m, name=name: f"d{name}: {m}"
        )


# Chunks are up to 512 steps long (_MAX_BLOCK_L) and 128 steps at N = 16; with max_block_l = 16 the lengths below
# cover one chunk, several, and a partial last chunk.
@pytest.mark.parametrize(
    ("n", "bc", "groups", "length", "max_block_l"),
    [
        (1, "var", 4, 300, 512),
        (1, "var", 4, 75, 16),
        (1, "var", 1, 37, 16),
        (16, "var", 0, 70, 512),
        (16, "var", 2, 33, 16),
        (4, "ti", 1, 45, 16),
    ],
)
def test_triton_matches_reference(n, bc, groups, length, max_block_l, monkeypatch):
    monkeypatch.setattr(triton_scan, "_MAX_BLOCK_L", max_block_l)
    check_against_reference(make_inputs(dim=8, length=length, n=n, bc=bc, groups=groups, seed=n + length))


def test_triton_atomic_bc_gradients(monkeypatch):
    # variable dB / dC through atomic adds instead of per-program partial sums (used for very large inputs)
    monkeypatch.setattr(triton_scan, "_MAX_PARTIAL_RATIO", 0)
    monkeypatch.setattr(triton_scan, "_MAX_BLOCK_L", 16)
    check_against_reference(make_inputs(dim=8, length=40, n=2, groups=2, seed=5))


@pytest.mark.parametrize(
    "tiles",
    [
        (16, 2, 1, 4, 2),  # backward programs cover more channels than forward ones
        (32, 4, 2, 1, 1),  # and fewer
    ],
)
def test_triton_separate_forward_and_backward_tiles(tiles, monkeypatch):
    # the launch shapes the tuning script tries: only the chunk length must agree between the two kernels
    kernel = triton_scan._TritonScanKernel(training=True, tiles=triton_scan._Tiles(*tiles))
    monkeypatch.setattr(triton_scan, "_TRAINING_KERNEL", kernel)
    check_against_reference(make_inputs(batch=2, dim=8, length=70, n=2, groups=2, seed=11))
    inputs = make_inputs(batch=2, dim=8, length=45, n=1, bc="ti", seed=12)
    check_against_reference(inputs, softplus=False)


@pytest.mark.parametrize(
    ("has_z", "has_d", "has_bias", "softplus"),
    [(False, False, False, False), (False, True, True, True), (True, False, False, True), (True, True, True, False)],
)
def test_triton_optional_inputs(has_z, has_d, has_bias, softplus):
    inputs = make_inputs(length=21, n=2, groups=2, has_d=has_d, has_z=has_z, has_bias=has_bias)
    check_against_reference(inputs, softplus=softplus, last_state=False)


def test_triton_mixed_time_invariant_and_variable():
    inputs = make_inputs(length=19, n=4, groups=2)
    inputs["C"] = torch.randn(4, 4, requires_grad=True)  # time-invariant C with grouped B
    check_against_reference(inputs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_inputs(dtype):
    inputs = make_inputs(length=40, n=2, groups=2, dtype=dtype)
    ref_in = {k: (v.detach().float() if v is not None else None) for k, v in inputs.items()}
    ref = selective_scan_reference(**ref_in, delta_softplus=True)
    out = selective_scan(**to_device(inputs), delta_softplus=True, backend="triton")
    assert out.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float().cpu(), ref, rtol=rtol, atol=atol)
    out.float().sum().backward()


def test_triton_large_decay_stays_finite():
    inputs = make_inputs(length=150, n=16, requires_grad=False)
    inputs["A"] = -torch.arange(1, 17, dtype=torch.float32).repeat(4, 1)
    inputs["delta"] = inputs["delta"] + 2.0
    ref = selective_scan_reference(**inputs)
    out = selective_scan(**to_device(inputs), backend="triton")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu(), ref, rtol=6e-4, atol=2e-3)


@pytest.mark.slow
def test_triton_gradcheck_float64():
    inputs = to_device(make_inputs(batch=1, dim=2, length=5, n=2, groups=2, dtype=torch.float64, seed=3))
    names = list(inputs)

    def fn(*args):
        return selective_scan(**dict(zip(names, args, strict=True)), delta_softplus=True, backend="triton")

    assert torch.autograd.gradcheck(fn, tuple(inputs[k] for k in names))


def test_triton_rejects_different_group_counts():
    inputs = make_inputs(length=5, n=2, groups=2, requires_grad=False)
    inputs["C"] = torch.randn(2, 4, 2, 5)
    with pytest.raises(ValueError, match="same number of groups"):
        selective_scan(**to_device(inputs), backend="triton")
