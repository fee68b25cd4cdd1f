"""Plain numpy/Python-loop oracle for RoI max pooling, written from the spec.

Geometry is evaluated one RoI and one axis at a time with numpy *scalars* of
the coordinate type C (np.float32 or np.float64), so every product, division,
floor and ceil rounds exactly as IEEE arithmetic in C does. float16 rois with
bins="fast_rcnn" follow torchvision's float16 arithmetic instead: every
operation in float32, its result rounded to float16 (numpy's conversion).

The max itself is taken in float64 (exact for every supported value dtype)
and vectorised over channels only, so large cases stay fast enough for the
test suite.
"""

from __future__ import annotations

import math

import numpy as np

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
LAYOUTS = ("NHWC", "NCHW")
BINS = ("fast_rcnn", "partition")
FLOAT16_FAST_RCNN = "fast_rcnn in float16"  # bins of float16 rois with bins="fast_rcnn"


def half(v) -> np.float32:
    """v rounded to float16 (from float32, as c10::Half converts), as float32;
    overflow gives inf."""
    with np.errstate(over="ignore"):
        return np.float32(np.float16(np.float32(v)))


def coordinate_type(rois_dtype) -> type:
    """C: float64 for float64 rois, float32 for every other floating dtype."""
    return np.float64 if np.dtype(rois_dtype) == np.float64 else np.float32


def round_half_away(v: float) -> float:
    """C ``round``: halves go away from zero (numpy's np.round goes to even)."""
    whole = math.trunc(v)  # exact: v is a finite binary float
    frac = v - whole  # exact as well
    if abs(frac) >= 0.5:
        whole += 1 if v > 0 else -1
    return float(whole)


class Int32Overflow(ArithmeticError):
    """A step of the geometry left int32, where torchvision computes it: the
    RoI is invalid."""


def int32(v: int) -> int:
    """v, an exact Python int, where it fits int32."""
    if not INT32_MIN <= v <= INT32_MAX:
        raise Int32Overflow(v)
    return v


def corner_cell(scaled) -> int:
    return int32(int(round_half_away(float(scaled))))


def _pair(output_size) -> tuple[int, int]:
    if isinstance(output_size, (tuple, list)):
        return int(output_size[0]), int(output_size[1])
    return int(output_size), int(output_size)


def axis_spans(lo, hi, pooled: int, extent: int, bins: str, ctype: type) -> list[tuple[int, int]]:
    """Clipped half-open [begin, end) of each bin along one axis of one RoI.

    ``lo`` and ``hi`` are already scaled ``ctype`` scalars. Every integer
    step that torchvision computes in int is checked against int32: one that
    leaves it raises Int32Overflow.
    """
    start, last = corner_cell(lo), corner_cell(hi)
    spans = []
    if bins == "fast_rcnn":
        length = max(int32(int32(last - start) + 1), 1)
        bin_size = ctype(length) / ctype(pooled)
        for i in range(pooled):
            begin = int32(int32(int(np.floor(ctype(i) * bin_size))) + start)
            end = int32(int32(int(np.ceil(ctype(i + 1) * bin_size))) + start)
            spans.append((begin, end))
    elif bins == FLOAT16_FAST_RCNN:
        length = max(int32(int32(last - start) + 1), 1)
        bin_size = half(half(length) / half(pooled))
        for i in range(pooled):
            with np.errstate(invalid="ignore"):
                first, past = half(half(i) * bin_size), half(half(i + 1) * bin_size)
            if not np.isfinite(past):  # float16 overflowed: an empty bin
                spans.append((0, 0))
                continue
            spans.append((int(np.floor(first)) + start, int(np.ceil(past)) + start))
    elif bins == "partition":
        length = max(int32(last - start), 0)
        for i in range(pooled):
            begin = start + (i * length) // pooled
            end = start + ((i + 1) * length) // pooled
            if length > 0 and end <= begin:
                end = begin + 1
            spans.append((begin, end))  # length 0: every bin is empty
    else:
        raise ValueError(bins)
    return [(min(max(b, 0), extent), min(max(e, 0), extent)) for b, e in spans]


