"""Shared helpers for the jax_roipool tests (imported as ``from conftest import ...``)."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil

# Before jax starts: several processes (xdist workers) may share one GPU,
# and each would otherwise take 75% of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import hypothesis  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import reference_loop  # noqa: E402
from jax_roipool import _native  # noqa: E402

# Tests run on the CPU (the native CPU kernels) unless they place their
# arrays on a GPU themselves, as test_gpu.py does: on a machine with a GPU,
# jax would otherwise run every test there.
jax.config.update("jax_default_device", jax.devices("cpu")[0])


def gpu_devices() -> list:
    """jax's GPUs; none where jax has no GPU backend at all."""
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


# The host C++ compiler for the tests that build small programs ($CXX, c++ or g++).
HOST_CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")

hypothesis.settings.register_profile(
    "roipool", derandomize=True, deadline=None, max_examples=40, print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow,
                           hypothesis.HealthCheck.data_too_large])

LAYOUTS = ("NHWC", "NCHW")
BINS = ("fast_rcnn", "partition")
DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)
SCALES = (1.0, 0.5, 1.0 / 16, 0.3)


def settings(max_examples: int):
    """Reproducible hypothesis settings with a bounded number of examples."""
    return hypothesis.settings(hypothesis.settings.get_profile("roipool"),
                               max_examples=max_examples)


def x64_for(*dtypes):
    """Enables x64 while the block runs if any dtype is float64 (x64 is off otherwise)."""
    if any(np.dtype(d) == np.float64 for d in dtypes):
        return jax.enable_x64(True)
    return contextlib.nullcontext()


def dtype_id(dtype) -> str:
    return np.dtype(dtype).name


def feature_shape(n, h, w, c, layout):
    return (n, h, w, c) if layout == "NHWC" else (n, c, h, w)


def random_features(rng, shape, dtype, kind="normal"):
    """Feature map (numpy array of `dtype`).

    kind: "normal" (random, some natural ties in 16-bit dtypes), "ties"
    (small integers: many ties), "distinct" (all values distinct in `dtype`).
    """
    size = int(np.prod(shape))
    if kind == "normal":
        values = rng.standard_normal(size) * 3
    elif kind == "ties":
        values = rng.integers(-2, 3, size).astype(np.float64)
    elif kind == "distinct":
        # Distinct after rounding to `dtype`: unique draws, shuffled.
        pool = np.unique(rng.standard_normal(4 * size + 64).astype(dtype).astype(np.float64))
        assert pool.size >= size, "too many cells for distinct values in this dtype"
        values = rng.permutation(pool)[:size]
    else:
        raise ValueError(kind)
    return values.reshape(shape).astype(dtype)


def every_16bit_value(dtype, layout):
    """A 4x4 map of 4096 channels that holds every bit pattern of a 16-bit
    type (NaN payloads and signalling NaNs too), in order, as features of the
    given layout. In NCHW the CPU kernels' layout transposes move it in whole
    4x4 blocks (SSE registers on x86)."""
    values = np.arange(2**16, dtype=np.uint16).view(dtype)
    return values.reshape((1, 4, 4, -1) if layout == "NHWC" else (1, -1, 4, 4))


def random_rois(rng, n, h, w, r, spatial_scale=1.0, *, dtype=np.float32, adversarial=True):
    """[r, 5] rois in image coordinates for an [n, h, w] map at `spatial_scale`.

    With `adversarial`, mixes in boxes partly/completely outside the map,
    inverted, zero-size, tiny, at .5 boundaries and with fractional or invalid
    batch indices.
    """
    img_h, img_w = h / spatial_scale, w / spatial_scale
    kinds = ("inside", "partial", "outside", "inverted", "zero", "half", "tiny", "whole",
             "fractional_batch", "invalid_batch") if adversarial else ("inside",)
    weights = np.array([8, 3, 1, 1, 1, 2, 2, 1, 1, 1][:len(kinds)], np.float64)
    rows = []
    for kind in rng.choice(kinds, size=r, p=weights / weights.sum()):
        b = float(rng.integers(0, n))
        x1, x2 = np.sort(rng.uniform(0, img_w, 2))
        y1, y2 = np.sort(rng.uniform(0, img_h, 2))
        if kind == "partial":
            x1, y1 = x1 - img_w / 2, y1 - img_h / 2
            x2, y2 = x2 + img_w / 3, y2 + img_h / 3
        elif kind == "outside":
            shift = rng.choice([-2.0, 2.0]) * (img_w + img_h)
            x1, x2, y1, y2 = x1 + shift, x2 + shift, y1 - shift, y2 - shift
        elif kind == "inverted":
            x1, x2, y1, y2 = x2, x1, y2, y1
        elif kind == "zero":
            if rng.random() < 0.5:
                x2 = x1
            else:
                y2 = y1
        elif kind == "half":
            # Scaled corners at k + 0.5 (or one float step away).
            cells = rng.integers(-1, max(h, w) + 1, 4) + 0.5
            step = rng.choice([-1, 0, 1], 4)
            cells = np.array([np.nextafter(np.float32(v), np.float32(v + s)) if s else v
                              for v, s in zip(cells, step)], np.float64)
            x1, y1, x2, y2 = cells / spatial_scale
        elif kind == "tiny":
            x2, y2 = x1 + rng.uniform(0, 2) / spatial_scale, y1 + rng.uniform(0, 2) / spatial_scale
        elif kind == "whole":
            x1, y1, x2, y2 = 0.0, 0.0, img_w - 1, img_h - 1
        elif kind == "fractional_batch":
            b = float(rng.choice([0.7, -0.5, n - 0.25]))
        elif kind == "invalid_batch":
            b = float(rng.choice([-1.0, n, n + 0.5, -3.0]))
        rows.append((b, x1, y1, x2, y2))
    return np.asarray(rows, np.float64).reshape(r, 5).astype(dtype)


