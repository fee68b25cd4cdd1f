"""Trace-time validation and normalisation of roi_pool's arguments."""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("NHWC", "NCHW")
BIN_MODES = ("fast_rcnn", "partition")
# bins="fast_rcnn" for float16 rois: the geometry in float16 arithmetic, as
# torchvision computes it for float16 inputs (roipool::kFastRcnnBinary16),
# with the spatial scale rounded to float16. Internal: the primitives get it
# in place of "fast_rcnn".
FAST_RCNN_BINARY16 = "fast_rcnn_binary16"
VALUE_DTYPES = tuple(np.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))
# argmax stores flat cell indices (n * H + h) * W + w in int32.
MAX_CELLS = 2**31 - 1
# Bound on each output dimension: keeps the pure-JAX partition arithmetic in
# uint32 and every bin index exact in float32.
MAX_POOLED = 65535


class Config(NamedTuple):
    """Static parameters of one roi_pool call (hashable: they are primitive params)."""

    pooled: tuple[int, int]
    spatial_scale: float
    layout: str
    bins: str


def check_arguments(features, rois, output_size, spatial_scale, layout, bins):
    """(Config, features, rois) of a roi_pool call, validated; rois are the
    flat ``[R, 5]`` or per-image ``[N, K, 4]`` form, in their coordinate dtype."""
    config = check_config(output_size, spatial_scale, layout, bins)
    features = check_features(features, layout)
    rois = as_rois_array(rois)
    if bins == "fast_rcnn" and rois.dtype == np.float16:
        config = config._replace(bins=FAST_RCNN_BINARY16,
                                 spatial_scale=_binary16_scale(config.spatial_scale))
    if rois.ndim == 3:
        rois = check_boxes(rois, feature_dims(features.shape, layout)[0])
    else:
        rois = check_rois(rois)
    check_scale_precision(config.spatial_scale, rois.dtype)
    return config, features, rois


def check_config(output_size, spatial_scale, layout, bins) -> Config:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"roi_pool: layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(bins, str) or bins not in BIN_MODES:
        raise ValueError(f"roi_pool: bins must be one of {BIN_MODES}, got {bins!r}")
    return Config(_check_output_size(output_size), _check_scale(spatial_scale), layout, bins)


# Where a traced output_size or scale comes from, and what to pass instead.
_STATIC_HINT = ("; inside a jitted function jax values are traced, also a "
                "constant made there (jnp.float32(0.25), say): use Python or numpy numbers, "
                "and mark a jax.jit argument static (static_argnums)")


def _check_output_size(output_size) -> tuple[int, int]:
    if isinstance(output_size, (tuple, list)):
        sizes = output_size
    elif (isinstance(output_size, (np.ndarray, jax.Array))
          and not isinstance(output_size, jax.core.Tracer) and output_size.ndim == 1):
        sizes = np.asarray(output_size).tolist()  # not by indexing: that traces under jit
    else:
        sizes = (output_size, output_size)
    if any(isinstance(s, jax.core.Tracer) for s in sizes):
        raise TypeError("roi_pool: output_size must be static (Python or numpy ints), not a "
                        f"traced value{_STATIC_HINT}")
    if len(sizes) != 2:
        raise ValueError(f"roi_pool: output_size must be an int or a pair (PH, PW), got {output_size!r}")
    pooled = []
    for s in sizes:
        if isinstance(s, bool):
            raise TypeError(f"roi_pool: output_size must hold integers, got {output_size!r}")
        try:
            s = operator.index(s)
        except TypeError:
            raise TypeError(f"roi_pool: output_size must hold integers, got {output_size!r}") from None
        if not 1 <= s <= MAX_POOLED:
            raise ValueError(f"roi_pool: output_size must be in [1, {MAX_POOLED}], got {output_size!r}")
        pooled.append(s)
    return (pooled[0], pooled[1])


