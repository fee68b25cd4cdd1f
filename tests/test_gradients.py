"""Gradients: scatter-add of the cotangent at the argmax cell; zero for rois."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.interpreters import ad
from jax.test_util import check_grads

import jax_roipool as jrp
from jax_roipool import _primitives, reference
import reference_loop
from conftest import (BINS, DTYPES, LAYOUTS, assert_bitwise, assert_exact, dtype_id, feature_shape,
                      random_features, random_rois, x64_for)


def problem(seed, dtype, layout, *, kind="normal", r=16, n=2, h=11, w=14, c=3, scale=0.5):
    rng = np.random.default_rng(seed)
    features = random_features(rng, feature_shape(n, h, w, c, layout), dtype, kind)
    rois_dtype = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    rois = random_rois(rng, n, h, w, r, scale, dtype=rois_dtype)
    return rng, features, rois


def vjp_features(features, rois, cotangent, pooled, scale, layout, bins, roi_pool=jrp.roi_pool):
    _, pullback = jax.vjp(
        lambda f: roi_pool(f, rois, pooled, scale, layout=layout, bins=bins), features)
    (grad,) = pullback(jnp.asarray(cotangent))
    return np.asarray(grad)


def expected_grad(features, rois, cotangent, pooled, scale, layout, bins):
    _, argmax = reference_loop.roi_pool_loop(features, rois, pooled, scale, layout=layout,
                                             bins=bins)
    return reference_loop.scatter_grad(cotangent, argmax, features.shape, layout=layout), argmax


@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=dtype_id)
@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("roi_pool", [jrp.roi_pool, reference.roi_pool],
                         ids=["primitive", "jax_reference_autodiff"])
def test_grad_is_exact_scatter(roi_pool, kind, dtype, layout, bins):
    # Small-integer cotangents: every partial sum is exact, so any summation
    # order must give exactly the reference. The pure-JAX reference,
    # differentiated by JAX itself, must route tied maxima as the kernels do.
    with x64_for(dtype):
        rng, features, rois = problem(1, dtype, layout, kind=kind)
        pooled = (3, 4)
        out_shape = np.asarray(jrp.roi_pool(features, rois, pooled, 0.5, layout=layout,
                                            bins=bins)).shape
        cotangent = rng.integers(-3, 4, out_shape).astype(dtype)
        grad = vjp_features(features, rois, cotangent, pooled, 0.5, layout, bins, roi_pool)
        want, argmax = expected_grad(features, rois, cotangent, pooled, 0.5, layout, bins)
        assert grad.dtype == dtype and grad.shape == features.shape
        assert_exact(grad, want, "feature gradient")
        assert (argmax >= 0).any() and np.abs(want).sum() > 0


@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_grad_random_cotangent(dtype, layout, bins):
    with x64_for(dtype):
        rng, features, rois = problem(2, dtype, layout, r=40)
        pooled = 4
        out_shape = np.asarray(jrp.roi_pool(features, rois, pooled, 0.5, layout=layout,
                                            bins=bins)).shape
        cotangent = rng.standard_normal(out_shape).astype(dtype)
        grad = vjp_features(features, rois, cotangent, pooled, 0.5, layout, bins)
        want, argmax = expected_grad(features, rois, cotangent, pooled, 0.5, layout, bins)
        tol = {2: 2e-2, 4: 1e-5, 8: 1e-12}[np.dtype(dtype).itemsize]
        np.testing.assert_allclose(grad.astype(np.float64), want, rtol=tol, atol=tol)
        # Cells that are nobody's argmax get exactly zero.
        hits = reference_loop.scatter_grad(np.ones(argmax.shape), argmax, features.shape,
                                           layout=layout)
        assert np.all(grad.astype(np.float64)[hits == 0] == 0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grad_of_sum_counts_argmax_hits(layout):
    rng, features, rois = problem(3, np.float32, layout, kind="ties", r=30)
    grad = jax.grad(lambda f: jrp.roi_pool(f, rois, 5, 0.5, layout=layout).sum())(features)
    _, argmax = reference_loop.roi_pool_loop(features, rois, 5, 0.5, layout=layout)
    want = reference_loop.scatter_grad(np.ones(argmax.shape), argmax, features.shape,
                                       layout=layout)
    assert_exact(grad, want, "gradient of sum")
    assert want.max() > 1  # overlapping bins / RoIs share cells: the test has teeth


@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_check_grads_second_order(layout, bins):
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        shape = feature_shape(2, 7, 9, 2, layout)
        # Distinct values 0.01 apart: finite differences never change the argmax.
        features = (rng.permutation(int(np.prod(shape))) * 0.01).reshape(shape)
        rois = random_rois(rng, 2, 7, 9, 10, 1.0, dtype=np.float64)
        f = lambda x: jrp.roi_pool(x, rois, (3, 2), layout=layout, bins=bins)  # noqa: E731
        assert np.abs(np.asarray(f(features))).sum() > 0
        check_grads(f, (features,), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=dtype_id)
def test_rois_gradient_is_zero(dtype, layout):
    with x64_for(dtype):
        _, features, rois = problem(5, dtype, layout)
        loss = lambda r: (jrp.roi_pool(features, r, 3, 0.5, layout=layout) ** 2).sum()  # noqa
        grad = jax.grad(loss)(rois)
        assert grad.shape == rois.shape and grad.dtype == rois.dtype
        assert np.all(np.asarray(grad) == 0)
        both = jax.grad(lambda f, r: jrp.roi_pool(f, r, 3, 0.5, layout=layout).sum(),
                        argnums=(0, 1))(features, rois)
        assert np.all(np.asarray(both[1]) == 0) and np.abs(np.asarray(both[0])).sum() > 0
        _, tangent = jax.jvp(lambda r: jrp.roi_pool(features, r, 3, 0.5, layout=layout),
                             (rois,), (jnp.ones_like(rois),))
        assert np.all(np.asarray(tangent) == 0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_jvp_gathers_tangent_at_argmax(layout):
    rng, features, rois = problem(6, np.float32, layout)
    tangent = random_features(rng, features.shape, np.float32)
    out, out_dot = jax.jvp(lambda f: jrp.roi_pool(f, rois, (2, 5), 0.5, layout=layout),
                           (features,), (tangent,))
    _, argmax = reference_loop.roi_pool_loop(features, rois, (2, 5), 0.5, layout=layout)
    # The tangent of each output is the tangent at its argmax cell (0 for empty bins).
    picked = np.where(argmax >= 0, gather_at(tangent, argmax, layout), 0.0)
    assert_exact(out_dot, picked, "jvp tangent")
    assert_exact(out, reference_loop.roi_pool_loop(features, rois, (2, 5), 0.5,
                                                   layout=layout)[0], "jvp primal")


def test_symbolic_zero_cotangent_transposes_to_a_symbolic_zero():
    # JAX's transpose rules may be handed a symbolic zero (ad.Zero) as the
    # cotangent; gather and scatter must answer with a symbolic zero for
    # their linear operand rather than bind a kernel on it.
    _, features, rois = problem(5, np.float32, "NHWC")
    config = dict(pooled=(3, 3), spatial_scale=0.5, layout="NHWC", bins="fast_rcnn", copies=1)
    features_aval = jax.core.ShapedArray(features.shape, np.float32)
    pooled_aval = jax.core.ShapedArray((rois.shape[0], 3, 3, features.shape[3]), np.float32)
    for primitive, value, out in ((_primitives.gather_p, features_aval, pooled_aval),
                                  (_primitives.scatter_p, pooled_aval, features_aval)):
        result = ad.primitive_transposes[primitive](ad.Zero(out), ad.UndefinedPrimal(value),
                                                    features, rois, **config)
        assert type(result[0]) is ad.Zero and result[0].aval.shape == value.shape, result
        assert result[1:] == [None, None]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=dtype_id)
def test_wide_channels_with_nan_inf_and_ties(dtype, layout):
    # 37 channels: two 16-lane blocks of the CPU kernels' float32 fast path
    # plus a tail. NaN (the first one wins), +-inf and ties decide the argmax
    # that the gather and scatter recompute.
    with x64_for(dtype):
        rng, features, rois = problem(5, dtype, layout, kind="ties", c=37, r=40)
        flat = features.reshape(-1)
        special = rng.choice(flat.size, 90, replace=False)
        flat[special[:30]], flat[special[30:60]], flat[special[60:]] = np.nan, np.inf, -np.inf
        pooled = (3, 4)
        out, argmax = jrp.roi_pool_with_argmax(features, rois, pooled, 0.5, layout=layout)
        want_out, want_arg = reference_loop.roi_pool_loop(features, rois, pooled, 0.5,
                                                          layout=layout)
        assert_exact(out, want_out, "output")
        assert_exact(argmax, want_arg, "argmax")
        assert np.isnan(want_out).any() and np.isinf(want_out).any()
        cotangent = rng.integers(-3, 4, want_out.shape).astype(dtype)
        grad = vjp_features(features, rois, cotangent, pooled, 0.5, layout, "fast_rcnn")
        assert_exact(grad, reference_loop.scatter_grad(cotangent, want_arg, features.shape,
                                                       layout=layout), "feature gradient")
        tangent = random_features(rng, features.shape, dtype)
        _, out_dot = jax.jvp(lambda f: jrp.roi_pool(f, rois, pooled, 0.5, layout=layout),
                             (features,), (tangent,))
        picked = np.where(want_arg >= 0, gather_at(tangent, want_arg, layout), 0.0)
        assert_exact(out_dot, picked, "jvp tangent")


def gather_at(values, argmax, layout):
    """values[cell, channel] for each argmax entry (cell index clipped at 0)."""
    v = reference_loop.to_float64(values)
    if layout == "NCHW":
        v = v.transpose(0, 2, 3, 1)
        argmax = argmax.transpose(0, 2, 3, 1)
    flat = v.reshape(-1, v.shape[-1])
    out = flat[np.maximum(argmax, 0), np.arange(v.shape[-1])]
    return out.transpose(0, 3, 1, 2) if layout == "NCHW" else out


def assert_pooling_and_gradient_exact(features, rois, cotangent, layout):
    """Maxima, argmax and feature gradient of fast_rcnn pooling at scale 1 vs
    the reference; features and cotangent are given NHWC and transposed for
    NCHW."""
    if layout == "NCHW":
        features, cotangent = features.transpose(0, 3, 1, 2), cotangent.transpose(0, 3, 1, 2)
    pooled = cotangent.shape[2:] if layout == "NCHW" else cotangent.shape[1:3]
    out, argmax = jrp.roi_pool_with_argmax(features, rois, pooled, 1.0, layout=layout)
    want_out, want_argmax = reference_loop.roi_pool_loop(features, rois, pooled, 1.0,
                                                         layout=layout, bins="fast_rcnn")
    assert_exact(out, want_out, "maxima")
    assert_exact(argmax, want_argmax, "argmax")
    grad = vjp_features(features, rois, cotangent, pooled, 1.0, layout, "fast_rcnn")
    want = reference_loop.scatter_grad(cotangent, want_argmax, features.shape, layout=layout)
    assert_exact(grad, want, "feature gradient")


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=dtype_id)
def test_grad_of_large_map(dtype, layout):
    # A feature map above the CPU scatter's budget for per-thread accumulators
    # (128 MiB over all threads) takes the other split (channel blocks); the
    # small maps above take the per-thread one. Both must be exact. 5x5 bins
    # of ~1000 channels also span two of the kernels' 16K-value chunks.
    rng = np.random.default_rng(11)
    n, h, w, c = 1, 96, 96, 1920  # 68 MiB of float32 accumulators per thread
    features = rng.standard_normal((n, h, w, c)).astype(dtype)
    rois = random_rois(rng, n, h, w, 12, 1.0, adversarial=False)
    cotangent = rng.integers(-3, 4, (12, 5, 5, c)).astype(dtype)
    assert_pooling_and_gradient_exact(features, rois, cotangent, layout)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_grad_over_several_chunks(layout):
    # 7x7 bins of 700 channels are three of the CPU kernels' 16K-value chunks
    # (23 bins each), with the per-thread accumulators; in NCHW the forward
    # transposes each chunk into place (whole 4x4 blocks, then the leftover bins).
    rng = np.random.default_rng(12)
    n, h, w, c = 2, 11, 13, 700
    features = rng.standard_normal((n, h, w, c)).astype(np.float32)
    rois = random_rois(rng, n, h, w, 9, 1.0, adversarial=True)
    cotangent = rng.integers(-3, 4, (9, 7, 7, c)).astype(np.float32)
    assert_pooling_and_gradient_exact(features, rois, cotangent, layout)


def rounding_pairs(dtype, count, rng):
    """(a, b): every bit pattern of the 16-bit dtype as a (cycled to count),
    and for each a finite b that makes a + b a tie, a near-tie or an
    arbitrary sum when rounded back to the dtype; in the top binade, a
    quarter of the partners make a + b the tie just beyond the largest finite
    value, which must round to Inf through the carry into the exponent."""
    a = np.resize(np.arange(2**16, dtype=np.uint16), count).view(dtype)
    finite = np.isfinite(a.astype(np.float32))
    with np.errstate(over="ignore", invalid="ignore"):  # at the top of the range and NaN
        magnitude = np.abs(np.where(finite, a, 0)).astype(np.float64)
        top = magnitude.max()
        ulp = np.spacing(magnitude.astype(dtype)).astype(np.float64)  # Inf at the top
        top_ulp = top - float(np.nextafter(top.astype(dtype), dtype.type(0)))
        offset = rng.choice([0.5, 0.5, 0.5 - 2.0**-6, 0.5 + 2.0**-6, 0.25], count)
        b = (ulp * offset * rng.choice([-1.0, 1.0], count)).astype(dtype)
        arbitrary = rng.random(count) < 0.2
        b[arbitrary] = rng.standard_normal(arbitrary.sum()).astype(dtype) * a[arbitrary]
        beyond = finite & (magnitude > top / 2) & (rng.random(count) < 0.25)
        b[beyond] = (np.sign(a.astype(np.float64)) * (top + top_ulp / 2 - magnitude))[beyond]
    b[~np.isfinite(b.astype(np.float32))] = 0
    return a, b


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=dtype_id)
def test_16bit_grad_rounds_the_float32_sum_to_nearest_even(dtype, layout):
    # 16-bit gradients are summed in float32 and rounded once at the end.
    # Each cell here is the argmax of exactly two one-cell RoIs, so its
    # gradient is a + b in float32, rounded: every 16-bit pattern as a, with
    # partners chosen to make ties (both parities), near-ties, finite sums
    # that round to Inf, and NaNs. (Sums of float16 values are multiples of
    # 2^-24, so a subnormal float16 result is always exact.)
    width, channels = 64, 1024
    a, b = rounding_pairs(np.dtype(dtype), width * channels, np.random.default_rng(13))
    with np.errstate(over="ignore", invalid="ignore"):
        # From +0, as the kernel's accumulator: (-0) + (-0) gives +0.
        exact = np.float32(0) + a.astype(np.float32) + b.astype(np.float32)
        want = exact.astype(dtype)
    # The pairs really round, both ways, and overflow.
    assert (want.astype(np.float32) > exact).sum() > 4000
    assert (want.astype(np.float32) < exact).sum() > 4000
    assert (np.isinf(want.astype(np.float32)) & np.isfinite(exact)).sum() > 40
    x = np.arange(width, dtype=np.float32)
    rois = np.zeros((2 * width, 5), np.float32)
    rois[:, 1] = rois[:, 3] = np.concatenate([x, x])  # RoI i covers cell i % width
    features = np.zeros((1, 1, width, channels), dtype)
    cotangent = np.concatenate([a, b]).reshape(2 * width, 1, 1, channels)
    want = want.reshape(1, 1, width, channels)
    if layout == "NCHW":
        features, cotangent = features.transpose(0, 3, 1, 2), cotangent.transpose(0, 3, 1, 2)
        want = want.transpose(0, 3, 1, 2)
    grad = vjp_features(features, rois, cotangent, 1, 1.0, layout, "fast_rcnn")
    assert_bitwise(grad, want, "rounded 16-bit gradient")


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=dtype_id)
def test_pure_jax_scatter_sums_16_bit_in_float32(dtype):
    # The pure-JAX lowering (platforms without a kernel) sums as the kernels
    # do. Three RoIs share one cell, cotangents 1, u/2, u/2 (u: the ulp of 1):
    # added in 16 bits, each u/2 is a tie that rounds back to 1; in float32
    # the sum is 1 + u, exact.
    u = float(jnp.finfo(dtype).eps)
    features = np.zeros((1, 1, 1, 1), dtype)
    rois = np.zeros((3, 5), np.float32)
    cotangent = np.array([1, u / 2, u / 2], dtype).reshape(3, 1, 1, 1)
    config = dict(pooled=(1, 1), spatial_scale=1.0, layout="NHWC", bins="fast_rcnn")
    fallback = jax.jit(lambda c, f, r: reference.scatter(c, f, r, **config))
    want = np.array(1 + u, dtype).reshape(features.shape)
    assert_bitwise(fallback(cotangent, features, rois), want, "pure-JAX 16-bit gradient")
    assert_bitwise(vjp_features(features, rois, cotangent, 1, 1.0, "NHWC", "fast_rcnn"), want,
                   "kernel 16-bit gradient")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_grad_with_zero_rois_is_zero(layout, dtype):
    # With no RoI the scatter must still write its whole gradient: XLA hands
    # it a reused buffer, which the same jitted function's other work has
    # filled by the second call.
    features = np.ones(feature_shape(1, 32, 32, 16, layout), dtype)
    rois = np.zeros((0, 5), np.float32)

    @jax.jit
    def fn(f):
        filler = jnp.sum(jnp.cumsum(jnp.sin(f * 3 + 1), axis=1))
        grad = jax.grad(lambda f: jnp.sum(jrp.roi_pool(f, rois, 2, layout=layout)))(f)
        return jnp.cumsum(grad, axis=2) * 2, filler

    with x64_for(dtype):
        for _ in range(3):
            grad = fn(features)[0]
            assert grad.dtype == dtype and not np.asarray(grad).any()
