"""jax_roipool: RoI max pooling (Fast R-CNN) for JAX with native CPU and CUDA kernels."""

from . import _native  # noqa: F401  (registers the FFI targets and lowerings)
from ._api import boxes_to_rois, export_safety_checks, roi_pool, roi_pool_with_argmax

__all__ = ["boxes_to_rois", "export_safety_checks", "roi_pool", "roi_pool_with_argmax"]
__version__ = "0.1.0"
