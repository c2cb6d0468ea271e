"""Pure tensor functions and autograd ops (no nn.Module state, no Lightning, no I/O)."""

from visionkit.ops.selective_scan import (
    SELECTIVE_SCAN_BACKENDS,
    selective_scan,
    selective_scan_chunked,
    selective_scan_reference,
)

__all__ = ["SELECTIVE_SCAN_BACKENDS", "selective_scan", "selective_scan_chunked", "selective_scan_reference"]
