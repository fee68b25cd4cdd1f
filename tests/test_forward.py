"""Forward pass: native kernels == numpy loop reference == jax reference, exactly."""

from __future__ import annotations

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jax_roipool as jrp
import reference_loop
from jax_roipool import _checks, _primitives, reference
from conftest import (BINS, DTYPES, LAYOUTS, SCALES, adversarial_rois, assert_bitwise,
                      assert_exact, assert_reference_quotient_is_exact, check_case, dtype_id,
                      feature_shape, random_features, random_rois, settings, x64_for)

SEED_MAP = np.array([
    [0.88, 0.44, 0.14, 0.16, 0.37, 0.77, 0.96, 0.27],
    [0.19, 0.45, 0.57, 0.16, 0.63, 0.29, 0.71, 0.70],
    [0.66, 0.26, 0.82, 0.64, 0.54, 0.73, 0.59, 0.26],
    [0.85, 0.34, 0.76, 0.84, 0.29, 0.75, 0.62, 0.25],
    [0.32, 0.74, 0.21, 0.39, 0.34, 0.03, 0.33, 0.48],
    [0.20, 0.14, 0.16, 0.13, 0.73, 0.65, 0.96, 0.32],
    [0.19, 0.69, 0.09, 0.86, 0.88, 0.07, 0.01, 0.48],
    [0.83, 0.24, 0.97, 0.04, 0.24, 0.35, 0.50, 0.91],
], np.float32)
SEED_ROIS = np.array([[0, 0, 3, 7, 8]], np.float32)
SEED_OUT = np.array([[0.85, 0.84], [0.97, 0.96]], np.float32)
SEED_ARGMAX = np.array([[3 * 8 + 0, 3 * 8 + 3], [7 * 8 + 2, 5 * 8 + 6]], np.int32)


def seed_features(layout):
    return SEED_MAP[None, :, :, None] if layout == "NHWC" else SEED_MAP[None, None]


def as_single_channel(x, layout):
    """[1, PH, PW, 1] / [1, 1, PH, PW] -> [PH, PW]."""
    return np.asarray(x)[0, :, :, 0] if layout == "NHWC" else np.asarray(x)[0, 0]


# ---------------------------------------------------------------------------
# Self-tests of the loop reference (hand-computed expectations).

@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_loop_seed_example(layout):
    out, arg = reference_loop.roi_pool_loop(seed_features(layout), SEED_ROIS, 2, layout=layout,
                                            bins="partition")
    assert np.array_equal(as_single_channel(out, layout), SEED_OUT.astype(np.float64))
    assert np.array_equal(as_single_channel(arg, layout), SEED_ARGMAX)


HAND_MAP = np.array([
    [5, 1, 9, 2, 0, 3],
    [4, 8, 2, 7, 7, 1],
    [6, 0, 3, 9, 1, 2],
    [2, 2, 8, 4, 6, 5],
], np.float32)


def test_reference_loop_fast_rcnn_by_hand():
    # x: corners 1..4 -> 4 cells, bins of 2: [1,3), [3,5).
    # y: corners 0..2 -> 3 cells, bins of 1.5: [0,2), [1,3) (overlapping).
    out, arg = reference_loop.roi_pool_loop(HAND_MAP[None, :, :, None],
                                            np.array([[0, 1, 0, 4, 2]], np.float32), 2)
    assert np.array_equal(out[0, :, :, 0], [[9, 7], [8, 9]])
    # (1, 3) and (1, 4) tie at 7: the first in row-major order wins.
    assert np.array_equal(arg[0, :, :, 0], [[2, 9], [7, 15]])


@pytest.mark.parametrize("value, expected", [
    (0.5, 1), (-0.5, -1), (1.5, 2), (2.5, 3), (-2.5, -3), (0.49999997, 0), (2.4999998, 2),
    (-0.49999997, 0), (7.0, 7), (-(2.0**31), -(2**31)), (2.0**31 - 128, 2**31 - 128),
])
def test_reference_loop_corner_rounding(value, expected):
    assert reference_loop.corner_cell(np.float32(value)) == expected


