"""SPMD partitioning of the per-image roi_pool calls.

With per-image boxes ``[N, K, 4]`` every image only meets its own boxes and
the argmax is image-local, so any block of images (and of boxes, and of
channels) is a self-contained problem. The lowerings of the three per-image
primitives wrap their bodies in ``jax.experimental.custom_partitioning`` with
the rule below, so XLA's SPMD partitioner (Shardy, through the sharding rule,
or GSPMD, through the callbacks) runs one kernel call per device on its own
images instead of gathering the feature maps. Sharded rows or columns of the
features (and box coordinates, pooled bins) are gathered first.

custom_partitioning is used at the lowering level only (the jaxpr keeps the
primitives with their AD and batching rules), and only where it can split
anything: not for one device or fully manual code (``shard_map``), where the
body is inlined, nor for ``jax.export``, whose modules must not hold the
process-local CustomSPMDPartitioning call (an exported module is partitioned
by XLA alone when it runs: correct, but it may gather the features).

It needs the devices while lowering, which jit provides for primitives in a
private registry (``require_devices_during_lowering``); as a consequence
per-image calls cannot be lowered for an AbstractMesh alone.

The flat ``[R, 5]`` form is not partitioned: any row may name any image, so
XLA replicates its operands (correct, but it gathers the features).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec, use_abstract_mesh

# Dimension labels: n image, k box, c channel, h/w feature rows/columns,
# i/j pooled rows/columns, d box coordinate, b batch (a leading axis of a
# batched call: see the per-image batching rules in ``_primitives``).


class Signature(NamedTuple):
    """Dimension labels of the operands and results of one per-image call.

    Labels in ``keep`` may be sharded (each shard is computed independently);
    all others must be whole on every device.
    """

    operands: tuple[tuple[str, ...], ...]
    results: tuple[tuple[str, ...], ...]
    keep: frozenset[str]

    def fixed_labels(self) -> tuple[str, ...]:
        """Labels that must not be sharded, in order of first appearance
        (Shardy wants its special factors sorted by factor index)."""
        labels = [label for dims in self.operands + self.results for label in dims]
        return tuple(dict.fromkeys(label for label in labels if label not in self.keep))

    def shardy_rule(self) -> str:
        def side(arrays):
            return ", ".join(" ".join(dims) for dims in arrays)

        return f"{side(self.operands)} -> {side(self.results)}"


def signature(op: str, layout: str, with_argmax: bool = True, *, batched: bool = False,
              features_batched: bool = False) -> Signature:
    """op: "forward" (features, boxes) -> (out[, argmax]); "gather" (source,
    features, boxes) -> values; "scatter" (cotangent, features, boxes) ->
    features-shaped sum. ``batched``: the boxes, and with them the pooled
    values and a gather's source or scatter's gradient, have a leading batch
    axis; ``features_batched``: so do the features (else the batch shares
    them). Each device pools its block of the batch for its block of the
    images."""
    features = ("n", "h", "w", "c") if layout == "NHWC" else ("n", "c", "h", "w")
    pooled = ("n", "k", "i", "j", "c") if layout == "NHWC" else ("n", "k", "c", "i", "j")
    boxes = ("n", "k", "d")
    like_features = features
    if batched:
        like_features, pooled, boxes = (("b",) + dims for dims in (features, pooled, boxes))
    if features_batched:
        features = ("b",) + features
    if op == "forward":
        return Signature((features, boxes), (pooled, pooled)[:1 + with_argmax],
                         frozenset("bnkc"))
    if op == "gather":
        return Signature((like_features, features, boxes), (pooled,), frozenset("bnkc"))
    if op == "scatter":
        # Boxes of one image add into the same cells: sharding k would need a
        # sum across devices, so k is gathered instead (it is small).
        return Signature((pooled, features, boxes), (like_features,), frozenset("bnc"))
    raise ValueError(op)


def spec_entries(sharding, ndim: int) -> tuple:
    """A sharding's PartitionSpec with one entry per axis (all None if not a NamedSharding)."""
    if not isinstance(sharding, NamedSharding):
        return (None,) * ndim
    spec = tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def _axis_names(entry) -> tuple:
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _splits_evenly(size, sharding, names) -> bool:
    """Whether mesh axes ``names`` split ``size`` into equal blocks (assumed
    for a symbolic size)."""
    count = math.prod(sharding.mesh.shape[name] for name in names)
    return not isinstance(size, int) or size % count == 0


def choose_axes(sig: Signature, operands) -> dict:
    """Mesh axes of each shardable label: taken from the first operand (an
    aval or a ShapeDtypeStruct-like ``.shape`` and ``.sharding``) that shards
    it evenly, unless those mesh axes are already in use by another label.
    (An uneven split would give the body blocks of unequal shapes.)"""
    axes, used = {}, set()
    for dims, x in zip(sig.operands, operands):
        sharding = getattr(x, "sharding", None)
        for label, size, entry in zip(dims, x.shape, spec_entries(sharding, len(dims))):
            if label not in sig.keep or label in axes or entry is None:
                continue
            names = set(_axis_names(entry))
            if names & used or not _splits_evenly(size, sharding, names):
                continue
            axes[label] = entry
            used |= names
    return axes


