"""The roi_pool primitives and their abstract evaluation, AD, batching and lowering rules.

Two families of three primitives each:
- ``roi_pool`` / ``roi_pool_per_image``: (features, rois) -> (output, argmax).
  Not linear; the JVP is the family's gather applied to the features' tangent.
- ``roi_pool_gather`` / ``roi_pool_per_image_gather``: (source, features,
  rois) -> source at the argmax cell of every output element. Linear in
  source.
- ``roi_pool_scatter`` / ``roi_pool_per_image_scatter``: (cotangent,
  features, rois) -> the cotangent added at the argmax cells. Linear in
  cotangent; gather and scatter are each other's transpose.
Together these give grad, jvp, jacfwd/jacrev, hessian and higher orders.

The flat gather and scatter also take ``copies``: their source (gradient)
may hold ``copies`` copies of the features' images, copy-major, a RoI naming
image ``copy * N + n`` of the source and pooling image n of the features.
The per-image primitives may instead have a leading batch axis (see their
batching rules), on the features too or not: a batch that shares the
features pools its copies of them. That is how a vmap over tangents or
cotangents alone (jacfwd, jacrev, batched JVPs and VJPs) batches without
copying the features it shares.

Gather and scatter take the forward's operands instead of its argmax and
recompute the argmax inside the kernel: a stored argmax would be as large as
the output, written by the forward and read back by the backward, which
would double the memory traffic of a training step. Their derivative with
respect to features and rois is zero (the argmax is piecewise constant).

The flat family takes rois ``[R, 5]`` and its argmax holds flat cell indices
``(n * H + h) * W + w``; it is what the kernels implement. The per-image
family takes boxes ``[N, K, 4]``, and its argmax ``[N, K, ...]`` holds
image-local cell indices ``h * W + w``, so that any block of images is a
self-contained problem. Its lowering runs the flat family on rois with batch
column 0..N-1 (with a batch axis, 0..B * N - 1: the batch taken into N),
inside custom_partitioning where the module is compiled for
several devices (``_sharding``): sharded along the images, each device pools
its own.

Native flat lowerings are registered in ``_native``; the pure-JAX ones from
``reference`` are the default for any other platform.
"""

from __future__ import annotations

import functools
import math
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
        # Under jax.disable_jit() the jit would call this impl again, forever;
        # the kernel only runs compiled, so compile this one call regardless.
        with jax.disable_jit(False):
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


def _batch_axes(features, rois) -> dict:
    """Which operands of a per-image call have a leading batch axis (see
    its batching rules): all but the features, or all."""
    return dict(batched=rois.ndim == 4, features_batched=features.ndim == 5)


def _result_specs(family, op, layout, operands):
    if not family.per_image:
        return (None, None)
    sig = _sharding.signature(op, layout, **_batch_axes(*operands[-2:]))
    return _sharding.result_specs(sig, operands)


def _pooled_shape(features, rois, pooled, layout):
    """[R, 5] rois give [R, ...]; per-image [N, K, 4] boxes give [N, K, ...]."""
    c = _checks.feature_dims(features.shape[-4:], layout)[3]
    return tuple(rois.shape[:-1]) + _checks.pooled_shape(0, pooled, c, layout)[1:]


def _roi_pool_abstract(family, features, rois, *, pooled, spatial_scale, layout, bins,
                       with_argmax):
    axes = _batch_axes(features, rois)
    if family.per_image and axes["batched"] != axes["features_batched"]:
        # The forward pools each batch element's own images (shared features
        # with batched boxes go into K instead: see the batching rules).
        raise ValueError(f"roi_pool_per_image: features {features.shape} and boxes "
                         f"{rois.shape} must both have a batch axis or neither")
    shape = _pooled_shape(features, rois, pooled, layout)
    operands = (features, rois)
    specs = _result_specs(family, "forward", layout, operands)
    out = _result_aval(shape, features.dtype, operands, specs[0])
    if not with_argmax:  # the kernel skips the argmax and returns an empty one
        return out, _result_aval((0,), np.int32, operands)
    return out, _result_aval(shape, np.int32, operands, specs[1])


