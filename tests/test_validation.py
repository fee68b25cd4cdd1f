"""Bad arguments raise TypeError/ValueError at trace time, naming the argument."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_roipool as jrp
import jax_roipool.reference as ref
from conftest import assert_exact

FEATURES = np.ones((2, 6, 7, 3), np.float32)
ROIS = np.array([[0, 0, 0, 4, 4], [1, 1, 1, 5, 5]], np.float32)
GOOD = dict(features=FEATURES, rois=ROIS, output_size=2, spatial_scale=1.0, layout="NHWC",
            bins="fast_rcnn")

# (overrides of GOOD, exception, regex that must appear in the message)
BAD_CASES = {
    "features_rank3": (dict(features=np.ones((6, 7, 3), np.float32)), ValueError, "features"),
    "features_rank5": (dict(features=np.ones((1, 2, 6, 7, 3), np.float32)), ValueError,
                       "features"),
    "features_int32": (dict(features=np.ones((2, 6, 7, 3), np.int32)), TypeError, "features"),
    "features_uint8": (dict(features=np.ones((2, 6, 7, 3), np.uint8)), TypeError, "features"),
    "features_bool": (dict(features=np.ones((2, 6, 7, 3), bool)), TypeError, "features"),
    "features_complex": (dict(features=np.ones((2, 6, 7, 3), np.complex64)), TypeError,
                         "features"),
    "features_empty_spatial": (dict(features=np.ones((2, 0, 7, 3), np.float32)), ValueError,
                               "features"),
    "rois_rank1": (dict(rois=np.zeros(5, np.float32)), ValueError, "rois"),
    "rois_R4": (dict(rois=np.zeros((3, 4), np.float32)), ValueError, "rois"),
    "rois_R6": (dict(rois=np.zeros((3, 6), np.float32)), ValueError, "rois"),
    "rois_rank3_width5": (dict(rois=np.zeros((2, 3, 5), np.float32)), ValueError, "rois"),
    "boxes_for_3_images_of_2": (dict(rois=np.zeros((3, 2, 4), np.float32)), ValueError,
                                "per-image rois have batch 3 but features have batch 2"),
    "rois_int32": (dict(rois=ROIS.astype(np.int32)), TypeError, "rois"),
    "rois_bool": (dict(rois=ROIS.astype(bool)), TypeError, "rois"),
    "output_size_0": (dict(output_size=0), ValueError, "output_size"),
    "output_size_negative": (dict(output_size=-3), ValueError, "output_size"),
    "output_size_pair_with_0": (dict(output_size=(2, 0)), ValueError, "output_size"),
    "output_size_65536": (dict(output_size=(2, 65536)), ValueError, r"\[1, 65535\]"),
    "output_size_float": (dict(output_size=2.5), TypeError, "output_size"),
    "output_size_float_in_pair": (dict(output_size=(2, 2.0)), TypeError, "output_size"),
    "output_size_bool": (dict(output_size=True), TypeError, "output_size"),
    "output_size_str": (dict(output_size="7"), TypeError, "output_size"),
    "output_size_len1": (dict(output_size=(2,)), ValueError, "output_size"),
    "output_size_len3": (dict(output_size=(2, 2, 2)), ValueError, "output_size"),
    "layout_NHCW": (dict(layout="NHCW"), ValueError, "layout"),
    "layout_lowercase": (dict(layout="nhwc"), ValueError, "layout"),
    "layout_none": (dict(layout=None), ValueError, "layout"),
    "bins_unknown": (dict(bins="bilinear"), ValueError, "bins"),
    "bins_none": (dict(bins=None), ValueError, "bins"),
    "spatial_scale_0": (dict(spatial_scale=0.0), ValueError, "spatial_scale"),
    "spatial_scale_negative": (dict(spatial_scale=-0.5), ValueError, "spatial_scale"),
    "spatial_scale_nan": (dict(spatial_scale=float("nan")), ValueError, "spatial_scale"),
    "spatial_scale_inf": (dict(spatial_scale=float("inf")), ValueError, "spatial_scale"),
    "spatial_scale_str": (dict(spatial_scale="half"), TypeError, "spatial_scale"),
    "spatial_scale_numeric_str": (dict(spatial_scale="0.5"), TypeError, "spatial_scale"),
    "spatial_scale_bool": (dict(spatial_scale=True), TypeError, "spatial_scale"),
    "spatial_scale_numpy_bool": (dict(spatial_scale=np.bool_(True)), TypeError, "spatial_scale"),
    "spatial_scale_bool_array": (dict(spatial_scale=np.array(True)), TypeError, "spatial_scale"),
    "spatial_scale_jax_bool": (dict(spatial_scale=jnp.array(True)), TypeError, "spatial_scale"),
    # Finite in float64 but not in float32, where float32 rois are scaled.
    "spatial_scale_overflows_float32": (dict(spatial_scale=1e39), ValueError, "spatial_scale"),
    "spatial_scale_underflows_float32": (dict(spatial_scale=1e-50), ValueError,
                                         "spatial_scale"),
    # float16 rois are scaled in float16 (fast_rcnn, as torchvision does).
    "spatial_scale_overflows_float16": (dict(rois=ROIS.astype(np.float16), spatial_scale=7e4),
                                        ValueError, "non-zero in float16"),
    "spatial_scale_underflows_float16": (dict(rois=ROIS.astype(np.float16), spatial_scale=1e-8),
                                         ValueError, "non-zero in float16"),
}

# Both entry points of the native op and the jax reference share the checks.
FUNCTIONS = {
    "roi_pool": jrp.roi_pool,
    "roi_pool_with_argmax": jrp.roi_pool_with_argmax,
    "reference.roi_pool": ref.roi_pool,
}


def call(fn, features, rois, output_size, spatial_scale, layout, bins):
    return fn(features, rois, output_size, spatial_scale, layout=layout, bins=bins)


@pytest.mark.parametrize("fn", FUNCTIONS.values(), ids=FUNCTIONS.keys())
@pytest.mark.parametrize("case", BAD_CASES.values(), ids=BAD_CASES.keys())
def test_bad_argument_raises_eagerly(case, fn):
    overrides, error, pattern = case
    with pytest.raises(error, match=pattern):
        call(fn, **{**GOOD, **overrides})


@pytest.mark.parametrize("case", BAD_CASES.values(), ids=BAD_CASES.keys())
def test_bad_argument_raises_at_trace_time(case):
    overrides, error, pattern = case
    args = {**GOOD, **overrides}
    features, rois = args.pop("features"), args.pop("rois")
    traced = jax.jit(lambda f, r: jrp.roi_pool(f, r, args["output_size"], args["spatial_scale"],
                                               layout=args["layout"], bins=args["bins"]))
    # eval_shape only traces: nothing runs, so the error must come from tracing.
    with pytest.raises(error, match=pattern):
        jax.eval_shape(traced, jax.ShapeDtypeStruct(features.shape, features.dtype),
                       jax.ShapeDtypeStruct(rois.shape, rois.dtype))


def test_good_arguments_pass():
    # The baseline of every bad case is valid: each failure above is due to its override.
    for fn in FUNCTIONS.values():
        call(fn, **GOOD)
    for output_size, pooled in ((1, (1, 1)), ((1, 9), (1, 9)), ([3, 2], (3, 2)),
                                (np.int64(4), (4, 4)), (np.array([3, 5]), (3, 5)),
                                (jnp.array([2, 1]), (2, 1)), (np.array(6), (6, 6)),
                                ((65535, 1), (65535, 1))):
        assert jrp.roi_pool(FEATURES, ROIS, output_size).shape[1:3] == pooled
    jrp.roi_pool(FEATURES, ROIS, 2, np.float32(0.25))
    jrp.roi_pool(FEATURES, ROIS, 2, 3)  # an int scale is a number too


def test_traced_spatial_scale_rejected():
    with pytest.raises(TypeError, match="spatial_scale must be a static.*static_argnums"):
        jax.jit(lambda s: jrp.roi_pool(FEATURES, ROIS, 2, s))(0.5)
    # A jax constant made inside the traced function is traced too: the error
    # says so, and what to pass instead.
    with pytest.raises(TypeError, match="spatial_scale must be a static.*jnp.float32.*numpy"):
        jax.jit(lambda f: jrp.roi_pool(f, ROIS, 2, 1 / jnp.float32(4)))(FEATURES)


def test_concrete_array_output_size_under_jit():
    # A jax array made outside the traced function is a constant there.
    for output_size in (jnp.array([2, 1]), jnp.array(3)):
        out = jax.jit(lambda f: jrp.roi_pool(f, ROIS, output_size))(FEATURES)
        assert list(out.shape[1:3]) == np.broadcast_to(np.asarray(output_size), (2,)).tolist()


def test_traced_output_size_rejected_as_not_static():
    for output_size in (lambda s: s, lambda s: (2, s)):
        with pytest.raises(TypeError, match="output_size must be static.*static_argnums"):
            jax.jit(lambda s: jrp.roi_pool(FEATURES, ROIS, output_size(s)))(2)
    with pytest.raises(TypeError, match="output_size must be static.*constant made there"):
        jax.jit(lambda f: jrp.roi_pool(f, ROIS, jnp.int32(2)))(FEATURES)


def test_float64_rois_without_x64_are_accepted():
    # Without x64, float64 numpy rois become float32 (computed in float32).
    assert not jax.config.jax_enable_x64
    out = jrp.roi_pool(FEATURES, ROIS.astype(np.float64), 2)
    assert out.dtype == jnp.float32


def test_errors_name_the_shape_or_dtype():
    # Either rank names both forms: a [N, K, 5] array is not taken for per-image boxes alone.
    for shape in ((3, 4), (2, 3, 5)):
        with pytest.raises(ValueError, match=r"\[R, 5\], .*\[N, K, 4\], .*got " + re.escape(
                str(shape))):
            jrp.roi_pool(FEATURES, np.zeros(shape, np.float32), 2)
    with pytest.raises(TypeError, match="int32"):
        jrp.roi_pool(FEATURES.astype(np.int32), ROIS, 2)


@pytest.mark.parametrize("fn", FUNCTIONS.values(), ids=FUNCTIONS.keys())
def test_non_arrays_are_named(fn):
    for rois in (None, [None], [1.0, object()], (object(),)):
        with pytest.raises(TypeError, match="roi_pool: rois must be an array"):
            fn(FEATURES, rois, 2)
    with pytest.raises(TypeError, match="roi_pool: features must be an array"):
        fn(None, ROIS, 2)


@pytest.mark.parametrize("fn", FUNCTIONS.values(), ids=FUNCTIONS.keys())
def test_float64_rois_take_scales_beyond_float32(fn):
    """The float32 range bounds spatial_scale only for float32 rois: float64
    rois are scaled in float64."""
    features = np.random.default_rng(0).standard_normal((2, 6, 7, 3))
    rois = np.array([[0, 0, 0, 4, 4], [1, 3, 2, 5, 5]], np.float64)

    def pooled(*args):
        out = fn(*args)
        return out[0] if isinstance(out, tuple) else out

    with jax.enable_x64(True):
        tiny = pooled(features, rois, 2, 1e-50)   # every corner rounds to cell (0, 0)
        assert_exact(tiny, np.broadcast_to(features[[0, 1], None, None, 0, 0], tiny.shape))
        # 1e9 cells: RoI 0's first bin covers image 0, its others start
        # beyond the map; RoI 1 starts beyond it.
        far = pooled(features, rois, 2, 2.5e8)
        want = np.zeros(far.shape)
        want[0, 0, 0] = features[0].max(axis=(0, 1))
        assert_exact(far, want)
        # 4e39 cells overflow int32, as torchvision computes them: invalid RoIs.
        assert_exact(pooled(features, rois, 2, 1e39), np.zeros(far.shape))
        # Nor does float64 take an infinite, NaN or zero scale.
        for bad in (np.inf, np.nan, 0.0):
            with pytest.raises(ValueError, match="spatial_scale must be finite and positive"):
                pooled(features, rois, 2, bad)
    with pytest.raises(ValueError, match="float32"):
        pooled(features.astype(np.float32), rois.astype(np.float32), 2, 1e39)


def test_image_index_must_be_exact_in_float32():
    """Per-image boxes pool as rois whose image index has the boxes' dtype:
    float32 cannot tell images apart beyond 2**24, so that needs float64."""
    many = 2**24 + 1
    features = jax.ShapeDtypeStruct((many, 1, 1, 1), jnp.float32)
    pool = lambda f, b: jrp.roi_pool(f, b, 1)  # noqa: E731
    with pytest.raises(ValueError, match="float64"):
        jax.eval_shape(pool, features, jax.ShapeDtypeStruct((many, 1, 4), jnp.float32))
    with jax.enable_x64(True):
        out = jax.eval_shape(pool, features, jax.ShapeDtypeStruct((many, 1, 4), jnp.float64))
        assert out.shape == (many, 1, 1, 1, 1)
    # 2**24 images are still exact in float32.
    exact = jax.ShapeDtypeStruct((2**24, 1, 1, 1), jnp.float32)
    jax.eval_shape(pool, exact, jax.ShapeDtypeStruct((2**24, 1, 4), jnp.float32))
    # vmap folds its copies of the images into N: the same bound applies to the total.
    half = jax.ShapeDtypeStruct((2, 2**23 + 1, 1, 1, 1), jnp.float32)
    for rois in (ROIS, np.zeros((2**23 + 1, 1, 4), np.float32)):
        with pytest.raises(ValueError, match="float64"):
            jax.eval_shape(jax.vmap(lambda f: jrp.roi_pool(f, rois, 1)), half)
    # So does a vmap over tangents alone (copies of the shared images).
    shared = jax.ShapeDtypeStruct(half.shape[1:], jnp.float32)
    for rois in (ROIS, np.zeros((2**23 + 1, 1, 4), np.float32)):
        def jvps(tangents):
            return jax.vmap(lambda t: jax.jvp(lambda x: jrp.roi_pool(x, rois, 1),
                                              (shared,), (t,))[1])(tangents)

        with pytest.raises(ValueError, match="float64"):
            jax.eval_shape(jvps, half)


def test_feature_cells_must_fit_the_int32_argmax():
    """N * H * W, counting vmapped copies of the images, is at most 2**31 - 1,
    the largest argmax cell index (only traced: nothing is allocated)."""
    error = "more than the int32 argmax can address"
    pool = lambda f, b: jrp.roi_pool(f, b, 1)  # noqa: E731
    boxes = np.zeros((1, 1, 4), np.float32)
    largest = jax.ShapeDtypeStruct((1, 1, 2**31 - 1, 1), jnp.bfloat16)
    for rois in (ROIS, boxes):
        assert jax.eval_shape(pool, largest, rois).shape[-3:] == (1, 1, 1)
        with pytest.raises(ValueError, match=error):
            jax.eval_shape(pool, jax.ShapeDtypeStruct((1, 2, 2**30, 1), jnp.bfloat16), rois)
    # Two vmapped copies of 2**30 cells are one call's 2**31.
    half = jax.ShapeDtypeStruct((2, 1, 1, 2**30, 1), jnp.bfloat16)
    for rois in (ROIS, boxes):
        with pytest.raises(ValueError, match=error):
            jax.eval_shape(jax.vmap(lambda f: pool(f, rois)), half)
        # So does a vmap over tangents alone (copies of the shared images).
        shared = jax.ShapeDtypeStruct(half.shape[1:], jnp.bfloat16)

        def jvps(tangents):
            return jax.vmap(lambda t: jax.jvp(lambda x: pool(x, rois), (shared,), (t,))[1])(
                tangents)

        with pytest.raises(ValueError, match=error):
            jax.eval_shape(jvps, half)
    # Per-image boxes of a batch of images are one call's too.
    with pytest.raises(ValueError, match=error):
        jax.eval_shape(jax.vmap(pool), half, np.zeros((2, 1, 1, 4), np.float32))