@pytest.mark.parametrize("value", [2.0**31, -(2.0**31) - 256, 1e30, -1e30])
def test_reference_loop_corner_overflow(value):
    with pytest.raises(reference_loop.Int32Overflow):
        reference_loop.corner_cell(np.float32(value))


def test_reference_loop_emulates_float32_bin_edges():
    # Region of 4 cells in 28 bins: 21 * (4/28) is 3 exactly, but 3.0000002 in
    # float32, so bin 20 ends at 4 in float32 and at 3 in float64.
    assert reference_loop.axis_spans(np.float32(0), np.float32(3), 28, 99, "fast_rcnn",
                                     np.float32)[20] == (2, 4)
    assert reference_loop.axis_spans(np.float64(0), np.float64(3), 28, 99, "fast_rcnn",
                                     np.float64)[20] == (2, 3)


# ---------------------------------------------------------------------------
# The jax reference's bin size: float division emulated in integers.

@pytest.mark.parametrize("ctype", [np.float32, np.float64], ids=dtype_id)
def test_reference_quotient_is_the_rounded_division(ctype):
    assert_reference_quotient_is_exact(ctype, jax.devices("cpu")[0])


@pytest.mark.parametrize("ctype", [np.float32, np.float64], ids=dtype_id)
def test_reference_has_no_float_division(ctype):
    # Float division rounds differently across backends (XLA:GPU float32 is
    # within 2 ulp); the reference's three kernels must not depend on it.
    features = np.zeros((1, 9, 9, 2), np.float32)
    pooled = np.zeros((3, 3, 4, 2), np.float32)
    rois = np.zeros((3, 5), ctype)
    # The float16 geometry (float16 rois) runs on float32 rois too.
    modes = BINS + ((_checks.FAST_RCNN_BINARY16,) if ctype == np.float32 else ())
    with x64_for(ctype):
        for bins in modes:
            config = dict(pooled=(3, 4), spatial_scale=0.3, layout="NHWC", bins=bins)
            kernels = jax.jit(lambda f, r, c: (reference.forward(f, r, **config),
                                               reference.gather(f, f, r, **config),
                                               reference.scatter(c, f, r, **config)))
            hlo = kernels.lower(features, rois, pooled).as_text()
            divisions = re.findall(r"stablehlo\.divide .*", hlo)
            assert divisions, "no divide at all: the pattern no longer matches StableHLO"
            # Float element types end a tensor type: tensor<f32>, tensor<3x1xf64>.
            assert not [d for d in divisions if re.search(r"[<x]b?f\d+>", d)], divisions