def _gather_abstract(family, source, features, rois, *, pooled, layout, **_):
    operands = (source, features, rois)
    spec = _result_specs(family, "gather", layout, operands)[0]
    return _result_aval(_pooled_shape(features, rois, pooled, layout), source.dtype, operands,
                        spec)


def _scatter_abstract(family, cotangent, features, rois, *, layout, copies=1, **_):
    operands = (cotangent, features, rois)
    spec = _result_specs(family, "scatter", layout, operands)[0]
    if family.per_image:
        shape = rois.shape[:-3] + features.shape[-4:]
    else:
        shape = (features.shape[0] * copies,) + features.shape[1:]
    return _result_aval(tuple(shape), cotangent.dtype, operands, spec)


# ---------------------------------------------------------------------------
# Differentiation.

def _zero_like(x):
    return ad.Zero(jax.typeof(x).to_tangent_aval())


def _roi_pool_jvp(family, primals, tangents, *, with_argmax, **config):
    features, rois = primals
    features_dot, _ = tangents  # rois only choose cells: zero derivative
    out, argmax = family.forward.bind(features, rois, with_argmax=with_argmax, **config)
    if type(features_dot) is ad.Zero:
        out_dot = _zero_like(out)
    else:
        copies = {} if family.per_image else {"copies": 1}
        out_dot = family.gather.bind(features_dot, features, rois, **copies, **config)
    return (out, argmax), (out_dot, _zero_like(argmax))


def _linear_jvp(primitive):
    """JVP of gather or scatter: linear in the first operand; features and
    rois only choose the cells (zero derivative)."""

    def jvp(primals, tangents, **config):
        value, features, rois = primals
        out = primitive.bind(value, features, rois, **config)
        if type(tangents[0]) is ad.Zero:
            return out, _zero_like(out)
        return out, primitive.bind(tangents[0], features, rois, **config)

    return jvp


def _typed_like(x, aval):
    """``x`` resharded to ``aval``'s sharding type where they differ (explicit
    mesh axes only; e.g. the gradient of replicated features whose per-image
    pooling was split along the boxes' sharding)."""
    want = getattr(aval, "sharding", None)
    have = getattr(jax.typeof(x), "sharding", None)
    if _mesh(aval) is None or want is None or have is None:
        return x
    if _sharding.spec_entries(want, x.ndim) == _sharding.spec_entries(have, x.ndim):
        return x
    return jax.sharding.reshard(x, want)


def _transpose_to(other):
    """Transpose rule of gather (``other`` = scatter) or scatter (``other`` = gather)."""

    def transpose(cotangent, value, features, rois, **config):
        assert ad.is_undefined_primal(value)
        assert not (ad.is_undefined_primal(features) or ad.is_undefined_primal(rois))
        if type(cotangent) is ad.Zero:
            return [ad.Zero(value.aval), None, None]
        out = other.bind(cotangent, features, rois, **config)
        return [_typed_like(out, value.aval), None, None]

    return transpose


# ---------------------------------------------------------------------------
# Batching of the flat family: the mapped axis is folded into the image axis
# N and the RoI axis R, so a vmapped call is one kernel launch.

def _to_front(x, dim, size):
    """Moves the mapped axis to the front, broadcasting an unmapped operand."""
    if dim is None:
        return jnp.broadcast_to(x, (size,) + x.shape)
    return jnp.moveaxis(x, dim, 0)


def _spec(x) -> tuple:
    """x's PartitionSpec, one entry per axis (all None unless sharded in its type)."""
    return _sharding.spec_entries(getattr(jax.typeof(x), "sharding", None), x.ndim)


