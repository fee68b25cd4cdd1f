"""Per-image boxes [N, K, 4]: values, argmax and every transformation, against
the flat [N*K, 5] form and the loop reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_roipool as jrp
import jax_roipool.reference as ref
import reference_loop
from conftest import (BINS, LAYOUTS, assert_exact, dtype_id, feature_shape, random_features,
                      random_rois)
from jax_roipool._primitives import (gather_p, per_image_gather_p, per_image_p,
                                     per_image_scatter_p, scatter_p)

POOLED = (3, 4)
SCALE = 0.5
N, H, W, C = 3, 9, 11, 3
K = 4
B = 2  # vmapped batch size


def random_boxes(rng, n=N, k=K):
    """[n, k, 4] boxes: random, partly outside, inverted, empty, plus a NaN box."""
    boxes = random_rois(rng, n, H, W, n * k, SCALE)[:, 1:].reshape(n, k, 4)
    if n * k:
        boxes[0, 0] = [np.nan, 0, 4, 4]
    return boxes


def flat_rois(boxes):
    n, k = boxes.shape[:2]
    index = np.repeat(np.arange(n, dtype=boxes.dtype), k)[:, None]
    return np.concatenate([index, boxes.reshape(n * k, 4)], axis=1)


def loop(features, boxes, layout="NHWC", bins="fast_rcnn"):
    """Expected (out, argmax) of per-image boxes: the flat rois, reshaped [N, K, ...]."""
    out, arg = reference_loop.roi_pool_loop(features, flat_rois(boxes), POOLED, SCALE,
                                            layout=layout, bins=bins)
    lead = boxes.shape[:2]
    return out.reshape(lead + out.shape[1:]), arg.reshape(lead + arg.shape[1:])


def pool(features, boxes, layout="NHWC", bins="fast_rcnn"):
    return jrp.roi_pool_with_argmax(features, boxes, POOLED, SCALE, layout=layout, bins=bins)


def inputs(seed, layout, kind="ties", batch=None):
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    features = random_features(rng, lead + feature_shape(N, H, W, C, layout), np.float32, kind)
    boxes = np.stack([random_boxes(rng) for _ in range(batch or 1)])
    return features, boxes if batch else boxes[0]


def scatter_grad(cotangent, argmax, features_shape, layout):
    """Feature gradient of a per-image call: scatter at the flat argmax."""
    flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731
    return reference_loop.scatter_grad(flat(cotangent), flat(argmax), features_shape,
                                       layout=layout)


def pick(values, argmax, layout):
    """values at each output's (flat) argmax cell and channel, 0 where argmax is -1."""
    v = reference_loop.to_float64(values)
    a = np.asarray(argmax)
    if layout == "NCHW":
        v, a = v.transpose(0, 2, 3, 1), np.moveaxis(a, 2, -1)
    picked = v.reshape(-1, v.shape[-1])[np.maximum(a, 0), np.arange(v.shape[-1])]
    picked = np.where(a >= 0, picked, 0.0)
    return np.moveaxis(picked, -1, 2) if layout == "NCHW" else picked


# ---------------------------------------------------------------------------
# Values and argmax.

@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_values_and_argmax(layout, bins):
    features, boxes = inputs(0, layout)
    want_out, want_arg = loop(features, boxes, layout, bins)
    assert (want_arg >= 0).any() and (want_arg < 0).any()
    jitted = jax.jit(pool, static_argnames=("layout", "bins"))
    for fn in (pool, jitted):
        out, arg = fn(features, boxes, layout=layout, bins=bins)
        assert out.shape == arg.shape == want_out.shape
        assert_exact(out, want_out, "per-image output")
        # The public argmax holds flat cell indices, as for [R, 5] rois.
        assert_exact(arg, want_arg, "per-image argmax")
    assert_exact(jrp.roi_pool(features, boxes, POOLED, SCALE, layout=layout, bins=bins),
                 want_out, "roi_pool")
    flat_out, flat_arg = jrp.roi_pool_with_argmax(features, flat_rois(boxes), POOLED, SCALE,
                                                  layout=layout, bins=bins)
    assert_exact(out, reference_loop.to_float64(flat_out).reshape(out.shape), "vs flat form")
    assert_exact(arg, np.asarray(flat_arg).reshape(arg.shape), "argmax vs flat form")
    ref_out, ref_arg = ref.roi_pool_with_argmax(features, boxes, POOLED, SCALE, layout=layout,
                                                bins=bins)
    assert_exact(ref_out, want_out, "pure-JAX reference output")
    assert_exact(ref_arg, want_arg, "pure-JAX reference argmax")


