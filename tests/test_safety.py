"""Invalid RoIs, extreme coordinates and non-finite features: defined results, no crash."""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_roipool as jrp
import jax_roipool.reference as ref
import reference_loop
from conftest import (BINS, DTYPES, LAYOUTS, assert_exact, check_case, dtype_id, feature_shape,
                      hand_written_call, random_features, x64_for)

N, H, W, C = 2, 8, 10, 3
VALID = [1, 1, 2, 8, 7]  # a box well inside image 1


def features_for(layout, dtype=np.float32, seed=0):
    return random_features(np.random.default_rng(seed), feature_shape(N, H, W, C, layout), dtype)


def roi_slice(x, k, layout):
    """Output (or argmax) of RoI k, NHWC-ordered."""
    x = np.asarray(x)[k]
    return x if layout == "NHWC" else x.transpose(1, 2, 0)


def assert_roi_invalid(features, rois, k, *, layout, bins, scale=1.0):
    """RoI k gives zeros, argmax -1 and no gradient; the whole call equals the references."""
    out, arg = check_case(features, rois, (2, 3), scale, layout=layout, bins=bins)
    assert np.all(roi_slice(out, k, layout).astype(np.float64) == 0)
    assert np.all(roi_slice(arg, k, layout) == -1)
    grad = jax.grad(lambda f: jnp.sum(
        jrp.roi_pool(f, rois, (2, 3), scale, layout=layout, bins=bins)[k].astype(jnp.float32)))(
            features)
    assert np.all(np.asarray(grad).astype(np.float64) == 0)


@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", [-1.0, -1.5, float(N), N + 0.5, 1e9, -1e9, 2.0**31, 3e9, 1e30,
                                   np.nan, np.inf, -np.inf])
def test_invalid_batch_index(batch, layout, bins):
    rois = np.array([VALID, [batch, 0, 0, 9, 7], VALID], np.float32)
    assert_roi_invalid(features_for(layout), rois, 1, layout=layout, bins=bins)


@pytest.mark.parametrize("batch, image", [(-0.99, 0), (-0.5, 0), (0.999, 0), (1.0, 1),
                                          (N - 0.01, N - 1)])
def test_fractional_batch_index_truncates(batch, image):
    features = features_for("NHWC")
    rois = np.array([[batch, 0, 0, 9, 7]], np.float32)
    out, _ = check_case(features, rois, 1)
    assert np.array_equal(out[0, 0, 0], features[image].max(axis=(0, 1)))


def test_batch_index_beyond_the_float32_integers():
    """N = 2**24 + 1 rounds down in float32, but image 2**24 is still valid and
    2**24 + 2 (exact in float32) still invalid: the bound is an integer test."""
    n = 2**24 + 1
    features = np.zeros((n, 1, 1, 1), np.float32)
    features[2**24] = 7
    features[0] = 5
    rois = np.array([[2**24, 0, 0, 0, 0], [2**24 + 2, 0, 0, 0, 0], [-0.5, 0, 0, 0, 0]],
                    np.float32)
    want_out, want_arg = [[7], [0], [5]], [[2**24], [-1], [0]]
    for pool in (jrp.roi_pool_with_argmax, jax.jit(ref.roi_pool_with_argmax, static_argnums=2)):
        out, arg = pool(features, rois, 1)
        assert_exact(out.reshape(3, 1), np.array(want_out, np.float64))
        assert_exact(arg.reshape(3, 1), np.array(want_arg))
    expected = reference_loop.roi_pool_loop(features, rois, 1)
    assert_exact(expected[1].reshape(3, 1), np.array(want_arg))   # the loop agrees
    # float64 rois name the images in between exactly.
    wide = np.array([[2**24 + 0.5, 0, 0, 0, 0], [2**24 + 1, 0, 0, 0, 0]])
    with jax.enable_x64(True):
        for pool in (jrp.roi_pool_with_argmax,
                     jax.jit(ref.roi_pool_with_argmax, static_argnums=2)):
            out, arg = pool(features, wide, 1)
            assert_exact(out.reshape(2, 1), np.array([[7], [0]], np.float64))
            assert_exact(arg.reshape(2, 1), np.array([[2**24], [-1]]))


@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("column", [1, 2, 3, 4])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_coordinate(value, column, layout, bins):
    roi = [0, 1, 1, 6, 6]
    roi[column] = value
    rois = np.array([VALID, roi], np.float32)
    assert_roi_invalid(features_for(layout), rois, 1, layout=layout, bins=bins)