@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_gather_and_scatter_of_copies_match_the_kernels(layout, bins):
    # A gather's source (a scatter's gradient) holding 2 copies of the 2
    # images: batch indices in (-1, 4) truncate to a valid image, as in the
    # forward (-0.5 is image 0); -1, 4 and NaN name none.
    rng = np.random.default_rng(23)
    shape = feature_shape(2, 5, 6, 3, layout)
    features = random_features(rng, shape, np.float32)
    source = random_features(rng, (4,) + shape[1:], np.float32)
    batch = np.array([-0.5, 0, 1.7, 2.2, 3.9, 4, -1, np.nan], np.float32)
    rois = np.concatenate([batch[:, None], np.tile([[0, 1, 4, 3]], (8, 1))], 1).astype(np.float32)
    config = dict(pooled=(2, 3), spatial_scale=1.0, layout=layout, bins=bins, copies=2)
    pooled = jax.eval_shape(lambda s, f, r: _primitives.gather_p.bind(s, f, r, **config),
                            source, features, rois)
    cotangent = random_features(rng, pooled.shape, np.float32)
    for what, primitive, fallback, value in (
            ("gather", _primitives.gather_p, reference.gather, source),
            ("scatter", _primitives.scatter_p, reference.scatter, cotangent)):
        kernel = jax.jit(lambda v, f, r: primitive.bind(v, f, r, **config))(value, features, rois)
        assert np.asarray(kernel).any(), what
        got = jax.jit(lambda v, f, r: fallback(v, f, r, **config))(value, features, rois)
        assert_bitwise(got, kernel, f"pure-JAX {what} of 2 copies")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_indexes_past_int32_elements(layout):
    # The fallback gather and scatter address (cell, channel) per element. With
    # 2**21 cells of 2**11 channels (2**32 elements) a flat int32 element
    # offset would wrap; every index coordinate must still name the right one.
    n, h, w, c = 2, 1024, 1024, 2048
    shape = (n, h, w, c) if layout == "NHWC" else (n, c, h, w)
    cells = np.array([0, 5, h * w - 1, h * w + 7, n * h * w - 1, -1], np.int32)
    channel_axis = 3 if layout == "NHWC" else 1
    argmax = np.repeat(cells.reshape(-1, 1, 1, 1), c, channel_axis)
    got = jax.jit(reference._cell_index, static_argnums=(1, 2))(argmax, shape, layout)
    image, row, col = np.unravel_index(np.maximum(argmax, 0), (n, h, w))
    channel = np.broadcast_to(np.moveaxis(np.arange(c).reshape(c, 1, 1, 1), 0, channel_axis),
                              argmax.shape)
    want = (image, row, col, channel) if layout == "NHWC" else (image, channel, row, col)
    assert len(got) == len(want)
    for k, (g, wanted) in enumerate(zip(got, want)):
        assert_exact(g, wanted, f"index coordinate {k}")
    # The last element addressed lies past int32, where a flat offset wraps.
    assert np.ravel_multi_index(tuple(x.max() for x in want), shape) >= 2**31


# ---------------------------------------------------------------------------
# The seed article example.

@pytest.mark.parametrize("layout", LAYOUTS)
def test_seed_example(layout):
    out, arg = check_case(seed_features(layout), SEED_ROIS, 2, layout=layout, bins="partition")
    assert np.array_equal(as_single_channel(out, layout), SEED_OUT)
    assert np.array_equal(as_single_channel(arg, layout), SEED_ARGMAX)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_seed_example_fast_rcnn(layout):
    check_case(seed_features(layout), SEED_ROIS, 2, layout=layout)


# ---------------------------------------------------------------------------
# Bin geometry read off "probe" features: channels w, -w, h, -h, so a bin's
# output is (end_w - 1, -begin_w, end_h - 1, -begin_h) of its clipped span.

def probe_features(h, w, layout, dtype=np.float32):
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    nhwc = np.stack([ww, -ww, hh, -hh], axis=-1)[None].astype(dtype)
    return nhwc if layout == "NHWC" else nhwc.transpose(0, 3, 1, 2)


def decode_spans(out, arg, layout):
    """Per bin ((row begin, row end), (col begin, col end)) or None (empty), for RoI 0."""
    out, arg = np.asarray(out, np.float64)[0], np.asarray(arg)[0]
    if layout == "NCHW":
        out, arg = out.transpose(1, 2, 0), arg.transpose(1, 2, 0)
    return [[None if arg[i, j, 0] < 0 else
             ((int(-out[i, j, 3]), int(out[i, j, 2]) + 1),
              (int(-out[i, j, 1]), int(out[i, j, 0]) + 1))
             for j in range(out.shape[1])] for i in range(out.shape[0])]


