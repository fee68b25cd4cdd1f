"""jax.export of jitted functions using roi_pool: both forms serialise,
deserialise in a fresh process (after ``import jax_roipool``) and run with
identical results, forward and gradient."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_roipool as jrp
from jax_roipool import export_safety_checks
from jax_roipool._native import FFI_TARGETS

POOLED, SCALE = (3, 4), 0.5
N, H, W, C, K = 2, 9, 11, 3, 4


def inputs(form, layout, seed=0):
    rng = np.random.default_rng(seed)
    shape = (N, H, W, C) if layout == "NHWC" else (N, C, H, W)
    features = rng.integers(-3, 4, shape).astype(np.float32)
    xy = rng.uniform(-2, 2 * W, (N, K, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0, 2 * W, (N, K, 2))], -1).astype(np.float32)
    if form == "flat":
        index = np.repeat(np.arange(N), K)[:, None]
        return features, np.concatenate([index, boxes.reshape(-1, 4)], 1).astype(np.float32)
    return features, boxes


def export_for_cpu(fn, **kwargs):
    """jax.export.export for the CPU, whatever jax's default backend (a GPU
    machine's would be cuda): these tests run the exported code on the CPU."""
    return jax.export.export(fn, platforms=("cpu",), **kwargs)


def forward(layout):
    return jax.jit(lambda f, r: jrp.roi_pool_with_argmax(f, r, POOLED, SCALE, layout=layout))


def gradient(layout):
    def loss(f, r, w):
        return jnp.sum(jrp.roi_pool(f, r, POOLED, SCALE, layout=layout) * w)

    return jax.jit(jax.grad(loss))


def test_safety_checks_name_the_kernels():
    checks = export_safety_checks()
    assert len(checks) == len(FFI_TARGETS) == 3
    for name in FFI_TARGETS:
        assert jax.export.DisabledSafetyCheck.custom_call(name) in checks


@pytest.mark.parametrize("form", ["flat", "per_image"])
def test_export_needs_the_safety_checks(form):
    features, rois = inputs(form, "NHWC")
    with pytest.raises(ValueError, match="roipool_forward"):
        export_for_cpu(forward("NHWC"))(features, rois)


@pytest.mark.parametrize("form", ["flat", "per_image"])
def test_exported_call_in_process(form):
    features, rois = inputs(form, "NCHW", seed=1)
    exported = export_for_cpu(forward("NCHW"), disabled_checks=export_safety_checks())(
        features, rois)
    assert "CustomSPMDPartitioning" not in exported.mlir_module()
    want = forward("NCHW")(features, rois)
    for got, expected in zip(exported.call(features, rois), want):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("form, specs", [
    ("flat", ("b, 9, 11, 3", "r, 5", "r, 3, 4, 3")),
    ("per_image", ("b, 9, 11, 3", "b, k, 4", "b, k, 3, 4, 3")),
    ("flat", ("b, h, w, c", "r, 5", "r, 3, 4, c")),
    ("per_image", ("b, h, w, c", "b, k, 4", "b, k, 3, 4, c")),
])
def test_shape_polymorphic_export(form, specs):
    """Symbolic dimensions (jax.export.symbolic_args_specs): one export serves
    every shape; forward, argmax and gradient equal the jitted ones."""
    features, rois = inputs(form, "NHWC", seed=3)
    weights = np.ones(forward("NHWC")(features, rois)[0].shape, np.float32)
    f_spec, r_spec, w_spec = jax.export.symbolic_args_specs((features, rois, weights), specs)
    checks = export_safety_checks()
    fwd = export_for_cpu(forward("NHWC"), disabled_checks=checks)(f_spec, r_spec)
    grad = export_for_cpu(gradient("NHWC"), disabled_checks=checks)(f_spec, r_spec, w_spec)
    spatial_symbolic = "h" in specs[0]
    for seed, n in ((4, N), (5, N + 3)):  # two concrete shapes
        rng = np.random.default_rng(seed)
        h, w, c = (H + n, W - n, C + n) if spatial_symbolic else (H, W, C)
        f = rng.integers(-3, 4, (n, h, w, c)).astype(np.float32)
        if form == "flat":  # R and K vary with n too
            r = np.concatenate([rng.integers(0, n, (2 * n, 1)), rng.uniform(-2, 2 * w, (2 * n, 4))],
                               1)
        else:
            r = rng.uniform(-2, 2 * w, (n, n + 1, 4))
        r = r.astype(np.float32)
        for got, want in zip(fwd.call(f, r), forward("NHWC")(f, r)):
            np.testing.assert_array_equal(got, want)
        cot = rng.integers(-2, 3, forward("NHWC")(f, r)[0].shape).astype(np.float32)
        np.testing.assert_array_equal(grad.call(f, r, cot), gradient("NHWC")(f, r, cot))


