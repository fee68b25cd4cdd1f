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

Gather and scatter also take ``copies``: their source (gradient) may hold
``copies`` copies of the features' images, a RoI naming image i of the
source and pooling image n of the features. In the flat family the copies
are folded into the images, copy-major (image ``copy * N + n``); in the
per-image family they are a leading axis of the source (gradient), boxes
and pooled values, ``[copies, N, ...]``, which any mesh axes may shard
beside N. That is how a vmap over tangents or cotangents alone (jacfwd,
jacrev, batched JVPs and VJPs) batches without copying the features it
shares.

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
column 0..N-1 (with a copies axis, 0..copies * N - 1: the images of the
copies, copy-major), inside custom_partitioning where the module is compiled for
several devices (``_sharding``): sharded along the images, each device pools
its own.

Native flat lowerings are registered in ``_native``; the pure-JAX ones from
``reference`` are the default for any other platform.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
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


def _result_specs(family, op, layout, operands, copies=1):
    if not family.per_image:
        return (None, None)
    sig = _sharding.signature(op, layout, copies_axis=copies != 1)
    return _sharding.result_specs(sig, operands)


def _pooled_shape(features, rois, pooled, layout):
    """[R, 5] rois give [R, ...]; per-image [N, K, 4] boxes give [N, K, ...]."""
    c = _checks.feature_dims(features.shape, layout)[3]
    return tuple(rois.shape[:-1]) + _checks.pooled_shape(0, pooled, c, layout)[1:]


def _roi_pool_abstract(family, features, rois, *, pooled, spatial_scale, layout, bins,
                       with_argmax):
    shape = _pooled_shape(features, rois, pooled, layout)
    operands = (features, rois)
    specs = _result_specs(family, "forward", layout, operands)
    out = _result_aval(shape, features.dtype, operands, specs[0])
    if not with_argmax:  # the kernel skips the argmax and returns an empty one
        return out, _result_aval((0,), np.int32, operands)
    return out, _result_aval(shape, np.int32, operands, specs[1])


def _gather_abstract(family, source, features, rois, *, pooled, layout, copies, **_):
    operands = (source, features, rois)
    spec = _result_specs(family, "gather", layout, operands, copies)[0]
    return _result_aval(_pooled_shape(features, rois, pooled, layout), source.dtype, operands,
                        spec)


def _scatter_abstract(family, cotangent, features, rois, *, layout, copies, **_):
    operands = (cotangent, features, rois)
    spec = _result_specs(family, "scatter", layout, operands, copies)[0]
    if copies == 1:
        shape = features.shape
    elif family.per_image:
        shape = (copies,) + features.shape
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
        out_dot = family.gather.bind(features_dot, features, rois, copies=1, **config)
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
    such equivalent and is gathered first."""
    shape = x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:]
    spec = _spec(x)
    if spec[axis] is None and spec[axis + 1] is None:
        return x.reshape(shape)
    mesh = jax.typeof(x).sharding.mesh
    if spec[axis + 1] is not None:
        gathered = spec[:axis + 1] + (None,) + spec[axis + 2:]
        x = jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec(*gathered)))
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


def _own_copies(features, dim, size, copies):
    """Features [B, N * copies, ...]: every batch element's own copy of the
    images that a gather's source (a scatter's gradient) holds, copy-major."""
    features = _to_front(features, dim, size)
    if copies == 1:
        return features
    copied = jnp.expand_dims(features, 1)
    copied = jnp.broadcast_to(copied, copied.shape[:1] + (copies,) + copied.shape[2:])
    return _merge(copied, 1)  # (which gathers an N sharded in the types first)


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
# image-local). Shared (unmapped) images take the mapped axis into the box
# axis K, or, where every batch element has its own gather source (scatter
# gradient), into the copies axis; neither copies features. Mapped images
# are folded image-major, [N, B, ...] -> [N * B, ...], which keeps a
# sharded N sharded alike, or batch-major where only the mapped axis is
# sharded in the types (explicit mesh axes), which keeps that one sharded.

def _to_second(x, dim, size):
    """Moves the mapped axis to position 1, broadcasting an unmapped operand."""
    if dim is None:
        x = jnp.expand_dims(x, 1)
        return jnp.broadcast_to(x, x.shape[:1] + (size,) + x.shape[2:])
    return jnp.moveaxis(x, dim, 1)


def _batch_major(operands, dims) -> bool:
    """Whether some operand's mapped axis is sharded while its N (the element's
    first axis) is not."""
    for x, dim in zip(operands, dims):
        if dim is not None:
            spec = _spec(x)
            if spec[dim] is not None and spec[1 if dim == 0 else 0] is None:
                return True
    return False


def _boxes_into_k(boxes, dim):
    """Shared images: the boxes' mapped axis goes into their K, ahead of it,
    [..., N, B, K, 4] -> [..., N, B * K, 4]. Returns the boxes and the split
    of a result: result -> (it with the batch axis split out, batch dim)."""
    k = boxes.ndim - 3  # the element's K axis
    boxes = jnp.moveaxis(boxes, dim, k)
    lead = boxes.shape[k:k + 2]
    return _merge(boxes, k), lambda r: (_split(r, k, *lead), k)


class _PerImageFold(NamedTuple):
    """How a batched per-image call was folded into one unbatched call."""
    fold: Callable   # (operand, its mapped dim) -> it folded like the images
    split: Callable  # result -> (result with the batch axis split out, batch dim)


def _fold_per_image(boxes, boxes_dim, size, plane, *, batch_major):
    """(boxes, _PerImageFold): the per-image counterpart of ``_fold_rois``.
    The mapped axis goes into N of the boxes, which counts the images they
    name, ahead of it if ``batch_major`` (see ``_batch_major``); ``fold``
    folds the operands with images (features, a source, a cotangent) alike.
    The folded images' cells must fit the int32 argmax (``plane`` = H * W)."""
    move = _to_front if batch_major else _to_second

    def fold(x, dim):
        return _merge(move(x, dim, size), 0)

    boxes = fold(boxes, boxes_dim)
    _checks.check_cell_count(boxes.shape[0], plane)
    _checks.check_image_count(boxes.dtype, boxes.shape[0])
    n = boxes.shape[0] // size
    lead, out_dim = ((size, n), 0) if batch_major else ((n, size), 1)
    return boxes, _PerImageFold(fold, lambda r: (_split(r, 0, *lead), out_dim))


