"""Pure tensor functions and autograd ops (no nn.Module state, no Lightning, no I/O)."""

from visionkit.ops.connected_components import connected_components, label_regions, region_props
from visionkit.ops.cross_scan import CROSS_SCAN_DIRECTIONS, cross_merge, cross_scan
from visionkit.ops.kmeans import kmeans, raster_init_indices
from visionkit.ops.mamba_attention import MAMBA_ATTENTION_MODES, mamba_attention_map
from visionkit.ops.moe import (
    MOE_BACKENDS,
    MoEDispatch,
    expert_map,
    expert_reduce,
    grouped_linear,
    moe_combine,
    moe_dispatch,
    moe_gather,
    moe_mlp,
    moe_sort,
    moe_unsort,
    resolve_moe_backend,
)
from visionkit.ops.selective_scan import (
    SELECTIVE_SCAN_BACKENDS,
    available_selective_scan_backends,
    selective_scan,
    selective_scan_chunked,
    selective_scan_reference,
)

__all__ = [
    "CROSS_SCAN_DIRECTIONS",
    "MAMBA_ATTENTION_MODES",
    "MOE_BACKENDS",
    "SELECTIVE_SCAN_BACKENDS",
    "MoEDispatch",
    "available_selective_scan_backends",
    "connected_components",
    "cross_merge",
    "cross_scan",
    "expert_map",
    "expert_reduce",
    "grouped_linear",
    "kmeans",
    "label_regions",
    "mamba_attention_map",
    "moe_combine",
    "moe_dispatch",
    "moe_gather",
    "moe_mlp",
    "moe_sort",
    "moe_unsort",
    "raster_init_indices",
    "region_props",
    "resolve_moe_backend",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_reference",
]