@pytest.mark.parametrize("bins", BINS)
def test_coordinate_overflowing_after_scaling(bins):
    # 1e30 is finite, but 1e30 * 1e10 overflows float32: the RoI is invalid.
    rois = np.array([VALID, [0, 0, 0, 1e30, 1e-10]], np.float32)
    assert_roi_invalid(features_for("NHWC"), rois, 1, layout="NHWC", bins=bins, scale=1e10)


# Corners where torchvision's int arithmetic overflows: every one of these
# RoIs is invalid (zeros, argmax -1).
OVERFLOWING = [
    [0, -1e30, -1e30, 1e30, 1e30],
    [0, 1e30, 1e30, -1e30, -1e30],
    [1, -1e30, 0, 5, 1e30],
    [1, 3, 3, 1e30, 4],
    [0, 0, 0, 1e30, 1e30],
    [0, -3e9, -3e9, 3e9, 3e9],
    [0, 2.0**31, 0, 2.0**31, 5],
    [1, -(2.0**31), 2, 2, 6],  # corners fit int32, the size 2^31 + 3 does not
    [0, 2e9, 0, -2e9, 5],  # inverted: last - first underflows
    [0, 3.4e38, 3.4e38, 3.4e38, 3.4e38],
]
# Far corners whose arithmetic fits int32: torchvision's result is defined,
# and the bins are its bins.
FAR = [
    [0, -1e9, -1e9, 1e9, 1e9],
    [1, -1e9, 0, 5e8, 5],
    [1, 0, 0, 4e8, 6],
    [0, 2.0**28 - 0.5, 0, 2.0**28 + 3, 7],
    [1, -(2.0**28) - 8, -1, 2.0**28 + 8, 1],
    [0, -(2.0**31), 2, -(2.0**31) + 100, 6],
    [1, 0, 0, 2.0**31 - 128, 5],
]


@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pooled", [1, (2, 3), 7])
def test_far_and_overflowing_coordinates(pooled, layout, bins):
    rois = np.array(FAR + OVERFLOWING, np.float32)
    out, arg = check_case(features_for(layout), rois, pooled, layout=layout, bins=bins)
    assert np.all(np.asarray(arg)[len(FAR):] == -1)
    assert np.all(np.asarray(out)[len(FAR):].astype(np.float64) == 0)


@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("k", range(len(OVERFLOWING)))
def test_overflowing_coordinates_make_the_roi_invalid(k, bins):
    rois = np.array([VALID, OVERFLOWING[k]], np.float32)
    assert_roi_invalid(features_for("NHWC"), rois, 1, layout="NHWC", bins=bins)


@pytest.mark.parametrize("bins", BINS)
def test_far_float64_coordinates(bins):
    with jax.enable_x64(True):
        rois = np.array(FAR + OVERFLOWING + [[0, -1e300, -1e300, 1e300, 1e300],
                                             [1, 1e300, 0, 2e300, 4],
                                             [0, -(2.0**31) + 0.5, 0, 2.0**31 - 1.5, 5]],
                        np.float64)
        check_case(features_for("NHWC", np.float64), rois, (3, 2), bins=bins)


def frontier_axis(rng, extent):
    """(lo, hi) of one axis near an int32 limit of the geometry: a size of
    about 2^31 cells, a corner at about +-2^31, or a far bin edge at 2^31."""
    near = rng.uniform(-3, extent + 3)
    jitter = rng.uniform(-400, 400)
    return [(-(2.0**31) + jitter, near),  # the size 2^31 + near - jitter
            (near, 2.0**31 + jitter),  # the last corner
            (-(2.0**30) + jitter, 2.0**30 + rng.uniform(-400, 400)),  # the size, both sides
            (near, 2.0**31 - 128 - 700 + jitter),  # the far edge, at some output sizes
            (near, -(2.0**31) + jitter),  # inverted: last - first near INT32_MIN
            tuple(np.sort(rng.uniform(-3, extent + 3, 2)))][rng.integers(6)]


