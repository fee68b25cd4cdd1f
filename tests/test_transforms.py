"""JAX transformations: jit, vmap (any axes, nested), grad/jvp/jacobians, eval_shape, checkpoint."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_roipool as jrp
import reference_loop
from conftest import BINS, LAYOUTS, assert_exact, feature_shape, random_features, random_rois

POOLED = (3, 4)
SCALE = 0.5
N, H, W, C = 2, 9, 11, 3
B = 3  # vmapped batch size


def pool(features, rois, layout="NHWC", bins="fast_rcnn"):
    return jrp.roi_pool_with_argmax(features, rois, POOLED, SCALE, layout=layout, bins=bins)


def loop(features, rois, layout="NHWC", bins="fast_rcnn"):
    return reference_loop.roi_pool_loop(features, rois, POOLED, SCALE, layout=layout, bins=bins)


def hard_rois(rng, r=10):
    """Random rois plus batch indices that a careless batching rule would send
    into a neighbouring copy of the images: -0.5 and N - 0.25 are valid
    (images 0 and N-1), -1, N and N + 0.5 are invalid."""
    rois = random_rois(rng, N, H, W, r, SCALE)
    whole = [0, 0, 0, W / SCALE - 1, H / SCALE - 1]
    extra = np.array([[b] + whole[1:] for b in (-0.5, N - 0.25, -1, N, N + 0.5)], np.float32)
    return np.concatenate([rois, extra]).astype(np.float32)


def batched_inputs(seed, layout, kind="normal"):
    rng = np.random.default_rng(seed)
    features = random_features(rng, (B,) + feature_shape(N, H, W, C, layout), np.float32, kind)
    rois = np.stack([hard_rois(rng) for _ in range(B)])
    return features, rois


def stacked_loop(features, rois, f_axis, r_axis, layout, bins):
    """Expected vmapped (out, argmax): the loop reference per batch element."""
    outs, args = [], []
    for b in range(B):
        f = features if f_axis is None else np.take(features, b, axis=f_axis)
        r = rois if r_axis is None else np.take(rois, b, axis=r_axis)
        out, arg = loop(f, r, layout, bins)
        outs.append(out)
        args.append(arg)
    return np.stack(outs), np.stack(args)


@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eager_equals_jit(layout, bins):
    features, rois = batched_inputs(0, layout)
    features, rois = features[0], rois[0]
    want_out, want_arg = loop(features, rois, layout, bins)
    for fn in (pool, jax.jit(pool, static_argnames=("layout", "bins"))):
        out, arg = fn(features, rois, layout=layout, bins=bins)
        assert_exact(out, want_out)
        assert_exact(arg, want_arg)


@pytest.mark.parametrize("form", ["flat", "per_image"])
def test_disable_jit(form):
    """Under jax.disable_jit() (a debugging mode) every entry point runs eagerly
    and gives the jitted results."""
    features, rois = batched_inputs(6, "NHWC", kind="ties")
    features, rois = features[0], rois[0]
    if form == "per_image":
        rois = rois[:N * 5, 1:].reshape(N, 5, 4)
    weights = np.random.default_rng(7).integers(-2, 3, pool(features, rois)[0].shape)

    def everything(f, r):
        out, arg = pool(f, r)
        grad = jax.grad(lambda f: jnp.sum(pool(f, r)[0] * weights))(f)
        tangent = jax.jvp(lambda f: pool(f, r)[0], (f,), (f * 2,))[1]
        batched = jax.vmap(lambda f: pool(f, r)[0])(jnp.stack([f, -f]))
        return out, arg, grad, tangent, batched

    want = jax.jit(everything)(features, rois)
    with jax.disable_jit():
        got = everything(features, rois)
    for g, w in zip(got, want):
        assert_exact(g, np.asarray(w))


@pytest.mark.parametrize("form", ["flat", "per_image"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("f_axis, r_axis", [(0, None), (None, 0), (0, 0)])
def test_vmap_over_an_empty_axis(f_axis, r_axis, layout, form):
    """A mapped axis of size 0 gives empty results (forward, argmax, gradient,
    JVP), shaped as for any other size."""
    features, rois = batched_inputs(8, layout)
    if form == "per_image":
        rois = rois[:, :N * 5, 1:].reshape(B, N, 5, 4)
    features = features[0] if f_axis is None else features[:0]
    rois = rois[0] if r_axis is None else rois[:0]
    element = [jax.ShapeDtypeStruct(x.shape if axis is None else x.shape[1:], x.dtype)
               for x, axis in ((features, f_axis), (rois, r_axis))]
    element_out = jax.eval_shape(functools.partial(pool, layout=layout), *element)[0]
    fn = jax.vmap(functools.partial(pool, layout=layout), in_axes=(f_axis, r_axis))
    for f in (fn, jax.jit(fn)):
        out, arg = f(features, rois)
        assert out.shape == arg.shape == (0,) + element_out.shape
        assert out.dtype == np.float32 and arg.dtype == np.int32
    # roi_pool alone: the kernel's argmax is skipped (an unbatched placeholder).
    plain = jax.vmap(lambda f, r: jrp.roi_pool(f, r, POOLED, SCALE, layout=layout),
                     in_axes=(f_axis, r_axis))
    for f in (plain, jax.jit(plain)):
        assert f(features, rois).shape == (0,) + element_out.shape
    grads = jax.vmap(jax.grad(lambda f, r: jnp.sum(pool(f, r, layout)[0])),
                     in_axes=(f_axis, r_axis))(features, rois)
    assert grads.shape == (0,) + element[0].shape
    tangents = jax.vmap(lambda f, r: jax.jvp(lambda f: pool(f, r, layout)[0], (f,), (f,))[1],
                        in_axes=(f_axis, r_axis))(features, rois)
    assert tangents.shape == (0,) + element_out.shape


# (features batch axis, rois batch axis); None = not mapped.
VMAP_AXES = [(0, None), (None, 0), (0, 0), (1, None), (None, 1), (1, 1), (4, 2), (3, 0)]


@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("f_axis, r_axis", VMAP_AXES)
def test_vmap(f_axis, r_axis, layout, bins):
    features, rois = batched_inputs(1, layout, kind="ties")
    features = features[0] if f_axis is None else np.moveaxis(features, 0, f_axis)
    rois = rois[0] if r_axis is None else np.moveaxis(rois, 0, r_axis)
    fn = jax.vmap(functools.partial(pool, layout=layout, bins=bins), in_axes=(f_axis, r_axis))
    want_out, want_arg = stacked_loop(features, rois, f_axis, r_axis, layout, bins)
    for f in (fn, jax.jit(fn)):
        out, arg = f(features, rois)
        assert_exact(out, want_out, "vmapped output")
        assert_exact(arg, want_arg, "vmapped argmax (indices into each element's own features)")


def test_vmap_out_axes():
    features, rois = batched_inputs(2, "NHWC")
    out, arg = jax.vmap(pool, in_axes=(0, 0), out_axes=2)(features, rois)
    want_out, want_arg = stacked_loop(features, rois, 0, 0, "NHWC", "fast_rcnn")
    assert_exact(out, np.moveaxis(want_out, 0, 2))
    assert_exact(arg, np.moveaxis(want_arg, 0, 2))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nested_vmap(layout):
    rng = np.random.default_rng(3)
    b1, b2 = 2, 3
    features = random_features(rng, (b1, b2) + feature_shape(N, H, W, C, layout), np.float32)
    rois = np.stack([hard_rois(rng) for _ in range(b1)])  # shared across the inner axis
    inner = jax.vmap(functools.partial(pool, layout=layout), in_axes=(0, None))
    out, arg = jax.jit(jax.vmap(inner, in_axes=(0, 0)))(features, rois)
    assert out.shape[:2] == (b1, b2)
    for i in range(b1):
        for j in range(b2):
            want_out, want_arg = loop(features[i, j], rois[i], layout)
            assert_exact(out[i, j], want_out)
            assert_exact(arg[i, j], want_arg)


def per_example_grad(features, rois, cotangent, layout, bins="fast_rcnn"):
    _, arg = loop(features, rois, layout, bins)
    return reference_loop.scatter_grad(cotangent, arg, features.shape, layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("f_axis, r_axis", [(0, None), (None, 0), (0, 0)])
def test_vmap_of_grad(f_axis, r_axis, layout):
    features, rois = batched_inputs(4, layout, kind="ties")
    features = features[0] if f_axis is None else features
    rois = rois[0] if r_axis is None else rois
    rng = np.random.default_rng(5)
    out_shape = feature_shape(rois.shape[-2], POOLED[0], POOLED[1], C, layout)
    weights = rng.integers(-2, 3, (B,) + out_shape).astype(np.float32)

    def loss(f, r, w):
        return jnp.sum(pool(f, r, layout)[0] * w)

    grads = jax.vmap(jax.grad(loss), in_axes=(f_axis, r_axis, 0))(features, rois, weights)
    for b in range(B):
        f = features if f_axis is None else features[b]
        r = rois if r_axis is None else rois[b]
        assert_exact(grads[b], per_example_grad(f, r, weights[b], layout))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vmap_of_jvp(layout):
    features, rois = batched_inputs(6, layout)
    tangents = random_features(np.random.default_rng(7), features.shape, np.float32)

    def jvp(f, r, t):
        return jax.jvp(lambda x: pool(x, r, layout)[0], (f,), (t,))

    outs, out_dots = jax.vmap(jvp)(features, rois, tangents)
    for b in range(B):
        want_out, arg = loop(features[b], rois[b], layout)
        assert_exact(outs[b], want_out)
        # The tangent picks the tangent at the argmax cell: a one-hot cotangent pull-back.
        want_dot = np.where(arg >= 0, gather(tangents[b], arg, layout), 0.0)
        assert_exact(out_dots[b], want_dot)


def gather(values, argmax, layout):
    """values[argmax cell, channel] per output element (argmax clipped at 0)."""
    v = reference_loop.to_float64(values)
    if layout == "NCHW":
        v, argmax = v.transpose(0, 2, 3, 1), argmax.transpose(0, 2, 3, 1)
    picked = v.reshape(-1, v.shape[-1])[np.maximum(argmax, 0), np.arange(v.shape[-1])]
    return picked.transpose(0, 3, 1, 2) if layout == "NCHW" else picked


def small_problem(layout, seed=8):
    rng = np.random.default_rng(seed)
    features = random_features(rng, feature_shape(1, 5, 6, 2, layout), np.float32, "ties")
    rois = np.array([[0, 0, 0, 11, 9], [0, 2, 2, 6, 8], [0, 100, 100, 120, 120],
                     [1, 0, 0, 4, 4]], np.float32)  # includes an outside box and an invalid one
    return features, rois


def expected_jacobian(features, rois, layout):
    """d out / d features: one-hot at each output's argmax cell (same channel)."""
    out, arg = loop(features, rois, layout)
    jac = np.zeros(out.shape + features.shape)
    for index in np.ndindex(out.shape):
        if arg[index] < 0:
            continue
        one_hot = np.zeros(out.shape)
        one_hot[index] = 1.0
        jac[index] = reference_loop.scatter_grad(one_hot, arg, features.shape, layout=layout)
    return jac


