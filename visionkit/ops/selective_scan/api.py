"""The public selective scan and the one table of its backends.

Every backend is a row of :data:`_BACKENDS`: a function that says why the backend cannot run on a device (None when it
can) and a runner that takes validated :class:`~visionkit.ops.selective_scan.inputs.ScanInputs`. The table serves
:func:`selective_scan` (``backend=...``), :func:`available_selective_scan_backends` and the ``"auto"`` choice; nothing
else checks whether a backend can run. Availability probes import a module once and remember the outcome; numba,
Triton and mamba_ssm are imported only by those probes and by the runners, never at ``import visionkit``.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from visionkit.ops.selective_scan.inputs import ScanInputs, ScanOutput
from visionkit.ops.selective_scan.mamba_ssm_scan import MAMBA_SSM_INTERFACE
from visionkit.ops.selective_scan.reference import run_reference
from visionkit.ops.selective_scan.torch_chunked import run_chunked

__all__ = [
    "SELECTIVE_SCAN_BACKENDS",
    "available_selective_scan_backends",
    "resolve_selective_scan_backend",
    "selective_scan",
]

#: A backend's runner: validated inputs and ``return_last_state`` in, the scan's output out.
Runner = Callable[[ScanInputs, bool], ScanOutput]


@functools.cache
def _probe(module: str) -> str | None:
    """Import ``module`` once; return None on success, else the reason it failed (never raises)."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # any import failure (ABI mismatch, missing CUDA) means "unavailable"
        return f"{type(exc).__name__}: {exc}"
    return None


def _runs_anywhere(device: torch.device) -> str | None:
    """The reference and torch backends run on every device."""
    return None


