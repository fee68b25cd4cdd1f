"""Bit-exact agreement with torchvision.ops.roi_pool on stored golden cases.

``tests/data/torchvision_roi_pool.npz`` holds inputs and torchvision's output,
argmax and feature gradient (made by ``tests/data/make_torchvision_golden.py``
with torchvision's CPU kernels): boxes inside, partly and wholly outside the
map, inverted, zero-size, whole-image, and coordinates whose scaled value is
exactly k + 0.5, and corners 2^28 to 2^31 cells away (where torchvision's int
arithmetic still fits int32); float32, float64 and float16 (whose geometry
torchvision computes in float16); output sizes 1x1 to 14x14.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

import jax_roipool as jrp
from conftest import LAYOUTS, x64_for

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "data", "torchvision_roi_pool.npz"))
CASES = [f"c{i:02d}" for i in range(int(GOLDEN["case_count"]))]


def case(name):
    return {key[len(name) + 1:]: GOLDEN[key] for key in GOLDEN.files if key.startswith(name + "_")}


def to_layout(x, layout):
    return x.transpose(0, 2, 3, 1) if layout == "NHWC" else x


def test_golden_file_is_substantial():
    assert len(CASES) >= 64
    assert {str(case(c)["features"].dtype) for c in CASES} == {"float32", "float64", "float16"}
    assert {str(case(c)["feature_kind"]) for c in CASES} == {"normal", "ties", "far"}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", CASES)
def test_matches_torchvision(name, layout):
    g = case(name)
    features, rois = g["features"], g["rois"]
    n, _, h, w = features.shape
    size = tuple(int(s) for s in g["output_size"])
    scale = float(g["spatial_scale"])
    with x64_for(features.dtype):
        x = to_layout(features, layout)

        def loss(f):
            out = jrp.roi_pool(f, rois, size, scale, layout=layout)
            return (out * to_layout(g["cotangent"], layout)).sum(), out

        out, argmax = jrp.roi_pool_with_argmax(x, rois, size, scale, layout=layout)
        grad, out_again = jax.grad(loss, has_aux=True)(x)
        assert out.dtype == features.dtype and grad.dtype == features.dtype
    np.testing.assert_array_equal(np.asarray(out), to_layout(g["output"], layout))
    np.testing.assert_array_equal(np.asarray(out_again), to_layout(g["output"], layout))
    # torchvision's argmax is h * W + w inside the RoI's own image; ours adds n * H * W.
    batch = rois[:, 0].astype(np.int64).reshape((-1, 1, 1, 1))
    tv_argmax = g["argmax"].astype(np.int64)
    want = np.where(tv_argmax >= 0, tv_argmax + batch * h * w, -1)
    np.testing.assert_array_equal(np.asarray(argmax), to_layout(want, layout))
    # Dyadic cotangent: every sum is exact, so the gradient is compared exactly too.
    np.testing.assert_array_equal(np.asarray(grad), to_layout(g["grad_features"], layout))
