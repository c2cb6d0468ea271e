"""The ``"mamba_ssm"`` selective-scan backend: a call into mamba_ssm's compiled CUDA kernel, when it is installed.

visionkit never imports mamba_ssm at import time: its interface module imports the compiled extension
``selective_scan_cuda`` at module level, and a skipped or ABI-mismatched build makes that import fail
(``docs/ops/selective_scan.md``, "The optional mamba_ssm backend"). The backend table
(:mod:`visionkit.ops.selective_scan.api`) probes both imports and only then calls :func:`run_mamba_ssm`, which imports
the interface on first use; ``"auto"`` never picks this backend.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from visionkit.ops.selective_scan.inputs import ScanInputs, ScanOutput

__all__ = ["MAMBA_SSM_INTERFACE", "load_selective_scan_fn", "run_mamba_ssm"]

#: The mamba_ssm module that defines ``selective_scan_fn`` (mamba_ssm 2.x).
MAMBA_SSM_INTERFACE = "mamba_ssm.ops.selective_scan_interface"


def load_selective_scan_fn() -> Callable[..., ScanOutput]:
    """Import mamba_ssm's interface module and return its ``selective_scan_fn``.

    Returns:
        ``selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
        return_last_state=False)``.

    Raises:
        ImportError: mamba_ssm or its compiled extension does not import.
    """
    return importlib.import_module(MAMBA_SSM_INTERFACE).selective_scan_fn


def run_mamba_ssm(inputs: ScanInputs, return_last_state: bool) -> ScanOutput:
    """mamba_ssm's ``selective_scan_fn`` on validated CUDA inputs (the backend table's runner of ``"mamba_ssm"``).

    Args:
        inputs: The call's inputs, already validated; every field is passed by its name, which is also mamba_ssm's.
        return_last_state: Also return the final state h_L, (batch, dim, N).

    Returns:
        What mamba_ssm returns: ``out`` (batch, dim, L), or ``(out, last_state)``.
    """
    return load_selective_scan_fn()(**inputs._asdict(), return_last_state=return_last_state)
