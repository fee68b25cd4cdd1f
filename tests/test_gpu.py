"""CUDA kernels: bit-for-bit equal to the CPU kernels (and to torchvision where present)."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_roipool as jrp
from jax_roipool import _native, reference
from conftest import (BINS, DTYPES, LAYOUTS, SCALES, adversarial_rois, all_ops_case,
                      assert_bitwise, assert_exact, assert_reference_quotient_is_exact, dtype_id,
                      feature_shape, gpu_devices, random_features, random_rois, x64_for)


GPUS = gpu_devices()
# Set by benchmarks/gpu_proof.sh: there, a GPU that jax cannot use (a broken
# CUDA plugin, say) must fail the run rather than skip every test.
if not GPUS and os.environ.get("JAX_ROIPOOL_REQUIRE_GPU") == "1":
    pytest.fail("JAX_ROIPOOL_REQUIRE_GPU=1 but jax sees no GPU", pytrace=False)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not GPUS, reason="no NVIDIA GPU present (jax.devices('gpu') is empty)"),
]


def gpu():
    return GPUS[0]


def cpu():
    return jax.devices("cpu")[0]


def run_on(device, fn, *args):
    """fn(*args) with every argument committed to `device`; numpy results."""
    placed = [jax.device_put(a, device) for a in args]
    result = jax.jit(fn)(*placed)
    leaves = jax.tree_util.tree_leaves(result)
    for leaf in leaves:
        assert leaf.devices() == {device}, (leaf.devices(), device)
    return jax.tree_util.tree_map(np.asarray, result)


def forward_fn(pooled, scale, layout, bins):
    return functools.partial(jrp.roi_pool_with_argmax, output_size=pooled, spatial_scale=scale,
                             layout=layout, bins=bins)


def compare_devices(features, rois, pooled, scale, layout, bins):
    fn = forward_fn(pooled, scale, layout, bins)
    with x64_for(features.dtype, rois.dtype):
        g_out, g_arg = run_on(gpu(), fn, features, rois)
        c_out, c_arg = run_on(cpu(), fn, features, rois)
    assert_bitwise(g_out, c_out, "output GPU vs CPU")
    assert_exact(g_arg, c_arg, "argmax GPU vs CPU")
    return c_arg


def test_cuda_kernel_is_used():
    features = jax.device_put(np.ones((1, 8, 8, 2), np.float32), gpu())
    rois = jax.device_put(np.array([[0, 0, 0, 7, 7]], np.float32), gpu())
    text = jax.jit(forward_fn(2, 1.0, "NHWC", "fast_rcnn")).lower(features, rois).as_text()
    assert "roipool_forward" in text  # a native custom call, not the jnp fallback
    grad = jax.jit(jax.grad(lambda f, r: jnp.sum(jrp.roi_pool(f, r, 2))))
    assert "roipool_scatter" in grad.lower(features, rois).as_text()


@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_random_cases_match_cpu(dtype, layout, bins):
    for seed in range(12):
        rng = np.random.default_rng(seed)
        n, h, w = int(rng.integers(1, 4)), int(rng.integers(1, 40)), int(rng.integers(1, 40))
        c = int(rng.choice([1, 3, 16, 33, 70, 256]))
        scale = SCALES[seed % len(SCALES)]
        kind = ("normal", "ties")[seed % 2]
        features = random_features(rng, feature_shape(n, h, w, c, layout), dtype, kind)
        # float16 rois (with float16 features): the float16 geometry.
        rois_dtype = dtype if np.dtype(dtype) in (np.float64, np.float16) else np.float32
        with np.errstate(over="ignore"):
            rois = np.concatenate([random_rois(rng, n, h, w, int(rng.integers(0, 200)), scale),
                                   adversarial_rois(n, h, w, scale)]).astype(rois_dtype)
        pooled = (int(rng.integers(1, 21)), int(rng.integers(1, 14)))
        compare_devices(features, rois, pooled, scale, layout, bins)


@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_nonfinite_features_match_cpu(dtype, layout, bins):
    rng = np.random.default_rng(1)
    features = random_features(rng, feature_shape(2, 17, 23, 5, layout), dtype)
    flat = features.reshape(-1)
    flat[rng.choice(flat.size, 40, replace=False)] = np.nan
    flat[rng.choice(flat.size, 40, replace=False)] = -np.inf
    flat[rng.choice(flat.size, 10, replace=False)] = np.inf
    rois = np.concatenate([random_rois(rng, 2, 17, 23, 300, 0.5), adversarial_rois(2, 17, 23, 0.5)])
    compare_devices(features, rois, (6, 7), 0.5, layout, bins)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_case_matches_cpu(layout):
    rng = np.random.default_rng(2)
    features = random_features(rng, feature_shape(2, 38, 50, 512, layout), np.float32)
    rois = random_rois(rng, 2, 38, 50, 5000, 1 / 16)
    arg = compare_devices(features, rois, 7, 1 / 16, layout, "fast_rcnn")
    assert (arg >= 0).mean() > 0.5


@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gradients_match_cpu(dtype, layout, bins):
    rng = np.random.default_rng(3)
    features = random_features(rng, feature_shape(2, 19, 21, 6, layout), dtype)
    rois_dtype = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    rois = np.concatenate([random_rois(rng, 2, 19, 21, 400, 0.5),
                           adversarial_rois(2, 19, 21, 0.5)]).astype(rois_dtype)
    pooled = (4, 5)
    out_shape = feature_shape(len(rois), pooled[0], pooled[1], 6, layout)

    def grad(f, r, cot):
        _, pullback = jax.vjp(lambda x: jrp.roi_pool(x, r, pooled, 0.5, layout=layout,
                                                     bins=bins), f)
        return pullback(cot)[0]

    with x64_for(dtype):
        # Small integers: sums exact in any order, so atomics cannot change them.
        cot = rng.integers(-2, 3, out_shape).astype(dtype)
        assert_bitwise(run_on(gpu(), grad, features, rois, cot),
                       run_on(cpu(), grad, features, rois, cot), "integer-cotangent gradient")
        cot = rng.standard_normal(out_shape).astype(dtype)
        g = run_on(gpu(), grad, features, rois, cot).astype(np.float64)
        c = run_on(cpu(), grad, features, rois, cot).astype(np.float64)
    # Both devices sum in float32 (float64) and round once; only the order of
    # the additions differs. Per-add 16-bit rounding would miss these bounds.
    tol = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5,
           "float64": 1e-12}[np.dtype(dtype).name]
    np.testing.assert_allclose(g, c, rtol=tol, atol=tol)


def test_vmap_and_jvp_on_gpu_match_cpu():
    rng = np.random.default_rng(4)
    features = random_features(rng, (3, 2, 15, 16, 4), np.float32, "ties")
    rois = np.stack([random_rois(rng, 2, 15, 16, 50, 1.0) for _ in range(3)])
    tangent = random_features(rng, features.shape, np.float32)

    def fn(f, r, t):
        out, out_dot = jax.jvp(lambda x: jrp.roi_pool(x, r, 3), (f,), (t,))
        return out, out_dot, jrp.roi_pool_with_argmax(f, r, 3)[1]

    got = run_on(gpu(), jax.vmap(fn), features, rois, tangent)
    want = run_on(cpu(), jax.vmap(fn), features, rois, tangent)
    for g, w in zip(got, want):
        assert_bitwise(g, w, "vmapped jvp")


@pytest.mark.parametrize("form", ["flat", "per_image"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batched_jvps_and_vjps_at_shared_features_match_cpu(layout, form):
    # A vmap over tangents or cotangents alone: the kernels read the shared
    # features once for all batch elements (copies of the images in their
    # source or gradient; folded into the images for flat rois, a leading axis
    # per image).
    rng = np.random.default_rng(7)
    features = random_features(rng, feature_shape(2, 15, 16, 4, layout), np.float32, "ties")
    rois = random_rois(rng, 2, 15, 16, 40, 1.0)
    if form == "per_image":
        rois = rois[:, 1:].reshape(2, 20, 4)
    pool = lambda x: jrp.roi_pool(x, rois, 3, layout=layout)  # noqa: E731
    tangents = random_features(rng, (3,) + features.shape, np.float32)
    cotangents = rng.integers(-2, 3, (3,) + jax.eval_shape(pool, features).shape)

    def fn(f, t, c):
        jvps = jax.vmap(lambda t: jax.jvp(pool, (f,), (t,))[1])(t)
        back = jax.vjp(pool, f)[1]
        return jvps, jax.vmap(lambda c: back(c)[0])(c)

    cotangents = cotangents.astype(np.float32)
    got = run_on(gpu(), fn, features, tangents, cotangents)
    want = run_on(cpu(), fn, features, tangents, cotangents)
    assert_bitwise(got[0], want[0], "batched JVPs")
    assert_bitwise(got[1], want[1], "batched VJPs")  # small integer sums: exact


@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_image_boxes_match_cpu(layout):
    rng = np.random.default_rng(5)
    features = random_features(rng, feature_shape(3, 14, 18, 8, layout), np.float32, "ties")
    boxes = random_rois(rng, 3, 14, 18, 3 * 20, 0.5, adversarial=False)[:, 1:].reshape(3, 20, 4)
    cot = rng.integers(-2, 3, (3, 20) + feature_shape(1, 4, 5, 8, layout)[1:]).astype(np.float32)

    def fn(f, b, c):
        out, pullback = jax.vjp(lambda x: jrp.roi_pool(x, b, (4, 5), 0.5, layout=layout), f)
        return out, pullback(c)[0], jrp.roi_pool_with_argmax(f, b, (4, 5), 0.5, layout=layout)[1]

    got = run_on(gpu(), fn, features, boxes, cot)
    want = run_on(cpu(), fn, features, boxes, cot)
    for g, w, what in zip(got, want, ("output", "gradient", "argmax")):
        assert_bitwise(g, w, f"per-image {what}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_roi_order_matches_cpu(monkeypatch, dtype, layout):
    # Features from SORT_ROIS_FROM_FEATURE_BYTES up are pooled in roi_order on
    # CUDA; forced here on small ones: the same bits as the CPU kernels, for
    # the forward, the JVP's gather and the gradient's scatter.
    monkeypatch.setitem(_native.SORT_ROIS_FROM_FEATURE_BYTES, "cuda",
                        dict.fromkeys(_native.FFI_TARGETS, 0))
    fn, args = all_ops_case(np.random.default_rng(6), dtype, layout, "fast_rcnn", 3, 16, 19, 7,
                            300, (4, 3), 0.5)
    with x64_for(dtype):
        placed = [jax.device_put(a, gpu()) for a in args]
        assert "stablehlo.sort" in jax.jit(fn).lower(*placed).as_text()
        got = run_on(gpu(), fn, *args)
        want = run_on(cpu(), fn, *args)
    for g, w, what in zip(got, want, ("output", "jvp", "gradient", "argmax")):
        assert_bitwise(g, w, f"{what} in roi_order")


# The pure-jnp reference, the lowering where no native kernel exists, run by
# XLA on the GPU, whose float32 division is not correctly rounded.
@pytest.mark.parametrize("ctype", [np.float32, np.float64], ids=dtype_id)
def test_reference_quotient_on_gpu_is_exact(ctype):
    assert_reference_quotient_is_exact(ctype, gpu())


@pytest.mark.parametrize("rois_dtype", [np.float32, np.float16], ids=dtype_id)
@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_on_gpu_matches_cpu_kernel(layout, bins, rois_dtype):
    rng = np.random.default_rng(5)
    features = random_features(rng, feature_shape(2, 40, 52, 3, layout), np.float32)
    with np.errstate(over="ignore"):
        rois = np.concatenate([random_rois(rng, 2, 40, 52, 300, 1 / 16),
                               adversarial_rois(2, 40, 52, 1 / 16)]).astype(rois_dtype)
    for pooled in ((7, 7), (28, 3), (13, 5)):
        config = dict(output_size=pooled, spatial_scale=1 / 16, layout=layout, bins=bins)
        g_out, g_arg = run_on(gpu(), functools.partial(reference.roi_pool_with_argmax, **config),
                              features, rois)
        c_out, c_arg = run_on(cpu(), forward_fn(pooled, 1 / 16, layout, bins), features, rois)
        assert_bitwise(g_out, c_out, f"reference on the GPU vs CPU kernel, {pooled}")
        assert_exact(g_arg, c_arg, f"reference argmax on the GPU vs CPU kernel, {pooled}")


@pytest.mark.parametrize("scale", SCALES)
def test_torchvision_roi_pool(scale):
    # The GPU tests need torch + torchvision with CUDA (the GPU image has them).
    import torch
    import torchvision
    if not torch.cuda.is_available():
        pytest.fail("torch cannot see the GPU that jax sees")
    for seed in range(8):
        rng = np.random.default_rng(100 + seed)
        n, c = int(rng.integers(1, 4)), int(rng.choice([1, 8, 64]))
        h, w = int(rng.integers(4, 40)), int(rng.integers(4, 40))
        features = random_features(rng, (n, c, h, w), np.float32)
        rois = random_rois(rng, n, h, w, 300, scale)
        rois = rois[(rois[:, 0] > -1) & (rois[:, 0] < n)]  # torchvision has no invalid RoIs
        pooled = (int(rng.integers(1, 10)), int(rng.integers(1, 10)))
        cot = rng.standard_normal((len(rois), c) + pooled).astype(np.float32)

        def ours(f, r, ct):
            out, pullback = jax.vjp(lambda x: jrp.roi_pool(x, r, pooled, scale,
                                                           layout="NCHW"), f)
            return out, pullback(ct)[0]

        out, grad = run_on(gpu(), ours, features, rois, cot)
        x = torch.from_numpy(features).cuda().requires_grad_(True)
        theirs = torchvision.ops.roi_pool(x, torch.from_numpy(rois).cuda(), pooled, scale)
        theirs.backward(torch.from_numpy(cot).cuda())
        assert_bitwise(out, theirs.detach().cpu().numpy(), f"output vs torchvision (seed {seed})")
        np.testing.assert_allclose(grad, x.grad.cpu().numpy(), rtol=1e-5, atol=1e-5)