def _per_image_batch(args, dims, *, with_argmax, **config):
    features, boxes = args
    if dims[0] is None:
        boxes, split = _boxes_into_k(boxes, dims[1])
    else:
        size = _batch_size(args, dims)
        _, h, w, _ = _element_dims(features, dims[0], config["layout"])
        boxes, how = _fold_per_image(boxes, dims[1], size, h * w,
                                     batch_major=_batch_major(args[:1], dims[:1]))
        features, split = how.fold(features, dims[0]), how.split
    out, argmax = per_image_p.bind(features, boxes, with_argmax=with_argmax, **config)
    out, out_dim = split(out)
    if not with_argmax:
        return (out, argmax), (out_dim, None)
    return (out, split(argmax)[0]), (out_dim, out_dim)


def _batch_into_copies(primitive, value, value_dim, features, boxes, boxes_dim, size, copies,
                       config):
    """A per-image gather or scatter at shared images for a batch of sources
    (cotangents): the mapped axis becomes the copies axis, ahead of the
    copies the call has, [B, C, N, ...] -> [B * C, N, ...], or after them
    where only they are sharded in the types (explicit mesh axes), which
    keeps them sharded: [C, B, N, ...] -> [C * B, N, ...]."""
    value, boxes = _to_front(value, value_dim, size), _to_front(boxes, boxes_dim, size)
    if copies == 1 and size == 1:  # one copy: no copies axis
        return primitive.bind(value[0], features, boxes[0], copies=1, **config)[None], 0
    out_dim = 0
    if copies != 1:
        spec = _spec(value)
        if spec[0] is None and spec[1] is not None:
            value, boxes, out_dim = jnp.swapaxes(value, 0, 1), jnp.swapaxes(boxes, 0, 1), 1
        value, boxes = _merge(value, 0), _merge(boxes, 0)
    _, h, w, _ = _checks.feature_dims(features.shape, config["layout"])
    images = boxes.shape[0] * boxes.shape[1]
    _checks.check_cell_count(images, h * w)
    _checks.check_image_count(boxes.dtype, images)
    out = primitive.bind(value, features, boxes, copies=copies * size, **config)
    if copies == 1:
        return out, 0
    return _split(out, 0, *((copies, size) if out_dim else (size, copies))), out_dim


