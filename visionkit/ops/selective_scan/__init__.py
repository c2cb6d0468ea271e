"""Mamba selective scan (S6): mamba_ssm's ``selective_scan_fn`` over a sequential reference and four fast backends.

Semantics, formulas, tolerances and backends: ``docs/ops/selective_scan.md``. The package, one concept per module:

- :mod:`.api`: :func:`selective_scan` and the one table of backends (availability, reason, runner; ``"auto"``).
- :mod:`.inputs`: the input record :class:`~.inputs.ScanInputs`, its shape checks (run once per call) and the dtype
  rules; :mod:`.kernel`: the forward / backward contract of a kernel and the autograd wrapper that runs it.
- :mod:`.reference`: ``"reference"``, a loop over L (the oracle, :func:`selective_scan_reference`).
- :mod:`.torch_chunked`: ``"torch"``, a chunked doubling scan in pure PyTorch (:func:`selective_scan_chunked`).
- :mod:`.numba_scan`: ``"numba"``, compiled CPU kernels; its kernels are in :mod:`.numba_single_state` (N = 1) and
  :mod:`.numba_multi_state` (N > 1), their shared records and float32 math in :mod:`.numba_support`.
- :mod:`.triton_scan`: ``"triton"``, launch shapes and autograd around the fused GPU kernels of :mod:`.triton_kernels`.
- :mod:`.mamba_ssm_scan`: ``"mamba_ssm"``, mamba_ssm's CUDA kernel when it imports (never picked by ``"auto"``).

Note: ``visionkit.ops.selective_scan`` is the function once :mod:`visionkit.ops` is imported (the package shares its
name); reach the modules with ``from visionkit.ops.selective_scan import api`` or
``importlib.import_module("visionkit.ops.selective_scan.api")``.
"""

from visionkit.ops.selective_scan.api import (
    SELECTIVE_SCAN_BACKENDS,
    available_selective_scan_backends,
    resolve_selective_scan_backend,
    selective_scan,
)
from visionkit.ops.selective_scan.reference import selective_scan_reference
from visionkit.ops.selective_scan.torch_chunked import selective_scan_chunked

__all__ = [
    "SELECTIVE_SCAN_BACKENDS",
    "available_selective_scan_backends",
    "resolve_selective_scan_backend",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_reference",
]