def _merge(x, axis):
    """Merges axes ``axis`` and ``axis + 1``. With explicitly sharded types the
    merged axis is sharded like the major one; a sharded minor axis has no
    such equivalent, and the reshape gathers it."""
    shape = x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:]
    spec = _spec(x)
    if spec[axis] is None and spec[axis + 1] is None:
        return x.reshape(shape)
    mesh = jax.typeof(x).sharding.mesh
    merged = spec[:axis + 1] + spec[axis + 2:]
    return jnp.reshape(x, shape, out_sharding=NamedSharding(mesh, PartitionSpec(*merged)))


def _split(x, axis, major, minor):
    """Splits axis ``axis`` (of size major * minor) into (major, minor)."""
    return x.reshape(x.shape[:axis] + (major, minor) + x.shape[axis + 1:])


def _batch_size(args, dims):
    return next(a.shape[d] for a, d in zip(args, dims) if d is not None)


def _unless_empty(primitive, rule):
    """A batching rule that answers a mapped axis of size 0 with empty results:
    the rules fold the mapped axis into N or R and split results by its size,
    and N = 0 is no valid feature map."""

    def batched(args, dims, **params):
        if _batch_size(args, dims) != 0:
            return rule(args, dims, **params)
        element = [jax.ShapeDtypeStruct(a.shape if d is None else a.shape[:d] + a.shape[d + 1:],
                                        a.dtype) for a, d in zip(args, dims)]
        results = jax.eval_shape(functools.partial(primitive.bind, **params), *element)
        if not primitive.multiple_results:
            return jnp.zeros((0,) + results.shape, results.dtype), 0
        out, argmax = results
        if not params["with_argmax"]:  # the unbatched placeholder stays one
            return (jnp.zeros((0,) + out.shape, out.dtype), jnp.zeros((0,), np.int32)), (0, None)
        return tuple(jnp.zeros((0,) + r.shape, r.dtype) for r in results), (0, 0)

    return batched


def _fold_leading(x, dim, size):
    """Folds the mapped axis into the leading one (N of a feature-shaped
    operand, R of rois and pooled ones) batch-major: [B, N, ...] ->
    [B * N, ...], broadcasting an unmapped operand."""
    return _merge(_to_front(x, dim, size), 0)


def _fold_rois(rois, dim, size, images: int, plane: int):
    """Folds the mapped axis of [R, 5] rois into R, re-indexing the RoIs of batch
    element b into images b * images + i of images folded batch-major
    (``plane`` = H * W: the folded images' cells must fit the int32 argmax)."""
    rois = _to_front(rois, dim, size)
    _checks.check_cell_count(size * images, plane)
    _checks.check_image_count(rois.dtype, size * images)
    # Invalid batch indices stay invalid (they must not land in a neighbouring
    # copy). Unlike the kernels, this compares in the rois' dtype: exact, as
    # check_image_count keeps float32 totals within 2**24.
    b = rois[..., 0]
    offset = (jnp.arange(size, dtype=rois.dtype) * images)[:, None]
    rois = rois.at[..., 0].set(jnp.where((b > -1) & (b < images), jnp.trunc(b) + offset, -1))
    return _merge(rois, 0)


def _element_dims(features, dim, layout) -> tuple[int, int, int, int]:
    """(N, H, W, C) of one batch element of features mapped along ``dim`` (or None)."""
    shape = features.shape if dim is None else features.shape[:dim] + features.shape[dim + 1:]
    return _checks.feature_dims(shape, layout)


def _copies_axis(features, copies):
    """Features [B, ...] -> [B, copies, ...], each batch element's copies."""
    copied = jnp.expand_dims(features, 1)
    return jnp.broadcast_to(copied, copied.shape[:1] + (copies,) + copied.shape[2:])


def _own_copies(features, dim, size, copies):
    """Features [B, N * copies, ...]: every batch element's own copy of the
    images that a gather's source (a scatter's gradient) holds, copy-major."""
    features = _to_front(features, dim, size)
    if copies == 1:
        return features
    # (_merge gathers an N sharded in the types.)
    return _merge(_copies_axis(features, copies), 1)


