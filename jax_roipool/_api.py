"""Public API: ``roi_pool`` and ``roi_pool_with_argmax``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import _checks
from ._primitives import roi_pool_p

OutputSize = int | tuple[int, int]


def roi_pool_with_argmax(
    features: jax.typing.ArrayLike,
    rois: jax.typing.ArrayLike,
    output_size: OutputSize,
    spatial_scale: float = 1.0,
    *,
    layout: str = "NHWC",
    bins: str = "fast_rcnn",
) -> tuple[jax.Array, jax.Array]:
    """Like :func:`roi_pool`, also returning the int32 argmax.

    ``argmax`` has the output's shape and holds, per output element, the flat
    cell index ``(n * H + h) * W + w`` of the maximum in the features (the
    same for both layouts), or -1 for an empty bin or an invalid RoI.
    """
    return _pool(features, rois, output_size, spatial_scale, layout, bins, with_argmax=True)


def _pool(features, rois, output_size, spatial_scale, layout, bins, *, with_argmax):
    config = _checks.check_config(output_size, spatial_scale, layout, bins)
    features = _checks.check_features(features, layout)
    rois = jnp.asarray(rois)
    if rois.ndim == 3:
        return _per_image(features, rois, config, with_argmax)
    rois = _checks.check_rois(rois)
    return roi_pool_p.bind(features, rois, **config._asdict(), with_argmax=with_argmax)


def _per_image(features, boxes, config, with_argmax):
    """[N, K, 4] boxes: one flat call with batch indices 0..N-1, outputs [N, K, ...]."""
    n = _checks.feature_dims(features.shape, config.layout)[0]
    boxes = _checks.check_boxes(boxes, n)
    k = boxes.shape[1]
    index = jnp.broadcast_to(jnp.arange(n, dtype=boxes.dtype)[:, None, None], (n, k, 1))
    rois = jnp.concatenate([index, boxes], axis=2).reshape(n * k, 5)
    out, argmax = roi_pool_p.bind(features, rois, **config._asdict(), with_argmax=with_argmax)
    if with_argmax:
        argmax = argmax.reshape((n, k) + argmax.shape[1:])
    return out.reshape((n, k) + out.shape[1:]), argmax


def roi_pool(
    features: jax.typing.ArrayLike,
    rois: jax.typing.ArrayLike,
    output_size: OutputSize,
    spatial_scale: float = 1.0,
    *,
    layout: str = "NHWC",
    bins: str = "fast_rcnn",
) -> jax.Array:
    """RoI max pooling (Fast R-CNN), a JAX primitive with native CPU and CUDA kernels.

    Args:
      features: ``[N, H, W, C]`` (``layout="NHWC"``) or ``[N, C, H, W]``
        (``layout="NCHW"``); float16, bfloat16, float32 or float64.
      rois: either ``[R, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, or
        per-image boxes ``[N, K, 4]`` rows ``(x1, y1, x2, y2)``; image
        coordinates, any floating dtype (computed in float32, or float64 for
        float64 rois). ``R = 0`` / ``K = 0`` are valid.
      output_size: ``PH`` (square) or ``(PH, PW)``, each in [1, 65535].
      spatial_scale: feature cells per image pixel (1/16 for a stride-16
        backbone); a static positive number.
      layout: ``"NHWC"`` (default, the Flax convention) or ``"NCHW"``.
      bins: ``"fast_rcnn"`` (default; bit-identical to
        ``torchvision.ops.roi_pool``) or ``"partition"`` (the non-overlapping
        sections of the deepsense.ai RoI pooling article).

    Returns:
      ``[R, PH, PW, C]`` / ``[R, C, PH, PW]`` for ``[R, 5]`` rois, or
      ``[N, K, PH, PW, C]`` / ``[N, K, C, PH, PW]`` for per-image boxes, in
      the features' dtype. Empty bins and invalid RoIs (batch index outside
      ``[0, N)``, non-finite coordinates) give 0. Differentiable in
      ``features`` (the gradient goes to the argmax cell of each bin); the
      gradient with respect to ``rois`` is zero.
    """
    return _pool(features, rois, output_size, spatial_scale, layout, bins, with_argmax=False)[0]