# (x1, x2, spatial_scale, bins, pooled, coordinate dtype, expected spans per bin)
# The same corners are used for y, on a 40x40 map. Hand-computed from the spec.
SPAN_CASES = [
    (0.5, 2.5, 1.0, "fast_rcnn", 1, np.float32, [(1, 4)]),
    (0.49999997, 2.4999998, 1.0, "fast_rcnn", 1, np.float32, [(0, 3)]),
    (8.0, 40.0, 1 / 16, "fast_rcnn", 1, np.float32, [(1, 4)]),  # 0.5 -> 1, 2.5 -> 3
    (24.0, 24.0, 1 / 16, "fast_rcnn", 1, np.float32, [(2, 3)]),  # 1.5 -> 2
    (1.5, 1.5, 1.0, "fast_rcnn", 1, np.float32, [(2, 3)]),
    (3.0, 1.0, 1.0, "fast_rcnn", 1, np.float32, [(3, 4)]),  # inverted: one cell
    (-0.5, 0.5, 1.0, "fast_rcnn", 1, np.float32, [(0, 2)]),  # [-1, 2) clipped
    (-1.5, -0.6, 1.0, "fast_rcnn", 1, np.float32, [None]),  # [-2, 0): outside
    (38.0, 45.0, 1.0, "fast_rcnn", 1, np.float32, [(38, 40)]),
    (0.0, 4.0, 1.0, "fast_rcnn", 2, np.float32, [(0, 3), (2, 5)]),  # 5 cells, bins of 2.5
    (0.0, 1.0, 1.0, "fast_rcnn", 3, np.float32, [(0, 1), (0, 2), (1, 2)]),
    # float32: 11.666666 * 0.3 = 3.5 -> 4 and 14.999999 * 0.3 = 4.5 -> 5; in
    # float64 (or with a float64 product) both round one lower.
    (11.666666030883789, 14.999999046325684, 0.3, "fast_rcnn", 1, np.float32, [(4, 6)]),
    (11.666666030883789, 14.999999046325684, 0.3, "fast_rcnn", 1, np.float64, [(3, 5)]),
    # 4 cells in 28 bins: 21 * (4 / 28) rounds above 3 in float32 only.
    (0.0, 3.0, 1.0, "fast_rcnn", 28, np.float32,
     [(0, 1)] * 7 + [(1, 2)] * 7 + [(2, 3)] * 6 + [(2, 4)] + [(3, 4)] * 7),
    (0.0, 3.0, 1.0, "fast_rcnn", 28, np.float64,
     [(0, 1)] * 7 + [(1, 2)] * 7 + [(2, 3)] * 7 + [(3, 4)] * 7),
    # Far corners, in torchvision's int arithmetic: the length 2^30 + 21 is
    # 2^30 in float32, so the bin ends at cell 0, before the map (float64
    # holds it exactly: cell 21).
    (-(2.0**30), 20.0, 1.0, "fast_rcnn", 1, np.float32, [None]),
    (-(2.0**30), 20.0, 1.0, "fast_rcnn", 1, np.float64, [(0, 21)]),
    (0.0, 2.0**31 - 128, 1.0, "fast_rcnn", 1, np.float32, [(0, 40)]),
    # The last of 25 bins ends at cell 2^31 in float32 (int overflow: the
    # RoI is invalid), at 2^31 - 127 in float64.
    (0.0, 2.0**31 - 128, 1.0, "fast_rcnn", 25, np.float32, [None] * 25),
    (0.0, 2.0**31 - 128, 1.0, "fast_rcnn", 25, np.float64, [(0, 40)] + [None] * 24),
    (-(2.0**31), 20.0, 1.0, "fast_rcnn", 1, np.float64, [None]),  # size 2^31 + 21
    (-(2.0**31) + 128, 20.0, 1.0, "fast_rcnn", 1, np.float64, [(0, 21)]),
    (-(2.0**31), 20.0, 1.0, "partition", 1, np.float64, [None]),  # size 2^31 + 20
    (-(2.0**31) + 128, 20.0, 1.0, "partition", 1, np.float64, [(0, 20)]),
    (-(2.0**31) - 256, 2.0, 1.0, "fast_rcnn", 1, np.float32, [None]),  # corner overflows
    # Halves round away from zero in float64 too (to even would give 0 and 2).
    (0.5, 2.5, 1.0, "fast_rcnn", 1, np.float64, [(1, 4)]),
    (0.5, 2.5, 1.0, "partition", 1, np.float64, [(1, 3)]),
    (0.0, 3.0, 1.0, "partition", 1, np.float32, [(0, 3)]),
    (0.5, 2.5, 1.0, "partition", 1, np.float32, [(1, 3)]),
    (2.0, 2.0, 1.0, "partition", 2, np.float32, [None, None]),  # empty region
    (3.0, 1.0, 1.0, "partition", 1, np.float32, [None]),  # inverted: empty
    (-2.0, 1.0, 1.0, "partition", 2, np.float32, [None, (0, 1)]),  # [-2,-1), [-1,1) clipped
    (38.0, 45.0, 1.0, "partition", 1, np.float32, [(38, 40)]),
    (0.0, 7.0, 1.0, "partition", 3, np.float32, [(0, 2), (2, 4), (4, 7)]),
    # Region narrower than the output: empty sections take the cell at their start.
    (5.0, 6.0, 1.0, "partition", 3, np.float32, [(5, 6)] * 3),
    (5.0, 7.0, 1.0, "partition", 3, np.float32, [(5, 6), (5, 6), (6, 7)]),
    (5.0, 8.0, 1.0, "partition", 5, np.float32, [(5, 6), (5, 6), (6, 7), (6, 7), (7, 8)]),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("x1, x2, scale, bins, pooled, ctype, spans", SPAN_CASES)
def test_bin_spans_by_hand(layout, x1, x2, scale, bins, pooled, ctype, spans):
    features = probe_features(40, 40, layout)
    rois = np.array([[0, x1, x1, x2, x2]], ctype)
    with x64_for(ctype):
        out, arg = check_case(features, rois, pooled, scale, layout=layout, bins=bins)
    expected = [[None if r is None or c is None else (r, c) for c in spans] for r in spans]
    assert decode_spans(out, arg, layout) == expected


def float32_edge_cases(limit=30):
    """(length, pooled) pairs where some fast_rcnn bin edge differs between
    float32 and float64 arithmetic (edges computed as the spec says)."""
    cases = []
    for length in range(2, 90):
        for pooled in range(2, 60):
            b32 = np.float32(length) / np.float32(pooled)
            b64 = np.float64(length) / np.float64(pooled)
            i = np.arange(pooled + 1)
            begin_differs = (np.floor(i[:-1].astype(np.float32) * b32)
                             != np.floor(i[:-1] * b64)).any()
            end_differs = (np.ceil(i[1:].astype(np.float32) * b32) != np.ceil(i[1:] * b64)).any()
            if begin_differs or end_differs:
                cases.append((length, pooled))
    return cases[::max(1, len(cases) // limit)][:limit]


@pytest.mark.parametrize("ctype", [np.float32, np.float64], ids=dtype_id)
def test_float32_bin_edge_cases(ctype):
    cases = float32_edge_cases()
    assert len(cases) >= 20
    features = probe_features(100, 100, "NHWC")
    with x64_for(ctype):
        for length, pooled in cases:
            # Region [3, 3 + length) on both axes; the map is wide enough that
            # an edge one cell too far is visible rather than clipped.
            rois = np.array([[0, 3, 3, 3 + length - 1, 3 + length - 1]], ctype)
            out, arg = check_case(features, rois, (pooled, pooled))
            spans = decode_spans(out, arg, "NHWC")
            want = reference_loop.axis_spans(ctype(3), ctype(2 + length), pooled, 100,
                                             "fast_rcnn", ctype)
            assert [s[1] for s in spans[0]] == want


# ---------------------------------------------------------------------------
# Random cases: every dtype x layout x bins x spatial scale.

@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("bins", BINS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_random_grid(dtype, layout, bins, scale):
    rng = np.random.default_rng(zlib.crc32(f"{dtype_id(dtype)}-{layout}-{bins}-{scale}".encode()))
    n, h, w, c = int(rng.integers(1, 4)), int(rng.integers(1, 17)), int(rng.integers(1, 23)), \
        int(rng.integers(1, 9))
    kind = ("normal", "ties", "distinct")[int(rng.integers(0, 3 if n * h * w * c <= 1000 else 2))]
    features = random_features(rng, feature_shape(n, h, w, c, layout), dtype, kind)
    rois = np.concatenate([random_rois(rng, n, h, w, 24, scale), adversarial_rois(n, h, w, scale)])
    pooled = (int(rng.integers(1, 8)), int(rng.integers(1, 8)))
    with x64_for(dtype):
        check_case(features, rois, pooled, scale, layout=layout, bins=bins)


@st.composite
def cases(draw):
    layout = draw(st.sampled_from(LAYOUTS))
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 25)), draw(st.integers(1, 25))
    c = draw(st.sampled_from([1, 2, 3, 8, 17, 70]))
    pooled = draw(st.one_of(st.integers(1, 8),
                            st.tuples(st.integers(1, 20), st.integers(1, 13))))
    return dict(layout=layout, n=n, h=h, w=w, c=c, pooled=pooled,
                r=draw(st.integers(1, 12)), scale=draw(st.sampled_from(SCALES)),
                bins=draw(st.sampled_from(BINS)),
                kind=draw(st.sampled_from(["normal", "ties"])),
                seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=100)
@given(cases())
def test_random_hypothesis(case):
    rng = np.random.default_rng(case["seed"])
    shape = feature_shape(case["n"], case["h"], case["w"], case["c"], case["layout"])
    features = random_features(rng, shape, np.float32, case["kind"])
    rois = random_rois(rng, case["n"], case["h"], case["w"], case["r"], case["scale"])
    check_case(features, rois, case["pooled"], case["scale"], layout=case["layout"],
               bins=case["bins"])


@pytest.mark.parametrize("rois_dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bins", BINS)
def test_rois_dtypes(rois_dtype, bins):
    # float64 rois use float64 geometry, float16 rois float16 arithmetic
    # (fast_rcnn), the others float32.
    rng = np.random.default_rng(7)
    features = random_features(rng, (2, 13, 19, 3), np.float32)
    rois = random_rois(rng, 2, 13, 19, 30, 0.3, dtype=rois_dtype)
    with x64_for(rois_dtype):
        check_case(features, rois, (3, 5), 0.3, bins=bins)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_float16_rois_take_float16_geometry(dtype, layout):
    # torchvision computes float16 rois' scaled corners, bin sizes and edges
    # in float16 (each operation rounded to it): so does bins="fast_rcnn"
    # here, which moves some bins against the same rois upcast to float32.
    rng = np.random.default_rng(17)
    n, h, w = 2, 40, 47
    features = random_features(rng, feature_shape(n, h, w, 3, layout), dtype, "ties")
    moved = 0
    for scale, pooled in ((0.3, (7, 7)), (1 / 16, (5, 11)), (2.5, (13, 3))):
        with np.errstate(over="ignore"):  # huge adversarial coordinates become inf
            rois = np.concatenate([random_rois(rng, n, h, w, 200, scale),
                                   adversarial_rois(n, h, w, scale)]).astype(np.float16)
        with x64_for(dtype):
            _, arg = check_case(features, rois, pooled, scale, layout=layout)
            _, upcast = jrp.roi_pool_with_argmax(features, rois.astype(np.float32), pooled,
                                                 scale, layout=layout)
        moved += int((arg != np.asarray(upcast)).any(axis=tuple(range(1, arg.ndim))).sum())
    assert moved > 0


def test_float16_rois_round_the_region_length():
    # torchvision converts the int length to float16 before dividing: 2049
    # cells become 2048, and 2048 / 3 rounds to 682.5, so bin 1 starts at
    # cell 682 (at 683 from the exact length): torchvision 0.29.1 gives the same.
    features = probe_features(1, 700, "NHWC")
    rois = np.array([[0, 0, 0, 2048, 0]], np.float16)
    out, arg = check_case(features, rois, (1, 3))
    columns = [span and span[1] for span in decode_spans(out, arg, "NHWC")[0]]
    assert columns == [(0, 683), (682, 700), None]


def test_float16_rois_scale_rounds_through_float32():
    # torchvision's float16 kernels take the double scale as float, then
    # float16: 1 + 2**-11 + 2**-30 becomes 1 + 2**-11 in float32, then 1 in
    # float16 (ties to even), not 1 + 2**-10 as from the double directly. So
    # x1 = 512 scales to 512 and the bin starts at the maximum in column 512;
    # torchvision 0.29.1 gives the same.
    features = np.zeros((1, 1, 600, 1), np.float16)
    features[0, 0, 512] = 5
    rois = np.array([[0, 512, 0, 520, 0]], np.float16)
    out, arg = check_case(features, rois, 1, 1 + 2**-11 + 2**-30)
    assert out.ravel().tolist() == [5] and arg.ravel().tolist() == [512]


def test_float16_rois_where_float16_overflows():
    # Where torchvision's float16 arithmetic overflows (its result is then
    # undefined): a scaled corner from 65520 on makes the RoI invalid; a
    # length or a bin end from 65520 on makes bins empty. Output sizes from
    # 65520 on give bin size 0 (empty bins), as there.
    features = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6, 1)
    rois = np.array([[0, -40000, -40000, 40000, 40000],  # length 80001: every bin empty
                     [1, -65472, 0, 33, 4],  # length 65506: the last of 3 bins ends at inf
                     [1, 0, 0, 33024, 4],  # at scale 2, x2 overflows: invalid
                     [0, 3, 3, 3, 3]], np.float16)  # one cell
    out, _ = check_case(features, rois, (2, 3), 1.0)
    assert (out[:2] == 0).all() and (out[3] == features[0, 3, 3, 0]).all()
    out, _ = check_case(features, rois[2:3], (2, 3), 2.0)
    assert (out == 0).all()
    # In float32 the last bin of the second RoI covers the map, and the third
    # RoI is valid at scale 2 (as it would be, clamped to 65504, in float16).
    assert (np.asarray(jrp.roi_pool(features, rois[1:2].astype(np.float32), (2, 3)))
            [0, :, 2] > 30).all()
    assert (np.asarray(jrp.roi_pool(features, rois[2:3].astype(np.float32), (2, 3), 2.0))
            [0, :, 0] > 30).all()
    # 1/20000 is a float16 subnormal bin size (rounded up: the last bins,
    # whose edges round to the region's end, are empty); 65530 bins take bin
    # size 0.
    out, _ = check_case(features, rois[3:], (1, 20000), 1.0)
    assert out[0, 0, 0, 0] == features[0, 3, 3, 0] and set(np.unique(out)) == {0, 21}
    out, arg = check_case(features, rois[3:], (1, 65530), 1.0)
    assert (arg == -1).all()
    # A bin ending at 65504, the largest float16, is finite: it covers the map.
    out, _ = check_case(features, np.array([[0, 0, 0, 65504, 4]], np.float16), 1, 1.0)
    assert out[0, 0, 0, 0] == features[0].max()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_output_larger_than_roi(layout):
    rng = np.random.default_rng(3)
    features = random_features(rng, feature_shape(1, 9, 11, 5, layout), np.float32, "ties")
    rois = np.array([[0, 2, 2, 3, 4], [0, 5, 1, 5, 1], [0, 0, 0, 10, 8]], np.float32)
    for bins in BINS:
        check_case(features, rois, (20, 13), layout=layout, bins=bins)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pooled", [1, (2, 3)])
def test_zero_rois(layout, pooled):
    features = np.ones(feature_shape(2, 5, 6, 3, layout), np.float32)
    rois = np.zeros((0, 5), np.float32)
    out, arg = check_case(features, rois, pooled, layout=layout)
    ph, pw = (pooled, pooled) if isinstance(pooled, int) else pooled
    assert out.shape == feature_shape(0, ph, pw, 3, layout)
    jitted = jax.jit(lambda f, r: jrp.roi_pool(f, r, pooled, layout=layout))(features, rois)
    assert jitted.shape == out.shape


def test_constant_features_pick_first_cell():
    features = np.full((1, 6, 7, 2), 1.5, np.float32)
    rois = np.array([[0, 1, 2, 5, 5]], np.float32)
    out, arg = check_case(features, rois, 2)
    # Every bin's argmax is its top-left cell.
    assert np.array_equal(arg[0, :, :, 0], [[2 * 7 + 1, 2 * 7 + 3], [4 * 7 + 1, 4 * 7 + 3]])


@pytest.mark.parametrize("bins", BINS)
def test_many_rois(bins):
    rng = np.random.default_rng(11)
    features = random_features(rng, (3, 24, 31, 6), np.float32)
    rois = random_rois(rng, 3, 24, 31, 1500, 0.5)
    check_case(features, rois, 5, 0.5, bins=bins)


def test_stress_5000_rois_512_channels():
    rng = np.random.default_rng(2024)
    features = random_features(rng, (2, 38, 50, 512), np.float32)
    rois = random_rois(rng, 2, 38, 50, 5000, 1 / 16)
    out, arg = check_case(features, rois, 7, 1 / 16, jax_reference=False)
    assert out.shape == (5000, 7, 7, 512)
    assert (arg >= 0).mean() > 0.5  # most bins are non-empty: the test has teeth


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=dtype_id)
def test_16bit_features_keep_dtype_and_values(dtype):
    rng = np.random.default_rng(5)
    features = random_features(rng, (1, 10, 10, 4), dtype)
    rois = np.array([[0, 0, 0, 9, 9], [0, 2.5, 1.5, 7.5, 8.5]], np.float32)
    out, _ = check_case(features, rois, 3)
    assert out.dtype == dtype
    # Every non-empty output is a value of the map (no rounding on the way).
    assert np.isin(out.astype(np.float64), features.astype(np.float64)).all()