def _check_scale(spatial_scale) -> float:
    if isinstance(spatial_scale, jax.core.Tracer):
        raise TypeError("roi_pool: spatial_scale must be a static Python or numpy number, not a "
                        f"traced value{_STATIC_HINT}")
    if isinstance(spatial_scale, (str, bytes, bool)) or getattr(spatial_scale, "dtype", None) == bool:
        raise TypeError(f"roi_pool: spatial_scale must be a number, got {spatial_scale!r}")
    try:
        scale = float(spatial_scale)
    except (TypeError, ValueError):
        raise TypeError(f"roi_pool: spatial_scale must be a number, got {spatial_scale!r}") from None
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"roi_pool: spatial_scale must be finite and positive, got {spatial_scale!r}")
    return scale


def _narrowed_scale(spatial_scale: float, dtype, rois: str, wider: str) -> float:
    """The scale as rois scaled in ``dtype`` see it (a double converted through
    float32, as C++ and c10::Half do), which must stay finite and non-zero."""
    with np.errstate(over="ignore", under="ignore"):
        narrow = np.dtype(dtype).type(np.float32(spatial_scale))
    if not (np.isfinite(narrow) and narrow > 0):
        info = np.finfo(dtype)
        raise ValueError(f"roi_pool: spatial_scale must be finite and non-zero in {info.dtype} "
                         f"for {rois} (between {info.smallest_subnormal:.2g} and "
                         f"{info.max:.5g}), got {spatial_scale!r}; {wider}")
    return float(narrow)


def check_scale_precision(spatial_scale: float, coordinates) -> None:
    """Rois are scaled in their coordinate dtype: for float32 ones the scale
    must stay finite and non-zero in float32 too."""
    if np.dtype(coordinates) == np.float32:
        _narrowed_scale(spatial_scale, np.float32, "float32 rois",
                        "float64 rois (with jax_enable_x64) take any finite positive scale")


def _binary16_scale(spatial_scale: float) -> float:
    """The scale as torchvision applies it to float16 rois: rounded to float16."""
    return _narrowed_scale(spatial_scale, np.float16, "float16 rois with bins='fast_rcnn'",
                           "float32 rois take a wider range")


def _as_array(x, name: str, caller: str = "roi_pool") -> jax.Array:
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{caller}: {name} must be an array, got {type(x).__name__}: {err}") from err


def is_static(*dims) -> bool:
    """Whether the dimensions are known numbers (not jax.export's symbolic ones)."""
    return all(isinstance(d, (int, np.integer)) for d in dims)


def check_features(features, layout: str) -> jax.Array:
    features = _as_array(features, "features")
    if features.ndim != 4:
        dims = "[N, H, W, C]" if layout == "NHWC" else "[N, C, H, W]"
        raise ValueError(f"roi_pool: features must have rank 4 ({dims} for layout {layout!r}), "
                         f"got shape {features.shape}")
    if features.dtype not in VALUE_DTYPES:
        raise TypeError("roi_pool: features must be float16, bfloat16, float32 or float64, "
                        f"got {features.dtype}")
    n, h, w = feature_dims(features.shape, layout)[:3]
    # jax.export's symbolic dimensions are at least 1; their product is
    # checked by the native kernels when they run.
    if any(is_static(d) and d < 1 for d in (n, h, w)):
        raise ValueError(f"roi_pool: features must have non-empty batch and spatial dimensions, "
                         f"got shape {features.shape} for layout {layout!r}")
    check_cell_count(n, h * w)
    return features


def check_cell_count(images, plane) -> None:
    """N * H * W cells (``plane`` = H * W), counting vmapped copies of the
    images, must be addressable by the int32 argmax."""
    if is_static(images, plane) and images * plane > MAX_CELLS:
        raise ValueError(f"roi_pool: features have {images * plane} cells (N*H*W, counting "
                         f"vmapped copies), more than the int32 argmax can address "
                         f"({MAX_CELLS})")


def feature_dims(shape, layout: str) -> tuple[int, int, int, int]:
    """(N, H, W, C) of a feature-shaped array."""
    if layout == "NHWC":
        return tuple(shape)
    n, c, h, w = shape
    return (n, h, w, c)


def pooled_shape(r: int, pooled: tuple[int, int], c: int, layout: str) -> tuple[int, ...]:
    ph, pw = pooled
    return (r, ph, pw, c) if layout == "NHWC" else (r, c, ph, pw)


