"""The roi_pool primitives and their abstract evaluation, AD and batching rules.

Three primitives:
- ``roi_pool``: (features, rois) -> (output, argmax). Not linear; its JVP is
  the gather below applied to the features' tangent.
- ``roi_pool_gather``: (source, argmax) -> source at argmax. Linear in source.
- ``roi_pool_scatter``: (cotangent, argmax) -> scatter-add at argmax. Linear in
  cotangent; gather and scatter are each other's transpose.
Together these give grad, jvp, jacfwd/jacrev, hessian and higher orders.
Native lowerings are registered in ``_native``; the pure-JAX ones from
``reference`` are the default for any other platform.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from . import _checks, reference

roi_pool_p = Primitive("roi_pool")
roi_pool_p.multiple_results = True
gather_p = Primitive("roi_pool_gather")
scatter_p = Primitive("roi_pool_scatter")


def _eager_impl(primitive):
    """Eager application: compile the single primitive once per signature."""

    @functools.lru_cache(maxsize=None)
    def compiled(**params):
        return jax.jit(functools.partial(primitive.bind, **params))

    def impl(*args, **params):
        return compiled(**params)(*args)

    return impl


# ---------------------------------------------------------------------------
# Abstract evaluation.

def _roi_pool_abstract(features, rois, *, pooled, spatial_scale, layout, bins, with_argmax):
    c = _checks.feature_dims(features.shape, layout)[3]
    shape = _checks.pooled_shape(rois.shape[0], pooled, c, layout)
    # Without with_argmax the kernel skips the argmax and returns an empty one.
    argmax_shape = shape if with_argmax else (0,)
    return (jax.core.ShapedArray(shape, features.dtype),
            jax.core.ShapedArray(argmax_shape, np.int32))


def _gather_abstract(source, argmax, *, layout):
    return jax.core.ShapedArray(argmax.shape, source.dtype)


def _scatter_abstract(cotangent, argmax, *, layout, features_shape):
    return jax.core.ShapedArray(features_shape, cotangent.dtype)


# ---------------------------------------------------------------------------
# Differentiation.

def _zero_like(x):
    return ad.Zero(jax.typeof(x).to_tangent_aval())


def _roi_pool_jvp(primals, tangents, **params):
    features, rois = primals
    features_dot, _ = tangents  # rois only choose cells: zero derivative
    if type(features_dot) is ad.Zero:
        out, argmax = roi_pool_p.bind(features, rois, **params)
        return (out, argmax), (_zero_like(out), _zero_like(argmax))
    out, argmax = roi_pool_p.bind(features, rois, **{**params, "with_argmax": True})
    out_dot = gather_p.bind(features_dot, argmax, layout=params["layout"])
    if not params["with_argmax"]:
        argmax = jnp.zeros((0,), np.int32)
    return (out, argmax), (out_dot, _zero_like(argmax))


def _linear_jvp(primitive):
    """JVP of a primitive linear in its first operand (the second is an index)."""

    def jvp(primals, tangents, **params):
        value, argmax = primals
        out = primitive.bind(value, argmax, **params)
        if type(tangents[0]) is ad.Zero:
            return out, _zero_like(out)
        return out, primitive.bind(tangents[0], argmax, **params)

    return jvp


def _gather_transpose(cotangent, source, argmax, *, layout):
    assert ad.is_undefined_primal(source) and not ad.is_undefined_primal(argmax)
    if type(cotangent) is ad.Zero:
        return [ad.Zero(source.aval), None]
    features_shape = tuple(source.aval.shape)
    return [scatter_p.bind(cotangent, argmax, layout=layout, features_shape=features_shape), None]


def _scatter_transpose(cotangent, value, argmax, *, layout, features_shape):
    assert ad.is_undefined_primal(value) and not ad.is_undefined_primal(argmax)
    if type(cotangent) is ad.Zero:
        return [ad.Zero(value.aval), None]
    return [gather_p.bind(cotangent, argmax, layout=layout), None]


# ---------------------------------------------------------------------------
# Batching: the mapped axis is folded into the image axis N and the RoI axis
# R, so a vmapped call is one kernel launch.

def _to_front(x, dim, size):
    """Moves the mapped axis to the front, broadcasting an unmapped operand."""
    if dim is None:
        return jnp.broadcast_to(x, (size,) + x.shape)
    return jnp.moveaxis(x, dim, 0)


def _fold(x):
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _unfold(x, size):
    return x.reshape((size, x.shape[0] // size) + x.shape[1:])


def _batch_size(args, dims):
    return next(a.shape[d] for a, d in zip(args, dims) if d is not None)


def _roi_pool_batch(args, dims, *, pooled, spatial_scale, layout, bins, with_argmax):
    features, rois = args
    features_dim, rois_dim = dims
    size = _batch_size(args, dims)
    rois = _to_front(rois, rois_dim, size)
    if features_dim is not None:
        features = _to_front(features, features_dim, size)
        copy_shape = features.shape[1:]
        n = copy_shape[0]  # images per batch element (N leads in both layouts)
        features = _fold(features)
        _checks.check_features(features, layout)  # the folded N*H*W must still fit int32
        if rois.dtype == np.float32 and size * n > 2**24:
            raise ValueError("roi_pool: vmap over more than 2**24 images needs float64 rois")
        # Re-index each RoI into its own copy of the images; invalid indices
        # stay invalid (they must not land in a neighbouring copy).
        b = rois[..., 0]
        offset = (jnp.arange(size, dtype=rois.dtype) * n)[:, None]
        b = jnp.where((b > -1) & (b < n), jnp.trunc(b) + offset, -1)
        rois = rois.at[..., 0].set(b)
    out, argmax = roi_pool_p.bind(features, _fold(rois), pooled=pooled,
                                  spatial_scale=spatial_scale, layout=layout, bins=bins,
                                  with_argmax=with_argmax)
    if not with_argmax:
        return (_unfold(out, size), argmax), (0, None)
    argmax = _unfold(argmax, size)
    if features_dim is not None:
        # The kernel indexed the folded images; make each argmax index its own copy.
        argmax = _offset_argmax(argmax, copy_shape, layout, sign=-1)
    return (_unfold(out, size), argmax), (0, 0)


def _offset_argmax(argmax, features_shape, layout, sign=1):
    """[B, ...] argmax into B stacked copies of features of ``features_shape``:
    add b * N*H*W (``sign=-1``: subtract it, back to per-copy indices)."""
    n, h, w, _ = _checks.feature_dims(features_shape, layout)
    offset = jnp.arange(argmax.shape[0], dtype=np.int32) * (sign * n * h * w)
    offset = offset.reshape((-1,) + (1,) * (argmax.ndim - 1))
    return jnp.where(argmax >= 0, argmax + offset, -1)


def _folded_shape(features_shape, size):
    return (size * features_shape[0],) + tuple(features_shape[1:])


def _gather_batch(args, dims, *, layout):
    source, argmax = args
    source_dim, argmax_dim = dims
    size = _batch_size(args, dims)
    argmax = _to_front(argmax, argmax_dim, size)
    if source_dim is not None:
        source = _to_front(source, source_dim, size)
        argmax = _offset_argmax(argmax, source.shape[1:], layout)
        source = _fold(source)
        _checks.check_features(source, layout)
    out = gather_p.bind(source, _fold(argmax), layout=layout)
    return _unfold(out, size), 0


def _scatter_batch(args, dims, *, layout, features_shape):
    cotangent, argmax = args
    size = _batch_size(args, dims)
    cotangent, argmax = (_to_front(x, d, size) for x, d in zip(args, dims))
    argmax = _offset_argmax(argmax, features_shape, layout)
    folded = _folded_shape(features_shape, size)
    if np.prod(_checks.feature_dims(folded, layout)[:3]) > _checks.MAX_CELLS:
        raise ValueError("roi_pool: vmapped features exceed the int32 argmax range")
    out = scatter_p.bind(_fold(cotangent), _fold(argmax), layout=layout, features_shape=folded)
    return _unfold(out, size), 0


# ---------------------------------------------------------------------------
# Registration.

for _p in (roi_pool_p, gather_p, scatter_p):
    _p.def_impl(_eager_impl(_p))
roi_pool_p.def_abstract_eval(_roi_pool_abstract)
gather_p.def_abstract_eval(_gather_abstract)
scatter_p.def_abstract_eval(_scatter_abstract)

ad.primitive_jvps[roi_pool_p] = _roi_pool_jvp
ad.primitive_jvps[gather_p] = _linear_jvp(gather_p)
ad.primitive_jvps[scatter_p] = _linear_jvp(scatter_p)
ad.primitive_transposes[gather_p] = _gather_transpose
ad.primitive_transposes[scatter_p] = _scatter_transpose

batching.primitive_batchers[roi_pool_p] = _roi_pool_batch
batching.primitive_batchers[gather_p] = _gather_batch
batching.primitive_batchers[scatter_p] = _scatter_batch

# Default lowering for every platform; _native overrides cpu and cuda.
mlir.register_lowering(roi_pool_p, mlir.lower_fun(reference.forward, multiple_results=True))
mlir.register_lowering(gather_p, mlir.lower_fun(reference.gather, multiple_results=False))
mlir.register_lowering(scatter_p, mlir.lower_fun(reference.scatter, multiple_results=False))