def test_argmax_is_within_own_image():
    features, boxes = inputs(1, "NHWC", kind="normal")
    _, arg = pool(features, boxes)
    arg = np.asarray(arg)
    image = np.arange(N).reshape(N, 1, 1, 1, 1)
    valid = arg >= 0
    assert valid.any()
    assert np.all((arg // (H * W))[valid] == np.broadcast_to(image, arg.shape)[valid])


def test_dtypes():
    rng = np.random.default_rng(2)
    features = random_features(rng, (N, H, W, C), jnp.bfloat16, "normal")
    boxes = random_boxes(rng).astype(np.float64)
    with jax.enable_x64(True):
        out, arg = pool(features, boxes)
        assert out.dtype == jnp.bfloat16
        want_out, want_arg = loop(features, boxes)
        assert_exact(out, want_out)
        assert_exact(arg, want_arg)
    out16, _ = pool(features, boxes.astype(np.float16))
    want16, _ = loop(features, boxes.astype(np.float16))
    assert_exact(out16, want16, "float16 boxes")


def test_forward_batch_axis_on_both_or_neither():
    # The per-image forward's leading batch axis (vmap's) pools each batch
    # element's own images: boxes with one need features with one.
    features, boxes = jnp.zeros((N, H, W, C)), jnp.zeros((2, N, 3, 4))
    config = dict(pooled=POOLED, spatial_scale=SCALE, layout="NHWC", bins="fast_rcnn",
                  with_argmax=True)
    with pytest.raises(ValueError, match="batch axis or neither"):
        jax.eval_shape(lambda f, b: per_image_p.bind(f, b, **config), features, boxes)
    out = jax.eval_shape(lambda f, b: per_image_p.bind(f, b, **config), features[None], boxes)
    assert out[0].shape == (2, N, 3) + POOLED + (C,)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_boxes(layout):
    features, _ = inputs(3, layout)
    boxes = np.zeros((N, 0, 4), np.float32)
    out, arg = jax.jit(functools.partial(pool, layout=layout))(features, boxes)
    assert out.shape == arg.shape == (N, 0) + feature_shape(1, *POOLED, C, layout)[1:]
    grad = jax.grad(lambda f: jnp.sum(pool(f, boxes, layout)[0]))(features)
    assert grad.shape == features.shape and not np.asarray(grad).any()
    batched = jax.vmap(lambda b: pool(features, b, layout)[0])(np.zeros((B, N, 0, 4), np.float32))
    assert batched.shape == (B,) + out.shape


def test_eval_shape():
    features = jax.ShapeDtypeStruct((2, 30, 40, 7), jnp.bfloat16)
    boxes = jax.ShapeDtypeStruct((2, 13, 4), jnp.float32)
    out, arg = jax.eval_shape(lambda f, b: jrp.roi_pool_with_argmax(f, b, (5, 6)), features,
                              boxes)
    assert out.shape == arg.shape == (2, 13, 5, 6, 7)
    assert out.dtype == jnp.bfloat16 and arg.dtype == jnp.int32


# ---------------------------------------------------------------------------
# Differentiation.

@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_grad(layout, bins):
    features, boxes = inputs(4, layout)
    _, arg = loop(features, boxes, layout, bins)
    weights = np.random.default_rng(5).integers(-2, 3, arg.shape).astype(np.float32)

    def loss(f):
        return jnp.sum(jrp.roi_pool(f, boxes, POOLED, SCALE, layout=layout, bins=bins) * weights)

    want = scatter_grad(weights, arg, features.shape, layout)
    assert np.abs(want).sum() > 0
    for fn in (jax.grad(loss), jax.jit(jax.grad(loss))):
        assert_exact(fn(features), want, "per-image gradient")
    flat_grad = jax.grad(lambda f: jnp.sum(
        jrp.roi_pool(f, flat_rois(boxes), POOLED, SCALE, layout=layout, bins=bins)
        * weights.reshape((-1,) + weights.shape[2:])))(features)
    assert_exact(flat_grad, want, "flat-form gradient")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_jvp(layout):
    features, boxes = inputs(6, layout, kind="normal")
    tangent = random_features(np.random.default_rng(7), features.shape, np.float32)
    out, out_dot = jax.jvp(lambda x: pool(x, boxes, layout)[0], (features,), (tangent,))
    want_out, arg = loop(features, boxes, layout)
    assert_exact(out, want_out)
    assert_exact(out_dot, pick(tangent, arg, layout), "tangent at the argmax cells")


def small_problem(layout):
    rng = np.random.default_rng(8)
    features = random_features(rng, feature_shape(2, 5, 6, 2, layout), np.float32, "ties")
    boxes = np.array([[[0, 0, 11, 9], [2, 2, 6, 8]], [[100, 100, 120, 120], [1, 0, 5, 4]]],
                     np.float32)  # one box outside the map
    return features, boxes


def expected_jacobian(features, boxes, layout):
    out, arg = loop(features, boxes, layout)
    jac = np.zeros(out.shape + features.shape)
    for index in np.ndindex(out.shape):
        if arg[index] >= 0:
            one_hot = np.zeros(out.shape)
            one_hot[index] = 1.0
            jac[index] = scatter_grad(one_hot, arg, features.shape, layout)
    return jac


@pytest.mark.parametrize("layout", LAYOUTS)
def test_jacfwd_jacrev(layout):
    features, boxes = small_problem(layout)
    f = lambda x: pool(x, boxes, layout)[0]  # noqa: E731
    want = expected_jacobian(features, boxes, layout)
    assert want.any()
    for jac in (jax.jacfwd(f), jax.jacrev(f), jax.jit(jax.jacrev(f))):
        assert_exact(jac(features), want, "jacobian")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hessian_and_grad_of_grad(layout):
    features, boxes = small_problem(layout)
    hess = jax.hessian(lambda x: jnp.sum(pool(x, boxes, layout)[0]))(features)
    assert hess.shape == features.shape * 2 and not np.asarray(hess).any()

    v = random_features(np.random.default_rng(9), features.shape, np.float32)

    def loss(x):
        return jnp.sum(pool(x, boxes, layout)[0] ** 2)

    second = jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), v))(features)
    _, arg = loop(features, boxes, layout)
    want = 2 * scatter_grad(pick(v, arg, layout), arg, features.shape, layout)
    assert np.abs(want).sum() > 0
    np.testing.assert_allclose(np.asarray(second), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpoint(layout):
    features, boxes = small_problem(layout)
    _, arg = loop(features, boxes, layout)
    cot = np.arange(arg.size, dtype=np.float32).reshape(arg.shape)

    def loss(x):
        return jnp.sum(pool(x, boxes, layout)[0] * cot)

    got = jax.grad(jax.checkpoint(loss))(features)
    assert_exact(got, scatter_grad(cot, arg, features.shape, layout))
    assert_exact(jax.jit(jax.grad(jax.checkpoint(loss)))(features),
                 reference_loop.to_float64(got))


# ---------------------------------------------------------------------------
# vmap.

# (features batch axis, boxes batch axis); None = not mapped.
VMAP_AXES = [(0, None), (None, 0), (0, 0), (1, 1), (4, 3), (2, None), (None, 2), (3, 1)]


def place(features, boxes, f_axis, b_axis):
    features = features[0] if f_axis is None else np.moveaxis(features, 0, f_axis)
    boxes = boxes[0] if b_axis is None else np.moveaxis(boxes, 0, b_axis)
    return features, boxes


def stacked_loop(features, boxes, f_axis, b_axis, layout, bins="fast_rcnn"):
    outs, args = [], []
    for b in range(B):
        f = features if f_axis is None else np.take(features, b, axis=f_axis)
        r = boxes if b_axis is None else np.take(boxes, b, axis=b_axis)
        out, arg = loop(f, r, layout, bins)
        outs.append(out)
        args.append(arg)
    return np.stack(outs), np.stack(args)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("f_axis, b_axis", VMAP_AXES)
def test_vmap(f_axis, b_axis, layout):
    features, boxes = place(*inputs(10, layout, batch=B), f_axis, b_axis)
    fn = jax.vmap(functools.partial(pool, layout=layout), in_axes=(f_axis, b_axis))
    want_out, want_arg = stacked_loop(features, boxes, f_axis, b_axis, layout)
    for f in (fn, jax.jit(fn)):
        out, arg = f(features, boxes)
        assert_exact(out, want_out, "vmapped output")
        assert_exact(arg, want_arg, "vmapped argmax (indices into each element's own features)")
    single = jax.vmap(lambda f, b: jrp.roi_pool(f, b, POOLED, SCALE, layout=layout),
                      in_axes=(f_axis, b_axis))(features, boxes)
    assert_exact(single, want_out, "vmapped roi_pool")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("f_axis, b_axis", [(0, None), (None, 0), (0, 0), (2, 1)])
def test_vmap_of_grad_and_jvp(f_axis, b_axis, layout):
    features, boxes = place(*inputs(11, layout, batch=B), f_axis, b_axis)
    _, args = stacked_loop(features, boxes, f_axis, b_axis, layout)
    rng = np.random.default_rng(12)
    weights = rng.integers(-2, 3, args.shape).astype(np.float32)
    tangents = random_features(rng, (B,) + feature_shape(N, H, W, C, layout), np.float32)

    def loss(f, r, w):
        return jnp.sum(pool(f, r, layout)[0] * w)

    def jvp(f, r, t):
        return jax.jvp(lambda x: pool(x, r, layout)[0], (f,), (t,))[1]

    grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(f_axis, b_axis, 0)))(features, boxes,
                                                                           weights)
    dots = jax.vmap(jvp, in_axes=(f_axis, b_axis, 0))(features, boxes, tangents)
    for b in range(B):
        f = features if f_axis is None else np.take(features, b, axis=f_axis)
        assert_exact(grads[b], scatter_grad(weights[b], args[b], f.shape, layout))
        assert_exact(dots[b], pick(tangents[b], args[b], layout))


