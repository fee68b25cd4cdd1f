"""The CUDA lowerings as StableHLO, on any machine: lowering for platform
"cuda" needs the _cuda module (built wherever nvcc is found), not a GPU."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_roipool as jrp
from conftest import DTYPES, LAYOUTS, dtype_id, feature_shape, x64_for
from jax_roipool import _native

pytestmark = pytest.mark.skipif(
    _native.cuda is None,
    reason="built without nvcc: no _cuda module, hence no CUDA lowering to check")

# The scatter's custom call and the dtype of its result, e.g. "f32".
SCATTER = re.compile(r"custom_call @roipool_scatter\(.*?\)\s*->\s*tensor<[0-9x]+x(\w+)>",
                     re.DOTALL)


def gradient_hlo_for_cuda(dtype, layout: str) -> str:
    features = jnp.ones(feature_shape(2, 8, 9, 5, layout), dtype)
    rois = jnp.array([[0, 0, 0, 7, 7], [1, 2, 1, 8, 6]], jnp.float32)
    cotangent = jnp.ones(feature_shape(2, 3, 3, 5, layout), dtype)

    def grad(x, cot):
        _, pullback = jax.vjp(lambda f: jrp.roi_pool(f, rois, 3, layout=layout), x)
        return pullback(cot)[0]

    return jax.jit(grad).trace(features, cotangent).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cuda_scatter_accumulates_16_bit_gradients_in_float32(dtype, layout):
    # 16-bit atomic adds would round every partial sum to 16 bits (in
    # bfloat16, 256 + 1 == 256); the CPU rounds its float32 sum once.
    with x64_for(dtype):
        text = gradient_hlo_for_cuda(dtype, layout)
    results = SCATTER.findall(text)
    assert len(results) == 1, text
    name = {2: None, 4: "f32", 8: "f64"}[np.dtype(dtype).itemsize]
    if name is not None:  # float32 / float64: the kernel writes the gradient itself
        assert results == [name] and "stablehlo.convert" not in text
        return
    assert results == ["f32"]
    want = {np.dtype(jnp.float16): "f16", np.dtype(jnp.bfloat16): "bf16"}[np.dtype(dtype)]
    assert re.search(rf"stablehlo\.convert %\w+ : \(tensor<[0-9x]+xf32>\) -> "
                     rf"tensor<[0-9x]+x{want}>", text), text


# The order operand each CUDA custom call takes last: "tensor<0xi32>" (the
# RoIs' own order) or "tensor<Rxi32>" (roi_order).
ORDER_OPERAND = re.compile(r"custom_call @(roipool_\w+)\(.*?\)\s*\{.*?\}\s*:\s*\((.*?)\)\s*->",
                           re.DOTALL)


def cuda_orders(features, rois, layout="NHWC") -> dict[str, str]:
    """{target: the type of its order operand} in the CUDA lowering of a
    forward, JVP and gradient of roi_pool on abstract arrays."""
    def f(x, r):
        y, pullback = jax.vjp(lambda f: jrp.roi_pool(f, r, 3, layout=layout), x)
        tangent = jax.jvp(lambda f: jrp.roi_pool(f, r, 3, layout=layout), (x,), (x,))[1]
        return y, pullback(y)[0], tangent

    text = jax.jit(f).trace(features, rois).lower(lowering_platforms=("cuda",)).as_text()
    found = {target: operands.split(", ")[-1] for target, operands in ORDER_OPERAND.findall(text)}
    assert set(found) == set(_native.FFI_TARGETS), text
    return found


def abstract(shape, dtype=np.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_feature_maps_are_pooled_in_roi_order(layout):
    threshold = _native.SORT_ROIS_FROM_FEATURE_BYTES
    n, h, w = 8, 64, 64
    c = threshold // (4 * n * h * w)  # float32 features of exactly the threshold
    rois = abstract((40, 5))
    assert set(cuda_orders(abstract(feature_shape(n, h, w, c, layout)), rois,
                           layout).values()) == {"tensor<40xi32>"}
    assert set(cuda_orders(abstract(feature_shape(n, h, w, c - 1, layout)), rois,
                           layout).values()) == {"tensor<0xi32>"}
    # One RoI has no order to choose; per-image boxes go through the same lowering.
    assert set(cuda_orders(abstract(feature_shape(n, h, w, c, layout)), abstract((1, 5)),
                           layout).values()) == {"tensor<0xi32>"}
    assert set(cuda_orders(abstract(feature_shape(n, h, w, c, layout)), abstract((n, 5, 4)),
                           layout).values()) == {f"tensor<{n * 5}xi32>"}


def test_symbolic_sizes_are_pooled_in_roi_order():
    features, rois = jax.export.symbolic_args_specs(
        (np.ones((2, 8, 9, 5), np.float32), np.ones((3, 5), np.float32)),
        ("n, h, w, c", "r, 5"))
    exported = jax.export.export(jax.jit(lambda f, r: jrp.roi_pool(f, r, 3)),
                                 platforms=("cuda",),
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
                     [0, 0, 10, 9, 20]],   # image 0, middle
                    np.float32)
    assert np.asarray(_native.roi_order(jnp.asarray(rois))).tolist() == [3, 4, 1, 2, 0]
