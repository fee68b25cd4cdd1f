"""Pure ``jax.numpy`` RoI pooling with exactly the semantics of the native kernels.

It is readable rather than fast (it materialises per-RoI masks over the whole
feature map), serves as a second oracle in the tests, and is the lowering of
the roi_pool primitives on platforms without a native kernel (e.g. TPU). The
geometry mirrors ``csrc/roipool_geometry.h`` step by step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _checks

INT32_MAX = 2**31 - 1


def _corner_cell(scaled: jax.Array):
    """(cell, fits): scaled rounded half away from zero as int32, and whether
    it fits int32 (NaN and inf do not; their cell is 0)."""
    rounded = lax.round(scaled, lax.RoundingMethod.AWAY_FROM_ZERO)
    fits = (rounded >= -(2.0**31)) & (rounded < 2.0**31)
    return jnp.where(fits, rounded, 0).astype(jnp.int32), fits


def _axis_spans(lo, hi, pooled: int, extent: int, bins: str):
    """Clipped [begin, end) of every bin along one axis, two [R, pooled] int32
    arrays, and [R] whether the geometry's int32 steps all fit (torchvision's
    for fast_rcnn, the same rule for partition), as make_axis decides."""
    origin, origin_fits = _corner_cell(lo)
    last, last_fits = _corner_cell(hi)
    # last - origin wraps in int32; it overflowed where its sign disagrees.
    difference = last - origin
    fits = origin_fits & last_fits & ((difference >= 0) == (last >= origin))
    if bins != "partition":
        fits &= difference < INT32_MAX  # the + 1
        length = jnp.where(fits, jnp.maximum(difference + 1, 1), 1)
    else:
        length = jnp.where(fits, jnp.maximum(difference, 0), 0)
    origin, length = origin[:, None], length[:, None]
    i = jnp.arange(pooled, dtype=jnp.int32)[None, :]
    if bins == "fast_rcnn":
        bin_size = _rounded_quotient(length, pooled, lo.dtype)
        # The last bin's end is the largest edge (rounding is monotonic).
        far = jnp.ceil(jnp.asarray(pooled, lo.dtype) * bin_size)
        far_fits = far < 2.0**31
        room = INT32_MAX - jnp.where(far_fits, far, 0).astype(jnp.int32)
        fits &= (far_fits & (origin <= room))[:, 0]
        begin = jnp.floor(i.astype(lo.dtype) * bin_size).astype(jnp.int32)
        end = jnp.ceil((i + 1).astype(lo.dtype) * bin_size).astype(jnp.int32)
    elif bins == _checks.FAST_RCNN_BINARY16:
        begin, end = _binary16_edges(length, pooled)
    else:
        begin, end = _partition_edge(i, length, pooled), _partition_edge(i + 1, length, pooled)
        end = jnp.where((length > 0) & (end <= begin), begin + 1, end)
    return jnp.clip(begin + origin, 0, extent), jnp.clip(end + origin, 0, extent), fits


def _rounded_quotient(length, pooled: int, dtype):
    """dtype(length) / pooled rounded to nearest (ties to even) in float
    `dtype`, as the kernels divide, for 1 <= length <= 2**31 - 1 and
    1 <= pooled <= 65535.

    Computed without float division, whose rounding is not the same on every
    backend: XLA on GPU divides float32 within 2 ulp (div.full), XLA on CPU
    may multiply by a rounded reciprocal, and either moves some bin edges by
    one cell. Integer long division and one integer-to-float conversion
    (rounded to nearest on CPUs and NVIDIA GPUs) give the correctly rounded
    quotient.
    """
    info = jnp.finfo(dtype)
    digits = info.nmant + 1  # significant bits: 24 (float32) or 53 (float64)
    itype = jnp.int32 if digits <= 24 else jnp.int64
    # length * 2**shift // pooled keeps at least digits + 2 bits: the bit that
    # decides the rounding and one below it, into which a non-zero remainder
    # is folded, so that converting the integer rounds as the exact quotient.
    # The kernels divide dtype(length), which may round up to 2**31 in
    # float32: halve that (exactly) into int32's range, and double the result.
    length = length.astype(dtype)
    halved = length >= 2.0**31
    length = jnp.where(halved, length * 0.5, length).astype(jnp.int32)
    most = digits + 1 + pooled.bit_length()  # the shift for length 1
    shift = jnp.maximum(most + 1 - (32 - lax.clz(length)), 0)

    def next_bit(step, state):
        quotient, remainder = state
        more = step < shift
        doubled = jnp.where(more, 2 * remainder, remainder)
        bit = doubled >= pooled  # never where not `more`: remainder < pooled
        return (jnp.where(more, 2 * quotient + bit.astype(itype), quotient),
                doubled - jnp.where(bit, pooled, 0).astype(itype))

    quotient, remainder = lax.fori_loop(
        0, most, next_bit, ((length // pooled).astype(itype), (length % pooled).astype(itype)))
    rounded = (quotient | (remainder != 0).astype(itype)).astype(dtype)
    power = halved.astype(itype) - shift  # the result is rounded * 2**power, exactly
    exponent = (info.maxexp - 1 + power).astype(itype) << info.nmant
    return rounded * lax.bitcast_convert_type(exponent, dtype)


def _to_binary16(v):
    """float32 v rounded to the nearest binary16 value, ties to even, as
    float32; +-inf from magnitude 65520 on. As to_binary16 in
    roipool_geometry.h, with bit operations rather than a float16 conversion,
    which a backend might flush or saturate."""
    a = jnp.abs(v)
    subnormal = lax.round(a * 2.0**24, lax.RoundingMethod.TO_NEAREST_EVEN) * 2.0**-24
    bits = lax.bitcast_convert_type(a, jnp.uint32)
    bits = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~np.uint32(0x1FFF)
    normal = lax.bitcast_convert_type(bits, jnp.float32)
    return jnp.copysign(jnp.where(a < 2.0**-14, subnormal,
                                  jnp.where(a < 65520, normal, a * np.inf)), v)


def _binary16_edges(length, pooled: int):
    """Unclipped [begin, end) of every bin for float16 rois: fast_rcnn's
    formulas with each operand and product rounded to binary16, as
    torchvision computes them; a bin whose end overflows is empty (0, 0)."""
    with np.errstate(over="ignore"):
        divisor = np.float32(np.float16(np.float32(pooled)))
        indices = np.arange(pooled + 1, dtype=np.float32).astype(np.float16).astype(np.float32)
    numerator = _to_binary16(length.astype(jnp.float32))
    if np.isfinite(divisor):
        finite = numerator < np.inf
        quotient = _rounded_quotient(jnp.where(finite, numerator, 1).astype(jnp.int32),
                                     int(divisor), jnp.float32)
        bin_size = jnp.where(finite, _to_binary16(quotient), np.inf)
    else:  # pooled >= 65520: a finite length over inf is 0, inf over inf NaN
        bin_size = jnp.where(numerator < np.inf, 0.0, np.nan).astype(jnp.float32)
    first = _to_binary16(indices[None, :-1] * bin_size)
    past = _to_binary16(indices[None, 1:] * bin_size)
    finite = past <= 65504
    begin = jnp.where(finite, jnp.floor(jnp.where(finite, first, 0)), 0).astype(jnp.int32)
    end = jnp.where(finite, jnp.ceil(jnp.where(finite, past, 0)), 0).astype(jnp.int32)
    return begin, end


def _partition_edge(i, length, pooled: int):
    """floor(i * length / pooled) exactly, without int32 overflow (pooled <= 65535)."""
    q, rem = length // pooled, (length % pooled).astype(jnp.uint32)
    return i * q + ((i.astype(jnp.uint32) * rem) // pooled).astype(jnp.int32)


def _max(values, axis: int):
    """jnp.max, NaN where any value is NaN: XLA:CPU's max reduction can drop
    NaN (it did here for 16 or more RoIs, not for 8)."""
    return jnp.where(jnp.isnan(values).any(axis), jnp.array(jnp.nan, values.dtype),
                     jnp.max(values, axis))


def _first_hit(values, best, mask, axis: int):
    """Index along `axis` of the first masked value equal to `best` (NaN matches NaN)."""
    best = jnp.expand_dims(best, axis)
    hit = mask & ((values == best) | (jnp.isnan(values) & jnp.isnan(best)))
    return jnp.argmax(hit, axis=axis)


def forward(features, rois, *, pooled, spatial_scale, layout, bins, with_argmax=True):
    """(output, argmax) of roi_pool for validated arguments (rois [R, 5] in f32/f64).

    With ``with_argmax=False`` the argmax is returned empty, as by the kernels.
    """
    n, h, w, c = _checks.feature_dims(features.shape, layout)
    ph, pw = pooled
    nhwc = features if layout == "NHWC" else jnp.transpose(features, (0, 2, 3, 1))
    scale = jnp.asarray(spatial_scale, rois.dtype)
    b = rois[:, 0]
    x1, y1, x2, y2 = (rois[:, k] * scale for k in range(1, 5))
    if bins == _checks.FAST_RCNN_BINARY16:  # float16 products, as torchvision's
        x1, y1, x2, y2 = (_to_binary16(v) for v in (x1, y1, x2, y2))
    # As the kernels: the bound N is compared after truncation, as an integer
    # (n itself may round in float32 above 2**24).
    in_range = (b > -1) & (b < 2.0**31)
    batch = jnp.where(in_range, b, 0).astype(jnp.int32)
    y_begin, y_end, y_fits = _axis_spans(y1, y2, ph, h, bins)
    x_begin, x_end, x_fits = _axis_spans(x1, x2, pw, w, bins)
    valid = in_range & (batch < n) & y_fits & x_fits
    batch = jnp.where(valid, batch, 0)

    rows = jnp.arange(h)[None, None, :]
    cols = jnp.arange(w)[None, None, :]
    row_mask = (rows >= y_begin[..., None]) & (rows < y_end[..., None])  # [R, PH, H]
    col_mask = (cols >= x_begin[..., None]) & (cols < x_end[..., None])  # [R, PW, W]

    # Max along each row inside every column span, then along the rows of
    # every row span: row-major first on ties, since both steps keep the first.
    images = nhwc[batch]  # [R, H, W, C]
    low = jnp.array(-jnp.inf, features.dtype)
    m = col_mask[:, :, None, :, None]
    v = jnp.where(m, images[:, None], low)  # [R, PW, H, W, C]
    row_max = _max(v, axis=3)  # [R, PW, H, C]
    row_arg = _first_hit(v, row_max, m, axis=3)
    m = row_mask[:, :, None, :, None]
    v = jnp.where(m, row_max[:, None], low)  # [R, PH, PW, H, C]
    best = _max(v, axis=3)  # [R, PH, PW, C]
    best_h = _first_hit(v, best, m, axis=3)
    best_w = jnp.take_along_axis(
        jnp.broadcast_to(row_arg[:, None], v.shape), best_h[:, :, :, None], axis=3)[:, :, :, 0]

    empty = (~valid[:, None, None] | (y_end <= y_begin)[:, :, None]
             | (x_end <= x_begin)[:, None, :])[..., None]
    # The value is read back at the argmax cell rather than taken from `best`:
    # JAX then differentiates it as the kernels do (the whole cotangent to
    # that cell, where jnp.max would share it among tied cells).
    r = rois.shape[0]
    image_cell = (best_h * w + best_w).reshape(r, ph * pw, c)
    picked = jnp.take_along_axis(images.reshape(r, h * w, c), image_cell, axis=1)
    out = jnp.where(empty, jnp.zeros((), features.dtype), picked.reshape(best.shape))
    cell = (batch[:, None, None, None] * h + best_h) * w + best_w
    argmax = jnp.where(empty, -1, cell).astype(jnp.int32)
    if layout == "NCHW":
        out, argmax = (jnp.transpose(a, (0, 3, 1, 2)) for a in (out, argmax))
    return out, argmax if with_argmax else jnp.zeros((0,), jnp.int32)


def _cell_index(argmax, features_shape, layout: str):
    """Index arrays into a feature-shaped array of each element's (argmax cell,
    channel), cell 0 where -1. Each coordinate fits int32 (N*H*W is checked to);
    a flat element offset would not once the features pass 2**31 elements."""
    _, h, w, _ = _checks.feature_dims(features_shape, layout)
    cell = jnp.maximum(argmax, 0)
    image, row, col = cell // (h * w), cell % (h * w) // w, cell % w
    if layout == "NHWC":
        return image, row, col, lax.broadcasted_iota(jnp.int32, argmax.shape, 3)
    return image, lax.broadcasted_iota(jnp.int32, argmax.shape, 1), row, col


def _source_argmax(features, rois, copies: int, config):
    """The forward's argmax of every output element as cells of the images of
    a gather's source (a scatter's gradient), which may hold ``copies`` copies
    of the features' images (see ``_primitives``): a RoI naming image i of
    them pools image ``i % N`` of the features."""
    if copies == 1:
        return forward(features, rois, **config)[1]
    n, h, w, _ = _checks.feature_dims(features.shape, config["layout"])
    b = rois[:, 0]
    in_range = (b > -1) & (b < 2.0**31)  # as forward: truncated, compared as an integer
    image = jnp.where(in_range, b, 0).astype(jnp.int32)
    valid = in_range & (image < n * copies)
    pooled = image % n
    rois = rois.at[:, 0].set(jnp.where(valid, pooled, -1).astype(rois.dtype))
    argmax = forward(features, rois, **config)[1]
    shift = ((image - pooled) * (h * w)).reshape((-1, 1, 1, 1))
    return jnp.where(argmax >= 0, argmax + shift, -1)


def gather(source, features, rois, *, copies=1, **config):
    """``source`` (shaped like the features, or holding ``copies`` copies of
    their images) at the forward's argmax cell of every output element, 0
    for an empty bin: the forward's JVP tangent."""
    argmax = _source_argmax(features, rois, copies, config)
    values = source[_cell_index(argmax, source.shape, config["layout"])]
    return jnp.where(argmax >= 0, values, jnp.zeros((), source.dtype))