def _roi_pool_batch(args, dims, *, with_argmax, **config):
    features, rois = args
    size = _batch_size(args, dims)
    fold = dims[0] is not None
    if fold:
        n, h, w, _ = _element_dims(features, dims[0], config["layout"])
        features = _fold_leading(features, dims[0], size)
        rois = _fold_rois(rois, dims[1], size, n, h * w)
    else:
        rois = _fold_leading(rois, dims[1], size)
    out, argmax = roi_pool_p.bind(features, rois, with_argmax=with_argmax, **config)
    out = _split(out, 0, size, out.shape[0] // size)
    if not with_argmax:
        return (out, argmax), (0, None)
    argmax = _split(argmax, 0, size, argmax.shape[0] // size)
    if fold:
        # The kernel indexed the folded images; make each argmax index its own copy.
        offset = jnp.arange(size, dtype=np.int32) * (n * h * w)
        offset = offset.reshape((-1,) + (1,) * (argmax.ndim - 1))
        argmax = jnp.where(argmax >= 0, argmax - offset, -1)
    return (out, argmax), (0, 0)


def _argmax_op_batch(primitive, value_like_features):
    """Batching rule of the flat gather (``value_like_features``: its source is
    feature-shaped) or scatter (its cotangent is pooled; its result feature-shaped).

    Only a gather's rois mapped: the mapped axis goes into R. Otherwise every batch
    element has its own source (or gradient): the mapped axis goes into its
    images, batch-major, and each element's RoIs are re-indexed into them.
    Shared features are not copied: the kernel pools features image
    ``i % N`` for image i (copies, copy-major). Mapped features are folded
    alike, each element with its own copy."""

    def rule(args, dims, *, copies, **config):
        value, features, rois = args
        size = _batch_size(args, dims)
        if value_like_features and dims[0] is None and dims[1] is None:
            out = primitive.bind(value, features, _fold_leading(rois, dims[2], size),
                                 copies=copies, **config)
            return _split(out, 0, size, out.shape[0] // size), 0
        n, h, w, _ = _element_dims(features, dims[1], config["layout"])
        shared = dims[1] is None
        if not shared:
            features = _fold_leading(_own_copies(features, dims[1], size, copies), 0, size)
        images = n * copies  # per batch element
        rois = _fold_rois(rois, dims[2], size, images, h * w)
        out = primitive.bind(_fold_leading(value, dims[0], size), features, rois,
                             copies=copies * size if shared else 1, **config)
        return _split(out, 0, size, out.shape[0] // size), 0

    return rule


# ---------------------------------------------------------------------------
# Batching of the per-image family: no index offsets (the argmax is
# image-local). A per-image call may have a leading batch axis: boxes
# [B, N, K, 4], with a gather's source and a scatter's cotangent and
# gradient [B, N, ...], pooled values [B, N, K, ...]. Its features have the
# axis too (each batch element its own) or not (shared: the batch pools B
# copies of the images, read once). A vmap's mapped axis becomes that axis,
# or merges with the one the call has; it never folds into N, so that mesh
# axes sharding N and mesh axes sharding the batch both stay. Shared
# features and a shared gather source take the mapped axis into the box
# axis K instead.

def _boxes_into_k(boxes, dim):
    """Shared images: the boxes' mapped axis goes into their K, ahead of it,
    [..., N, S, K, 4] -> [..., N, S * K, 4]. Returns the boxes and the split
    of a result: result -> (it with the mapped axis split out, its dim)."""
    k = boxes.ndim - 3  # the element's K axis
    boxes = jnp.moveaxis(boxes, dim, k)
    lead = boxes.shape[k:k + 2]
    return _merge(boxes, k), lambda r: (_split(r, k, *lead), k)


def _as_batch_axis(operands, size, call_batched):
    """Operands with the mapped axis S in front: S is their batch axis, or,
    where the call has one (B, behind S), merged with it, [S, B, ...] ->
    [S * B, ...], or [B * S, ...] where only B of the first is sharded in
    the types (explicit mesh axes), which keeps B sharded. Returns them and
    the split of a result: result -> (it with the mapped axis split out, its dim)."""
    if not call_batched:
        return list(operands), lambda r: (r, 0)
    inner = operands[0].shape[1]
    spec = _spec(operands[0])
    if spec[0] is None and spec[1] is not None:
        merged = [_merge(jnp.swapaxes(x, 0, 1), 0) for x in operands]
        return merged, lambda r: (_split(r, 0, inner, size), 1)
    return [_merge(x, 0) for x in operands], lambda r: (_split(r, 0, size, inner), 0)


def _check_images(boxes, features, layout):
    """The images of a batched call (batch times N) must have cells within
    the int32 argmax and exact indices in the boxes' dtype (its lowering
    numbers them in one flat call)."""
    images = math.prod(boxes.shape[:-2])
    _, h, w, _ = _checks.feature_dims(features.shape[-4:], layout)
    _checks.check_cell_count(images, h * w)
    _checks.check_image_count(boxes.dtype, images)


def _per_image_batch(args, dims, *, with_argmax, **config):
    features, boxes = args
    if dims[0] is None:  # shared images
        boxes, split = _boxes_into_k(boxes, dims[1])
    else:
        size = _batch_size(args, dims)
        features, boxes = _to_front(features, dims[0], size), _to_front(boxes, dims[1], size)
        (features, boxes), split = _as_batch_axis((features, boxes), size, boxes.ndim == 5)
        _check_images(boxes, features, config["layout"])
    out, argmax = per_image_p.bind(features, boxes, with_argmax=with_argmax, **config)
    out, out_dim = split(out)
    if not with_argmax:
        return (out, argmax), (out_dim, None)
    return (out, split(argmax)[0]), (out_dim, out_dim)


def _per_image_argmax_op_batch(primitive, value_like_features):
    """Batching rule of the per-image gather (``value_like_features``) or
    scatter. Only a gather's boxes mapped: the mapped axis goes into K.
    Otherwise every batch element has its own source (gradient): the mapped
    axis becomes (or merges with) the call's batch axis. Shared features
    stay shared (batched ones by taking their batch into N); mapped ones
    of a call whose batch shares them get their own copies."""

    def rule(args, dims, **config):
        value, features, boxes = args
        if value_like_features and dims[0] is None and dims[1] is None:
            boxes, split = _boxes_into_k(boxes, dims[2])
            return split(primitive.bind(value, features, boxes, **config))
        size = _batch_size(args, dims)
        value, boxes = _to_front(value, dims[0], size), _to_front(boxes, dims[2], size)
        batched = boxes.ndim == 5  # the call has a batch axis, [S, B, N, K, 4] now
        images = None  # the element's [B, N] images, where taken into N
        if dims[1] is not None:
            features = _to_front(features, dims[1], size)
            if batched and features.ndim == 5:  # each element its own copies
                features = _copies_axis(features, boxes.shape[1])
        elif features.ndim == 5:  # batched features shared by the mapped axis
            images = features.shape[:2]
            features = _merge(features, 0)
            value, boxes = _merge(value, 1), _merge(boxes, 1)
            batched = False
        operands = [value, boxes] + ([features] if dims[1] is not None else [])
        operands, split = _as_batch_axis(operands, size, batched)
        value, boxes = operands[:2]
        if dims[1] is not None:
            features = operands[2]
        _check_images(boxes, features, config["layout"])
        out, out_dim = split(primitive.bind(value, features, boxes, **config))
        if images is not None:
            out = _split(out, 1, *images)
        return out, out_dim

    return rule


# ---------------------------------------------------------------------------
# Lowering of the per-image family, for every platform: the flat family (so
# whichever flat lowering the platform has) on rois with batch column
# 0..N-1. The bodies see whatever block of the images (and of the batch)
# they are given: under SPMD each device runs them on its own (``_sharding``).

def _flat_call(features, boxes):
    """(features, rois, copies) of the flat call that pools per-image boxes:
    a batch axis is taken into N (with shared features, as the images of the
    copies of them that a gather's source or scatter's gradient holds)."""
    copies = boxes.shape[0] if boxes.ndim == 4 and features.ndim == 4 else 1
    rois = reference.per_image_rois(_leading_merged(boxes, boxes.ndim - 2))
    return _leading_merged(features, features.ndim - 3), rois, copies


def _leading_merged(x, count):
    """x with its first ``count`` axes merged into one."""
    return x.reshape((math.prod(x.shape[:count]),) + x.shape[count:])


def _per_image_forward(features, boxes, *, with_argmax, **config):
    """(out[, argmax]) for per-image boxes, argmax image-local."""
    features, rois, _ = _flat_call(features, boxes)
    out, argmax = roi_pool_p.bind(features, rois, with_argmax=with_argmax, **config)
    by_image = (features.shape[0], boxes.shape[-2]) + out.shape[1:]  # [B * N, K, ...]
    out = out.reshape(boxes.shape[:-1] + out.shape[1:])
    if not with_argmax:
        return (out,)
    argmax = reference.global_to_local(argmax.reshape(by_image), features.shape, config["layout"])
    return out, argmax.reshape(out.shape)


def _per_image_gather(source, features, boxes, **config):
    features, rois, copies = _flat_call(features, boxes)
    out = gather_p.bind(_leading_merged(source, source.ndim - 3), features, rois,
                        copies=copies, **config)
    return (out.reshape(boxes.shape[:-1] + out.shape[1:]),)


def _per_image_scatter(cotangent, features, boxes, **config):
    shape = boxes.shape[:-3] + features.shape[-4:]
    features, rois, copies = _flat_call(features, boxes)
    pooled = _leading_merged(cotangent, boxes.ndim - 1)
    return (scatter_p.bind(pooled, features, rois, copies=copies, **config).reshape(shape),)


def plain_aval(aval):
    """The aval without sharding in its type (manual-axis typing kept)."""
    if not varying_axes(aval):
        return jax.core.ShapedArray(aval.shape, aval.dtype, aval.weak_type)
    return aval.update(sharding=NamedSharding(aval.sharding.mesh, PartitionSpec()))


def _per_image_rule(op, body, multiple_results):
    def rule(ctx, *args, **params):
        with_argmax = params.get("with_argmax", True)
        sig = _sharding.signature(op, params["layout"], with_argmax,
                                  **_batch_axes(*ctx.avals_in[-2:]))
        fn = _sharding.maybe_partitioned(ctx, functools.partial(body, **params), sig)

        def lowered(*args):
            results = tuple(fn(*args))
            if not multiple_results:
                return results[0]
            return results if with_argmax else results + (jnp.zeros((0,), np.int32),)

        # Traced on the operands' shapes alone: the body works on any block
        # of the arrays; splitting them is custom_partitioning's (or XLA's).
        plain = ctx.replace(avals_in=[plain_aval(a) for a in ctx.avals_in])
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
    ad.primitive_transposes[_family.gather] = _transpose_to(_family.scatter)
    ad.primitive_transposes[_family.scatter] = _transpose_to(_family.gather)

for _p, _rule in ((roi_pool_p, _roi_pool_batch),
                  (gather_p, _argmax_op_batch(gather_p, True)),
                  (scatter_p, _argmax_op_batch(scatter_p, False)),
                  (per_image_p, _per_image_batch),
                  (per_image_gather_p, _per_image_argmax_op_batch(per_image_gather_p, True)),
                  (per_image_scatter_p, _per_image_argmax_op_batch(per_image_scatter_p, False))):
    batching.primitive_batchers[_p] = _unless_empty(_p, _rule)

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
