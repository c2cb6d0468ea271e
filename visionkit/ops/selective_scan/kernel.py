"""The forward / backward contract of the torch, numba and Triton scan kernels, and the autograd wrapper that runs them.

A kernel object implements :class:`ScanKernel`; :func:`run_scan_kernel` brings validated inputs to the kernel layout
and runs the kernel's forward under a ``torch.autograd.Function`` whose backward calls the kernel's backward. Like
mamba_ssm's kernel, the wrapper saves only the inputs plus what the kernel's forward returns for its backward, ignores
the gradient of the last state and refuses double backward (``docs/ops/selective_scan.md``, "Gradient").
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from visionkit.ops.selective_scan.inputs import TENSOR_FIELDS, ScanInputs, ScanOutput, kernel_layout

__all__ = ["Grads", "ScanKernel", "run_scan_kernel"]

#: Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) in the compute dtype; None where the input is None.
Grads = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]


class ScanKernel(Protocol):
    """A forward / backward implementation of the selective scan (the torch, numba and Triton backends).

    Both passes get the inputs as a :class:`~visionkit.ops.selective_scan.inputs.ScanInputs` in the kernel layout
    (:func:`~visionkit.ops.selective_scan.inputs.kernel_layout`), already validated.
    """

    def forward(self, inputs: ScanInputs) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """Run the forward pass.

        Returns:
            ``(out, last_state, saved)``: out (batch, dim, L) in u.dtype, last state (batch, dim, N) in the compute
            dtype, and the tensors the backward needs besides the inputs (e.g. per-chunk states).
        """
        ...

    def backward(self, inputs: ScanInputs, saved: tuple[Tensor, ...], dout: Tensor) -> Grads:
        """Run the backward pass for the upstream gradient ``dout`` (batch, dim, L).

        Returns:
            The gradients of the eight tensor inputs, each shaped like its input (see :data:`Grads`).
        """
        ...


class _KernelScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        kernel: ScanKernel,
        delta_softplus: bool,
        *tensors: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """``tensors``: the inputs' tensor fields in ``TENSOR_FIELDS`` order (autograd tracks positional tensors)."""
        out, last_state, saved = kernel.forward(ScanInputs.from_tensors(tensors, delta_softplus))
        ctx.kernel = kernel
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(*tensors, *saved)
        ctx.mark_non_differentiable(last_state)  # like mamba_ssm, the last state's gradient is ignored
        return out, last_state

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable: double backward must fail loudly
    def backward(ctx: torch.autograd.function.FunctionCtx, dout: Tensor, _dlast: Tensor | None) -> tuple:  # type: ignore[override]
        stored = ctx.saved_tensors  # read once: activation checkpointing allows a single unpack
        n_fields = len(TENSOR_FIELDS)
        tensors, saved = stored[:n_fields], tuple(stored[n_fields:])
        inputs = ScanInputs.from_tensors(tensors, ctx.delta_softplus)
        grads = ctx.kernel.backward(inputs, saved, dout.contiguous())
        cast = tuple(
            None if g is None or not need else g.to(x.dtype)
            for g, x, need in zip(grads, tensors, ctx.needs_input_grad[2:], strict=True)
        )
        return (None, None, *cast)


def run_scan_kernel(kernel: ScanKernel, inputs: ScanInputs, return_last_state: bool) -> ScanOutput:
    """Bring validated inputs to the kernel layout and run ``kernel`` under autograd.

    Args:
        kernel: The forward / backward implementation.
        inputs: The call's inputs, already validated (:meth:`ScanInputs.validated`).
        return_last_state: Also return the final state h_L, (batch, dim, N) in the compute dtype.

    Returns:
        ``out`` (batch, dim, L) in ``u.dtype``, or ``(out, last_state)``.
    """
    layout = kernel_layout(inputs)
    out, last_state = _KernelScanFunction.apply(kernel, layout.delta_softplus, *layout.tensors())
    return (out, last_state) if return_last_state else out