@pytest.mark.parametrize("layout", LAYOUTS)
def test_jacfwd_jacrev(layout):
    features, rois = small_problem(layout)
    f = lambda x: pool(x, rois, layout)[0]  # noqa: E731
    want = expected_jacobian(features, rois, layout)
    assert want.any()
    for jac in (jax.jacfwd(f), jax.jacrev(f), jax.jit(jax.jacrev(f))):
        assert_exact(jac(features), want, "jacobian")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hessian_is_zero(layout):
    features, rois = small_problem(layout)
    hess = jax.hessian(lambda x: jnp.sum(pool(x, rois, layout)[0]))(features)
    assert hess.shape == features.shape * 2
    assert np.all(np.asarray(hess) == 0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grad_of_grad(layout):
    # loss = sum(out**2): grad = S(2 G(f)) (G gathers at argmax, S scatters),
    # so d/df <grad(loss)(f), v> = 2 S(G(v)).
    features, rois = small_problem(layout)
    v = random_features(np.random.default_rng(9), features.shape, np.float32)

    def loss(x):
        return jnp.sum(pool(x, rois, layout)[0] ** 2)

    second = jax.grad(lambda x: jnp.vdot(jax.grad(loss)(x), v))(features)
    _, arg = loop(features, rois, layout)
    picked = np.where(arg >= 0, gather(v, arg, layout), 0.0)
    want = 2 * reference_loop.scatter_grad(picked, arg, features.shape, layout=layout)
    np.testing.assert_allclose(np.asarray(second), want, rtol=1e-6, atol=1e-6)
    assert np.abs(want).sum() > 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_shape(layout):
    features = jax.ShapeDtypeStruct(feature_shape(2, 30, 40, 7, layout), jnp.bfloat16)
    rois = jax.ShapeDtypeStruct((13, 5), jnp.float32)
    out, arg = jax.eval_shape(lambda f, r: jrp.roi_pool_with_argmax(f, r, (5, 6), layout=layout),
                              features, rois)
    assert out.shape == arg.shape == feature_shape(13, 5, 6, 7, layout)
    assert out.dtype == jnp.bfloat16 and arg.dtype == jnp.int32
    assert jax.eval_shape(lambda f, r: jrp.roi_pool(f, r, 3, layout=layout), features,
                          rois).shape == feature_shape(13, 3, 3, 7, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpoint(layout):
    features, rois = small_problem(layout)
    cot = np.arange(np.prod(loop(features, rois, layout)[0].shape), dtype=np.float32)

    def loss(x):
        return jnp.sum(pool(x, rois, layout)[0].ravel() * cot)

    got = jax.grad(jax.checkpoint(loss))(features)
    want = jax.grad(loss)(features)
    assert_exact(got, reference_loop.to_float64(want))
    _, arg = loop(features, rois, layout)
    assert_exact(got, per_example_grad(features, rois, cot.reshape(arg.shape), layout))


def sub_jaxprs(value):
    """Jaxprs nested in an equation parameter (pjit, custom_vjp, cond branches, ...)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(getattr(value, "jaxpr", None), "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from sub_jaxprs(item)


def primitive_names(jaxpr):
    """Names of all primitives in a jaxpr, recursively."""
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in sub_jaxprs(value):
                names.extend(primitive_names(sub))
    return names


@pytest.mark.parametrize("f_axis, r_axis", [(0, None), (None, 0), (0, 0), (1, 1)])
def test_vmap_is_one_kernel_call(f_axis, r_axis):
    features, rois = batched_inputs(10, "NHWC")
    features = features[0] if f_axis is None else np.moveaxis(features, 0, f_axis)
    rois = rois[0] if r_axis is None else np.moveaxis(rois, 0, r_axis)
    batched = jax.vmap(pool, in_axes=(f_axis, r_axis))
    names = primitive_names(jax.make_jaxpr(batched)(features, rois).jaxpr)
    assert names.count("roi_pool") == 1, names
    assert not {"scan", "while"} & set(names), names
    text = str(jax.make_jaxpr(batched)(features, rois))
    assert "scan" not in text and "while" not in text

    grads = jax.vmap(jax.grad(lambda f, r: jnp.sum(pool(f, r)[0])), in_axes=(f_axis, r_axis))
    names = primitive_names(jax.make_jaxpr(grads)(features, rois).jaxpr)
    assert not {"scan", "while"} & set(names), names



def primitive_eqns(jaxpr, name):
    """The equations of primitive ``name`` in a jaxpr, recursively."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            found.append(eqn)
        for value in eqn.params.values():
            for sub in sub_jaxprs(value):
                found.extend(primitive_eqns(sub, name))
    return found


def shared_problem(layout, form, seed=11):
    """Features, the rois argument of ``form`` and the same RoIs as flat rows."""
    rng = np.random.default_rng(seed)
    features = random_features(rng, feature_shape(N, H, W, C, layout), np.float32, "ties")
    if form == "flat":
        rois = hard_rois(rng)
        return features, rois, rois
    boxes = random_rois(rng, N, H, W, N * 4, SCALE)[:, 1:].reshape(N, 4, 4)
    flat = np.concatenate([np.repeat(np.arange(N, dtype=np.float32), 4)[:, None],
                           boxes.reshape(-1, 4)], axis=1)
    return features, boxes, flat


@pytest.mark.parametrize("form", ["flat", "per_image"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_vmap_over_tangents_or_cotangents_alone(layout, form):
    """Batched JVPs and VJPs (nested vmaps) at shared features: one gather or
    scatter call that reads the features once (its source or gradient holds
    the copies), with each element's values at the forward's argmax, and
    nothing transposed (the batch axes lead, as the copies do)."""
    features, rois, flat = shared_problem(layout, form)
    _, arg = loop(features, flat, layout)
    assert (arg >= 0).any() and (arg < 0).any()
    f = lambda x: pool(x, rois, layout)[0]  # noqa: E731
    out_shape = jax.eval_shape(f, features).shape
    rng = np.random.default_rng(12)
    b1, b2 = 2, 3
    tangents = random_features(rng, (b1, b2) + features.shape, np.float32)
    cotangents = rng.integers(-2, 3, (b1, b2) + out_shape).astype(np.float32)
    pull = lambda c: jax.vjp(f, features)[1](c)[0]  # noqa: E731
    push = lambda t: jax.jvp(f, (features,), (t,))[1]  # noqa: E731
    for name, fn, batch in (("gather", push, tangents), ("scatter", pull, cotangents)):
        batched = jax.vmap(jax.vmap(fn))
        got = jax.jit(batched)(batch)
        for i, j in np.ndindex(b1, b2):
            if name == "gather":
                want = np.where(arg >= 0, gather(batch[i, j], arg, layout), 0.0)
                assert_exact(np.asarray(got[i, j]).reshape(arg.shape), want, name)
            else:
                cot = batch[i, j].reshape(arg.shape)
                assert_exact(got[i, j], per_example_grad(features, flat, cot, layout), name)
        prefix = "roi_pool_" if form == "flat" else "roi_pool_per_image_"
        jaxpr = jax.make_jaxpr(batched)(batch).jaxpr
        (eqn,) = primitive_eqns(jaxpr, prefix + name)
        if form == "flat":
            assert eqn.params["copies"] == b1 * b2, eqn.params
        else:  # a batch axis of the boxes
            assert eqn.invars[2].aval.shape[:-3] == (b1 * b2,), eqn.invars[2].aval
        assert eqn.invars[1].aval.shape == features.shape  # not copied
        assert not primitive_eqns(jaxpr, "transpose"), jaxpr


@pytest.mark.parametrize("form", ["flat", "per_image"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_vmap_of_batched_jvps_and_vjps(layout, form):
    """An outer vmap over the features (each batch element its own copy of
    them) or over the rois, with or without the tangents (cotangents), of a
    vmap over tangents or cotangents alone."""
    features, rois, flat = shared_problem(layout, form, seed=13)
    rng = np.random.default_rng(14)
    b1, b2 = 2, 3
    many = random_features(rng, (b1,) + features.shape, np.float32, "ties")
    many_rois = np.stack([rois, shared_problem(layout, form, seed=15)[1]])
    many_flat = np.stack([flat, shared_problem(layout, form, seed=15)[2]])
    out_shape = jax.eval_shape(lambda x: pool(x, rois, layout)[0], features).shape
    tangents = random_features(rng, (b1, b2) + features.shape, np.float32)
    cotangents = rng.integers(-2, 3, (b1, b2) + out_shape).astype(np.float32)

    def push(x, r, t):
        return jax.vmap(lambda t: jax.jvp(lambda x: pool(x, r, layout)[0], (x,), (t,))[1])(t)

    def pull(x, r, c):
        back = jax.vjp(lambda x: pool(x, r, layout)[0], x)[1]
        return jax.vmap(lambda c: back(c)[0])(c)

    cases = {"features mapped": ((0, None, 0), (many, rois)),
             "rois mapped": ((None, 0, 0), (features, many_rois)),
             "rois alone mapped": ((None, 0, None), (features, many_rois))}
    for what, (in_axes, (x, r)) in cases.items():
        for name, fn, batches in (("gather", push, tangents), ("scatter", pull, cotangents)):
            batch = batches if in_axes[2] == 0 else batches[0]
            got = jax.jit(jax.vmap(fn, in_axes=in_axes))(x, r, batch)
            for i, j in np.ndindex(b1, b2):
                xi = x[i] if in_axes[0] == 0 else x
                fi = many_flat[i] if in_axes[1] == 0 else flat
                bij = batches[i if in_axes[2] == 0 else 0, j]
                _, arg = loop(xi, fi, layout)
                if name == "gather":
                    want = np.where(arg >= 0, gather(bij, arg, layout), 0.0)
                    assert_exact(np.asarray(got[i, j]).reshape(arg.shape), want,
                                 f"{what}: {name}")
                else:
                    cot = bij.reshape(arg.shape)
                    assert_exact(got[i, j], per_example_grad(xi, fi, cot, layout),
                                 f"{what}: {name}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vmap_over_tangents_alone_of_a_vmapped_per_image_call(layout):
    """A vmap over tangents (cotangents) alone of a function that vmaps
    per-image pooling over a batch of images [B, N, ...] itself: the gather
    (scatter) has batched features, which the outer mapped axis shares."""
    problems = [shared_problem(layout, "per_image", seed=40 + i) for i in range(2)]
    features = np.stack([p[0] for p in problems])
    boxes = np.stack([p[1] for p in problems])

    def f(x):
        return jax.vmap(lambda xi, bi: pool(xi, bi, layout)[0])(x, boxes)

    rng = np.random.default_rng(41)
    s = 3
    tangents = random_features(rng, (s,) + features.shape, np.float32)
    cotangents = rng.integers(-2, 3, (s,) + jax.eval_shape(f, features).shape).astype(np.float32)
    pushed = jax.jit(jax.vmap(lambda t: jax.jvp(f, (features,), (t,))[1]))(tangents)
    pulled = jax.jit(jax.vmap(lambda c: jax.vjp(f, features)[1](c)[0]))(cotangents)
    for b, (x, _, flat) in enumerate(problems):
        _, arg = loop(x, flat, layout)
        for j in range(s):
            want = np.where(arg >= 0, gather(tangents[j, b], arg, layout), 0.0)
            assert_exact(np.asarray(pushed[j, b]).reshape(arg.shape), want, "gather")
            cot = cotangents[j, b].reshape(arg.shape)
            assert_exact(pulled[j, b], per_example_grad(x, flat, cot, layout), "scatter")


OUTER_IN_AXES = [axes for axes in itertools.product((None, 0, 1), repeat=3)
                 if axes != (None, None, None)]


@pytest.mark.parametrize("sizes", [(2, 3), (1, 1)], ids=["batches 2x3", "batches 1x1"])
@pytest.mark.parametrize("form", ["flat", "per_image"])
def test_every_outer_vmap_of_batched_jvps_and_vjps(form, sizes):
    """Every combination of mapped features, rois and tangents (cotangents),
    at axes 0 or 1, of a vmap around a vmap over tangents or cotangents
    alone, against the loop reference element by element (batches of 1
    included)."""
    b1, b2 = sizes
    problems = [shared_problem("NHWC", form, seed=30 + i) for i in range(b1)]
    out_shape = jax.eval_shape(lambda x: pool(x, problems[0][1])[0], problems[0][0]).shape
    rng = np.random.default_rng(21)
    tangents = random_features(rng, (b1, b2) + problems[0][0].shape, np.float32)
    cotangents = rng.integers(-2, 3, (b1, b2) + out_shape).astype(np.float32)

    def push(x, r, t):
        return jax.vmap(lambda t: jax.jvp(lambda x: pool(x, r)[0], (x,), (t,))[1])(t)

    def pull(x, r, c):
        back = jax.vjp(lambda x: pool(x, r)[0], x)[1]
        return jax.vmap(lambda c: back(c)[0])(c)

    def given(items, axis):  # one item unmapped, or all of them along axis
        return items[0] if axis is None else np.stack(items, axis)

    for in_axes in OUTER_IN_AXES:
        x = given([p[0] for p in problems], in_axes[0])
        r = given([p[1] for p in problems], in_axes[1])
        for name, fn, batches in (("gather", push, tangents), ("scatter", pull, cotangents)):
            got = jax.jit(jax.vmap(fn, in_axes=in_axes))(x, r, given(list(batches), in_axes[2]))
            for i in range(b1):
                xi = problems[i if in_axes[0] is not None else 0][0]
                flat = problems[i if in_axes[1] is not None else 0][2]
                _, arg = loop(xi, flat)
                for j in range(b2):
                    value = batches[i if in_axes[2] is not None else 0, j]
                    if name == "gather":
                        want = np.where(arg >= 0, gather(value, arg, "NHWC"), 0.0)
                        assert_exact(np.asarray(got[i, j]).reshape(arg.shape), want,
                                     f"{in_axes}: {name}")
                    else:
                        want = per_example_grad(xi, flat, value.reshape(arg.shape), "NHWC")
                        assert_exact(got[i, j], want, f"{in_axes}: {name}")