def _per_image_argmax_op_batch(primitive, value_like_features):
    """Batching rule of the per-image gather (``value_like_features``) or
    scatter, as ``_argmax_op_batch`` for the flat ones. Shared images: a
    shared gather source too takes the mapped axis into K, otherwise it goes
    into the copies axis. Mapped images: the call's copies become images of
    each batch element, which pools its own copies of its features, folded
    as in the forward."""

    def rule(args, dims, *, copies, **config):
        value, features, boxes = args
        size = _batch_size(args, dims)
        if dims[1] is None:
            if value_like_features and dims[0] is None:
                boxes, split = _boxes_into_k(boxes, dims[2])
                return split(primitive.bind(value, features, boxes, copies=copies, **config))
            return _batch_into_copies(primitive, value, dims[0], features, boxes, dims[2], size,
                                      copies, config)
        value_dim, boxes_dim = dims[0], dims[2]
        if copies != 1:  # [B, C, N, ...] -> [B, C * N, ...]
            value, boxes = (_merge(_to_front(x, d, size), 1)
                            for x, d in ((value, value_dim), (boxes, boxes_dim)))
            value_dim = boxes_dim = 0
        features = _own_copies(features, dims[1], size, copies)
        _, h, w, _ = _element_dims(features, 0, config["layout"])
        boxes, how = _fold_per_image(boxes, boxes_dim, size, h * w,
                                     batch_major=_batch_major((value, features), (value_dim, 0)))
        out = primitive.bind(how.fold(value, value_dim), how.fold(features, 0), boxes, copies=1,
                             **config)
        out, out_dim = how.split(out)
        if copies == 1:
            return out, out_dim
        # The element's images back into [C, N, ...]; folded after them
        # (out_dim 1), the result [C * N, B, ...] has its batch axis at 2 then.
        images_at = 1 - out_dim
        out = _split(out, images_at, copies, out.shape[images_at] // copies)
        return out, 2 if out_dim == 1 else 0

    return rule


# ---------------------------------------------------------------------------
# Lowering of the per-image family, for every platform: the flat family (so
# whichever flat lowering the platform has) on rois with batch column
# 0..N-1. The bodies see whatever block of the images (and of the copies)
# they are given: under SPMD each device runs them on its own (``_sharding``).

def _per_image_forward(features, boxes, *, with_argmax, **config):
    """(out[, argmax]) for per-image boxes, argmax image-local."""
    out, argmax = roi_pool_p.bind(features, reference.per_image_rois(boxes),
                                  with_argmax=with_argmax, **config)
    out = out.reshape(boxes.shape[:2] + out.shape[1:])
    if not with_argmax:
        return (out,)
    return out, reference.global_to_local(argmax.reshape(out.shape), features.shape,
                                          config["layout"])


def _flat_rois(boxes, copies):
    """(rois, copies of the images they name) for the boxes of a per-image
    gather or scatter: with a copies axis, [copies, N, K, 4] boxes name the
    images ``copy * N + n`` of the source (gradient)."""
    if copies == 1:
        return reference.per_image_rois(boxes), 1
    return reference.per_image_rois(boxes.reshape((-1,) + boxes.shape[2:])), boxes.shape[0]


def _per_image_gather(source, features, boxes, *, copies, **config):
    rois, local = _flat_rois(boxes, copies)
    out = gather_p.bind(source.reshape((-1,) + features.shape[1:]), features, rois,
                        copies=local, **config)
    return (out.reshape(boxes.shape[:-1] + out.shape[1:]),)


def _per_image_scatter(cotangent, features, boxes, *, copies, **config):
    rois, local = _flat_rois(boxes, copies)
    pooled = cotangent.reshape((-1,) + cotangent.shape[boxes.ndim - 1:])
    grad = scatter_p.bind(pooled, features, rois, copies=local, **config)
    return (grad.reshape(boxes.shape[:-3] + features.shape),)


def plain_aval(aval):
    """The aval without sharding in its type (manual-axis typing kept)."""
    if not varying_axes(aval):
        return jax.core.ShapedArray(aval.shape, aval.dtype, aval.weak_type)
    return aval.update(sharding=NamedSharding(aval.sharding.mesh, PartitionSpec()))


def _per_image_rule(op, body, multiple_results):
    def rule(ctx, *args, **params):
        with_argmax = params.get("with_argmax", True)
        sig = _sharding.signature(op, params["layout"], with_argmax,
                                  copies_axis=params.get("copies", 1) != 1)
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