def roi_geometry(roi, n: int, h: int, w: int, pooled: tuple[int, int], spatial_scale: float,
                 bins: str, ctype: type):
    """(batch, row spans, column spans) of one RoI, or None for an invalid RoI."""
    with np.errstate(all="ignore"):
        b = ctype(roi[0])
        if bins == FLOAT16_FAST_RCNN:
            scale = half(spatial_scale)
            x1, y1, x2, y2 = (half(ctype(roi[k]) * scale) for k in range(1, 5))
        else:
            scale = ctype(spatial_scale)
            x1, y1, x2, y2 = (ctype(roi[k]) * scale for k in range(1, 5))
        # Valid: truncated toward zero, in [0, N) (compared as integers).
        if not (np.isfinite(b) and b > ctype(-1) and math.trunc(float(b)) < n):
            return None
        if not all(np.isfinite(v) for v in (x1, y1, x2, y2)):
            return None
        try:
            rows = axis_spans(y1, y2, pooled[0], h, bins, ctype)
            cols = axis_spans(x1, x2, pooled[1], w, bins, ctype)
        except Int32Overflow:
            return None
    return int(math.trunc(float(b))), rows, cols


def to_float64(x) -> np.ndarray:
    """Exact float64 copy of any supported floating array (bfloat16 included)."""
    return np.asarray(x).astype(np.float64)


def roi_pool_loop(features, rois, output_size, spatial_scale=1.0, *, layout="NHWC",
                  bins="fast_rcnn", coord_dtype=None):
    """(output, argmax) in float64 / int32, in the given layout.

    ``coord_dtype`` overrides the coordinate type (default: derived from the
    rois dtype, float64 only for float64 rois).
    """
    assert layout in LAYOUTS and bins in BINS
    if bins == "fast_rcnn" and np.asarray(rois).dtype == np.float16 and coord_dtype is None:
        bins = FLOAT16_FAST_RCNN
    feats = to_float64(features)
    if layout == "NCHW":
        feats = feats.transpose(0, 2, 3, 1)
    n, h, w, c = feats.shape
    rois = np.asarray(rois)
    ctype = coordinate_type(rois.dtype if coord_dtype is None else coord_dtype)
    if rois.dtype != np.float64:
        rois = rois.astype(np.float32)  # 16-bit rois are upcast exactly
    pooled = _pair(output_size)
    r = rois.shape[0]
    out = np.zeros((r, pooled[0], pooled[1], c), np.float64)
    arg = np.full((r, pooled[0], pooled[1], c), -1, np.int32)
    for k in range(r):
        geometry = roi_geometry(rois[k], n, h, w, pooled, spatial_scale, bins, ctype)
        if geometry is None:
            continue
        batch, rows, cols = geometry
        for ph, (h0, h1) in enumerate(rows):
            if h1 <= h0:
                continue
            for pw, (w0, w1) in enumerate(cols):
                if w1 <= w0:
                    continue
                cells = feats[batch, h0:h1, w0:w1, :].reshape(-1, c)  # row-major cells
                first = np.argmax(cells, axis=0)  # first max; first NaN if any
                out[k, ph, pw] = cells[first, np.arange(c)]
                hh, ww = np.divmod(first, w1 - w0)
                arg[k, ph, pw] = (batch * h + h0 + hh) * w + w0 + ww
    if layout == "NCHW":
        out, arg = out.transpose(0, 3, 1, 2), arg.transpose(0, 3, 1, 2)
    return out, arg


def scatter_grad(cotangent, argmax, features_shape, *, layout="NHWC") -> np.ndarray:
    """Feature gradient in float64: np.add.at of the cotangent at each argmax cell."""
    cot = to_float64(cotangent)
    arg = np.asarray(argmax)
    if layout == "NCHW":
        cot, arg = cot.transpose(0, 2, 3, 1), arg.transpose(0, 2, 3, 1)
        n, c, h, w = features_shape
    else:
        n, h, w, c = features_shape
    grad = np.zeros((n * h * w, c), np.float64)
    channel = np.broadcast_to(np.arange(c), arg.shape)
    keep = arg >= 0
    np.add.at(grad, (arg[keep], channel[keep]), cot[keep])
    grad = grad.reshape(n, h, w, c)
    return grad.transpose(0, 3, 1, 2) if layout == "NCHW" else grad
