"""The roi_pool primitives and their abstract evaluation, AD, batching and lowering rules.

Two families of three primitives each:
- ``roi_pool`` / ``roi_pool_per_image``: (features, rois) -> (output, argmax).
  Not linear; the JVP is the family's gather applied to the features' tangent.
- ``roi_pool_gather`` / ``roi_pool_per_image_gather``: (source, argmax) ->
  source at argmax. Linear in source.
- ``roi_pool_scatter`` / ``roi_pool_per_image_scatter``: (cotangent, argmax)
  -> scatter-add at argmax. Linear in cotangent; gather and scatter are each
  other's transpose.
Together these give grad, jvp, jacfwd/jacrev, hessian and higher orders.

The flat family takes rois ``[R, 5]`` and its argmax holds flat cell indices
``(n * H + h) * W + w``; it is what the kernels implement. The per-image
family takes boxes ``[N, K, 4]``, its argmax ``[N, K, ...]`` holds
image-local cell indices ``h * W + w``, so that any block of images is a
self-contained problem. Its lowering runs the flat family on rois with batch
column 0..N-1 (converting the argmax with elementwise ops), inside
custom_partitioning where the module is compiled for several devices
(``_sharding``): sharded along the images, each device pools its own.

Native flat lowerings are registered in ``_native``; the pure-JAX ones from
``reference`` are the default for any other platform.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding, PartitionSpec

from . import _checks, _sharding, reference

roi_pool_p = Primitive("roi_pool")
roi_pool_p.multiple_results = True
gather_p = Primitive("roi_pool_gather")
scatter_p = Primitive("roi_pool_scatter")

per_image_p = Primitive("roi_pool_per_image")
per_image_p.multiple_results = True
per_image_gather_p = Primitive("roi_pool_per_image_gather")
per_image_scatter_p = Primitive("roi_pool_per_image_scatter")


class Family(NamedTuple):
    forward: Primitive
    gather: Primitive
    scatter: Primitive
    per_image: bool


FLAT = Family(roi_pool_p, gather_p, scatter_p, per_image=False)
PER_IMAGE = Family(per_image_p, per_image_gather_p, per_image_scatter_p, per_image=True)


def _eager_impl(primitive):
    """Eager application: compile the single primitive once per signature."""

    @functools.lru_cache(maxsize=None)
    def compiled(**params):
        return jax.jit(functools.partial(primitive.bind, **params))

    def impl(*args, **params):
        return compiled(**params)(*args)

    return impl


# ---------------------------------------------------------------------------
# Abstract evaluation. Inside shard_map, results vary over the manual mesh
# axes their operands vary over (``_api`` makes the operands agree first).
# With explicitly sharded operands, per-image results are sharded in their
# types the way ``_sharding`` partitions them; flat results are not sharded.

def varying_axes(aval) -> frozenset:
    """Manual mesh axes an abstract value varies over (shard_map's check_vma)."""
    mat = getattr(aval, "mat", None)  # jax 0.10 calls it manual_axis_type
    if mat is not None:
        return frozenset(getattr(mat, "varying", ()))
    return frozenset(getattr(aval, "vma", ()))


def _mesh(aval):
    mesh = getattr(getattr(aval, "sharding", None), "mesh", None)
    return None if mesh is None or mesh.empty else mesh


def _result_aval(shape, dtype, operands, spec=None):
    base = max(operands, key=lambda aval: len(varying_axes(aval)))
    mesh = _mesh(base) or next(filter(None, map(_mesh, operands)), None)
    if mesh is None:
        return jax.core.ShapedArray(shape, dtype)
    sharding = NamedSharding(mesh, spec if spec is not None else PartitionSpec())
    return base.update(shape=tuple(shape), dtype=np.dtype(dtype), weak_type=False,
                       sharding=sharding)


def _result_specs(family, op, layout, operands, with_argmax=True):
    if not family.per_image:
        return (None, None)
    sig = _sharding.signature(op, layout, with_argmax)
    return _sharding.result_specs(sig, [getattr(a, "sharding", None) for a in operands])


def _roi_pool_abstract(family, features, rois, *, pooled, spatial_scale, layout, bins,
                       with_argmax):
    c = _checks.feature_dims(features.shape, layout)[3]
    # [R, 5] rois give [R, ...]; per-image [N, K, 4] boxes give [N, K, ...].
    shape = tuple(rois.shape[:-1]) + _checks.pooled_shape(0, pooled, c, layout)[1:]
    operands = (features, rois)
    specs = _result_specs(family, "forward", layout, operands)
    out = _result_aval(shape, features.dtype, operands, specs[0])
    if not with_argmax:  # the kernel skips the argmax and returns an empty one
        return out, _result_aval((0,), np.int32, operands)
    return out, _result_aval(shape, np.int32, operands, specs[1])


def _gather_abstract(family, source, argmax, *, layout):
    spec = _result_specs(family, "gather", layout, (source, argmax))[0]
    return _result_aval(argmax.shape, source.dtype, (source, argmax), spec)


def _scatter_abstract(family, cotangent, argmax, *, layout, features_shape):
    spec = _result_specs(family, "scatter", layout, (cotangent, argmax))[0]
    return _result_aval(features_shape, cotangent.dtype, (cotangent, argmax), spec)


# ---------------------------------------------------------------------------
# Differentiation.

def _zero_like(x):
    return ad.Zero(jax.typeof(x).to_tangent_aval())


def _roi_pool_jvp(family, primals, tangents, **params):
    features, rois = primals
    features_dot, _ = tangents  # rois only choose cells: zero derivative
    if type(features_dot) is ad.Zero:
        out, argmax = family.forward.bind(features, rois, **params)
        return (out, argmax), (_zero_like(out), _zero_like(argmax))
    out, argmax = family.forward.bind(features, rois, **{**params, "with_argmax": True})
    out_dot = family.gather.bind(features_dot, argmax, layout=params["layout"])
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


def _typed_like(x, aval):
    """``x`` resharded to ``aval``'s sharding type where they differ (explicit
    mesh axes only; e.g. the gradient of replicated features whose per-image
    pooling was split along the boxes' sharding)."""
    want = getattr(aval, "sharding", None)
    have = getattr(jax.typeof(x), "sharding", None)
    if _mesh(aval) is None or want is None or have is None:
        return x

    def entries(sharding):
        spec = tuple(sharding.spec)
        return spec + (None,) * (x.ndim - len(spec))

    if entries(want) == entries(have):
        return x
    return jax.sharding.reshard(x, want)


def _gather_transpose(family, cotangent, source, argmax, *, layout):
    assert ad.is_undefined_primal(source) and not ad.is_undefined_primal(argmax)
    if type(cotangent) is ad.Zero:
        return [ad.Zero(source.aval), None]
    out = family.scatter.bind(cotangent, argmax, layout=layout,
                              features_shape=tuple(source.aval.shape))
    return [_typed_like(out, source.aval), None]


def _scatter_transpose(family, cotangent, value, argmax, *, layout, features_shape):
    assert ad.is_undefined_primal(value) and not ad.is_undefined_primal(argmax)
    if type(cotangent) is ad.Zero:
        return [ad.Zero(value.aval), None]
    return [_typed_like(family.gather.bind(cotangent, argmax, layout=layout), value.aval), None]


# ---------------------------------------------------------------------------
# Batching of the flat family: the mapped axis is folded into the image axis
# N and the RoI axis R, so a vmapped call is one kernel launch.

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


def _check_image_index(rois, images):
    if rois.dtype == np.float32 and images > 2**24:
        raise ValueError("roi_pool: vmap over more than 2**24 images needs float64 rois")


def _check_cells(features_shape, layout):
    if np.prod(_checks.feature_dims(features_shape, layout)[:3]) > _checks.MAX_CELLS:
        raise ValueError("roi_pool: vmapped features exceed the int32 argmax range")


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
        _check_image_index(rois, size * n)
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
    # Entries that name no cell of their copy stay "no cell" (-1) rather than
    # landing in a neighbouring copy; the kernel's own output is always in range.
    names_cell = argmax >= 0 if sign < 0 else reference.in_range(argmax, features_shape, layout)
    return jnp.where(names_cell, argmax + offset, -1)


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
    _check_cells(folded, layout)
    out = scatter_p.bind(_fold(cotangent), _fold(argmax), layout=layout, features_shape=folded)
    return _unfold(out, size), 0


# ---------------------------------------------------------------------------
# Batching of the per-image family: no index offsets (the argmax is
# image-local). Mapped images are folded image-major, [N, B, ...] ->
# [N * B, ...], which keeps a sharded N sharded alike; shared (unmapped)
# images take the mapped axis into the box axis K instead, copying no features.

def _to_second(x, dim, size):
    """Moves the mapped axis to position 1, broadcasting an unmapped operand."""
    if dim is None:
        x = jnp.expand_dims(x, 1)
        return jnp.broadcast_to(x, x.shape[:1] + (size,) + x.shape[2:])
    return jnp.moveaxis(x, dim, 1)


def _merge(x, axis):
    """Merges axes ``axis`` and ``axis + 1``."""
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _split(x, axis, major, minor):
    """Splits axis ``axis`` (of size major * minor) into (major, minor)."""
    return x.reshape(x.shape[:axis] + (major, minor) + x.shape[axis + 1:])


def _per_image_batch(args, dims, **params):
    features, boxes = args
    features_dim, boxes_dim = dims
    size = _batch_size(args, dims)
    boxes = _to_second(boxes, boxes_dim, size)  # [N, B, K, 4]
    if features_dim is None:  # shared images: [N, B * K] boxes
        lead = boxes.shape[1:3]
        results = per_image_p.bind(features, _merge(boxes, 1), **params)
        split = lambda x: _split(x, 1, *lead)  # noqa: E731
    else:  # [N * B] images
        features = _to_second(features, features_dim, size)
        lead = features.shape[:2]
        features = _merge(features, 0)
        _checks.check_features(features, params["layout"])  # N*B*H*W must fit int32
        _check_image_index(boxes, features.shape[0])
        results = per_image_p.bind(features, _merge(boxes, 0), **params)
        split = lambda x: _split(x, 0, *lead)  # noqa: E731
    out, argmax = results
    if not params["with_argmax"]:
        return (split(out), argmax), (1, None)
    return (split(out), split(argmax)), (1, 1)


def _per_image_gather_batch(args, dims, *, layout):
    source, argmax = args
    source_dim, argmax_dim = dims
    size = _batch_size(args, dims)
    argmax = _to_second(argmax, argmax_dim, size)  # [N, B, K, ...]
    if source_dim is None:  # shared images: [N, B * K] entries
        out = per_image_gather_p.bind(source, _merge(argmax, 1), layout=layout)
        return _split(out, 1, *argmax.shape[1:3]), 1
    source = _to_second(source, source_dim, size)
    lead = source.shape[:2]
    source = _merge(source, 0)
    _checks.check_features(source, layout)
    out = per_image_gather_p.bind(source, _merge(argmax, 0), layout=layout)
    return _split(out, 0, *lead), 1


def _per_image_scatter_batch(args, dims, *, layout, features_shape):
    size = _batch_size(args, dims)
    cotangent, argmax = (_merge(_to_second(x, d, size), 0) for x, d in zip(args, dims))
    folded = (features_shape[0] * size,) + tuple(features_shape[1:])
    _check_cells(folded, layout)
    out = per_image_scatter_p.bind(cotangent, argmax, layout=layout, features_shape=folded)
    return _split(out, 0, features_shape[0], size), 1


# ---------------------------------------------------------------------------
# Lowering of the per-image family, for every platform: the flat family (so
# whichever flat lowering the platform has) on rois with batch column
# 0..N-1, converting the argmax between image-local and flat indices with
# elementwise ops. The bodies see whatever block of the images they are
# given: under SPMD each device runs them on its own (``_sharding``).

def _flatten_boxes(x):
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _per_image_forward(features, boxes, *, pooled, spatial_scale, layout, bins, with_argmax):
    """(out[, argmax]) for per-image boxes, argmax image-local."""
    out, argmax = roi_pool_p.bind(features, reference.per_image_rois(boxes), pooled=pooled,
                                  spatial_scale=spatial_scale, layout=layout, bins=bins,
                                  with_argmax=with_argmax)
    out = out.reshape(boxes.shape[:2] + out.shape[1:])
    if not with_argmax:
        return (out,)
    return out, reference.global_to_local(argmax.reshape(out.shape), features.shape, layout)


def _per_image_gather(source, argmax, *, layout):
    flat = reference.local_to_global(argmax, source.shape, layout)
    return (gather_p.bind(source, _flatten_boxes(flat), layout=layout).reshape(argmax.shape),)


def _per_image_scatter(cotangent, argmax, *, layout, features_shape):
    # features_shape is the whole one; a block of images (and channels)
    # scatters into its own block: N and C come from the cotangent.
    _, h, w, _ = _checks.feature_dims(features_shape, layout)
    n, c = cotangent.shape[0], cotangent.shape[-1 if layout == "NHWC" else 2]
    block_shape = (n, h, w, c) if layout == "NHWC" else (n, c, h, w)
    flat = reference.local_to_global(argmax, block_shape, layout)
    return (scatter_p.bind(_flatten_boxes(cotangent), _flatten_boxes(flat), layout=layout,
                           features_shape=block_shape),)


def _plain_aval(aval):
    """The aval without sharding in its type (manual-axis typing kept)."""
    if not varying_axes(aval):
        return jax.core.ShapedArray(aval.shape, aval.dtype, aval.weak_type)
    return aval.update(sharding=NamedSharding(aval.sharding.mesh, PartitionSpec()))


def _per_image_rule(op, body, multiple_results):
    def rule(ctx, *args, **params):
        with_argmax = params.get("with_argmax", True)
        sig = _sharding.signature(op, params["layout"], with_argmax)
        fn = _sharding.maybe_partitioned(ctx, functools.partial(body, **params), sig)

        def lowered(*args):
            results = tuple(fn(*args))
            if not multiple_results:
                return results[0]
            return results if with_argmax else results + (jnp.zeros((0,), np.int32),)

        # Traced on the operands' shapes alone: the body works on any block
        # of the arrays; splitting them is custom_partitioning's (or XLA's).
        plain = ctx.replace(avals_in=[_plain_aval(a) for a in ctx.avals_in])
        out = mlir.lower_fun(lowered, multiple_results=multiple_results)(plain, *args)
        if plain.tokens_out is not None:
            ctx.set_tokens_out(plain.tokens_out)
        return out

    return rule


# ---------------------------------------------------------------------------
# Registration.

for _family in (FLAT, PER_IMAGE):
    for _p in _family[:3]:
        _p.def_impl(_eager_impl(_p))
    _family.forward.def_abstract_eval(functools.partial(_roi_pool_abstract, _family))
    _family.gather.def_abstract_eval(functools.partial(_gather_abstract, _family))
    _family.scatter.def_abstract_eval(functools.partial(_scatter_abstract, _family))
    ad.primitive_jvps[_family.forward] = functools.partial(_roi_pool_jvp, _family)
    ad.primitive_jvps[_family.gather] = _linear_jvp(_family.gather)
    ad.primitive_jvps[_family.scatter] = _linear_jvp(_family.scatter)
    ad.primitive_transposes[_family.gather] = functools.partial(_gather_transpose, _family)
    ad.primitive_transposes[_family.scatter] = functools.partial(_scatter_transpose, _family)

batching.primitive_batchers[roi_pool_p] = _roi_pool_batch
batching.primitive_batchers[gather_p] = _gather_batch
batching.primitive_batchers[scatter_p] = _scatter_batch
batching.primitive_batchers[per_image_p] = _per_image_batch
batching.primitive_batchers[per_image_gather_p] = _per_image_gather_batch
batching.primitive_batchers[per_image_scatter_p] = _per_image_scatter_batch

# Flat family: the default lowering for every platform; _native overrides
# cpu and cuda with the kernels.
mlir.register_lowering(roi_pool_p, mlir.lower_fun(reference.forward, multiple_results=True))
mlir.register_lowering(gather_p, mlir.lower_fun(reference.gather, multiple_results=False))
mlir.register_lowering(scatter_p, mlir.lower_fun(reference.scatter, multiple_results=False))

# Per-image family: through the flat one, on every platform.
mlir.register_lowering(per_image_p, _per_image_rule("forward", _per_image_forward, True))
mlir.register_lowering(per_image_gather_p, _per_image_rule("gather", _per_image_gather, False))
mlir.register_lowering(per_image_scatter_p,
                       _per_image_rule("scatter", _per_image_scatter, False))
# custom_partitioning needs the devices while lowering; only the per-image
# family asks for them, so flat-only programs lower as before (e.g. with
# jax.export for an AbstractMesh).
_sharding.require_devices_during_lowering(*PER_IMAGE[:3])