def to_float64(x) -> np.ndarray:
    return reference_loop.to_float64(x)


def assert_exact(actual, expected, what="values"):
    """Exact equality (NaN == NaN) of an array of any supported dtype with float64/int data."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    a = to_float64(actual) if actual.dtype.kind == "f" or actual.dtype == jnp.bfloat16 else actual
    if np.array_equal(a, expected, equal_nan=a.dtype.kind == "f"):
        return
    same = a == expected
    if a.dtype.kind == "f":
        same |= np.isnan(a) & np.isnan(expected)
    bad = np.argwhere(~same)
    first = tuple(bad[0])
    raise AssertionError(f"{what}: {len(bad)} of {a.size} elements differ; first at {first}: "
                         f"got {a[first]!r}, expected {expected[first]!r}")


@functools.lru_cache(maxsize=None)
def jitted_reference(output_size, spatial_scale, layout, bins):
    """jax_roipool.reference.roi_pool_with_argmax, jitted for one static configuration."""
    import jax_roipool.reference as ref

    return jax.jit(functools.partial(ref.roi_pool_with_argmax, output_size=output_size,
                                     spatial_scale=spatial_scale, layout=layout, bins=bins))


def check_case(features, rois, output_size, spatial_scale=1.0, *, layout="NHWC",
               bins="fast_rcnn", jax_reference=True):
    """Native roi_pool_with_argmax == loop reference (and == jax reference), exactly.

    Returns the native (out, argmax) as numpy arrays.
    """
    import jax_roipool as jrp

    features = np.asarray(features)
    rois = np.asarray(rois)
    with x64_for(features.dtype, rois.dtype):
        out, arg = jrp.roi_pool_with_argmax(features, rois, output_size, spatial_scale,
                                            layout=layout, bins=bins)
        assert out.dtype == features.dtype, (out.dtype, features.dtype)
        assert arg.dtype == jnp.int32
        out, arg = np.asarray(out), np.asarray(arg)
        want_out, want_arg = reference_loop.roi_pool_loop(
            features, rois, output_size, spatial_scale, layout=layout, bins=bins)
        assert_exact(out, want_out, "output vs loop reference")
        assert_exact(arg, want_arg, "argmax vs loop reference")
        # The single-value entry point returns the same output.
        assert_exact(jrp.roi_pool(features, rois, output_size, spatial_scale, layout=layout,
                                  bins=bins), want_out, "roi_pool vs loop reference")
        if jax_reference:
            ref_out, ref_arg = jitted_reference(output_size, spatial_scale, layout, bins)(
                features, rois)
            assert_exact(ref_out, want_out, "jax reference output vs loop reference")
            assert_exact(ref_arg, want_arg, "jax reference argmax vs loop reference")
    return out, arg


def assert_bitwise(got, want, what):
    """Same bits, except that any NaN matches any NaN."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if got.dtype.kind == "i":
        assert_exact(got, want, what)
        return
    bits = np.dtype(f"u{got.dtype.itemsize}")
    g64, w64 = got.astype(np.float64), want.astype(np.float64)
    assert np.array_equal(np.isnan(g64), np.isnan(w64)), f"{what}: NaN positions differ"
    keep = ~np.isnan(g64)
    assert np.array_equal(got.view(bits)[keep], want.view(bits)[keep]), \
        f"{what}: {np.sum(got.view(bits)[keep] != want.view(bits)[keep])} elements differ"


def hand_written_call(name, results, *operands, **attrs):
    """A kernel called directly by its custom-call target (on the CPU), the
    operands given in the order given, and waited for (a kernel's error comes
    with its results): 2x2 NHWC fast_rcnn bins, except for the raw attribute
    values in ``attrs``. An operand may be a function that makes it inside
    the call."""
    call = jax.ffi.ffi_call(name, results)
    attrs = {**_native._pool_attrs((2, 2), 1.0, "NHWC", "fast_rcnn"), **attrs}

    def run(*arrays):
        given = iter(arrays)
        return call(*(op() if callable(op) else next(given) for op in operands), **attrs)

    return jax.block_until_ready(jax.jit(run)(*(op for op in operands if not callable(op))))