@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("ctype", [np.float32, np.float64], ids=dtype_id)
@pytest.mark.parametrize("pooled", [1, 2, 7, 25, (3, 255)])
def test_int32_frontier_agrees_with_the_loop(pooled, ctype, bins):
    """RoIs on both sides of every int32 limit: the kernels, the jax reference
    and the loop (which checks each of torchvision's int steps) agree."""
    rng = np.random.default_rng(zlib.crc32(f"{pooled} {ctype.__name__} {bins}".encode()))
    features = features_for("NHWC", ctype)
    rows = []
    for _ in range(60):
        (x1, x2), (y1, y2) = frontier_axis(rng, W), frontier_axis(rng, H)
        rows.append([rng.integers(0, N), x1, y1, x2, y2])
    rois = np.array(rows, ctype)
    with x64_for(ctype):
        out, arg = check_case(features, rois, pooled, bins=bins)
    ph, pw = pooled if isinstance(pooled, tuple) else (pooled, pooled)
    valid = [reference_loop.roi_geometry(roi, N, H, W, (ph, pw), 1.0, bins, ctype) is not None
             for roi in rois]
    # Both sides of the limits are reached: invalid RoIs, and valid ones on the map.
    assert 5 <= sum(valid) <= 55, sum(valid)
    assert (np.asarray(arg).reshape(len(rois), -1) >= 0).any(axis=1).sum() >= 5


# RoIs one step either side of each int32 limit, reaching the map where
# valid: (coordinate type, x corners, bins, pooled, valid). The valid
# fast_rcnn ones are torchvision's bins.
INT32_EDGES = [
    (np.float64, (0, 2**31 - 2), "fast_rcnn", 1, True),  # size and far edge INT32_MAX
    (np.float64, (0, 2**31 - 1), "fast_rcnn", 1, False),  # size 2^31: the + 1 overflows
    (np.float64, (0, 2**31 - 2), "fast_rcnn", 13, False),  # 13 * bin rounds up to 2^31
    (np.float64, (0, 2**31 - 2), "fast_rcnn", 7, True),
    (np.float32, (0, -(2**31)), "fast_rcnn", 1, True),  # last - first is INT32_MIN
    (np.float32, (5, -(2**31)), "fast_rcnn", 1, False),  # last - first below INT32_MIN
    (np.float64, (5, -(2**31) + 2), "partition", 2, False),  # last - first wraps
    (np.float64, (-(2**31) + 5, 5), "partition", 2, False),  # size 2^31
    (np.float64, (-(2**31) + 6, 5), "partition", 2, True),  # size INT32_MAX
    (np.float32, (0, 2**31), "fast_rcnn", 1, False),  # last corner 2^31, outside int32
    (np.float64, (0, 2**31 - 0.5), "partition", 2, False),  # rounds half away to 2^31
    (np.float64, (0, 2**31 - 1), "partition", 2, True),  # last corner INT32_MAX
]


@pytest.mark.parametrize("ctype, corners, bins, pooled, valid", INT32_EDGES)
def test_int32_limits_exactly(ctype, corners, bins, pooled, valid):
    x1, x2 = corners
    rois = np.array([[0, x1, 1, x2, 6]], ctype)
    with x64_for(ctype):
        _, arg = check_case(features_for("NHWC", ctype), rois, (1, pooled), bins=bins)
    assert (np.asarray(arg) >= 0).any() == valid


def test_far_corners_pool_as_torchvision():
    # Columns -1e9 .. 5e8 of 7 bins of 214285714.4 cells: the map lies in bin
    # 4, [-142857143, 71428572), as in torchvision (its int arithmetic fits).
    features = features_for("NHWC")
    rois = np.array([[1, -1e9, 0, 5e8, 1e8]], np.float32)
    out, _ = check_case(features, rois, 7)
    want = np.zeros(out.shape[1:], np.float64)
    want[0, 4] = features[1].max(axis=(0, 1))
    assert_exact(out[0], want)


def nan_cells(features_nhwc, rois, pooled, bins):
    """Expected NaN mask of the output from the spans (independent of the max code)."""
    n, h, w, c = features_nhwc.shape
    mask = np.zeros((len(rois), pooled, pooled, c), bool)
    isnan = np.isnan(features_nhwc.astype(np.float64))
    for k, roi in enumerate(rois):
        geometry = reference_loop.roi_geometry(roi, n, h, w, (pooled, pooled), 1.0, bins,
                                               np.float32)
        if geometry is None:
            continue
        b, rows, cols = geometry
        for i, (h0, h1) in enumerate(rows):
            for j, (w0, w1) in enumerate(cols):
                mask[k, i, j] = isnan[b, h0:h1, w0:w1].any(axis=(0, 1))
    return mask


