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
