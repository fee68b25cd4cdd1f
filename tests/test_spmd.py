"""SPMD on 4 virtual CPU devices: per-image roi_pool partitions along the
image axis with no all-gather of the features; shard_map and the flat form
give the single-device results.

The checks run in one subprocess (``python tests/test_spmd.py``) with
``--xla_force_host_platform_device_count=4``, so this process keeps its single
device; each test below asserts one group of the child's results.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import traceback

import pytest

DEVICES = 4
N, H, W, C, K = 8, 12, 10, 4, 5
K_SPLIT = 8  # boxes per image where the boxes are split along K
POOLED, SCALE = (3, 4), 0.5


# ---------------------------------------------------------------------------
# HLO inspection (compiled, partitioned HLO text).

_SHAPE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


def _shapes(text):
    return [(dtype, tuple(int(d) for d in dims.split(",") if d))
            for dtype, dims in _SHAPE.findall(text)]


def all_gathers(hlo: str):
    """Result shapes of every all-gather in the HLO text."""
    found = []
    for line in hlo.splitlines():
        match = re.search(r"=\s*(.*?)\s+all-gather(?:-start)?\(", line)
        if match:
            found.extend(shape for _, shape in _shapes(match.group(1)))
    return found


def kernel_calls(hlo: str, target: str):
    """(operand shapes, result shapes) of each custom call to ``target``.

    Compiled HLO names the operands' shapes in operand_layout_constraints
    (or inline, as in unoptimised HLO)."""
    calls = []
    for line in hlo.splitlines():
        if f'custom_call_target="{target}"' not in line:
            continue
        result, operands = re.search(r"=\s*(.*?)\s+custom-call\((.*?)\),", line).groups()
        key = "operand_layout_constraints={"
        if key in line:  # up to the matching brace
            start = line.index(key) + len(key)
            depth = 1
            for end in range(start, len(line)):
                depth += {"{": 1, "}": -1}.get(line[end], 0)
                if depth == 0:
                    break
            operands = line[start:end]
        calls.append(([s for _, s in _shapes(operands)], [s for _, s in _shapes(result)]))
    return calls


# ---------------------------------------------------------------------------
# The child process.

def _child():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    import jax_roipool as jrp
    from jax_roipool import _api, _sharding

    assert len(jax.devices()) == DEVICES, jax.devices()
    results = {}

    def check(fn):
        try:
            results[fn.__name__] = {"ok": True, "detail": fn()}
        except Exception:  # reported by the parent test
            results[fn.__name__] = {"ok": False, "detail": traceback.format_exc()[-4000:]}
        return fn

    rng = np.random.default_rng(0)

    def features_for(layout, n=N, c=C):
        shape = (n, H, W, c) if layout == "NHWC" else (n, c, H, W)
        return rng.integers(-4, 5, shape).astype(np.float32)  # many ties

    def boxes_for(n=N, k=K):
        xy = rng.uniform(-4, 2 * W, (n, k, 2))
        wh = rng.uniform(0, 2 * W, (n, k, 2))
        boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
        if k:
            boxes[0, 0] = [100, 100, 120, 120]  # outside: argmax -1
        return boxes

    def flat(boxes):
        index = np.repeat(np.arange(boxes.shape[0]), boxes.shape[1])[:, None]
        return np.concatenate([index, boxes.reshape(-1, 4)], 1).astype(np.float32)

    def pool(layout):
        return jax.jit(lambda f, b: jrp.roi_pool_with_argmax(f, b, POOLED, SCALE, layout=layout))

    def grad(layout):
        def loss(f, b, w):
            return jnp.sum(jrp.roi_pool(f, b, POOLED, SCALE, layout=layout) * w)
        return jax.jit(jax.grad(loss))

    def same(got, want, what):
        got, want = np.asarray(got), np.asarray(want)
        assert got.shape == want.shape, (what, got.shape, want.shape)
        assert np.array_equal(got, want), f"{what}: {np.sum(got != want)} elements differ"

    def hlo(fn, *args):
        return fn.lower(*args).compile().as_text()

    def no_all_gather(fn, *args):
        gathers = all_gathers(hlo(fn, *args))
        assert not gathers, f"all-gathers in the partitioned HLO: {gathers}"

    def per_image_case(put, layout, context=contextlib.nullcontext):
        """Sharded per-image forward and grad == single device, with no all-gather
        and per-device kernels on the local images."""
        features, boxes = features_for(layout), boxes_for()
        want_out, want_arg = pool(layout)(features, boxes)  # on one device
        assert (np.asarray(want_arg) >= 0).any() and (np.asarray(want_arg) < 0).any()
        weights = rng.integers(-2, 3, want_out.shape).astype(np.float32)
        want_grad = grad(layout)(features, boxes, weights)
        assert np.asarray(want_grad).any()
        with context():
            fs, bs, ws = put(features, P("x")), put(boxes, P("x")), put(weights, P("x"))
            out, arg = pool(layout)(fs, bs)
            same(out, want_out, "sharded output")
            same(arg, want_arg, "sharded argmax")
            same(grad(layout)(fs, bs, ws), want_grad, "sharded gradient")
            no_all_gather(pool(layout), fs, bs)
            no_all_gather(grad(layout), fs, bs, ws)
            local = (N // DEVICES,) + features.shape[1:]
            text = hlo(pool(layout), fs, bs)
            calls = kernel_calls(text, "roipool_forward")
            assert calls and all(ops[0] == local for ops, _ in calls), (calls, local)
            calls = kernel_calls(hlo(grad(layout), fs, bs, ws), "roipool_scatter")
            assert calls and all(res[0] == local for _, res in calls), (calls, local)
            explicit = out.sharding.mesh.axis_types[0] == AxisType.Explicit
            if explicit:  # sharding in types: typed as split along N
                assert jax.typeof(out).sharding.spec[0] == "x", jax.typeof(out)
        return {"forward kernel operands": kernel_calls(text, "roipool_forward")[0][0],
                "explicit": explicit}

    def auto_mesh(shape=(DEVICES,), names=("x",)):
        return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))

    def putter(mesh):
        return lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))

    @check
    def per_image_auto_mesh():
        mesh = auto_mesh()
        return {layout: per_image_case(putter(mesh), layout) for layout in ("NHWC", "NCHW")}

    @check
    def per_image_explicit_mesh():
        mesh = jax.make_mesh((DEVICES,), ("x",), axis_types=(AxisType.Explicit,))
        return per_image_case(jax.device_put, "NHWC", functools.partial(jax.set_mesh, mesh))

    @check
    def per_image_gspmd_partitioner():
        previous = jax.config.jax_use_shardy_partitioner
        jax.config.update("jax_use_shardy_partitioner", False)
        try:
            mesh = auto_mesh()
            return per_image_case(putter(mesh), "NCHW")
        finally:
            jax.config.update("jax_use_shardy_partitioner", previous)

    @check
    def channels_sharded_too():
        mesh = auto_mesh((2, 2), ("x", "y"))
        put = putter(mesh)
        features, boxes = features_for("NHWC"), boxes_for()
        fs, bs = put(features, P("x", None, None, "y")), put(boxes, P("x"))
        want = pool("NHWC")(features, boxes)
        got = pool("NHWC")(fs, bs)
        same(got[0], want[0], "output")
        same(got[1], want[1], "argmax")
        no_all_gather(pool("NHWC"), fs, bs)
        calls = kernel_calls(hlo(pool("NHWC"), fs, bs), "roipool_forward")
        assert all(ops[0] == (N // 2, H, W, C // 2) for ops, _ in calls), calls
        return calls[0][0]

    @check
    def sharded_vmap():
        """vmap of the per-image forward and gradient: the mapped axis is a
        batch axis beside N, so with N, the mapped axis or both sharded
        (automatic axes, 1-D and 2-D meshes) each device pools its own images
        of its own batch elements, gathering nothing."""
        b = DEVICES
        features = np.stack([features_for("NHWC") for _ in range(b)])
        boxes = np.stack([boxes_for() for _ in range(b)])
        weights = rng.integers(-2, 3, (b, N, K) + POOLED + (C,)).astype(np.float32)
        forward = jax.jit(jax.vmap(lambda f, bx: jrp.roi_pool(f, bx, POOLED, SCALE)))
        backward = jax.jit(jax.vmap(grad("NHWC")))
        want = forward(features, boxes), backward(features, boxes, weights)
        seen = {}
        for mesh, spec, (copies, images) in (
                (auto_mesh(), P(None, "x"), (b, N // DEVICES)),
                (auto_mesh(), P("x"), (1, N)),
                (auto_mesh((2, 2), ("x", "y")), P("x", "y"), (b // 2, N // 2))):
            put = putter(mesh)
            fs, bs, ws = put(features, spec), put(boxes, spec), put(weights, spec)
            what = f"{dict(mesh.shape)}, {spec}"
            same(forward(fs, bs), want[0], f"vmapped output, {what}")
            same(backward(fs, bs, ws), want[1], f"vmapped gradient, {what}")
            no_all_gather(forward, fs, bs)
            no_all_gather(backward, fs, bs, ws)
            local = (copies * images, H, W, C)  # the device's batch elements' images
            calls = kernel_calls(hlo(forward, fs, bs), "roipool_forward")
            assert calls and all(ops[0] == local for ops, _ in calls), (what, calls)
            calls = kernel_calls(hlo(backward, fs, bs, ws), "roipool_scatter")
            assert calls and all(res[0] == local for _, res in calls), (what, calls)
            seen[what] = local
        return seen

    @check
    def explicit_vmap():
        """vmap under explicit mesh axes, with the mapped axis or the image axis
        sharded: folding them together must keep the types consistent."""
        mesh = jax.make_mesh((DEVICES,), ("x",), axis_types=(AxisType.Explicit,))
        features = np.stack([features_for("NHWC") for _ in range(DEVICES)])  # [B, N, ...]
        boxes = np.stack([boxes_for() for _ in range(DEVICES)])
        rois = flat(boxes[0])
        weights = rng.integers(-2, 3, (DEVICES, N, K) + POOLED + (C,)).astype(np.float32)

        def per_image(f, b, w):
            out, arg = jrp.roi_pool_with_argmax(f, b, POOLED, SCALE)
            g = jax.grad(lambda f: jnp.sum(jrp.roi_pool(f, b, POOLED, SCALE) * w))(f)
            return out, arg, g

        def flat_form(f, w):
            out, arg = jrp.roi_pool_with_argmax(f, rois, POOLED, SCALE)
            g = jax.grad(lambda f: jnp.sum(jrp.roi_pool(f, rois, POOLED, SCALE) * w))(f)
            return out, arg, g

        flat_weights = weights.reshape((DEVICES, N * K) + POOLED + (C,))
        cases = {  # name: (fn, in_axes, args, the arguments' specs)
            "per-image, mapped axis sharded": (per_image, (0, 0, 0),
                                               (features, boxes, weights), P("x")),
            "per-image, unmapped boxes": (per_image, (0, None, 0),
                                          (features, boxes[0], weights), P("x")),
            # Shared images: the mapped axis goes into K, not N.
            "per-image, unmapped features": (per_image, (None, 0, 0),
                                             (features[0], boxes, weights), P("x")),
            "per-image, N sharded": (per_image, (0, 0, 0), (features, boxes, weights),
                                     P(None, "x")),
            "flat, mapped axis sharded": (flat_form, (0, 0), (features, flat_weights), P("x")),
            "flat, N sharded": (flat_form, (0, 0), (features, flat_weights), P(None, "x")),
        }
        for name, (fn, in_axes, args, spec) in cases.items():
            batched = jax.jit(jax.vmap(fn, in_axes=in_axes))
            want = batched(*args)
            with jax.set_mesh(mesh):
                sharded = [jax.device_put(a, spec) if axis is not None else a
                           for a, axis in zip(args, in_axes)]
                got = batched(*sharded)
                if name.startswith("per-image"):  # each device pools its own images
                    no_all_gather(batched, *sharded)
            for g, w, what in zip(got, want, ("output", "argmax", "gradient")):
                same(g, w, f"{name}: {what}")
        # Both the mapped axis and N sharded (2-D mesh): both stay sharded.
        mesh2 = jax.make_mesh((2, 2), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)
        batched = jax.jit(jax.vmap(per_image))
        want = batched(features, boxes, weights)
        with jax.set_mesh(mesh2):
            sharded = [jax.device_put(a, P("x", "y")) for a in (features, boxes, weights)]
            got = batched(*sharded)
            no_all_gather(batched, *sharded)
            assert jax.typeof(got[0]).sharding.spec[:2] == ("x", "y"), jax.typeof(got[0])
        for g, w, what in zip(got, want, ("output", "argmax", "gradient")):
            same(g, w, f"2-D mesh: {what}")

    @check
    def shared_features_vmap():
        """vmap over tangents or cotangents alone (batched JVPs and VJPs) with
        the features shared: the batch is a batch axis of the per-image gather's
        source (scatter's gradient) beside N, so with N sharded each device pools its
        own images for its block of every batch element, and with the mapped
        axis sharded its batch elements from all the images, or both on a 2-D
        mesh; never copying the features or gathering anything."""
        b = DEVICES
        features, boxes = features_for("NHWC"), boxes_for()
        out_shape = (N, K) + POOLED + (C,)
        tangents = rng.integers(-4, 5, (b,) + features.shape).astype(np.float32)
        cotangents = rng.integers(-2, 3, (b,) + out_shape).astype(np.float32)

        def jvps(f, bx, t):
            return jax.vmap(lambda t: jax.jvp(lambda f: jrp.roi_pool(f, bx, POOLED, SCALE),
                                              (f,), (t,))[1])(t)

        def vjps(f, bx, c):
            pull = jax.vjp(lambda f: jrp.roi_pool(f, bx, POOLED, SCALE), f)[1]
            return jax.vmap(lambda c: pull(c)[0])(c)

        fns = {"jvp": (jax.jit(jvps), tangents), "vjp": (jax.jit(vjps), cotangents)}
        want = {name: fn(features, boxes, batch) for name, (fn, batch) in fns.items()}
        assert all(np.asarray(w).any() for w in want.values())

        def kernels_see(name, fn, args, images, copies):
            """The partitioned call is right, gathers nothing, and each device's
            kernel reads ``images`` images of the features, once, for a
            source (gradient) of ``copies`` copies of them."""
            same(fn(*args), want[name], f"{name}: {images} images x {copies} copies")
            no_all_gather(fn, *args)
            target = "roipool_gather" if name == "jvp" else "roipool_scatter"
            calls = kernel_calls(hlo(fn, *args), target)
            assert calls and all(ops[1] == (images, H, W, C) for ops, _ in calls), calls
            like_features = [ops[0] if name == "jvp" else res[0] for ops, res in calls]
            assert all(shape == (images * copies, H, W, C) for shape in like_features), calls
            return calls[0][0]

        put = putter(auto_mesh())
        fs, bs = put(features, P("x")), put(boxes, P("x"))
        seen = {}
        for name, (fn, batch) in fns.items():
            seen[name] = kernels_see(name, fn, (fs, bs, put(batch, P(None, "x"))),
                                     N // DEVICES, b)
            kernels_see(name, fn, (features, boxes, put(batch, P("x"))), N, 1)
        mesh = jax.make_mesh((DEVICES,), ("x",), axis_types=(AxisType.Explicit,))
        with jax.set_mesh(mesh):
            sharded = jax.device_put(tangents, P("x"))
            kernels_see("jvp", jax.jit(jvps), (features, boxes, sharded), N, 1)
        # Explicit axes, nested: an outer vmap over more tangents keeps the
        # inner batch axis sharded (the copies then run inner-major); one
        # over features sharded along N gives each element its own copy of
        # them (gathered: right, but resharded).
        nested = jax.jit(jax.vmap(jvps, in_axes=(None, None, 0)))
        many = np.stack([tangents, -tangents])
        many_features = np.stack([features, features[::-1]])
        over_features = jax.jit(jax.vmap(jvps, in_axes=(0, None, None)))
        want_nested = nested(features, boxes, many)
        want_over = over_features(many_features, boxes, tangents)
        with jax.set_mesh(mesh):
            sharded = jax.device_put(many, P(None, "x"))
            same(nested(features, boxes, sharded), want_nested, "nested, inner axis sharded")
            no_all_gather(nested, features, boxes, sharded)
            sharded = jax.device_put(many_features, P(None, "x"))
            same(over_features(sharded, boxes, tangents), want_over,
                 "vmap over features sharded along N")
        # A 2-D mesh: the images on one axis, the batch on the other (given
        # both, or taking the images' from the features), under Shardy and GSPMD.
        put2 = putter(auto_mesh((2, 2), ("x", "y")))
        fs2, bs2 = put2(features, P("x")), put2(boxes, P("x"))
        previous = jax.config.jax_use_shardy_partitioner
        try:
            for shardy in (True, False):
                jax.config.update("jax_use_shardy_partitioner", shardy)
                for name, (fn, batch) in fns.items():
                    for spec in (P("y", "x"), P("y")):
                        kernels_see(name, fn, (fs2, bs2, put2(batch, spec)), N // 2, b // 2)
        finally:
            jax.config.update("jax_use_shardy_partitioner", previous)
        return seen

    @check
    def no_boxes():
        mesh = auto_mesh()
        put = putter(mesh)
        features, boxes = features_for("NHWC"), boxes_for(k=0)
        out, arg = pool("NHWC")(put(features, P("x")), put(boxes, P("x")))
        assert out.shape == arg.shape == (N, 0) + POOLED + (C,)
        g = grad("NHWC")(put(features, P("x")), put(boxes, P("x")), np.zeros(out.shape, np.float32))
        assert g.shape == features.shape and not np.asarray(g).any()

    @check
    def negative_controls():
        """The all-gather check can fail: the flat form, and the per-image form
        with custom partitioning switched off, gather the features."""
        mesh = auto_mesh()
        put = putter(mesh)
        features, boxes = features_for("NHWC"), boxes_for()
        fs, bs = put(features, P("x")), put(boxes, P("x"))
        flat_fn = jax.jit(lambda f, r: jrp.roi_pool(f, r, POOLED, SCALE))
        flat_gathers = all_gathers(hlo(flat_fn, fs, flat(boxes)))
        assert features.shape in flat_gathers, flat_gathers
        original = _sharding.maybe_partitioned
        _sharding.maybe_partitioned = lambda ctx, body, sig: body
        try:
            fn = jax.jit(lambda f, b: jrp.roi_pool(f, b, POOLED, SCALE))
            unpartitioned = all_gathers(hlo(fn, fs, bs))
            same(fn(fs, bs), pool("NHWC")(features, boxes)[0], "unpartitioned output")
        finally:
            _sharding.maybe_partitioned = original
        assert features.shape in unpartitioned, unpartitioned
        return {"flat": flat_gathers, "per-image, unpartitioned": unpartitioned}

    @check
    def flat_form_sharded():
        mesh = auto_mesh()
        put = putter(mesh)
        features, boxes = features_for("NCHW"), boxes_for()
        rois = flat(boxes)
        fn = jax.jit(lambda f, r: jrp.roi_pool_with_argmax(f, r, POOLED, SCALE, layout="NCHW"))
        want = fn(features, rois)
        for spec in (P(), P("x")):  # rois replicated or split along R
            got = fn(put(features, P("x")), put(rois, spec))
            same(got[0], want[0], "flat output")
            same(got[1], want[1], "flat argmax")
        weights = rng.integers(-2, 3, want[0].shape).astype(np.float32)
        gfn = jax.jit(jax.grad(lambda f, r, w: jnp.sum(
            jrp.roi_pool(f, r, POOLED, SCALE, layout="NCHW") * w)))
        same(gfn(put(features, P("x")), rois, weights), gfn(features, rois, weights), "flat grad")

    n_local = N // DEVICES

    def local_argmax(argmax, image):
        """Flat argmax into the whole batch -> into the shard's own images
        (``image``: the image of each entry along argmax's first axis)."""
        argmax = np.asarray(argmax)
        offset = (np.asarray(image) // n_local) * n_local * H * W
        offset = offset.astype(np.int32).reshape((-1,) + (1,) * (argmax.ndim - 1))
        return np.where(argmax >= 0, argmax - offset, -1)

    @check
    def shard_map_per_image():
        mesh = auto_mesh()
        features, boxes = features_for("NHWC"), boxes_for()
        want_out, want_arg = pool("NHWC")(features, boxes)
        body = functools.partial(jrp.roi_pool_with_argmax, output_size=POOLED, spatial_scale=SCALE)
        fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=P("x")))
        out, arg = fn(features, boxes)
        same(out, want_out, "shard_map output")
        same(arg, local_argmax(want_arg, np.arange(N)), "shard_map argmax (local images)")
        weights = rng.integers(-2, 3, want_out.shape).astype(np.float32)
        pooled = jax.shard_map(lambda f, b: jrp.roi_pool(f, b, POOLED, SCALE), mesh=mesh,
                               in_specs=(P("x"), P("x")), out_specs=P("x"))
        g = jax.jit(jax.grad(lambda f, b, w: jnp.sum(pooled(f, b) * w)))(features, boxes, weights)
        same(g, grad("NHWC")(features, boxes, weights), "shard_map gradient")

    @check
    def shard_map_flat():
        mesh = auto_mesh()
        features, boxes = features_for("NHWC"), boxes_for()
        rois = flat(boxes)  # image-major: each shard of rows names only its images
        local = rois.copy()
        local[:, 0] %= n_local  # batch indices into the shard's own images
        fn = jax.jit(lambda f, r: jrp.roi_pool_with_argmax(f, r, POOLED, SCALE))
        want_out, want_arg = fn(features, rois)
        body = functools.partial(jrp.roi_pool_with_argmax, output_size=POOLED, spatial_scale=SCALE)
        sm = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=P("x")))
        out, arg = sm(features, local)
        same(out, want_out, "shard_map flat output")
        same(arg, local_argmax(want_arg, rois[:, 0]), "shard_map flat argmax (local images)")
        weights = rng.integers(-2, 3, want_out.shape).astype(np.float32)
        pooled = jax.shard_map(lambda f, r: jrp.roi_pool(f, r, POOLED, SCALE), mesh=mesh,
                               in_specs=(P("x"), P("x")), out_specs=P("x"))
        g = jax.jit(jax.grad(lambda f, r, w: jnp.sum(pooled(f, r) * w)))(features, local, weights)
        want_g = jax.grad(lambda f: jnp.sum(jrp.roi_pool(f, rois, POOLED, SCALE) * weights))(
            features)
        same(g, want_g, "shard_map flat gradient")

    @check
    def shard_map_shared_features():
        # Replicated features, boxes split: the features do not vary over the
        # manual axis while the boxes do; each device pools its boxes from all
        # the images, and the features' gradient sums the devices' parts.
        mesh = auto_mesh()
        features, boxes = features_for("NHWC"), boxes_for(k=DEVICES)
        weights = rng.integers(-2, 3, (N, DEVICES) + POOLED + (C,)).astype(np.float32)
        for form, rois, split, w in (
                ("per-image", boxes, P(None, "x"), weights),
                ("flat", flat(boxes), P("x"), weights.reshape((-1,) + weights.shape[2:]))):
            pooled = jax.shard_map(lambda f, r: jrp.roi_pool(f, r, POOLED, SCALE), mesh=mesh,
                                   in_specs=(P(), split), out_specs=split)
            same(jax.jit(pooled)(features, rois), pool("NHWC")(features, rois)[0],
                 f"shard_map {form} output, shared features")
            g = jax.jit(jax.grad(lambda f, r, w: jnp.sum(pooled(f, r) * w)))(features, rois, w)
            want = grad("NHWC")(features, rois, w)
            assert np.asarray(want).any()
            same(g, want, f"shard_map {form} gradient, shared features")

    @check
    def boxes_split_along_k():
        # The forward and the JVP's gather keep their blocks of boxes; the
        # scatter must not (boxes of one image add into the same cells), so
        # the features' gradient is whole. Also with the images split over
        # the same mesh axis as the boxes (one axis cannot split both).
        mesh = auto_mesh()
        put = putter(mesh)
        k_local = (N * K_SPLIT // DEVICES, 5)  # one device's flat rois: all N, a block of K
        features, boxes = features_for("NHWC"), boxes_for(k=K_SPLIT)
        want_out, want_arg = pool("NHWC")(features, boxes)
        weights = rng.integers(-2, 3, want_out.shape).astype(np.float32)
        want_grad = grad("NHWC")(features, boxes, weights)
        assert np.asarray(want_grad).any()
        bs, ws = put(boxes, P(None, "x")), put(weights, P(None, "x"))
        for fspec in (P(), P("x")):
            fs = put(features, fspec)
            out, arg = pool("NHWC")(fs, bs)
            same(out, want_out, f"output, boxes split along K, features {fspec}")
            same(arg, want_arg, f"argmax, boxes split along K, features {fspec}")
            same(grad("NHWC")(fs, bs, ws), want_grad,
                 f"gradient, boxes split along K, features {fspec}")
        # With replicated features: each device pools all the images (those
        # split along N, above, keep theirs and gather K instead).
        fs = put(features, P())
        jvp = jax.jit(lambda f, b, t: jax.jvp(lambda x: jrp.roi_pool(x, b, POOLED, SCALE),
                                              (f,), (t,))[1])
        calls = kernel_calls(hlo(jvp, fs, bs, fs), "roipool_gather")
        assert calls and all(ops[1:3] == [features.shape, k_local] for ops, _ in calls), calls
        calls = kernel_calls(hlo(pool("NHWC"), fs, bs), "roipool_forward")
        assert calls and all(ops[:2] == [features.shape, k_local] for ops, _ in calls), calls
        calls = kernel_calls(hlo(grad("NHWC"), fs, bs, ws), "roipool_scatter")
        assert calls and all(ops[2] == (N * K_SPLIT, 5) for ops, _ in calls), calls

    @check
    def result_specs_choose_mesh_axes():
        # Mesh axes of each label come from the first operand sharding it
        # evenly, and no mesh axis serves two labels.
        mesh = jax.make_mesh((2, 2), ("x", "y"), axis_types=(AxisType.Auto,) * 2)
        sig = _sharding.signature("forward", "NHWC")

        def aval(shape, *spec):
            return jax.ShapeDtypeStruct(shape, np.float32, sharding=NamedSharding(mesh, P(*spec)))

        def specs(features, boxes):
            return [tuple(s) for s in _sharding.result_specs(sig, [features, boxes])]

        f, b = (4, H, W, C), (4, K_SPLIT, 4)
        whole = (None,) * 5  # a result split along no axis
        assert specs(aval(f, "x"), aval(b, "y")) == [("x",) + whole[1:]] * 2
        assert specs(aval(f, "x"), aval(b, None, "x")) == [("x",) + whole[1:]] * 2
        assert specs(aval(f), aval(b, None, "x")) == [(None, "x") + whole[2:]] * 2
        assert specs(aval(f, None, None, None, "y"), aval(b, "x")) == [("x", None, None, None,
                                                                        "y")] * 2
        assert specs(aval((3,) + f[1:], "x"), aval((3, K_SPLIT, 4), "x")) == [whole] * 2  # 3 / 2
        assert specs(aval(f, None, "x"), aval(b)) == [whole] * 2  # H is never split

    @check
    def export_sharded():
        mesh = auto_mesh()
        put = putter(mesh)
        features, boxes = features_for("NHWC"), boxes_for()
        fs, bs = put(features, P("x")), put(boxes, P("x"))
        exported = jax.export.export(pool("NHWC"), disabled_checks=_api.export_safety_checks())(
            fs, bs)
        assert "CustomSPMDPartitioning" not in exported.mlir_module()
        assert exported.nr_devices == DEVICES
        want = pool("NHWC")(features, boxes)
        exported = jax.export.deserialize(exported.serialize())
        got = exported.call(fs, bs)
        same(got[0], want[0], "exported output")
        same(got[1], want[1], "exported argmax")

    print("RESULTS " + json.dumps(results, default=str))


# ---------------------------------------------------------------------------
# The tests.

@pytest.fixture(scope="module")
def results():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={DEVICES}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(__file__))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"child failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULTS "):])


