"""Backend selection of visionkit.ops.selective_scan: "auto", availability probes and the optional mamba_ssm path."""

import sys
import types

import pytest
import torch

from tests.ops.scan_cases import make_inputs
from visionkit.ops import SELECTIVE_SCAN_BACKENDS, available_selective_scan_backends, selective_scan
from visionkit.ops.selective_scan.api import _probe, resolve_selective_scan_backend
from visionkit.ops.selective_scan.mamba_ssm_scan import load_selective_scan_fn


@pytest.fixture
def fresh_probes():
    _probe.cache_clear()
    yield
    _probe.cache_clear()


def test_cpu_backends_and_auto():
    backends = available_selective_scan_backends("cpu")
    assert {"reference", "torch"} <= set(backends)
    assert "mamba_ssm" not in backends  # needs CUDA tensors
    expected = "numba" if "numba" in backends else "torch"
    assert resolve_selective_scan_backend("auto", "cpu") == expected


def test_auto_on_cuda_prefers_triton_and_falls_back_to_torch(monkeypatch, fresh_probes):
    # resolution only (no CUDA tensors are made): with triton importable "auto" is triton, without it torch
    assert resolve_selective_scan_backend("auto", "cuda") in ("triton", "torch")
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail
    _probe.cache_clear()
    assert resolve_selective_scan_backend("auto", "cuda") == "torch"
    with pytest.raises(RuntimeError, match="'triton' is unavailable: triton does not import"):
        resolve_selective_scan_backend("triton", "cuda")


def test_named_backend_that_cannot_run_says_why(monkeypatch):
    inputs = make_inputs(length=5, n=2, requires_grad=False)
    with pytest.raises(RuntimeError, match="'mamba_ssm' is unavailable: mamba_ssm's kernel needs CUDA tensors"):
        selective_scan(**inputs, backend="mamba_ssm")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="'triton' is unavailable: the triton backend needs CUDA tensors"):
        selective_scan(**inputs, backend="triton")
    with pytest.raises(RuntimeError, match="'numba' is unavailable: the numba backend runs on CPU tensors"):
        resolve_selective_scan_backend("numba", "cuda")
    with pytest.raises(ValueError, match="unknown selective_scan backend 'cuda'"):
        selective_scan(**inputs, backend="cuda")


def test_mamba_ssm_is_used_only_when_its_extension_imports(monkeypatch, fresh_probes):
    # without the compiled extension: unavailable, with the import error in the message
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", None)
    with pytest.raises(RuntimeError, match="selective_scan_cuda does not import"):
        resolve_selective_scan_backend("mamba_ssm", "cuda")

    # with (stand-ins for) the extension and mamba_ssm's interface module: available on CUDA, never chosen by "auto"
    _probe.cache_clear()
    calls = []

    def fake_selective_scan_fn(*args, **kwargs):
        calls.append(kwargs)
        return "mamba_ssm result"

    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    interface.selective_scan_fn = fake_selective_scan_fn
    for name in ("mamba_ssm", "mamba_ssm.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", interface)
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    assert "mamba_ssm" in available_selective_scan_backends("cuda")
    assert resolve_selective_scan_backend("mamba_ssm", "cuda") == "mamba_ssm"
    assert resolve_selective_scan_backend("auto", "cuda") != "mamba_ssm"
    fn = load_selective_scan_fn()
    assert fn(1, 2, 3, 4, 5, D=None, delta_softplus=True) == "mamba_ssm result"
    assert calls == [{"D": None, "delta_softplus": True}]


def test_every_available_cpu_backend_agrees_with_the_reference():
    inputs = make_inputs(length=40, n=4, groups=2, requires_grad=False)
    ref, ref_h = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend="reference")
    for backend in [*available_selective_scan_backends("cpu"), "auto"]:
        out, h = selective_scan(**inputs, delta_softplus=True, return_last_state=True, backend=backend)
        torch.testing.assert_close(out, ref, rtol=6e-4, atol=2e-3, msg=lambda m, b=backend: f"{b}: {m}")
        torch.testing.assert_close(h, ref_h, rtol=6e-4, atol=2e-3, msg=lambda m, b=backend: f"{b}: {m}")
    assert set(SELECTIVE_SCAN_BACKENDS) == {"auto", "reference", "torch", "numba", "triton", "mamba_ssm"}