def scatter(cotangent, features, rois, *, copies=1, **config):
    """Scatter-add of the cotangent at the forward's argmax cells (transpose of
    gather) into a gradient shaped like the features, or holding ``copies``
    copies of their images; summed in float32 for 16-bit cotangents (as the
    kernels) and rounded once."""
    argmax = _source_argmax(features, rois, copies, config)
    acc_dtype = jnp.promote_types(cotangent.dtype, jnp.float32)
    updates = jnp.where(argmax >= 0, cotangent, 0).astype(acc_dtype)
    shape = (features.shape[0] * copies,) + features.shape[1:]
    index = _cell_index(argmax, shape, config["layout"])
    return jnp.zeros(shape, acc_dtype).at[index].add(updates).astype(cotangent.dtype)


# ---------------------------------------------------------------------------
# Per-image boxes [N, K, 4]. They are the flat rois with batch column 0..N-1;
# the primitives index their argmax within each image ("image-local":
# h * W + w, -1 for none), so that any subset of the images is self-contained.

def per_image_rois(boxes):
    """[N, K, 4] boxes -> [N * K, 5] rois with batch column 0..N-1 (the boxes' dtype)."""
    n, k = boxes.shape[:2]
    index = lax.broadcasted_iota(boxes.dtype, (n, k, 1), 0)
    return jnp.concatenate([index, boxes], axis=2).reshape(n * k, 5)