@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_nan_features_propagate(dtype, layout, bins):
    nhwc = features_for("NHWC", np.float32, seed=1)
    nhwc[0, 2, 3, 0] = np.nan
    nhwc[0, 5, 1, 1] = np.nan
    nhwc[0, 5, 6, 1] = np.nan  # second NaN in some bins: the first in row-major order wins
    nhwc[1, 0, 0, :] = np.nan
    nhwc[0, 4, 4, 2] = 100.0  # a larger value after a NaN does not win
    nhwc = nhwc.astype(dtype)
    features = nhwc if layout == "NHWC" else nhwc.transpose(0, 3, 1, 2)
    rois = np.array([[0, 0, 0, 9, 7], [0, 2, 1, 7, 6], [1, 0, 0, 3, 3], [0, 4, 4, 9, 7],
                     [1, 1, 1, 9, 7]], np.float32)
    # 20 RoIs: XLA:CPU's max reduction dropped NaN from 16 on, which the jax
    # reference (checked by check_case too) must not inherit.
    rois = np.tile(rois, (4, 1))
    with x64_for(dtype):
        out, arg = check_case(features, rois, 3, layout=layout, bins=bins)
    out = out if layout == "NHWC" else out.transpose(0, 2, 3, 1)
    want = nan_cells(nhwc, rois, 3, bins)
    assert want.any() and not want.all()
    assert np.array_equal(np.isnan(out.astype(np.float64)), want)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_infinite_features(dtype, layout):
    features = np.full(feature_shape(N, H, W, C, layout), -np.inf, dtype)
    rois = np.array([[0, 0, 0, 9, 7], [1, 2, 2, 5, 5], [0, 20, 20, 30, 30]], np.float32)
    with x64_for(dtype):
        out, arg = check_case(features, rois, 2, layout=layout)
        # Non-empty bins of an all -inf map are -inf (argmax: the bin's first cell);
        # the RoI outside the map gives empty bins: 0 and -1.
        assert np.all(np.isneginf(out[:2].astype(np.float64))) and np.all(arg[:2] >= 0)
        assert np.all(out[2].astype(np.float64) == 0) and np.all(arg[2] == -1)
        features = features.copy()
        features.reshape(-1)[::7] = np.inf
        out, _ = check_case(features, rois, 2, layout=layout)
        assert np.isposinf(out.astype(np.float64)).any()


@pytest.mark.parametrize("dtype, lowest", [(np.float32, -np.finfo(np.float32).max),
                                           (np.float64, -1e300)], ids=["float32", "float64"])
def test_bins_at_or_below_float32_lowest_give_their_true_max(dtype, lowest):
    # Where torchvision (starting each max at -FLT_MAX) gives -FLT_MAX with
    # argmax -1, the max here is the bin's own, with its first cell.
    features = np.full((1, 4, 4, 1), lowest, dtype)
    rois = np.array([[0, 0, 0, 3, 3]], np.float32)
    with x64_for(dtype):
        out, arg = check_case(features, rois, 1)
        grad = jax.grad(lambda f: jrp.roi_pool(f, rois, 1).sum())(features)
    assert out.reshape(()) == lowest and arg.reshape(()) == 0
    assert np.asarray(grad).reshape(-1)[0] == 1 and np.asarray(grad).sum() == 1


def test_invalid_roi_gradient_in_mixed_batch():
    # Valid and invalid RoIs together: the gradient is exactly the valid RoIs' scatter.
    features = features_for("NHWC")
    rois = np.array([VALID, [N, 0, 0, 9, 7], [0, np.nan, 0, 4, 4], [-1, 0, 0, 9, 7],
                     [0, 0, 0, 9, 7]], np.float32)
    grad = jax.grad(lambda f: jnp.sum(jrp.roi_pool(f, rois, 3)))(features)
    _, arg = reference_loop.roi_pool_loop(features, rois, 3)
    assert np.all(arg[1:4] == -1)
    want = reference_loop.scatter_grad(np.ones(arg.shape), arg, features.shape)
    assert_exact(grad, want)


