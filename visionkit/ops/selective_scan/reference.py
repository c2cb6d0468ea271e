"""The ``"reference"`` selective-scan backend: a plain Python loop over L, the oracle of every other backend.

Same math as mamba_ssm's ``selective_scan_ref`` (``mamba_ssm/ops/selective_scan_interface.py``; the recurrence is
written out in ``docs/ops/selective_scan.md``, "Definition"): the inputs are upcast to the compute dtype, the state is
updated one step at a time, and autograd differentiates the loop.
"""

from __future__ import annotations

import torch
from torch import Tensor

from visionkit.ops.selective_scan.inputs import (
    ScanInputs,
    ScanOutput,
    compute_dtype,
    expand_bc,
    finish_output,
    prepare_delta,
)

__all__ = ["run_reference", "selective_scan_reference"]


def run_reference(inputs: ScanInputs, return_last_state: bool) -> ScanOutput:
    """The sequential scan of validated inputs (the backend table's runner of ``"reference"``).

    Args:
        inputs: The call's inputs, already validated.
        return_last_state: Also return the final state h_L.

    Returns:
        ``out`` (batch, dim, L) in ``u.dtype``, or ``(out, last_state)`` with ``last_state`` (batch, dim, N) in the
        compute dtype (float32, or float64 for float64 inputs).
    """
    u = inputs.u
    dtype = compute_dtype(u)
    batch, dim, length = u.shape
    dt = prepare_delta(inputs.delta, inputs.delta_bias, inputs.delta_softplus, dtype)
    uc = u.to(dtype)
    Ac = inputs.A.to(dtype)
    Bc = expand_bc(inputs.B, dim, dtype)
    Cc = expand_bc(inputs.C, dim, dtype)

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
    out = finish_output(y, u, inputs.D, inputs.z, u.dtype, dtype)
    return (out, h) if return_last_state else out


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
) -> ScanOutput:
    """Sequential selective scan, a plain loop over L (same math as mamba_ssm ``selective_scan_ref``).

    Takes the arguments of :func:`visionkit.ops.selective_scan` except ``backend``, with the same shapes: u and
    delta (batch, dim, L); A (dim, N); B and C (dim, N), (batch, N, L) or (batch, G, N, L); D and delta_bias (dim,);
    z (batch, dim, L). Its backward is autograd through the loop, linear in L.

    Returns:
        ``out`` (batch, dim, L) in ``u.dtype``, or ``(out, last_state)`` with ``last_state`` (batch, dim, N) in the
        compute dtype (float32, or float64 for float64 inputs).

    Raises:
        ValueError: On a bad shape (the message names the argument and its shape).
    """
    inputs = ScanInputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus).validated()
    return run_reference(inputs, return_last_state)