CHECKS = ["per_image_auto_mesh", "per_image_explicit_mesh", "per_image_gspmd_partitioner",
          "channels_sharded_too", "sharded_vmap", "explicit_vmap", "shared_features_vmap",
          "no_boxes", "negative_controls",
          "flat_form_sharded", "shard_map_per_image", "shard_map_flat", "shard_map_shared_features",
          "boxes_split_along_k", "result_specs_choose_mesh_axes",
          "export_sharded"]


@pytest.mark.parametrize("name", CHECKS)
def test_spmd(results, name):
    result = results[name]
    assert result["ok"], result["detail"]


def test_hlo_parsing():
    line = ("  %all-gather = f32[8,12,10,4]{3,2,1,0} all-gather(f32[2,12,10,4]{3,2,1,0} %p), "
            "channel_id=1, dimensions={0}")
    assert all_gathers(line) == [(8, 12, 10, 4)]
    call = ('  %cc = (f32[2,5,3,4,4]{4,3,2,1,0}, s32[0]{0}) custom-call(f32[2,12,10,4]{3,2,1,0} '
            '%a, f32[10,5]{1,0} %b), custom_call_target="roipool_forward", api_version=API')
    assert kernel_calls(call, "roipool_forward") == [([(2, 12, 10, 4), (10, 5)],
                                                       [(2, 5, 3, 4, 4), (0,)])]
    call = ('  %r = (f32[10,3,3,4]{3,2,1,0}, s32[0]{0}) custom-call(%param, %fusion), '
            'custom_call_target="roipool_forward", operand_layout_constraints={f32[2,12,10,4]'
            '{3,2,1,0}, f32[10,5]{1,0}}, api_version=API_VERSION_TYPED_FFI')
    assert kernel_calls(call, "roipool_forward") == [([(2, 12, 10, 4), (10, 5)],
                                                       [(10, 3, 3, 4), (0,)])]


if __name__ == "__main__":
    _child()