def coordinate_dtype(dtype) -> np.dtype:
    """Coordinates are computed in float64 for float64 rois, else in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def as_rois_array(rois) -> jax.Array:
    """The rois argument as one array; a ragged list gets a pointer to boxes_to_rois."""
    if not isinstance(rois, (list, tuple)):
        return _as_array(rois, "rois")
    try:
        return jnp.asarray(rois)
    except (TypeError, ValueError) as err:
        for item in rois:  # an item that is no array at all raises TypeError here
            _as_array(item, "rois")
        raise ValueError(
            "roi_pool: rois must be one array, [R, 5] or [N, K, 4]; got a list that does not "
            "stack into one. For per-image boxes [K_n, 4] of different lengths "
            "(torchvision's list form), pass jax_roipool.boxes_to_rois(boxes)") from err


def _rois_shape_error(name: str, shape) -> ValueError:
    return ValueError(f"roi_pool: {name} must have shape [R, 5], rows (batch_index, x1, y1, x2, "
                      f"y2), or [N, K, 4], per-image rows (x1, y1, x2, y2); got {shape}")


def check_rois(rois, name: str = "rois") -> jax.Array:
    """[R, 5] rows (batch_index, x1, y1, x2, y2), cast to the coordinate dtype."""
    rois = jnp.asarray(rois)
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise _rois_shape_error(name, rois.shape)
    return _cast_coordinates(rois, name)


def check_boxes(boxes, batch: int, name: str = "rois") -> jax.Array:
    """[N, K, 4] per-image boxes (x1, y1, x2, y2), cast to the coordinate dtype."""
    boxes = jnp.asarray(boxes)
    if boxes.ndim != 3 or boxes.shape[2] != 4:
        raise _rois_shape_error(name, boxes.shape)
    if boxes.shape[0] != batch:
        raise ValueError(f"roi_pool: per-image {name} have batch {boxes.shape[0]} but features "
                         f"have batch {batch}")
    boxes = _cast_coordinates(boxes, name)
    check_image_count(boxes.dtype, batch)
    return boxes


# How rois whose image index would not be exact get a wider dtype.
_WIDER_INDEX = {
    np.dtype(np.float32): "float64 rois or boxes (with jax_enable_x64 on: without it float64 "
                          "arrays become float32)",
    np.dtype(np.float16): "float32 boxes",
}


def check_image_count(dtype, images, caller: str = "roi_pool") -> None:
    """Image indices must be exact in the rois' dtype (per-image boxes, vmapped
    images, boxes_to_rois), which holds every integer up to 2**digits."""
    dtype = np.dtype(dtype)
    if dtype not in _WIDER_INDEX or not is_static(images):
        return
    digits = np.finfo(dtype).nmant + 1
    if images > 2**digits:
        # roi_pool's count includes the images' vmapped copies; boxes_to_rois' has none.
        copies = ", counting vmapped copies" if caller == "roi_pool" else ""
        raise ValueError(f"{caller}: {images} images (more than 2**{digits}{copies}) have "
                         f"inexact {dtype} image indices: use {_WIDER_INDEX[dtype]}")


def check_image_boxes(boxes, name: str) -> jax.Array:
    """[K, 4] boxes (x1, y1, x2, y2) of one image, cast to the coordinate dtype
    (float16 kept: roi_pool computes float16 rois' geometry in float16)."""
    boxes = _as_array(boxes, name, caller="boxes_to_rois")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes_to_rois: {name} must have shape [K, 4], got {boxes.shape}")
    if boxes.dtype == np.float16:
        return boxes
    return _cast_coordinates(boxes, name, caller="boxes_to_rois")


def _cast_coordinates(rois: jax.Array, name: str, caller: str = "roi_pool") -> jax.Array:
    if not jnp.issubdtype(rois.dtype, jnp.floating):
        raise TypeError(f"{caller}: {name} must be floating point, got {rois.dtype}")
    return rois.astype(coordinate_dtype(rois.dtype))