def test_nested_vmap():
    b1, b2 = 2, 3
    rng = np.random.default_rng(13)
    features = random_features(rng, (b1, b2, N, H, W, C), np.float32, "ties")
    boxes = np.stack([random_boxes(rng) for _ in range(b1)])  # shared across the inner axis
    inner = jax.vmap(pool, in_axes=(0, None))
    out, arg = jax.jit(jax.vmap(inner, in_axes=(0, 0)))(features, boxes)
    for i in range(b1):
        for j in range(b2):
            want_out, want_arg = loop(features[i, j], boxes[i])
            assert_exact(out[i, j], want_out)
            assert_exact(arg[i, j], want_arg)


def primitive_names(jaxpr):
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    names.extend(primitive_names(sub))
    return names


@pytest.mark.parametrize("f_axis, b_axis", [(0, None), (None, 0), (0, 0), (1, 1)])
def test_vmap_is_one_kernel_call(f_axis, b_axis):
    features, boxes = place(*inputs(14, "NHWC", batch=B), f_axis, b_axis)
    batched = jax.vmap(pool, in_axes=(f_axis, b_axis))
    names = primitive_names(jax.make_jaxpr(batched)(features, boxes).jaxpr)
    assert names.count("roi_pool_per_image") == 1 and "roi_pool" not in names, names
    assert not {"scan", "while"} & set(names), names
    grads = jax.vmap(jax.grad(lambda f, r: jnp.sum(pool(f, r)[0] ** 2)), in_axes=(f_axis, b_axis))
    names = primitive_names(jax.make_jaxpr(grads)(features, boxes).jaxpr)
    assert names.count("roi_pool_per_image") == 1, names
    assert names.count("roi_pool_per_image_scatter") == 1, names
    assert not {"scan", "while"} & set(names), names