def result_specs(sig: Signature, operands) -> tuple[PartitionSpec, ...]:
    """PartitionSpecs of the results for operands (avals) sharded as they are."""
    axes = choose_axes(sig, operands)
    return tuple(PartitionSpec(*(axes.get(label) for label in dims))
                 for dims in sig.results)


def _named(mesh, dims, axes) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(*(axes.get(label) for label in dims)))


def _mesh_of(mesh, shardings):
    for sharding in shardings:
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return mesh


def _without_ambient_mesh(body: Callable) -> Callable:
    """``body`` traced with no mesh in context.

    custom_partitioning traces the per-device body (on local shapes) while XLA
    compiles, and since jax 0.11 that happens under the caller's
    ``jax.set_mesh``: with an Explicit mesh, values the body creates would be
    typed as sharded over it and lowered with sharding annotations, which
    nothing partitions any more inside the per-device computation (XLA fails
    with 'No registered implementation for untyped custom call to Sharding').
    """
    def local(*args):
        with use_abstract_mesh(AbstractMesh((), ())):
            return body(*args)

    return local


def partitioned(body: Callable, sig: Signature) -> Callable:
    """``body`` (operands -> tuple of results, traceable at any shard shape)
    as a custom_partitioning function that splits along ``sig.keep``."""
    def positional(*args):  # custom_partitioning resolves arguments by signature
        return body(*args)

    wrapped = custom_partitioning(positional)

    def infer(mesh, arg_shapes, result_shape):
        mesh = _mesh_of(mesh, [a.sharding for a in arg_shapes])
        axes = choose_axes(sig, arg_shapes)
        return tuple(_named(mesh, dims, axes) for dims in sig.results)

    def propagate(mesh, user_shape):
        # Keep what the consumer asks for on the shardable labels of each result.
        results = []
        for dims, shape in zip(sig.results, user_shape):
            mesh_ = _mesh_of(mesh, [shape.sharding])
            entries = spec_entries(shape.sharding, len(dims))
            spec = [e if label in sig.keep else None
                    for label, e in zip(dims, entries)]
            results.append(NamedSharding(mesh_, PartitionSpec(*spec)))
        return tuple(results)

    def partition(mesh, arg_shapes, result_shape):
        mesh = _mesh_of(mesh, [a.sharding for a in arg_shapes])
        axes = choose_axes(sig, arg_shapes)
        args = tuple(_named(mesh, dims, axes) for dims in sig.operands)
        results = tuple(_named(mesh, dims, axes) for dims in sig.results)
        return mesh, _without_ambient_mesh(body), results, args

    wrapped.def_partition(
        partition, infer_sharding_from_operands=infer, propagate_user_sharding=propagate,
        sharding_rule=sig.shardy_rule(),
        need_replication_factors=sig.fixed_labels())
    return wrapped


def _is_export(ctx) -> bool:
    params = getattr(ctx.module_context, "lowering_parameters", None)
    return bool(getattr(params, "for_export", False))


def _num_devices(ctx) -> int:
    """Devices the call is split over (1 inside fully manual shard_map code)."""
    context = ctx.module_context.axis_context
    mesh = getattr(context, "mesh", None)
    if mesh is not None:  # shard_map: only its automatic axes are left to split
        manual = set(getattr(context, "manual_axes", ()))
        return math.prod(size for name, size in mesh.shape.items() if name not in manual)
    return int(getattr(context, "num_devices", 1) or 1)


def _has_mesh(ctx) -> bool:
    """Whether custom_partitioning can name the devices and mesh axes here."""
    context = ctx.module_context.axis_context
    if getattr(context, "mesh", None) is not None:  # shard_map
        return True
    mesh = getattr(context, "abstract_mesh", None)
    return (getattr(context, "device_assignment", None) is not None
            and mesh is not None and not mesh.empty)


def maybe_partitioned(ctx, body: Callable, sig: Signature) -> Callable:
    """``partitioned(body, sig)`` where the module is compiled for several
    devices (and not for jax.export), else ``body`` itself."""
    if _is_export(ctx) or _num_devices(ctx) <= 1 or not _has_mesh(ctx):
        return body
    return partitioned(body, sig)


def require_devices_during_lowering(*primitives) -> bool:
    """Asks jit to lower these primitives knowing the devices, which
    custom_partitioning needs (as jax's own custom_partitioning primitive
    does; ours only creates it while lowering). Without this registry
    (a private jax API) the per-image calls stay correct but unpartitioned."""
    try:
        from jax._src import dispatch

        registry = dispatch.prim_requires_devices_during_lowering
    except (ImportError, AttributeError):
        return False
    registry.update(primitives)
    return True
