"""Mamba selective scan (S6): one entry point over a sequential reference and three fast backends.

Semantics follow mamba_ssm's ``selective_scan_ref`` (``mamba_ssm/ops/selective_scan_interface.py``), as specified in
the project's reference notes (``shared/reference/mamba.md``) §1-§2. Per batch b, channel d and state n (h_0 = 0)::

    Δ_t = softplus(delta_t + delta_bias_d)      (softplus only if ``delta_softplus``; bias only if given)
    a_t = exp(Δ_t · A_{d,n})
    h_t = a_t · h_{t-1} + Δ_t · B_{t,n} · u_t
    y_t = Σ_n C_{t,n} · h_{t,n}
    y_t += D_d · u_t                            (if D is given)
    y_t *= silu(z_t)                            (if z is given)

All arithmetic is done in at least float32 (fp16 / bf16 inputs are upcast; float64 stays float64) and the output is cast
back to ``u.dtype``. The last state is returned in the compute dtype, like ``selective_scan_ref``.

Backends:
    * ``"reference"``: a plain Python loop over L (the oracle).
    * ``"torch"``: chunked parallel scan in pure PyTorch, any device (:mod:`visionkit.ops.selective_scan_torch`).
    * ``"numba"``: compiled CPU kernels for the forward and backward (:mod:`visionkit.ops.selective_scan_numba`).
    * ``"triton"``: fused GPU kernels (:mod:`visionkit.ops.selective_scan_triton`); CUDA tensors, or CPU tensors
      under ``TRITON_INTERPRET=1`` (slow, for tests).
    * ``"mamba_ssm"``: mamba_ssm's compiled CUDA kernel, only when its extension imports (never chosen by "auto").
    * ``"auto"``: ``"triton"`` for CUDA tensors when Triton imports, ``"numba"`` for CPU tensors when numba imports,
      ``"torch"`` otherwise.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable

import torch
from torch import Tensor

from visionkit.ops._scan_inputs import compute_dtype, expand_bc, finish_output, prepare_delta, validate_scan_inputs
from visionkit.ops.selective_scan_torch import selective_scan_chunked

__all__ = [
    "SELECTIVE_SCAN_BACKENDS",
    "available_selective_scan_backends",
    "selective_scan",
    "selective_scan_reference",
]

#: Every backend name :func:`selective_scan` accepts.
SELECTIVE_SCAN_BACKENDS: tuple[str, ...] = ("auto", "reference", "torch", "numba", "triton", "mamba_ssm")


@functools.cache
def _probe(module: str) -> str | None:
    """Import ``module`` once; return None on success, else the reason it failed (never raises)."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # any import failure (ABI mismatch, missing CUDA) means "unavailable"
        return f"{type(exc).__name__}: {exc}"
    return None


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None if it can)."""
    if backend in ("reference", "torch"):
        return None
    if backend == "numba":
        if device.type != "cpu":
            return f"the numba backend runs on CPU tensors, got {device.type} tensors"
        reason = _probe("numba")
        return None if reason is None else f"numba does not import ({reason}); pip install numba"
    if backend == "triton":
        interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if device.type != "cuda" and not (interpret and device.type == "cpu"):
            return f"the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"
        reason = _probe("triton")
        return None if reason is None else f"triton does not import ({reason})"
    if backend == "mamba_ssm":
        if device.type != "cuda":
            return f"mamba_ssm's kernel needs CUDA tensors, got {device.type} tensors"
        reason = _probe("selective_scan_cuda")
        if reason is not None:
            return f"mamba_ssm's compiled extension selective_scan_cuda does not import ({reason})"
        reason = _probe("mamba_ssm.ops.selective_scan_interface")
        return None if reason is None else f"mamba_ssm does not import ({reason})"
    raise ValueError(f"unknown selective_scan backend {backend!r}; available backends: {SELECTIVE_SCAN_BACKENDS}")


def available_selective_scan_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device`` here (``"auto"`` excluded).

    Args:
        device: Where the tensors live.

    Returns:
        The runnable backends, in :data:`SELECTIVE_SCAN_BACKENDS` order.
    """
    device = torch.device(device)
    return [b for b in SELECTIVE_SCAN_BACKENDS[1:] if _unavailable_reason(b, device) is None]


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
    if backend == "auto":
        preferred = "triton" if device.type == "cuda" else "numba"
        return preferred if _unavailable_reason(preferred, device) is None else "torch"
    reason = _unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"selective_scan backend {backend!r} is unavailable: {reason}")
    return backend