# ---------------------------------------------------------------------------
# The gather and scatter primitives recompute the forward's argmax from the
# features: they pick from / add into the cells that the forward picks in
# `features`, whatever the values they gather or scatter. Their source (a
# scatter's gradient) may hold copies of the features' images (how a vmap over
# tangents or cotangents alone batches them): the same as copying the features
# alike. The flat form folds them into the images, copy-major; the per-image
# form has them as a leading batch axis of source, boxes, cotangent and
# gradient.

@pytest.mark.parametrize("copies", [1, 3])
@pytest.mark.parametrize("impl", ["flat", "per_image", "reference"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_scatter_at_forward_argmax(layout, impl, copies):
    rng = np.random.default_rng(15)
    features = random_features(rng, feature_shape(N, H, W, C, layout), np.float32, "ties")
    boxes = random_boxes(rng, n=N * copies)  # naming the images of the source
    rois = flat_rois(boxes)
    like_features = np.tile(features, (copies, 1, 1, 1))
    if impl == "per_image":
        _, arg = loop(like_features, boxes, layout)
    else:  # and batch indices out of range: no cell, in any copy
        images = N * copies
        rois = np.concatenate([rois, [[b, 0, 0, 2 * W, 2 * H] for b in
                                      (-1, images, images + 0.5, images - 0.5)]])
        _, arg = reference_loop.roi_pool_loop(like_features, rois, POOLED, SCALE, layout=layout)
        arg = arg[None]  # as per-image [1, R, ...], for pick and scatter_grad
    assert (arg >= 0).any() and (arg < 0).any()
    source = random_features(rng, like_features.shape, np.float32)
    cot = rng.integers(-2, 3, arg.shape).astype(np.float32)
    config = dict(pooled=POOLED, spatial_scale=SCALE, layout=layout, bins="fast_rcnn",
                  copies=copies)
    if impl == "per_image":
        def with_copies(x):  # [copies * N, ...] -> [copies, N, ...]
            return x if copies == 1 else x.reshape((copies, N) + x.shape[1:])

        where, given_source, given_cot = with_copies(boxes), with_copies(source), with_copies(cot)
        gather, scatter = per_image_gather_p.bind, per_image_scatter_p.bind
        del config["copies"]  # the batch axis of the boxes
    else:
        where, given_source, given_cot = rois, source, cot.reshape((-1,) + cot.shape[2:])
        gather, scatter = ((gather_p.bind, scatter_p.bind) if impl == "flat" else
                           (jax.jit(ref.gather, static_argnames=tuple(config)),
                            jax.jit(ref.scatter, static_argnames=tuple(config))))
    where = jnp.asarray(where, jnp.float32)
    got = gather(jnp.asarray(given_source), jnp.asarray(features), where, **config)
    assert_exact(np.asarray(got).reshape(arg.shape), pick(source, arg, layout), "gather")
    got = scatter(jnp.asarray(given_cot), jnp.asarray(features), where, **config)
    assert_exact(np.asarray(got).reshape(like_features.shape),
                 scatter_grad(cot, arg, like_features.shape, layout), "scatter")


# ---------------------------------------------------------------------------
# boxes_to_rois: torchvision's list form, per-image boxes of different lengths.

def ragged_boxes(rng, counts=(2, 0, 3)):
    """One [K_n, 4] array per image, K_n = counts[n] (a NaN box in the last image)."""
    boxes = [random_rois(rng, N, H, W, k, SCALE)[:, 1:] for k in counts]
    boxes[-1][0] = [0, np.nan, 4, 4]
    return boxes


def rows_of(boxes):
    """The [R, 5] rows of per-image boxes, written out: each image's boxes in
    turn, prefixed by its index."""
    return np.concatenate([np.c_[np.full((len(b), 1), n, np.float32), b]
                           for n, b in enumerate(boxes)])


def test_boxes_to_rois_rows():
    boxes = ragged_boxes(np.random.default_rng(20))
    rois = jrp.boxes_to_rois(boxes)
    assert rois.dtype == jnp.float32
    assert_exact(rois, rows_of(boxes), "rois")


@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_boxes_to_rois_pools_like_flat_rois(layout, bins):
    rng = np.random.default_rng(21)
    features = random_features(rng, feature_shape(N, H, W, C, layout), np.float32, "ties")
    boxes = ragged_boxes(rng)
    fn = jax.jit(lambda f, b: jrp.roi_pool_with_argmax(f, jrp.boxes_to_rois(b), POOLED, SCALE,
                                                       layout=layout, bins=bins))
    out, arg = fn(features, boxes)
    want_out, want_arg = reference_loop.roi_pool_loop(features, rows_of(boxes), POOLED, SCALE,
                                                      layout=layout, bins=bins)
    assert out.shape[0] == sum(len(b) for b in boxes)
    assert_exact(out, want_out)
    assert_exact(arg, want_arg, "argmax")
    weights = rng.integers(-2, 3, out.shape).astype(np.float32)
    grad = jax.grad(lambda f: jnp.vdot(fn(f, boxes)[0], weights))(features)
    want_grad = reference_loop.scatter_grad(weights, want_arg, features.shape, layout=layout)
    assert_exact(grad, want_grad, "gradient")


@pytest.mark.parametrize("boxes_dtype", [np.float32, np.float16], ids=dtype_id)
def test_boxes_to_rois_of_equal_lengths_is_the_flattened_per_image_form(boxes_dtype):
    # float16 boxes stay float16, so both forms pool them with float16 geometry.
    features, boxes = inputs(22, "NHWC")
    boxes = boxes.astype(boxes_dtype)
    rois = jrp.boxes_to_rois(list(boxes))
    assert rois.dtype == boxes_dtype
    flat = jrp.roi_pool(features, rois, POOLED, SCALE)
    per_image = jrp.roi_pool(features, boxes, POOLED, SCALE)
    assert_exact(flat, np.asarray(per_image).reshape((N * K,) + flat.shape[1:]))
    assert_exact(flat, loop(features, boxes)[0].reshape(flat.shape))


def test_boxes_to_rois_dtypes_and_empty():
    empty = jrp.boxes_to_rois([])
    assert empty.shape == (0, 5) and empty.dtype == jnp.float32
    assert jrp.boxes_to_rois([np.zeros((0, 4), np.float16)]).dtype == jnp.float16
    assert jrp.boxes_to_rois([np.zeros((1, 4), jnp.bfloat16)]).dtype == jnp.float32
    mixed = [np.ones((1, 4), jnp.bfloat16), np.ones((2, 4), np.float16)]
    assert jrp.boxes_to_rois(mixed).dtype == jnp.float32
    with pytest.raises(ValueError, match=r"boxes_to_rois: 2049 images \(more than 2\*\*11\) have "
                                         "inexact float16 image indices: use float32 boxes"):
        jrp.boxes_to_rois([np.zeros((0, 4), np.float16)] * 2049)
    assert jrp.boxes_to_rois([np.zeros((0, 4), np.float16)] * 2048).dtype == jnp.float16
    with jax.enable_x64(True):
        assert jrp.boxes_to_rois([]).dtype == jnp.float32  # not x64's default float64
        wide = jrp.boxes_to_rois([np.ones((1, 4), np.float32), np.full((1, 4), 0.1)])
        assert wide.dtype == jnp.float64
        assert wide[1, 1] == 0.1                     # float64 coordinates kept exactly
    features = np.ones((2, 5, 5, 3), np.float32)
    assert jrp.roi_pool(features, jrp.boxes_to_rois([np.zeros((0, 4), np.float32)] * 2),
                        2).shape == (0, 2, 2, 3)


@pytest.mark.parametrize("boxes, error, pattern", [
    ([np.zeros((2, 5), np.float32)], ValueError, r"boxes\[0\].*\[K, 4\].*\(2, 5\)"),
    ([np.zeros((2, 4), np.float32), np.zeros(4, np.float32)], ValueError, r"boxes\[1\]"),
    ([np.zeros((2, 4), np.int32)], TypeError, r"boxes_to_rois: boxes\[0\].*int32"),
    (np.zeros((3, 4), np.float32), ValueError, r"boxes\[0\]"),   # one image's boxes, not a list
    (None, TypeError, "sequence"),
    (3, TypeError, "sequence"),
    ([None], TypeError, r"boxes\[0\] must be an array"),
])
def test_boxes_to_rois_rejects(boxes, error, pattern):
    with pytest.raises(error, match=pattern):
        jrp.boxes_to_rois(boxes)


@pytest.mark.parametrize("fn", [jrp.roi_pool, ref.roi_pool])
def test_ragged_list_of_boxes_points_to_boxes_to_rois(fn):
    features = np.ones((2, 5, 5, 3), np.float32)
    for boxes in ([np.zeros((2, 4), np.float32), np.zeros((3, 4), np.float32)],
                  [jnp.zeros((2, 4)), jnp.zeros((3, 4))]):
        with pytest.raises(ValueError, match="boxes_to_rois"):
            fn(features, boxes, 2)