def test_float64_features():
    rng = np.random.default_rng(9)
    features = random_features(rng, (2, 12, 9, 3), np.float64)
    rois = random_rois(rng, 2, 12, 9, 40, 0.5, dtype=np.float64)
    with jax.enable_x64(True):
        out, _ = check_case(features, rois, (4, 3), 0.5)
        assert out.dtype == np.float64
    assert jnp.zeros(()).dtype == jnp.float32  # x64 is off again outside the block


@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_image_boxes_equal_flat_rois(layout):
    # [N, K, 4] boxes are the flat [N*K, 5] rois with batch indices 0..N-1.
    rng = np.random.default_rng(12)
    features = random_features(rng, feature_shape(3, 10, 12, 4, layout), np.float32)
    boxes = random_rois(rng, 3, 10, 12, 15, 0.5, adversarial=False)[:, 1:].reshape(3, 5, 4)
    flat = np.concatenate([np.repeat(np.arange(3.0), 5)[:, None], boxes.reshape(15, 4)], 1)
    want_out, want_arg = reference_loop.roi_pool_loop(features, flat, (2, 3), 0.5, layout=layout)
    out, arg = jrp.roi_pool_with_argmax(features, boxes, (2, 3), 0.5, layout=layout)
    assert out.shape == (3, 5) + want_out.shape[1:]
    assert_exact(out, want_out.reshape(out.shape))
    assert_exact(arg, want_arg.reshape(arg.shape))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=dtype_id)
def test_subnormal_values_are_ordered(dtype, layout):
    # XLA's CPU runtime flushes denormals to zero; the kernels must not, or
    # all subnormals compare equal and the first cell wins.
    tiny = np.finfo(dtype).smallest_subnormal
    values = (np.array([1, 3, 2, 0]) * tiny).astype(dtype)
    features = values.reshape(1, 2, 2, 1)
    if layout == "NCHW":
        features = features.transpose(0, 3, 1, 2)
    rois = np.array([[0, 0, 0, 1, 1]], dtype)
    with x64_for(dtype):
        out, argmax = jrp.roi_pool_with_argmax(features, rois, 1, layout=layout)
        grad = jax.grad(lambda f: jrp.roi_pool(f, rois, 1, layout=layout).sum())(features)
    assert np.asarray(out).item() == 3 * tiny and np.asarray(argmax).item() == 1
    np.testing.assert_array_equal(np.asarray(grad).reshape(-1), [0, 1, 0, 0])