def selective_scan_reference(
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
) -> Tensor | tuple[Tensor, Tensor]:
    """Sequential selective scan, a plain loop over L (same math as mamba_ssm ``selective_scan_ref``).

    Args:
        u: Input sequence, (batch, dim, L).
        delta: Step size before bias / softplus, (batch, dim, L).
        A: Diagonal state matrix, (dim, N), real.
        B: Input matrix, (dim, N), (batch, N, L) or (batch, G, N, L) with dim % G == 0.
        C: Output matrix, same shape options as ``B``.
        D: Optional skip weight, (dim,).
        z: Optional gate, (batch, dim, L); the output is multiplied by silu(z).
        delta_bias: Optional bias added to delta, (dim,).
        delta_softplus: Apply softplus to delta (after the bias).
        return_last_state: Also return the final state h_L.

    Returns:
        ``out`` (batch, dim, L) in ``u.dtype``, or ``(out, last_state)`` with ``last_state`` (batch, dim, N) in the
        compute dtype (float32, or float64 for float64 inputs).
    """
    validate_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    dtype = compute_dtype(u)
    batch, dim, length = u.shape
    dt = prepare_delta(delta, delta_bias, delta_softplus, dtype)
    uc = u.to(dtype)
    Ac = A.to(dtype)
    Bc = expand_bc(B, dim, dtype)
    Cc = expand_bc(C, dim, dtype)

    h = u.new_zeros((batch, dim, Ac.shape[1]), dtype=dtype)
    # per-step views taken once with unbind: indexing the full tensors at every step would make autograd's backward
    # write a full-size zero gradient per step (O(L²) time and memory)
    dts, us = dt.unbind(2), uc.unbind(2)
    Bs = [Bc] * length if Bc.dim() == 2 else Bc.unbind(-1)
    Cs = [Cc] * length if Cc.dim() == 2 else Cc.unbind(-1)
    ys = []
    for t in range(length):
        dt_t = dts[t][:, :, None]  # (batch, dim, 1)
        a_t = torch.exp(dt_t * Ac)  # (batch, dim, N)
        h = a_t * h + dt_t * Bs[t] * us[t][:, :, None]
        ys.append((h * Cs[t]).sum(-1))  # (batch, dim)
    y = torch.stack(ys, dim=2) if ys else uc.new_zeros((batch, dim, 0))
    out = finish_output(y, u, D, z, u.dtype, dtype)
    return (out, h) if return_last_state else out


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
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with the signature and semantics of mamba_ssm ``selective_scan_fn`` / ``selective_scan_ref``.

    Args:
        u: Input sequence, (batch, dim, L); fp32 / fp16 / bf16 (fp64 also accepted).
        delta: Step size, (batch, dim, L).
        A: Diagonal state matrix, (dim, N), real (usually negative).
        B: Input matrix: time-invariant (dim, N), variable (batch, N, L) or grouped (batch, G, N, L), dim % G == 0.
        C: Output matrix, same shape options as ``B``.
        D: Optional skip weight, (dim,): out += u·D.
        z: Optional gate, (batch, dim, L): out *= silu(z).
        delta_bias: Optional bias added to delta before softplus, (dim,).
        delta_softplus: Apply softplus to delta.
        return_last_state: Also return the final state h_L, (batch, dim, N).
        backend: One of :data:`SELECTIVE_SCAN_BACKENDS` (see the module docstring); ``"auto"`` picks the fastest
            backend that runs on ``u.device``.

    Returns:
        ``out`` (batch, dim, L) in ``u.dtype`` (fp32 accumulation), or ``(out, last_state)``.

    Raises:
        ValueError: On a bad shape (the message names the argument and its shape) or an unknown backend.
        RuntimeError: If a named backend cannot run here (not installed, wrong device); the message says why.
    """
    if backend not in SELECTIVE_SCAN_BACKENDS:
        raise ValueError(f"unknown selective_scan backend {backend!r}; available backends: {SELECTIVE_SCAN_BACKENDS}")
    validate_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    fn = _backend_function(resolve_selective_scan_backend(backend, u.device))
    return fn(
        u,
        delta,
        A,
        B,
        C,
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        return_last_state=return_last_state,
    )


def _backend_function(backend: str) -> Callable[..., Tensor | tuple[Tensor, Tensor]]:
    """The implementation of a concrete backend (imported lazily: numba and Triton take a while to import)."""
    if backend == "reference":
        return selective_scan_reference
    if backend == "torch":
        return selective_scan_chunked
    if backend == "numba":
        from visionkit.ops.selective_scan_numba import selective_scan_numba

        return selective_scan_numba
    if backend == "triton":
        from visionkit.ops.selective_scan_triton import selective_scan_triton

        return selective_scan_triton
    interface = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    return interface.selective_scan_fn
