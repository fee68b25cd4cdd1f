"""The pooling order: large feature maps are pooled with their RoIs in
``roi_order`` (by image, then top to bottom), passed to the kernels as their
last operand; every result stays where its RoI is.

The lowering is checked as StableHLO for the CPU and, where the CUDA module
was built, for CUDA (no GPU needed); the CPU kernels run here in both orders.
tests/test_cuda_kernel_on_host.py runs the CUDA kernel body in both orders,
tests/test_gpu.py the CUDA kernels on a GPU.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_roipool as jrp
from conftest import (BINS, DTYPES, LAYOUTS, all_ops_case, assert_bitwise, dtype_id,
                      feature_shape, hand_written_call, random_features, random_rois, x64_for)
from jax_roipool import _native

PLATFORMS = ["cpu"] + (["cuda"] if _native.cuda is not None else [])

# A kernel's custom call and the types of its operands, the order last:
# "tensor<0xi32>" (the RoIs' own order) or "tensor<Rxi32>" (roi_order).
CUSTOM_CALL = re.compile(r"custom_call @(roipool_\w+)\(.*?\)\s*\{.*?\}\s*:\s*\((.*?)\)\s*->",
                         re.DOTALL)


def orders(platform, features, rois, layout="NHWC") -> dict[str, str]:
    """{target: the type of its order operand} in the lowering for
    ``platform`` of a forward, JVP and gradient of roi_pool on abstract arrays."""
    def f(x, r):
        y, pullback = jax.vjp(lambda f: jrp.roi_pool(f, r, 3, layout=layout), x)
        tangent = jax.jvp(lambda f: jrp.roi_pool(f, r, 3, layout=layout), (x,), (x,))[1]
        return y, pullback(y)[0], tangent

    text = jax.jit(f).trace(features, rois).lower(lowering_platforms=(platform,)).as_text()
    found = {target: operands.split(", ")[-1] for target, operands in CUSTOM_CALL.findall(text)}
    assert set(found) == set(_native.FFI_TARGETS), text
    return found


def abstract(shape, dtype=np.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("target", _native.FFI_TARGETS)
def test_large_feature_maps_are_pooled_in_roi_order(target, platform, layout):
    threshold = _native.SORT_ROIS_FROM_FEATURE_BYTES[platform][target]
    n, h, w = 8, 32, 32
    c = threshold // (4 * n * h * w)  # float32 features of exactly the threshold
    at = abstract(feature_shape(n, h, w, max(c, 1), layout))
    assert orders(platform, at, abstract((40, 5)), layout)[target] == "tensor<40xi32>"
    if c > 1:
        below = abstract(feature_shape(n, h, w, c - 1, layout))
        assert orders(platform, below, abstract((40, 5)), layout)[target] == "tensor<0xi32>"
    # One RoI has no order to choose; per-image boxes go through the same lowering.
    assert orders(platform, at, abstract((1, 5)), layout)[target] == "tensor<0xi32>"
    assert orders(platform, at, abstract((n, 5, 4)), layout)[target] == f"tensor<{n * 5}xi32>"


@pytest.mark.parametrize("platform", PLATFORMS)
def test_symbolic_sizes_are_pooled_in_roi_order(platform):
    features, rois = jax.export.symbolic_args_specs(
        (np.ones((2, 8, 9, 5), np.float32), np.ones((3, 5), np.float32)),
        ("n, h, w, c", "r, 5"))
    exported = jax.export.export(jax.jit(lambda f, r: jrp.roi_pool(f, r, 3)),
                                 platforms=(platform,),
                                 disabled_checks=jrp.export_safety_checks())(features, rois)
    text = exported.mlir_module()
    assert "stablehlo.sort" in text
    assert re.search(r"custom_call @roipool_forward\(.*?\)\s*\{.*?\}\s*:\s*\(.*?, "
                     r"tensor<\?xi32>\)", text, re.DOTALL), text


def test_roi_order_groups_rois_by_image_then_top_to_bottom():
    rois = np.array([[1, 0, 50, 9, 60],    # image 1, lower
                     [0, 0, 30, 9, 40],    # image 0, lower
                     [1, 5, 0, 9, 10],     # image 1, top
                     [0.5, 0, 0, 9, 10],   # image 0 (truncated), top
                     [0, 0, 10, 9, 20],    # image 0, middle
                     [0, 0, 5, 9, 90]],    # image 0, tall: its middle is the lowest
                    np.float32)
    assert np.asarray(_native.roi_order(jnp.asarray(rois))).tolist() == [3, 4, 1, 5, 2, 0]


def pooled_in_both_orders(monkeypatch, fn, *args):
    """fn(*args) jitted on the CPU in the RoIs' own order and in roi_order."""
    results = []
    for threshold in (2**62, 0):
        monkeypatch.setitem(_native.SORT_ROIS_FROM_FEATURE_BYTES, "cpu",
                            dict.fromkeys(_native.FFI_TARGETS, threshold))
        jitted = jax.jit(lambda *a: fn(*a))  # a new function: traced and lowered anew
        assert ("stablehlo.sort" in jitted.lower(*args).as_text()) == (threshold == 0)
        results.append(jax.tree_util.tree_map(np.asarray, jitted(*args)))
    return results