def _struct(shape, dtype=np.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


# Custom calls written by hand with one thing wrong, by what is wrong:
# (target, results, operands before the order, raw attributes, the kernel's
# error). The operands are a gather's source or a scatter's cotangent (none
# for the forward), the features and the rois; the order is empty.
_FEATURES = np.zeros((1, 4, 4, 3), np.float32)
_ROIS = np.array([[0, 0, 0, 3, 3]], np.float32)
_POOLED = _struct((1, 2, 2, 3))
_CELLS = _struct((1, 2, 2, 3), np.int32)
_ORDER = np.zeros((0,), np.int32)
# 2**31 cells of bfloat16 zeros (4 GiB), made inside the call: argmax cells
# would overflow int32. (A zero-size map will not do: XLA drops a custom call
# whose results are all empty.)
_HUGE = functools.partial(jnp.zeros, (2**15, 2**8, 2**8, 1), jnp.bfloat16)
_FORWARD_ERROR = "output/argmax shape or dtype does not match the inputs"
_GATHER_ERROR = "source must be like features, output pooled"
_SCATTER_ERROR = "cotangent must be pooled, grad like features"
_BAD_CALLS = {
    "layout code": ("roipool_forward", (_POOLED, _CELLS), (_FEATURES, _ROIS),
                    dict(layout=np.int32(2)), "unknown layout code"),
    "bins code": ("roipool_forward", (_POOLED, _CELLS), (_FEATURES, _ROIS),
                  dict(bins=np.int32(7)), "unknown bins code"),
    "pooled height 0": ("roipool_forward", (_POOLED, _CELLS), (_FEATURES, _ROIS),
                        dict(pooled_h=np.int32(0)), "pooled size must be > 0"),
    "pooled width -1": ("roipool_forward", (_POOLED, _CELLS), (_FEATURES, _ROIS),
                        dict(pooled_w=np.int32(-1)), "pooled size must be > 0"),
    "features rank 3": ("roipool_forward", (_POOLED, _CELLS), (_FEATURES[0], _ROIS), {},
                        r"features must be rank 4 and rois \[R, 5\]"),
    "rois [R, 4]": ("roipool_forward", (_POOLED, _CELLS), (_FEATURES, _ROIS[:, :4]), {},
                    r"features must be rank 4 and rois \[R, 5\]"),
    "rois rank 1": ("roipool_forward", (_POOLED, _CELLS), (_FEATURES, _ROIS[0]), {},
                    r"features must be rank 4 and rois \[R, 5\]"),
    "N * H * W 2**31": ("roipool_forward",
                        (_struct((1, 2, 2, 1), jnp.bfloat16), _struct((1, 2, 2, 1), np.int32)),
                        (_HUGE, _ROIS), {}, r"N \* H \* W must fit in int32"),
    "H 2**31": ("roipool_forward", (_struct((1, 2, 2, 1)), _struct((1, 2, 2, 1), np.int32)),
                (np.zeros((1, 2**31, 0, 1), np.float32), _ROIS), {},
                r"N \* H \* W must fit in int32"),
    "output shape": ("roipool_forward", (_struct((1, 2, 3, 3)), _CELLS), (_FEATURES, _ROIS), {},
                     _FORWARD_ERROR),
    "output dtype": ("roipool_forward", (_struct((1, 2, 2, 3), np.float16), _CELLS),
                     (_FEATURES, _ROIS), {}, _FORWARD_ERROR),
    "argmax shape": ("roipool_forward", (_POOLED, _struct((1, 2, 2, 2), np.int32)),
                     (_FEATURES, _ROIS), {}, _FORWARD_ERROR),
    "features int32": ("roipool_forward", (_struct((1, 2, 2, 3), np.int32), _CELLS),
                       (_FEATURES.astype(np.int32), _ROIS), {},
                       "values must be float16, bfloat16, float32 or float64"),
    "rois float16": ("roipool_forward", (_POOLED, _CELLS), (_FEATURES, _ROIS.astype(np.float16)),
                     {}, "rois must be float32 or float64"),
    "gather source dtype": ("roipool_gather", _POOLED,
                            (_FEATURES.astype(np.float16), _FEATURES, _ROIS), {}, _GATHER_ERROR),
    "gather output dtype": ("roipool_gather", _struct((1, 2, 2, 3), np.float16),
                            (_FEATURES, _FEATURES, _ROIS), {}, _GATHER_ERROR),
    "gather output shape": ("roipool_gather", _struct((1, 2, 2, 2)),
                            (_FEATURES, _FEATURES, _ROIS), {}, _GATHER_ERROR),
    "gather copies of no images": ("roipool_gather", _POOLED,
                                   (_FEATURES, _FEATURES[:0], _ROIS), {}, _GATHER_ERROR),
    "gather copies N * H * W 2**31": ("roipool_gather", _struct((1, 2, 2, 1), jnp.bfloat16),
                                      (_HUGE, np.zeros((1, 2**8, 2**8, 1), jnp.bfloat16),
                                       _ROIS), {},
                                      r"N \* H \* W of the copies must fit in int32"),
    "scatter grad dtype": ("roipool_scatter", _struct((1, 4, 4, 3), jnp.bfloat16),
                           (np.ones((1, 2, 2, 3), np.float32), _FEATURES, _ROIS), {},
                           _SCATTER_ERROR),
    "scatter cotangent dtype": ("roipool_scatter", _struct((1, 4, 4, 3)),
                                (np.ones((1, 2, 2, 3), np.float16), _FEATURES, _ROIS), {},
                                _SCATTER_ERROR),
    "scatter cotangent shape": ("roipool_scatter", _struct((1, 4, 4, 3)),
                                (np.ones((1, 2, 3, 3), np.float32), _FEATURES, _ROIS), {},
                                _SCATTER_ERROR),
}


def test_hand_written_gather_and_scatter_shapes_are_checked():
    # A gather's source (a scatter's gradient) holds whole copies of the
    # features' images, copy-major: anything else is refused by the kernels
    # themselves, for custom calls written by hand.
    features = features_for("NHWC")
    rois = np.array([[0] + VALID[1:], [5] + VALID[1:]], np.float32)
    out_shape = jax.ShapeDtypeStruct((2, 2, 2, C), np.float32)

    def gather(source):
        return hand_written_call("roipool_gather", out_shape, source, features, rois, _ORDER)

    def scatter(images):
        return hand_written_call("roipool_scatter",
                                 jax.ShapeDtypeStruct((images, H, W, C), np.float32),
                                 np.ones(out_shape.shape, np.float32), features, rois, _ORDER)

    three = np.concatenate([features] * 3)  # copy-major: image 5 pools features image 1
    got = np.asarray(gather(three))
    assert_exact(got[1], np.asarray(jrp.roi_pool(features, rois[:1] + [1, 0, 0, 0, 0], 2))[0])
    assert_exact(np.asarray(scatter(3 * N))[5], np.asarray(jax.grad(
        lambda f: jnp.sum(jrp.roi_pool(f, rois[:1] + [1, 0, 0, 0, 0], 2)))(features))[1])
    with pytest.raises(Exception, match="source must be like features"):
        gather(three[:N * 3 - 1])  # not whole copies
    with pytest.raises(Exception, match="source must be like features"):
        gather(three[..., :C - 1])
    with pytest.raises(Exception, match="source must be like features"):
        gather(three[:, :H - 1])
    with pytest.raises(Exception, match="grad like features"):
        scatter(N + 1)


@pytest.mark.parametrize("wrong", list(_BAD_CALLS))
def test_hand_written_calls_are_checked(wrong):
    # What the Python side rejects at trace time, the kernels refuse too
    # (csrc/roipool_ffi.h, shared by the CPU and CUDA handlers), so that a
    # custom call written by hand gets an error rather than reading or
    # writing out of bounds.
    target, results, operands, attrs, error = _BAD_CALLS[wrong]
    with pytest.raises(Exception, match=error):
        hand_written_call(target, results, *operands, _ORDER, **attrs)


def test_hand_written_forward_without_argmax():
    # The control for the bad calls above: the same call, right, pools; an
    # empty argmax result asks for the maxima alone.
    features = np.arange(48, dtype=np.float32).reshape(_FEATURES.shape)
    want_out, want_arg = jrp.roi_pool_with_argmax(features, _ROIS, 2)
    out, arg = hand_written_call("roipool_forward", (_POOLED, _CELLS), features, _ROIS, _ORDER)
    assert_exact(out, want_out)
    assert_exact(arg, want_arg)
    out, arg = hand_written_call("roipool_forward", (_POOLED, _struct((0,), np.int32)),
                                 features, _ROIS, _ORDER)
    assert_exact(out, want_out)
    assert arg.shape == (0,)