def adversarial_rois(n, h, w, spatial_scale=1.0, dtype=np.float32):
    """Fixed hard cases: invalid batch indices, non-finite and huge coordinates,
    far corners whose geometry just fits int32 (or not), corners at .5
    boundaries, inverted, empty and whole-map boxes."""
    s = 1.0 / spatial_scale
    fin = np.finfo(np.float32).max
    rows = [
        [0, 0, 0, (w - 1) * s, (h - 1) * s],
        [n - 1, -1e30, -1e30, 1e30, 1e30],
        [0, 1e30, 1e30, -1e30, -1e30],
        [0, -3e9, 2 * s, 3e9, 3 * s],
        [n - 1, -1e9 * s, 0, 5e8 * s, h * s],
        [0, 0, 1 * s, (2.0**31 - 300) * s, 3 * s],
        [0, 2 * s, 0, -(2.0**31 - 200) * s, h * s],
        [0, fin, 0, fin, h * s],
        [-1, 0, 0, w * s, h * s],
        [n, 0, 0, w * s, h * s],
        [n - 0.5, 0, 0, w * s, h * s],
        [np.nan, 0, 0, w * s, h * s],
        [-0.5, 0.5 * s, 1.5 * s, 2.5 * s, 3.5 * s],
        [0, np.nan, 0, 3 * s, 3 * s],
        [0, 0, np.inf, 3 * s, 3 * s],
        [0, 0, 0, -np.inf, 3 * s],
        [0, 0.49999997 * s, 0.5 * s, 2.4999998 * s, 2.5 * s],
        [0, 5 * s, 5 * s, 1 * s, 1 * s],
        [0, 2 * s, 2 * s, 2 * s, 2 * s],
        [0, -5 * s, -5 * s, -1 * s, -1 * s],
        [0, (w + 2) * s, (h + 2) * s, (w + 9) * s, (h + 9) * s],
        [n - 1, -2.5 * s, -2.5 * s, (w + 1.5) * s, (h + 1.5) * s],
    ]
    with np.errstate(over="ignore"):
        return np.asarray(rows, np.float64).astype(dtype)


def all_ops_case(rng, dtype, layout, bins, n, h, w, c, r, pooled, spatial_scale):
    """(fn, args) exercising every kernel: fn(features, rois, tangent,
    cotangent) gives roi_pool's output, JVP (gather), gradient (scatter) and
    argmax. The features hold many ties; the rois are random and adversarial,
    shuffled (in no order of their images); the cotangent holds small
    integers, so the gradient's sums are exact in any order."""
    import jax_roipool as jrp

    features = random_features(rng, feature_shape(n, h, w, c, layout), dtype, "ties")
    rois_dtype = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    rois = np.concatenate([random_rois(rng, n, h, w, r, spatial_scale),
                           adversarial_rois(n, h, w, spatial_scale)]).astype(rois_dtype)
    rois = rois[rng.permutation(len(rois))]
    tangent = random_features(rng, features.shape, dtype)
    cot = rng.integers(-2, 3, feature_shape(len(rois), *pooled, c, layout)).astype(dtype)
    config = dict(output_size=pooled, spatial_scale=spatial_scale, layout=layout, bins=bins)

    def fn(f, r, t, ct):
        pool = functools.partial(jrp.roi_pool, rois=r, **config)
        out, pullback = jax.vjp(pool, f)
        return (out, jax.jvp(pool, (f,), (t,))[1], pullback(ct)[0],
                jrp.roi_pool_with_argmax(f, r, **config)[1])

    return fn, (features, rois, tangent, cot)


def assert_reference_quotient_is_exact(ctype, device):
    """The jax reference's bin size (length / pooled, without float division)
    on `device` equals IEEE division, as the kernels': small lengths
    exhaustively, large ones at random and at the extremes (up to 2^31 - 1,
    above float32's 2^24 integers, and from 2^31 - 64 on, where float32
    rounds the length to 2^31), pooled sizes up to 65535."""
    from jax_roipool import reference

    rng = np.random.default_rng(11)
    lengths = np.concatenate([np.arange(1, 300), rng.integers(1, 2**31, 500),
                              rng.integers(2**23, 2**25, 300), rng.integers(2**31 - 200, 2**31, 40),
                              [2**24 - 1, 2**24 + 1, 2**24 + 3, 2**29, 2**29 + 1,
                               2**31 - 65, 2**31 - 64, 2**31 - 1]])
    lengths = lengths.astype(np.int32)
    pooled_sizes = [*range(1, 24), 255, 256, 4097, 32768, 65534, 65535,
                    *(int(p) for p in rng.integers(1, 65536, 6))]
    with x64_for(ctype):
        on_device = jax.device_put(lengths, device)
        for pooled in pooled_sizes:
            got = jax.jit(lambda n, p=pooled: reference._rounded_quotient(n, p, ctype))(on_device)
            assert got.devices() == {device}
            want = lengths.astype(ctype) / ctype(pooled)  # IEEE division, as the kernels
            assert_exact(np.asarray(got), want, f"length / {pooled} in {dtype_id(ctype)}")
