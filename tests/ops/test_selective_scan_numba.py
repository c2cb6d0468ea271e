"""Tests for the numba CPU backend of the selective scan (visionkit.ops.selective_scan.numba_scan).

Every result is checked against the sequential reference with mamba's tolerances (tests/ops/test_selective_scan.py
in state-spaces/mamba; docs/ops/selective_scan.md, "Tolerances"). The first test that runs compiles the kernels (~15 s
per dtype without numba's on-disk cache).
"""

import importlib.util
import math
import sys

import numpy as np
import pytest
import torch

from tests.ops.scan_cases import TOL, clone_inputs, grad_tols, make_inputs
from visionkit.ops import selective_scan, selective_scan_reference
from visionkit.ops.selective_scan.inputs import ScanInputs

pytest.importorskip("numba")
snb = importlib.import_module("visionkit.ops.selective_scan.numba_scan")
numba_math = importlib.import_module("visionkit.ops.selective_scan.numba_support")


def selective_scan_numba(*args, **kwargs):
    """The numba backend through the public entry point (inputs validated once, as in every call)."""
    return selective_scan(*args, **kwargs, backend="numba")


def check_against_reference(inputs, softplus=True, time_invariant=False, has_z=True, dtype=torch.float32):
    """Values, last state and the gradients of every given input, numba vs reference."""
    ref_in, nb_in = clone_inputs(inputs), clone_inputs(inputs)
    ref, ref_h = selective_scan_reference(**ref_in, delta_softplus=softplus, return_last_state=True)
    out, h = selective_scan_numba(**nb_in, delta_softplus=softplus, return_last_state=True)
    rtol, atol = TOL[dtype]
    assert out.dtype == ref.dtype and h.dtype == ref_h.dtype
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(h, ref_h, rtol=rtol, atol=atol)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(ref.dtype)
    ref.backward(g)
    out.backward(g)
    for name, v in ref_in.items():
        if v is None:
            assert nb_in[name] is None
            continue
        r, a = grad_tols(name, rtol, atol, time_invariant, has_z)
        assert nb_in[name].grad.dtype == v.grad.dtype
        torch.testing.assert_close(nb_in[name].grad, v.grad, rtol=r, atol=a, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("n", [1, 16])
@pytest.mark.parametrize(("bc", "groups"), [("ti", 1), ("var", 0), ("var", 1), ("var", 2), ("var", 4)])
@pytest.mark.parametrize("length", [1, 64, 130])  # one step, exactly one chunk, 2 chunks + a partial one
def test_values_and_grads_match_reference(n, bc, groups, length):
    inputs = make_inputs(dim=8, length=length, n=n, bc=bc, groups=groups, seed=n + groups + length)
    check_against_reference(inputs, time_invariant=bc == "ti")


@pytest.mark.parametrize("has_z", [False, True])
@pytest.mark.parametrize("has_d", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("softplus", [False, True])
def test_optional_inputs(has_z, has_d, has_bias, softplus):
    inputs = make_inputs(length=70, n=4, groups=2, has_d=has_d, has_z=has_z, has_bias=has_bias, seed=5)
    check_against_reference(inputs, softplus=softplus, has_z=has_z)


def test_mixed_time_invariant_b_and_grouped_c():
    # mamba allows B and C to be variable independently: time-invariant B, grouped C (and the converse)
    inputs = make_inputs(dim=8, length=90, n=3, groups=2, seed=7)
    ti = make_inputs(dim=8, length=90, n=3, bc="ti", seed=8)
    check_against_reference({**inputs, "B": ti["B"]}, time_invariant=True)
    check_against_reference({**inputs, "C": ti["C"]}, time_invariant=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    inputs = make_inputs(length=100, n=4, groups=2, dtype=dtype, seed=2)
    check_against_reference(inputs, dtype=dtype)
    out = selective_scan_numba(**clone_inputs(inputs), delta_softplus=True)
    assert out.dtype == dtype


def test_gradcheck_float64(monkeypatch):
    # grouped B / C over two full chunks and a partial one, then time-invariant B / C without z
    monkeypatch.setattr(snb, "CHUNK", 4)
    inputs = make_inputs(batch=1, dim=2, length=10, n=2, groups=2, dtype=torch.float64, seed=3)
    names = list(inputs)

    def fn(*args):
        return selective_scan_numba(**dict(zip(names, args, strict=True)), delta_softplus=True, return_last_state=True)

    assert torch.autograd.gradcheck(fn, tuple(inputs[k] for k in names))

    ti = make_inputs(batch=2, dim=2, length=5, n=3, bc="ti", has_z=False, dtype=torch.float64, seed=4)
    ti_names = [k for k, v in ti.items() if v is not None]

    def fn_ti(*args):
        return selective_scan_numba(**dict(zip(ti_names, args, strict=True)))

    assert torch.autograd.gradcheck(fn_ti, tuple(ti[k] for k in ti_names))


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_float64_matches_reference_to_rounding(chunk, n, monkeypatch):
    # in float64 the chunked recomputation must agree with the sequential reference to rounding, for any chunk
    monkeypatch.setattr(snb, "CHUNK", chunk)
    inputs = make_inputs(dim=6, length=100, n=n, groups=3, dtype=torch.float64, seed=9)
    ref_in, nb_in = clone_inputs(inputs), clone_inputs(inputs)
    ref = selective_scan_reference(**ref_in, delta_softplus=True)
    out = selective_scan_numba(**nb_in, delta_softplus=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    ref.sum().backward()
    out.sum().backward()
    for name, v in ref_in.items():
        torch.testing.assert_close(nb_in[name].grad, v.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [16, 1024])
@pytest.mark.parametrize(("dim", "bc", "groups"), [(40, "ti", 1), (6, "var", 0), (40, "var", 2), (40, "mixed", 4)])
@pytest.mark.parametrize(
    ("has_z", "has_d", "has_bias", "softplus"),
    [(True, True, True, True), (False, False, False, False), (True, False, True, False), (False, True, False, True)],
)
def test_single_state_kernels(chunk, dim, bc, groups, has_z, has_d, has_bias, softplus, monkeypatch):
    # N = 1 runs the lane-interleaved kernels: dim 40 gives tasks of 5-20 channels with 1-4 threads (all four lanes,
    # some lane groups short), dim 6 tasks of one channel; L = 70 ends in a partial chunk of 16 (or is one chunk);
    # "mixed" is a time-invariant B with a grouped C
    monkeypatch.setattr(snb, "CHUNK", chunk)
    kw = {"dim": dim, "length": 70, "n": 1, "has_z": has_z, "has_d": has_d, "has_bias": has_bias}
    inputs = make_inputs(**kw, bc="ti" if bc == "ti" else "var", groups=groups, seed=dim + groups + chunk)
    if bc == "mixed":
        inputs["B"] = make_inputs(**kw, bc="ti", seed=1)["B"]
    check_against_reference(inputs, softplus=softplus, time_invariant=bc != "var", has_z=has_z)


def test_single_state_gradcheck_float64(monkeypatch):
    # the N = 1 kernels in float64 (math.exp / log1p): grouped B / C with z over chunks of 4, idle lanes (dim 5)
    monkeypatch.setattr(snb, "CHUNK", 4)
    inputs = make_inputs(batch=2, dim=5, length=10, n=1, groups=5, dtype=torch.float64, seed=12)
    names = list(inputs)

    def fn(*args):
        return selective_scan_numba(**dict(zip(names, args, strict=True)), delta_softplus=True, return_last_state=True)

    assert torch.autograd.gradcheck(fn, tuple(inputs[k] for k in names))
    ti = make_inputs(batch=1, dim=3, length=9, n=1, bc="ti", has_z=False, dtype=torch.float64, seed=13)
    ti_names = [k for k, v in ti.items() if v is not None]

    def fn_ti(*args):
        return selective_scan_numba(**dict(zip(ti_names, args, strict=True)))

    assert torch.autograd.gradcheck(fn_ti, tuple(ti[k] for k in ti_names))


@pytest.mark.parametrize("n", [2, 16])
@pytest.mark.parametrize("chunk", [16, 1024])
@pytest.mark.parametrize(("dim", "bc", "groups"), [(8, "ti", 1), (8, "var", 0), (12, "var", 3), (8, "mixed", 2)])
@pytest.mark.parametrize("has_z", [False, True])
def test_multi_state_kernels(n, chunk, dim, bc, groups, has_z, monkeypatch):
    # N > 1 runs the row-vectorised kernels: L = 70 ends in a partial chunk of 6 (chunk 16) or is one chunk; a
    # time-invariant B / C is repeated into a buffer, a variable one read in place; "mixed": time-invariant B, grouped C
    monkeypatch.setattr(snb, "CHUNK", chunk)
    kw = {"dim": dim, "length": 70, "n": n, "has_z": has_z}
    inputs = make_inputs(**kw, bc="ti" if bc == "ti" else "var", groups=groups, seed=dim + groups + chunk + n)
    if bc == "mixed":
        inputs["B"] = make_inputs(**kw, bc="ti", seed=2)["B"]
    check_against_reference(inputs, time_invariant=bc != "var", has_z=has_z)


def test_hand_worked_example():
    # A = -ln 2, Δ = softplus(ln(e - 1)) = 1, so a_t = 1/2; B = 2, C = 3, D = 0.5, u = [1, 2, 3]:
    # h = [2, 0.5·2 + 4 = 5, 0.5·5 + 6 = 8.5], y = 3·h + 0.5·u = [6.5, 16, 27]
    u = torch.tensor([[[1.0, 2.0, 3.0]]])
    delta = torch.full((1, 1, 3), math.log(math.e - 1))
    out, h = selective_scan_numba(
        u, delta, torch.tensor([[-math.log(2.0)]]), torch.tensor([[2.0]]), torch.tensor([[3.0]]),
        D=torch.tensor([0.5]), delta_softplus=True, return_last_state=True,
    )  # fmt: skip
    torch.testing.assert_close(out, torch.tensor([[[6.5, 16.0, 27.0]]]))
    torch.testing.assert_close(h, torch.tensor([[[8.5]]]))


def test_large_decay_stays_finite():
    # |Δ·A| up to 16·2.5 per step: exp underflows towards 0, never overflows
    inputs = make_inputs(length=150, n=16, groups=2, seed=11)
    with torch.no_grad():
        inputs["A"].copy_(-torch.arange(1, 17, dtype=torch.float32).repeat(4, 1))
        inputs["delta"].add_(2.0)
    check_against_reference(inputs)
    out = selective_scan_numba(**clone_inputs(inputs), delta_softplus=True)
    assert torch.isfinite(out).all()


def test_exp_and_log1p_float32_accuracy():
    # the polynomial exp / log1p behind the float32 kernels, against float64 torch
    x = torch.linspace(-87.0, 88.0, 20001, dtype=torch.float32)
    got = torch.tensor([numba_math.exp_f32_jit(v) for v in x.numpy()], dtype=torch.float64)
    torch.testing.assert_close(got, torch.exp(x.double()), rtol=3e-7, atol=0.0)
    e = torch.linspace(0.0, 1.0, 2001, dtype=torch.float32)
    got = torch.tensor([numba_math.log1p_unit_f32_jit(v) for v in e.numpy()], dtype=torch.float64)
    torch.testing.assert_close(got, torch.log1p(e.double()), rtol=3e-7, atol=1e-12)
    assert numba_math.exp_f32_jit(np.float32(100.0)) == math.inf
    assert numba_math.exp_f32_jit(np.float32(-100.0)) < 1e-37
    assert math.isnan(numba_math.exp_f32_jit(np.float32(math.nan)))


def test_channel_blocks_respect_groups():
    # a backward task must stay inside one group of every variable B / C and leave enough tasks for the threads
    threads = snb.numba.get_num_threads()
    for batch, dim, groups in [(2, 768, [4, 4]), (2, 1536, [1, 1]), (1, 12, [3, 2]), (2, 6, []), (1, 7, [7])]:
        block = snb._channel_block(batch, dim, groups)
        assert dim % block == 0
        assert all((dim // g) % block == 0 for g in groups)
        assert block == 1 or batch * (dim // block) >= 4 * threads


def test_dispatch_reaches_numba(monkeypatch):
    calls = []
    forward = snb._NumbaScanKernel.forward

    def spy(self, *args):
        calls.append(1)
        return forward(self, *args)

    monkeypatch.setattr(snb._NumbaScanKernel, "forward", spy)
    inputs = make_inputs(length=30, n=4, groups=2, requires_grad=False)
    ref = selective_scan_reference(**inputs, delta_softplus=True)
    for backend in ("numba", "auto"):
        out = selective_scan(**inputs, delta_softplus=True, backend=backend)
        torch.testing.assert_close(out, ref, rtol=6e-4, atol=2e-3)
    assert len(calls) == 2


def test_non_cpu_tensors_are_refused():
    inputs = make_inputs(length=5, n=2, requires_grad=False)
    meta = {k: (v.to("meta") if v is not None else None) for k, v in inputs.items()}
    with pytest.raises(RuntimeError, match="runs on CPU tensors, got meta tensors"):
        selective_scan_numba(**meta)


def test_module_imports_without_numba(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)  # makes `import numba` fail
    spec = importlib.util.spec_from_file_location("_snb_without_numba", snb.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(RuntimeError, match="needs numba, which does not import"):
        module.run_numba(ScanInputs(**make_inputs(length=5, n=2, requires_grad=False)), False)


@pytest.mark.parametrize("bc", ["var", "ti"])
def test_empty_sequence(bc):
    inputs = make_inputs(length=0, n=3, groups=2, bc=bc)
    out, h = selective_scan_numba(**inputs, delta_softplus=True, return_last_state=True)
    assert out.shape == (2, 4, 0)
    torch.testing.assert_close(h, torch.zeros(2, 4, 3))
    out.sum().backward()
    torch.testing.assert_close(inputs["A"].grad, torch.zeros(4, 3))
    torch.testing.assert_close(inputs["D"].grad, torch.zeros(4))