def _numba_unavailable(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the numba backend runs on CPU tensors, got {device.type} tensors"
    reason = _probe("numba")
    return None if reason is None else f"numba does not import ({reason}); pip install numba"


def _triton_unavailable(device: torch.device) -> str | None:
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device.type != "cuda" and not (interpret and device.type == "cpu"):
        return f"the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"
    reason = _probe("triton")
    return None if reason is None else f"triton does not import ({reason})"


def _mamba_ssm_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"mamba_ssm's kernel needs CUDA tensors, got {device.type} tensors"
    reason = _probe("selective_scan_cuda")
    if reason is not None:
        return f"mamba_ssm's compiled extension selective_scan_cuda does not import ({reason})"
    reason = _probe(MAMBA_SSM_INTERFACE)
    return None if reason is None else f"mamba_ssm does not import ({reason})"


def _lazy(module: str, name: str) -> Runner:
    """The runner ``name`` of this package's ``module``, imported on the first call (numba and Triton load slowly)."""

    def run(inputs: ScanInputs, return_last_state: bool) -> ScanOutput:
        runner = getattr(importlib.import_module(f"{__package__}.{module}"), name)
        return runner(inputs, return_last_state)

    return run


class _Backend(NamedTuple):
    """A row of the backend table."""

    unavailable: Callable[[torch.device], str | None]
    """Why the backend cannot run on a device, in words; None when it can."""
    run: Runner
    """Runs validated inputs (only called when ``unavailable`` said None)."""


_BACKENDS: dict[str, _Backend] = {
    "reference": _Backend(_runs_anywhere, run_reference),
    "torch": _Backend(_runs_anywhere, run_chunked),
    "numba": _Backend(_numba_unavailable, _lazy("numba_scan", "run_numba")),
    "triton": _Backend(_triton_unavailable, _lazy("triton_scan", "run_triton")),
    "mamba_ssm": _Backend(_mamba_ssm_unavailable, _lazy("mamba_ssm_scan", "run_mamba_ssm")),
}

#: Every backend name :func:`selective_scan` accepts.
SELECTIVE_SCAN_BACKENDS: tuple[str, ...] = ("auto", *_BACKENDS)

#: What ``"auto"`` tries first per device type (never ``"mamba_ssm"``); ``"torch"`` when that cannot run.
_AUTO_PREFERENCE = {"cuda": "triton"}
_AUTO_DEFAULT = "numba"
_AUTO_FALLBACK = "torch"


def _known(backend: str) -> str:
    """``backend`` itself if :func:`selective_scan` accepts the name, else a ValueError that lists the names."""
    if backend not in SELECTIVE_SCAN_BACKENDS:
        raise ValueError(f"unknown selective_scan backend {backend!r}; available backends: {SELECTIVE_SCAN_BACKENDS}")
    return backend


def available_selective_scan_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device`` here (``"auto"`` excluded).

    Args:
        device: Where the tensors live.

    Returns:
        The runnable backends, in :data:`SELECTIVE_SCAN_BACKENDS` order.
    """
    device = torch.device(device)
    return [name for name, row in _BACKENDS.items() if row.unavailable(device) is None]


def resolve_selective_scan_backend(backend: str, device: torch.device | str) -> str:
    """Turn ``backend`` (possibly ``"auto"``) into the concrete backend to use on ``device``.

    Args:
        backend: A name from :data:`SELECTIVE_SCAN_BACKENDS`.
        device: Where the tensors live.

    Returns:
        A concrete backend name.

    Raises:
        ValueError: ``backend`` is not a known name.
        RuntimeError: A named backend cannot run here; the message says why.
    """
    device = torch.device(device)
    if _known(backend) == "auto":
        preferred = _AUTO_PREFERENCE.get(device.type, _AUTO_DEFAULT)
        return preferred if _BACKENDS[preferred].unavailable(device) is None else _AUTO_FALLBACK
    reason = _BACKENDS[backend].unavailable(device)
    if reason is not None:
        raise RuntimeError(f"selective_scan backend {backend!r} is unavailable: {reason}")
    return backend


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str = "auto",
) -> ScanOutput:
    """Selective scan with the signature and semantics of mamba_ssm ``selective_scan_fn`` / ``selective_scan_ref``.

    Per batch element, channel d and state n, from h_0 = 0: Δ_t = softplus(delta_t + delta_bias_d) (bias and softplus
    optional), h_t = exp(Δ_t·A_{d,n})·h_{t-1} + Δ_t·B_{t,n}·u_t, y_t = Σ_n C_{t,n}·h_{t,n}, then y += D·u and
    y *= silu(z) (``docs/ops/selective_scan.md``, "Definition").

    Args:
        u: Input sequence, (batch, dim, L); fp32 / fp16 / bf16 (fp64 also accepted).
        delta: Step size before bias / softplus, (batch, dim, L).
        A: Diagonal state matrix, (dim, N), real (usually negative).
        B: Input matrix: time-invariant (dim, N), variable (batch, N, L) or grouped (batch, G, N, L), dim % G == 0.
        C: Output matrix, same shape options as ``B``.
        D: Optional skip weight, (dim,): out += u·D.
        z: Optional gate, (batch, dim, L): out *= silu(z).
        delta_bias: Optional bias added to delta before softplus, (dim,).
        delta_softplus: Apply softplus to delta (after the bias).
        return_last_state: Also return the final state h_L, (batch, dim, N) (its gradient is ignored).
        backend: One of :data:`SELECTIVE_SCAN_BACKENDS`; ``"auto"`` picks the fastest backend that runs on
            ``u.device``: ``"triton"`` for CUDA tensors when Triton imports, ``"numba"`` for CPU tensors when numba
            imports, ``"torch"`` otherwise (``docs/ops/selective_scan.md``, "Backends").

    Returns:
        ``out`` (batch, dim, L) in ``u.dtype`` (computed in float32, or float64 for float64 inputs), or
        ``(out, last_state)`` with ``last_state`` in the compute dtype.

    Raises:
        ValueError: On a bad shape (the message names the argument and its shape) or an unknown backend.
        RuntimeError: If a named backend cannot run here (not installed, wrong device); the message says why.
    """
    _known(backend)  # an unknown name is reported before the inputs are looked at
    inputs = ScanInputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus).validated()
    return _BACKENDS[resolve_selective_scan_backend(backend, u.device)].run(inputs, return_last_state)