def _image_cells(features_shape, layout: str) -> int:
    _, h, w, _ = _checks.feature_dims(features_shape, layout)
    return h * w


def _image_index(argmax):
    """n at every element of an [N, K, ...] array, sharded like it (sharding in types)."""
    return lax.broadcasted_iota(jnp.int32, argmax.shape, 0,
                                out_sharding=jax.typeof(argmax).sharding)


def local_to_global(argmax, features_shape, layout: str):
    """Image-local argmax [N, K, ...] (h * W + w, or -1 for none) -> flat cell
    indices (n * H + h) * W + w, or -1."""
    cells = _image_cells(features_shape, layout)
    return jnp.where(argmax >= 0, argmax + _image_index(argmax) * cells, -1)


def global_to_local(argmax, features_shape, layout: str):
    """Flat argmax [N, K, ...] of per-image rois (row n names cells of image n only) ->
    image-local."""
    cells = _image_cells(features_shape, layout)
    return jnp.where(argmax >= 0, argmax - _image_index(argmax) * cells, -1)


def roi_pool_with_argmax(features, rois, output_size, spatial_scale=1.0, *, layout="NHWC",
                         bins="fast_rcnn"):
    """Pure-JAX ``jax_roipool.roi_pool_with_argmax`` (differentiable by JAX itself).

    ``rois``: ``[R, 5]`` or per-image ``[N, K, 4]``; the argmax holds flat cell
    indices ``(n * H + h) * W + w`` for both, as the public function's.
    """
    config, features, rois = _checks.check_arguments(features, rois, output_size, spatial_scale,
                                                     layout, bins)
    if rois.ndim == 3:
        out, argmax = forward(features, per_image_rois(rois), **config._asdict())
        lead = rois.shape[:2]
        return out.reshape(lead + out.shape[1:]), argmax.reshape(lead + argmax.shape[1:])
    return forward(features, rois, **config._asdict())


def roi_pool(features, rois, output_size, spatial_scale=1.0, *, layout="NHWC", bins="fast_rcnn"):
    """Pure-JAX ``jax_roipool.roi_pool`` (``[R, 5]`` rois or per-image ``[N, K, 4]`` boxes)."""
    return roi_pool_with_argmax(features, rois, output_size, spatial_scale, layout=layout,
                                bins=bins)[0]