@pytest.mark.parametrize("form", ["flat", "per_image"])
def test_export_of_batched_jvps_and_vjps_with_a_symbolic_batch(form):
    """A vmap over tangents or cotangents alone, exported for any batch size:
    the kernels take the batch as a symbolic count of copies of the images."""
    features, rois = inputs(form, "NHWC", seed=6)
    pool = lambda x: jrp.roi_pool(x, rois, POOLED, SCALE)  # noqa: E731
    out_shape = jax.eval_shape(pool, features).shape

    def jvps(f, t):
        return jax.vmap(lambda t: jax.jvp(pool, (f,), (t,))[1])(t)

    def vjps(f, c):
        back = jax.vjp(pool, f)[1]
        return jax.vmap(lambda c: back(c)[0])(c)

    checks = export_safety_checks()
    rng = np.random.default_rng(7)
    for fn, shape in ((jvps, features.shape), (vjps, out_shape)):
        spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b") + shape, np.float32)
        exported = export_for_cpu(jax.jit(fn), disabled_checks=checks)(features, spec)
        for b in (1, 3):
            batch = rng.integers(-3, 4, (b,) + shape).astype(np.float32)
            want = jax.jit(fn)(features, batch)
            assert np.asarray(want).any()
            np.testing.assert_array_equal(exported.call(features, batch), want)


def test_symbolic_export_still_rejects_static_empty_dimensions():
    features = np.ones((2, 0, 11, 3), np.float32)
    args = jax.export.symbolic_args_specs((features, np.ones((3, 5), np.float32)),
                                          ("b, 0, 11, 3", "r, 5"))
    with pytest.raises(ValueError, match="non-empty"):
        export_for_cpu(forward("NHWC"), disabled_checks=export_safety_checks())(*args)


def test_multi_platform_export():
    features, rois = inputs("per_image", "NHWC")
    exported = jax.export.export(forward("NHWC"), platforms=("cpu", "cuda"),
                                 disabled_checks=export_safety_checks())(features, rois)
    assert exported.platforms == ("cpu", "cuda")
    got = exported.call(features, rois)  # runs the cpu variant here
    np.testing.assert_array_equal(got[0], forward("NHWC")(features, rois)[0])


def test_flat_form_exports_for_an_abstract_mesh():
    # Flat calls lower without devices, as before the per-image partitioning.
    from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

    mesh = AbstractMesh((4,), ("x",), axis_types=(AxisType.Auto,))
    features = jax.ShapeDtypeStruct((8, H, W, C), np.float32, sharding=NamedSharding(mesh, P("x")))
    rois = jax.ShapeDtypeStruct((12, 5), np.float32)
    exported = export_for_cpu(jax.jit(lambda f, r: jrp.roi_pool(f, r, POOLED, SCALE)),
                              disabled_checks=export_safety_checks())(features, rois)
    assert exported.nr_devices == 4


CHILD = textwrap.dedent("""
    import sys
    import jax
    import jax.numpy as jnp
    import numpy as np

    folder = sys.argv[1]
    names = sys.argv[2:]

    def load(name):
        with open(f"{folder}/{name}.bin", "rb") as f:
            exported = jax.export.deserialize(bytearray(f.read()))
        return exported, dict(np.load(f"{folder}/{name}.npz"))

    # Without jax_roipool the kernels are unknown to XLA.
    exported, data = load(names[0])
    try:
        exported.call(data["features"], data["rois"])
        print("UNREGISTERED-CALL-RAN")
    except Exception as e:
        print("UNREGISTERED-CALL-FAILED", "roipool_" in str(e))

    import jax_roipool  # registers the kernels

    for name in names:
        exported, data = load(name)
        if name.endswith("forward"):
            got = exported.call(data["features"], data["rois"])
            same = [np.array_equal(g, data[k]) for g, k in zip(got, ("out", "argmax"))]
            # Exported with vjp_order=1: differentiable in the fresh process.
            w = data["weights"]
            grad = jax.grad(lambda f: jnp.sum(exported.call(f, data["rois"])[0] * w))(
                data["features"])
            same.append(np.array_equal(grad, data["grad"]))
        else:
            got = exported.call(data["features"], data["rois"], data["weights"])
            same = [np.array_equal(got, data["grad"])]
        print("CASE", name, all(same), same)
""")


def test_deserialise_in_fresh_process(tmp_path):
    names = []
    for form in ("flat", "per_image"):
        for layout in ("NHWC", "NCHW"):
            features, rois = inputs(form, layout, seed=len(names))
            out, argmax = forward(layout)(features, rois)
            weights = np.random.default_rng(7).integers(-2, 3, out.shape).astype(np.float32)
            grad = gradient(layout)(features, rois, weights)
            assert np.asarray(grad).any() and (np.asarray(argmax) >= 0).any()
            data = dict(features=features, rois=rois, out=out, argmax=argmax, weights=weights,
                        grad=grad)
            checks = export_safety_checks()
            for kind, fn, args in (("forward", forward(layout), (features, rois)),
                                   ("grad", gradient(layout), (features, rois, weights))):
                exported = export_for_cpu(fn, disabled_checks=checks)(*args)
                blob = exported.serialize(vjp_order=1 if kind == "forward" else 0)
                name = f"{form}_{layout}_{kind}"
                (tmp_path / f"{name}.bin").write_bytes(blob)
                np.savez(tmp_path / f"{name}.npz", **{k: np.asarray(v) for k, v in data.items()})
                names.append(name)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), *names], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert "UNREGISTERED-CALL-FAILED True" in lines, proc.stdout + proc.stderr[-2000:]
    cases = {line.split()[1]: line for line in lines if line.startswith("CASE ")}
    assert sorted(cases) == sorted(names), proc.stdout
    for name, line in cases.items():
        assert line.split()[2] == "True", line