@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cpu_kernels_give_the_same_results_in_roi_order(monkeypatch, dtype, layout, bins):
    fn, args = all_ops_case(np.random.default_rng(7), dtype, layout, bins, 3, 17, 14, 37, 120,
                            (4, 5), 0.5)
    with x64_for(dtype):
        own, ordered = pooled_in_both_orders(monkeypatch, fn, *args)
    for a, b, what in zip(own, ordered, ("output", "jvp", "gradient", "argmax")):
        assert_bitwise(b, a, f"{what} in roi_order")


def test_per_image_boxes_and_vmap_give_the_same_results_in_roi_order(monkeypatch):
    rng = np.random.default_rng(8)
    features = random_features(rng, (2, 3, 12, 13, 5), np.float32, "ties")
    boxes = random_rois(rng, 3, 12, 13, 2 * 3 * 9, 1.0, adversarial=False)[:, 1:]
    boxes = boxes.reshape(2, 3, 9, 4)

    def fn(f, b):
        return jax.vmap(lambda x, y: jax.value_and_grad(
            lambda x: jnp.sum(jrp.roi_pool(x, y, 3) ** 2))(x))(f, b)

    own, ordered = pooled_in_both_orders(monkeypatch, fn, features, boxes)
    for a, b in zip(jax.tree_util.tree_leaves(own), jax.tree_util.tree_leaves(ordered)):
        np.testing.assert_allclose(b, a, rtol=1e-6)


def hand_written_forward(features, rois, order):
    out_shape = jax.ShapeDtypeStruct((len(rois), 2, 2, features.shape[-1]), features.dtype)
    argmax_shape = jax.ShapeDtypeStruct(out_shape.shape, np.int32)
    return hand_written_call("roipool_forward", (out_shape, argmax_shape),
                             features, rois, order)


def hand_written_argmax_op(name, features, rois, order):
    """The gather of the features, or the scatter of ones."""
    pooled_shape = (len(rois), 2, 2, features.shape[-1])
    source = features if name == "roipool_gather" else np.ones(pooled_shape, features.dtype)
    shape = pooled_shape if name == "roipool_gather" else features.shape
    return hand_written_call(name, jax.ShapeDtypeStruct(shape, features.dtype),
                             source, features, rois, order)


def test_hand_written_orders_are_checked():
    rng = np.random.default_rng(9)
    features = random_features(rng, (2, 9, 8, 3), np.float32)
    rois = random_rois(rng, 2, 9, 8, 6, 1.0, adversarial=False)
    want_out, want_arg = jrp.roi_pool_with_argmax(features, rois, 2)
    for order in (np.zeros((0,), np.int32), np.array([5, 3, 1, 0, 2, 4], np.int32)):
        out, arg = hand_written_forward(features, rois, order)
        assert_bitwise(np.asarray(out), np.asarray(want_out), f"output in order {order}")
        assert_bitwise(np.asarray(arg), np.asarray(want_arg), f"argmax in order {order}")
    with pytest.raises(Exception, match=r"order must be \[R\] or \[0\]"):
        hand_written_forward(features, rois, np.arange(5, dtype=np.int32))
    # The CPU kernels check that the order (in host memory) is a permutation:
    # a RoI named twice or not at all would leave outputs unwritten.
    for order in ([-1, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 6], [0, 1, 2, 3, 4, 4]):
        with pytest.raises(Exception, match=r"order must be a permutation of \[0, R\)"):
            hand_written_forward(features, rois, np.array(order, np.int32))
        for name in ("roipool_gather", "roipool_scatter"):
            with pytest.raises(Exception, match=r"order must be a permutation of \[0, R\)"):
                hand_written_argmax_op(name, features, rois, np.array(order, np.int32))
    # A permutation changes neither the gather nor the scatter.
    want_grad = jax.grad(lambda f: jnp.sum(jrp.roi_pool(f, rois, 2)))(features)
    for name, want in (("roipool_gather", want_out), ("roipool_scatter", want_grad)):
        got = hand_written_argmax_op(name, features, rois, np.array([5, 3, 1, 0, 2, 4], np.int32))
        assert_bitwise(np.asarray(got), np.asarray(want), name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_scatter_sums_in_roi_order(monkeypatch, layout):
    # Four one-bin RoIs whose maximum is the same cell: the gradient there is
    # the sum of their cotangents 1, 2**-24, 2**-24 and 0 in the order the
    # scatter takes them, whatever its split between workers (each sums its
    # places in order, then the workers in order). In the RoIs' own order 1
    # comes first and each 2**-24 rounds away (ties to even); in roi_order
    # (top to bottom) the two tiny ones come first and add up to a whole ulp.
    features = np.zeros(feature_shape(1, 8, 8, 1, layout), np.float32)
    features[(0, 4, 4, 0) if layout == "NHWC" else (0, 0, 4, 4)] = 1
    rois = np.array([[0, 0, 3, 7, 7],    # y1 + y2 = 10: last in roi_order
                     [0, 2, 0, 5, 4],    # 4: first
                     [0, 3, 1, 4, 4],    # 5: second
                     [0, 4, 2, 6, 6]],   # 8: third
                    np.float32)
    assert np.asarray(_native.roi_order(jnp.asarray(rois))).tolist() == [1, 2, 3, 0]
    cot = np.array([1, 2**-24, 2**-24, 0], np.float32).reshape((4, 1, 1, 1))

    def grad(f, r, c):
        return jax.vjp(lambda x: jrp.roi_pool(x, r, 1, layout=layout), f)[1](c)[0]

    own, ordered = pooled_in_both_orders(monkeypatch, grad, features, rois, cot)
    assert own.sum() == own.max() == 1
    assert ordered.sum() == ordered.max() == np.float32(1 + 2**-23)
