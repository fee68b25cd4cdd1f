"""Public API: ``roi_pool``, ``roi_pool_with_argmax`` and ``boxes_to_rois``."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from . import _checks, _native, reference
from ._primitives import per_image_p, roi_pool_p, varying_axes

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
    same for both layouts), or -1 for an empty bin or an invalid RoI. This
    holds for both forms: for per-image boxes ``[N, K, 4]``, ``argmax[n, k]``
    names cells of image ``n``, as the equivalent ``[N * K, 5]`` rois would
    (the image-local index is ``argmax - n * H * W`` where ``argmax >= 0``).
    Under ``vmap`` the indices are into each mapped element's own features.
    """
    return _pool(features, rois, output_size, spatial_scale, layout, bins, with_argmax=True)


def _pool(features, rois, output_size, spatial_scale, layout, bins, *, with_argmax):
    config, features, rois = _checks.check_arguments(features, rois, output_size, spatial_scale,
                                                     layout, bins)
    features, rois = _align_varying(features, rois)
    primitive = per_image_p if rois.ndim == 3 else roi_pool_p
    out, argmax = primitive.bind(features, rois, **config._asdict(), with_argmax=with_argmax)
    if with_argmax and rois.ndim == 3:
        # The per-image primitive's argmax is image-local; the public one is
        # the flat cell index, as for [R, 5] rois.
        argmax = reference.local_to_global(argmax, features.shape, config.layout)
    return out, argmax


def _align_varying(*arrays):
    """Inside shard_map, lets all operands vary over the same manual mesh axes
    (as jax's own multi-operand ops do), so gradients flow back correctly."""
    axes = [varying_axes(jax.typeof(x)) for x in arrays]
    union = frozenset().union(*axes)
    if all(a == union for a in axes):
        return arrays
    out = []
    for x, a in zip(arrays, axes):
        missing = tuple(sorted(union - a, key=str))
        if missing:
            x = (jax.lax.pcast(x, missing, to="varying") if hasattr(jax.lax, "pcast")
                 else jax.lax.pvary(x, missing))
        out.append(x)
    return tuple(out)


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
        float64 rois; with ``bins="fast_rcnn"``, float16 rois get
        torchvision's float16 arithmetic). ``R = 0`` / ``K = 0`` are valid.
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
      ``[0, N)``, non-finite coordinates, or a geometry that overflows
      torchvision's int32 arithmetic, e.g. corners of 1e30) give 0.
      Differentiable in ``features`` (the gradient goes to the argmax cell of
      each bin); the gradient with respect to ``rois`` is zero.

    Multiple devices: with per-image boxes, ``jit`` partitions the call the
    way the features and boxes are sharded along the image axis N (and the
    channel axis C; the forward also keeps the box axis K): each device pools
    its own images, with no all-gather of the feature maps (sharded H or W
    are gathered first). This works with Shardy and GSPMD, with automatic and explicit
    mesh axes, and under ``vmap``. Flat ``[R, 5]`` rois may name any image,
    so XLA replicates the features for them: correct, but it all-gathers
    them. Inside ``shard_map`` both forms pool the local block (batch
    indices of ``[R, 5]`` rois, and argmax indices, are then local).

    Order: the RoIs may come in any order of their images. Large feature
    maps (per platform and kernel: ``_native.SORT_ROIS_FROM_FEATURE_BYTES``)
    are pooled with the RoIs grouped by image, which keeps each image's
    features in cache; every result stays in its RoI's place.

    Export: see :func:`export_safety_checks`.
    """
    return _pool(features, rois, output_size, spatial_scale, layout, bins, with_argmax=False)[0]


def boxes_to_rois(boxes: Sequence[jax.typing.ArrayLike]) -> jax.Array:
    """Per-image boxes of any lengths (torchvision's list form) -> ``[R, 5]`` rois.

    ``boxes[n]`` is a ``[K_n, 4]`` array of ``(x1, y1, x2, y2)`` rows for image
    ``n`` (``K_n = 0`` allowed). The result holds image 0's boxes, then image
    1's, and so on, each row prefixed by its image index: the rows that
    ``torchvision.ops.roi_pool`` builds from its ``List[Tensor[K, 4]]``, so
    ``roi_pool(features, boxes_to_rois(boxes), ...)`` returns its
    ``[sum K_n, ...]`` output. Works under ``jit`` (the lengths are static
    shapes). The dtype is float64 if any box array is float64 (with
    ``jax_enable_x64``), float16 if all are float16 (whose geometry roi_pool
    computes in float16, as torchvision does; up to 2048 images, the image
    indices float16 holds exactly), else float32: the precision roi_pool
    computes coordinates in.

    For the same number of boxes per image, the per-image form ``[N, K, 4]``
    is the better choice: it keeps the image axis, so it can be sharded.
    """
    if not hasattr(boxes, "__iter__"):
        raise TypeError("boxes_to_rois: boxes must be a sequence of [K, 4] arrays, one per "
                        f"image, got {type(boxes).__name__}")
    checked = [_checks.check_image_boxes(b, f"boxes[{n}]") for n, b in enumerate(boxes)]
    if not checked:
        return jnp.zeros((0, 5), jnp.float32)
    dtype = jnp.result_type(*checked)
    _checks.check_image_count(dtype, len(checked), caller="boxes_to_rois")
    return jnp.concatenate(
        [jnp.concatenate([jnp.full((b.shape[0], 1), n, dtype), b.astype(dtype)], axis=1)
         for n, b in enumerate(checked)])


def export_safety_checks() -> list:
    """``disabled_checks`` that ``jax.export.export`` needs for functions using roi_pool.

    The native kernels are XLA FFI custom calls, which jax.export rejects
    unless told they are intended::

        exported = jax.export.export(
            jax.jit(fn), disabled_checks=jax_roipool.export_safety_checks())(*args)
        blob = exported.serialize()

    Serialising needs the ``flatbuffers`` package. To run it (in any
    process, later): ``import jax_roipool`` first (it registers the kernels
    under their target names; without it XLA reports an unknown custom call
    ``roipool_forward``), then ``jax.export.deserialize(blob).call(*args)``.
    The module names the kernels and their attributes, so it needs a
    jax_roipool with the same kernels, built for the platforms it was
    exported for (``platforms=("cpu", "cuda")`` exports for both; where the
    CUDA kernels were not built, the CUDA variant is the pure-JAX lowering).
    For gradients, export ``jax.grad(fn)`` itself, or serialise with
    ``exported.serialize(vjp_order=1)`` and differentiate ``call``.

    Sharded: exported per-image calls are not pre-partitioned; they run
    correctly on the exported devices, but XLA may gather the features.
    Per-image calls must be exported with concrete devices (not for an
    ``AbstractMesh`` alone: their partitioning needs the devices to lower).
    """
    from jax.export import DisabledSafetyCheck

    return [DisabledSafetyCheck.custom_call(name) for name in _native.FFI_TARGETS]
